"""Process group setup and the few collectives the trainers need.

One program for every launch: under ``torchrun`` (RANK/WORLD_SIZE set) each process joins the
group torchrun describes; run as plain ``python`` it forms a world of one, so the same FSDP code
path runs everywhere. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("train")


def init(timeout_minutes: float = 30, init_method: str | None = None, rank: int | None = None,
         world_size: int | None = None) -> torch.device:
    """Join (or form) the process group and return this rank's device."""
    if dist.is_initialized():
        return device()
    die_with_launcher()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    kwargs = dict(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                  timeout=datetime.timedelta(minutes=timeout_minutes))
    if init_method is None and "MASTER_ADDR" not in os.environ:
        assert world_size == 1, "a multi-process run needs torchrun (or MASTER_ADDR/MASTER_PORT)"
        kwargs["store"] = dist.HashStore()
    else:
        kwargs["init_method"] = init_method or "env://"
    if cuda:
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(**kwargs)
    return device()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher():
    """Under torchrun, end this rank the moment torchrun ends. torchrun starts every rank in a
    session of its own, so a SIGKILL of torchrun (kill -9 of the job's process group, the OOM
    killer) used to leave the ranks running on, writing checkpoints into a run_dir that a
    relaunched job may already be using. The rank writes nothing more: checkpoints are atomic, so
    the run resumes from the last complete one. Linux: the kernel's parent-death signal; elsewhere
    a thread that watches the parent pid."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # a world of one started from a shell: its parent's death is no reason to stop
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError):
        threading.Thread(target=_exit_when_orphaned, args=(launcher,), daemon=True, name="launcher-watch").start()
    if launcher == 1 or os.getppid() != launcher:  # it died before the signal was armed
        _exit_orphaned()


def _exit_when_orphaned(launcher: int):
    while os.getppid() == launcher:
        time.sleep(1)
    _exit_orphaned()


def _exit_orphaned():
    print(f"[rank {os.environ.get('RANK', '?')}] torchrun is gone: exiting", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGKILL)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def close(group_intact: bool = True):
    """Leave the group. After a peer died the barrier would only fail again (gloo) or wait for the
    dead rank until the timeout (NCCL), so a broken group is left without it."""
    if dist.is_initialized():
        if group_intact:
            dist.barrier()  # without it gloo sometimes aborts at exit ("terminate called without an active exception")
        dist.destroy_process_group()


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed, which in a run that worked so far means another
    rank died or stopped answering. NCCL and the store raise DistError; gloo's transport errors
    (connection reset or closed by the peer, receive timeout) arrive as plain RuntimeErrors."""
    if world() == 1 and LAUNCH_RANK is None:
        return False
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


def barrier():
    if dist.is_initialized():
        dist.barrier()


def first_failure(failure: str | None) -> str | None:
    """Collective: the first rank's (lowest rank's) non-None ``failure``, the same on every rank,
    or None if no rank failed: so that a step that failed on one rank (a write that hit a full
    disk) stops every rank at the same point, with one message, instead of leaving the others in
    the next collective."""
    if world() == 1:
        return failure
    found = [None] * world()
    dist.all_gather_object(found, failure)
    return next((f for f in found if f is not None), None)


def from_main(value):
    """Collective: rank 0's ``value`` on every rank (what it alone may decide, as holding a lock)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mesh(shard_ranks: int | None = None):
    """The device mesh FSDP2 shards every model over: all ranks (``shard_ranks`` null or the world),
    or HSDP's two dimensions, world / ``shard_ranks`` replicas of a model sharded over
    ``shard_ranks`` ranks each: gradients are reduce-scattered within a replica and all-reduced
    across them. ``shard_ranks=1`` is data parallelism: every rank holds the whole model and the
    only collective is one all-reduce of the gradients per update."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_ranks in (None, world()):
        return init_device_mesh(device().type, (world(),))
    return init_device_mesh(device().type, (world() // shard_ranks, shard_ranks), mesh_dim_names=("replicate", "shard"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the run's logs, metrics, checkpoints' state and exports: rank 0
    of the trainer ranks (in the split layout a sampler rank never is)."""
    return ROLE == "trainer" and rank() == 0


def all_sum(values: list[float], dev: torch.device) -> list[float]:
    """Sum a list of numbers over ranks, in float64 so counts stay exact."""
    return _all_reduce(values, dev, dist.ReduceOp.SUM)


def all_max(values: list[float], dev: torch.device) -> list[float]:
    """The largest of each number over ranks."""
    return _all_reduce(values, dev, dist.ReduceOp.MAX)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Collective: ``t`` summed over ranks, in place, left on its device (no host sync)."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce(values: list[float], dev: torch.device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    if world() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


# --- a list spread over the ranks ------------------------------------------------------------
# Algorithm code never calls torch.distributed: a list every rank holds (a batch, a rollout, eval
# prompts) is split with ``share``, worked on with ``lockstep`` when the work runs FSDP forwards,
# and put back together with ``gather``.

def share(items):
    """This rank's contiguous part of ``items`` (the same list on every rank): rank r gets
    ``items[n*r//W : n*(r+1)//W]``, so the parts differ by at most one and, concatenated in rank
    order, are ``items`` again (``gather`` undoes ``share``)."""
    n, r, w = len(items), rank(), world()
    return items[n * r // w : n * (r + 1) // w]


def gather(mine: list) -> list:
    """Collective: every rank's list, concatenated in rank order, on every rank."""
    if world() == 1:
        return list(mine)
    parts = [None] * world()
    dist.all_gather_object(parts, mine)
    return [x for part in parts for x in part]


def lockstep(fn, items: list, batch_size: int, stand_in, frozen=()) -> list:
    """Collective: ``fn(chunk)`` (one result per item of the chunk) over this rank's ``items`` in
    chunks of ``batch_size``, in as many calls on every rank. FSDP gathers each layer's weights from
    all ranks in a forward, so a rank with fewer chunks than another still calls ``fn``, on
    ``[stand_in]`` (an item of any rank), and drops its result. A frozen model's root stays
    gathered after a forward without backward: ``frozen`` models are resharded at the end."""
    n_calls = int(all_max([math.ceil(len(items) / batch_size)], device())[0])
    out = []
    for k in range(n_calls):
        chunk = items[k * batch_size : (k + 1) * batch_size]
        out += list(fn(chunk or [stand_in]))[: len(chunk)]
    for model in frozen:
        reshard(model)
    return out


def reshard(model):
    """Free FSDP2's unsharded parameters: after a forward without backward (e.g. generation) the
    root keeps its parameters (embeddings, final norm) unsharded, as plain tensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def report_user_error(exc: BaseException):
    """One line, once (rank 0), on stderr and in the log file (train.log): ``error: <what and
    where>: <fix>``; for bad input, where a traceback would bury the message."""
    if not is_main():
        return
    line = f"error: {exc}".replace("\n", " ")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(line + "\n")
            handler.flush()
    print(line, file=sys.stderr, flush=True)


def setup_logging(log_file: str | None = None, debug: bool = False):
    """Rank 0 logs the run's INFO lines to stdout (and ``log_file``); other ranks only warnings,
    tagged with their rank. Libraries' INFO lines ("Model weights successfully saved to <tmp>!"
    per export, ...) only with ``debug``."""
    fmt = "%(asctime)s %(message)s" if is_main() else f"[rank {rank()}] %(asctime)s %(levelname)s %(message)s"
    handlers = [logging.StreamHandler(sys.stdout if is_main() else sys.stderr)]
    if log_file and is_main():
        handlers.append(logging.FileHandler(log_file))
    ours = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=ours if debug else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    log.setLevel(ours)


# --- the split layout: trainer ranks and sampler ranks in one launch -----------------------------

ROLE = "trainer"  # this process's part of the launch: "trainer", or "sampler" (rollout.sampler_ranks)
LAUNCH_RANK = None  # its rank in the launch once split (None: not split; rank() is the launch's)
LAUNCH_WORLD = None  # the launch's ranks once split
LINK = None  # trainer rank 0's and the sampler ranks' Link once split


class SyncTimeout(RuntimeError):
    """A transfer between the trainer ranks and the sampler ranks that did not finish in time."""


def split(sampler_ranks: int, sync_timeout_s: float, timeout_minutes: float):
    """Collective over the whole launch: its last ``sampler_ranks`` ranks become sampler ranks, the
    others trainer ranks, and each part gets a default process group of its own in place of the
    launch's. So everything written for "every rank" (FSDP's mesh, checkpoints, metrics, the
    samplers' vLLM, which joins the world it finds) runs over its own part unchanged. ``LINK`` is
    then the ``Link`` between trainer rank 0 and the sampler ranks on those ranks (None on the
    other trainer ranks). ``RANK``/``WORLD_SIZE`` are set to the part's, as vLLM reads them."""
    global ROLE, LAUNCH_RANK, LAUNCH_WORLD, LINK
    launch_rank, launch_world = dist.get_rank(), dist.get_world_size()
    trainers = launch_world - sampler_ranks
    store, backend = dist.distributed_c10d._get_default_store(), dist.get_backend()
    dist.barrier()  # no rank still uses the launch's group when it goes (the store outlives it)
    dist.destroy_process_group()
    ROLE = "sampler" if launch_rank >= trainers else "trainer"
    LAUNCH_RANK, LAUNCH_WORLD = launch_rank, launch_world
    part_rank, part_world = (launch_rank - trainers, sampler_ranks) if ROLE == "sampler" else (launch_rank, trainers)
    kwargs = dict(backend=backend, store=dist.PrefixStore(f"part/{ROLE}", store), rank=part_rank,
                  world_size=part_world, timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(**kwargs)
    os.environ.update(RANK=str(part_rank), WORLD_SIZE=str(part_world))
    if ROLE == "sampler" or part_rank == 0:
        LINK = Link(store, 0 if ROLE == "trainer" else 1 + part_rank, 1 + sampler_ranks, sync_timeout_s,
                    timeout_minutes)


def launch_world() -> int:
    """The number of ranks in the launch (trainer and sampler ranks)."""
    return world() if LAUNCH_RANK is None else LAUNCH_WORLD


def launch_rank() -> int:
    """This process's rank in the launch (what torchrun's messages call it)."""
    return rank() if LAUNCH_RANK is None else LAUNCH_RANK


class Link:
    """Trainer rank 0 (link rank 0) and the sampler ranks (1..K): Python objects point to point
    (commands, samples; gloo, sent without waiting, received under the run's collective timeout)
    and tensors broadcast from link rank 0 (the weights; NCCL on GPU, gloo on CPU), under
    ``sync_timeout_s``: a broadcast not done by then raises ``SyncTimeout``."""

    def __init__(self, store, rank: int, size: int, sync_timeout_s: float, timeout_minutes: float):
        self.rank, self.size, self.sync_timeout_s = rank, size, sync_timeout_s
        self.objects = dist.ProcessGroupGloo(dist.PrefixStore("link/objects", store), rank, size,
                                             datetime.timedelta(minutes=timeout_minutes))
        sync_timeout = datetime.timedelta(seconds=sync_timeout_s)
        if torch.cuda.is_available():
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = sync_timeout
            self.weights = dist.ProcessGroupNCCL(dist.PrefixStore("link/weights", store), rank, size, options)
        else:
            self.weights = dist.ProcessGroupGloo(dist.PrefixStore("link/weights", store), rank, size, sync_timeout)
        self.sending = []  # (work, buffer) of sends not known to be done: the buffers must live until then

    def send(self, obj, to: int):
        """Send ``obj`` to link rank ``to`` without waiting for it to be received."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self.sending = [(w, b) for w, b in self.sending if not w.is_completed()]
        for tag, tensor in enumerate((size, data)):
            self.sending.append((self.objects.send([tensor], to, tag), tensor))

    def flush(self):
        """Wait until everything sent has been received (before this process ends: a send still in
        flight then would reach its receiver as a reset connection)."""
        for work, _ in self.sending:
            work.wait()
        self.sending = []

    def recv(self, src: int):
        """The next object link rank ``src`` sent (in the order sent)."""
        size = torch.zeros(1, dtype=torch.int64)
        self.objects.recv([size], src, 0).wait()
        data = torch.empty(int(size[0]), dtype=torch.uint8)
        self.objects.recv([data], src, 1).wait()
        return pickle.loads(data.numpy().tobytes())

    def broadcast(self, tensor: torch.Tensor, phase: str):
        """``tensor`` from link rank 0 into every sampler rank's ``tensor``; ``SyncTimeout`` naming
        this rank and ``phase`` if it is not done in ``sync_timeout_s``."""
        try:
            self.weights.broadcast([tensor], dist.BroadcastOptions()).wait()
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                raise
            side = "trainer rank 0" if self.rank == 0 else f"sampler rank {self.rank - 1}"
            raise SyncTimeout(f"rank {launch_rank()} ({side}): {phase} did not finish in rollout.sync_timeout_s="
                              f"{self.sync_timeout_s:g}s") from None
