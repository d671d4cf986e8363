"""Entry point: ``torchrun --nproc_per_node N train.py loss=sft model=tiny datasets=[toy_add] ...``

Also runs as plain ``python train.py ...`` (a world of one). Hydra composes ``config/config.yaml``
with a ``model/`` and a ``loss/`` file; the loss names the trainer class that runs it.
"""

import logging
import os
import sys
import time
import uuid

import hydra
from omegaconf import OmegaConf

import checkpointing
import distributed
from data import check_files

log = logging.getLogger("train")
USER_ERROR_GRACE_S = 10  # how long a rank other than 0 waits, on a user error, for rank 0 to report it and exit


def run_id() -> str:
    """The same on every rank of a launch: torchrun's rendezvous id (slurm passes its job id), or,
    for a single process, a fresh id."""
    rid = os.environ.get("TORCHELASTIC_RUN_ID")
    if rid and rid != "none":
        return rid
    return os.environ.setdefault("TRAIN_RUN_ID", uuid.uuid4().hex[:8])


OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def report_lost_peer(cfg, trainer, exc: BaseException):
    """gloo's own words ("Connection reset by peer ... GLHF!") neither say that a rank died nor what
    to do next; torchrun's failure summary names the rank, this says where to resume from."""
    found = checkpointing.complete(cfg.run_dir)
    where = f" at step {trainer.step}" if trainer is not None else ""
    said = (str(exc).splitlines() or [""])[0]
    log.error(f"rank {distributed.rank()}{where}: a collective failed: another rank died or stopped answering "
              f"(torchrun's failure summary names it). Last complete checkpoint: {found[-1] if found else 'none'}; "
              f"run again with resume=true to continue from it. [{type(exc).__name__}: {said}]")


def user_error(exc: BaseException, building: bool) -> bool:
    """A mistake in the config, data, paths or model a user gave, or a run_dir that cannot be used
    (held by another job, a full disk), not a bug: the data, model and run_dir errors the project
    raises anywhere, and any ValueError while the trainer is being built (config checks, data
    loading, model building: nothing has been computed yet)."""
    from data import DataError
    from models import ConfigError

    known = (DataError, ConfigError, checkpointing.RunDirError)
    return isinstance(exc, known) or (building and isinstance(exc, (ValueError, FileNotFoundError)))


def main(cfg):
    device = distributed.init(cfg.dist_timeout_minutes)
    trainer, group_intact, lock = None, True, None
    try:
        distributed.setup_logging(None, cfg.debug)
        os.makedirs(cfg.run_dir, exist_ok=True)
        # held until this process ends; taken before train.log, so a job turned away writes nothing there
        lock = checkpointing.lock(cfg.run_dir)
        distributed.setup_logging(os.path.join(cfg.run_dir, "train.log"), cfg.debug)
        # a bad local file stops the run before the slow imports (vLLM, the trainers: ~4 s)
        check_files(cfg.datasets, OmegaConf.to_container(cfg.data.columns))
        from trainers import TRAINERS

        if cfg.loss.trainer not in TRAINERS:
            raise ValueError(f"loss.trainer={cfg.loss.trainer!r} is not one of {sorted(TRAINERS)}")
        if cfg.rollout.sampler_ranks:  # the split layout: the last ranks only generate
            from trainers import check_rollout

            check_rollout(cfg, distributed.world(), TRAINERS[cfg.loss.trainer])
            distributed.split(cfg.rollout.sampler_ranks, cfg.rollout.sync_timeout_s, cfg.dist_timeout_minutes)
            if distributed.ROLE == "sampler":
                import sampler_service

                sampler_service.serve(cfg, device)
                return
        trainer = TRAINERS[cfg.loss.trainer](cfg, device)
        trainer.train()
    except BaseException as exc:
        # This rank failed, alone or because a peer died: the others may be waiting in a collective
        # it will never join, so it leaves without the collective clean-up (sampler close, barrier)
        # and its exit ends the job (torchrun stops the other ranks) instead of hanging it.
        group_intact = False
        if isinstance(exc, distributed.SyncTimeout):
            log.error(f"{exc}: the run stops. Last complete checkpoint: {checkpointing.last_checkpoint(cfg.run_dir)}; "
                      f"run again with resume=true to continue from it")
            raise SystemExit(1) from None
        if isinstance(exc, Exception) and distributed.lost_peer(exc):
            report_lost_peer(cfg, trainer, exc)
        elif user_error(exc, building=trainer is None) and not (cfg.debug or os.environ.get("HYDRA_FULL_ERROR") == "1"):
            distributed.report_user_error(exc)
            if not distributed.is_main():
                # every rank meets the same bad input; rank 0 alone says so, and a rank that left
                # first would have torchrun stop rank 0 before its line is out
                time.sleep(USER_ERROR_GRACE_S)
            raise SystemExit(2) from None  # no traceback: debug=true (or HYDRA_FULL_ERROR=1) shows it
        raise
    finally:
        if group_intact and trainer is not None and trainer.sampler is not None:
            trainer.sampler.close()  # collective; vLLM's shutdown takes the process group down with it
        distributed.close(group_intact)
        if lock is not None:
            lock.close()


@hydra.main(version_base=None, config_path="config", config_name="config")
def hydra_main(cfg):
    main(cfg)


if __name__ == "__main__":
    import overrides

    def rank0_print(line: str):
        if os.environ.get("RANK", "0") == "0":
            print(line, file=sys.stderr, flush=True)

    try:  # before Hydra and the heavy imports: a typo costs a second, not a start-up
        sys.argv[1:] = overrides.check(sys.argv[1:], warn=rank0_print)
    except overrides.OverrideError as exc:
        rank0_print(f"error: {exc}")
        sys.exit(2)
    try:
        hydra_main()
        code = 0
    except SystemExit as exc:  # a user error (2), or Hydra's after it printed an error (1)
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): what the interpreter does with it
            print(exc.code, file=sys.stderr)
            code = 1
    # The process group is closed and every file written and flushed (checkpoints are atomic):
    # leave without the interpreter's teardown, where gloo's threads, destroyed while still
    # joinable, now and then abort a finished rank ("terminate called without an active
    # exception", SIGABRT) on a busy machine, failing a run that completed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
