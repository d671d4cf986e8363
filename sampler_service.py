"""The split layout (``rollout.sampler_ranks: K``): the launch's last K ranks only generate, the
others only train, and trainer rank 0 drives the sampler ranks over a ``distributed.Link``.

What it sends, in this order on the link, and what each sampler rank does:

- ``("weights", names)``: the sampler answers ``("ready",)`` once it has finished what it was
  generating, then receives each of ``names`` (the policy's trained parameters) whole, broadcast
  under ``rollout.sync_timeout_s``, into its copy of the policy, and from there into its engine;
- ``("generate", ticket, prompts, params)``: it samples its share of ``prompts`` and sends back
  ``("samples", ticket, samples, seconds generating, seconds idle before)`` without waiting;
- ``("stop",)``: it closes its sampler and its run ends.

A sampler rank builds the policy as the trainers build it (``models.Builder``: the same
architecture, frozen base and LoRA adapters) and its sampler from that copy exactly as the
colocated layout does (``build_sampler``), so the weights it is sent go into the engine by the
sampler's own ``sync_weights``: the sampling code is the colocated layout's, and K sampler ranks
sample what K colocated ranks would (each its share, its engine seeded by its rank).
"""

from __future__ import annotations

import logging
import time

import torch

import distributed
import models
from sampler import Sampler, SamplingParams, build_sampler

log = logging.getLogger("train")


def trained_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """What a weight sync sends: the parameters that train (a LoRA policy's adapters alone: its
    frozen base is the same on both sides, built from the same weights)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class RemoteSampler(Sampler):
    """The sampler ranks, seen from every trainer rank. ``submit`` starts a generation and returns
    at once; ``result`` waits for it: the trainers work meanwhile. Both, like ``generate`` and
    ``sync_weights``, are collective over the trainer ranks; trainer rank 0 alone talks to the
    sampler ranks. Also reports the sampler ranks' own time: ``sampler_seconds`` of the last
    result (generating, idle before it)."""

    def __init__(self, link, sampler_ranks: int):
        self.link, self.samplers = link, sampler_ranks  # link: None on trainer ranks other than 0
        self.tickets, self.stash = 0, {}
        self.sampler_seconds = (0.0, 0.0)
        self.sync_stats: dict = {}

    def _expect(self, src: int, kind: str, ticket=None):
        """The next message of ``kind`` (and ``ticket``) from link rank ``src``; others that come
        first (a generation's samples before the "ready" of a later sync) are kept for later."""
        key = (src, kind, ticket)
        while key not in self.stash:
            msg = self.link.recv(src)
            self.stash[(src, msg[0], msg[1] if msg[0] == "samples" else None)] = msg
        return self.stash.pop(key)

    def sync_weights(self, model) -> float:
        """Collective over the trainers: every trained parameter, gathered whole (FSDP), broadcast
        by trainer rank 0 to the sampler ranks once they are ready; returns the seconds of the
        transfer, and ``sync_stats["wait"]``, those spent waiting for the samplers to be ready."""
        t0 = time.perf_counter()
        params = trained_parameters(model)
        if self.link is not None:
            for k in range(1, self.samplers + 1):
                self.link.send(("weights", [name for name, _ in params]), k)
            for k in range(1, self.samplers + 1):
                self._expect(k, "ready")
        t1 = time.perf_counter()
        sent = 0
        distributed.reshard(model)
        with torch.no_grad():
            for name, p in params:
                whole = models.full_tensor(p).contiguous()
                if self.link is not None:
                    self.link.broadcast(whole, f"the weight sync to the sampler ranks ({name})")
                sent += whole.numel() * whole.element_size()
        t2 = time.perf_counter()
        self.sync_stats = {"wait": t1 - t0, "seconds": t2 - t1, "bytes": sent}
        return t2 - t1

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """Start sampling ``params.n`` completions of each of ``prompts`` (all of them: the sampler
        ranks split them); returns the ticket ``result`` takes."""
        self.tickets += 1
        if self.link is not None:
            for k in range(1, self.samplers + 1):
                self.link.send(("generate", self.tickets, prompts, params), k)
        return self.tickets

    def result(self, ticket: int) -> list[list]:
        """Collective over the trainers: the samples of ``submit``'s prompts, in their order."""
        samples, seconds = None, None
        if self.link is not None:
            parts = [self._expect(k, "samples", ticket) for k in range(1, self.samplers + 1)]
            samples = [group for part in parts for group in part[2]]
            seconds = (max(p[3] for p in parts), min(p[4] for p in parts))
        samples, self.sampler_seconds = distributed.from_main((samples, seconds))
        return samples

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list]:
        """Collective over the trainers: this rank's ``prompts`` sampled by the sampler ranks."""
        counts = distributed.gather([len(prompts)])
        everything = self.result(self.submit(distributed.gather(prompts), params))
        start = sum(counts[: distributed.rank()])
        return everything[start : start + len(prompts)]

    def choice_logprobs(self, prompts, choices):
        raise NotImplementedError("a judge's choice log-probs come from a colocated sampler")

    def close(self):
        if self.link is not None:
            for k in range(1, self.samplers + 1):
                self.link.send(("stop",), k)
            self.link.flush()
            self.link = None


def serve(cfg, device: torch.device):
    """A sampler rank's whole run: build the policy and its sampler, then answer trainer rank 0's
    commands until it says stop. A stop signal (preemption, Ctrl-C, slurm's warning: they reach
    every rank) is the trainers' to act on: this rank generates what is asked until the trainers,
    checkpointing, have received what they wait for, and then say stop."""
    from preemption import StopSignals

    StopSignals()
    link = distributed.LINK
    tokenizer = models.load_tokenizer(cfg.model)
    try:
        hello = link.recv(0)  # what trainer rank 0 resolved: the compute dtype it measured
    except RuntimeError as exc:  # the trainers stopped before they were built: a bad config or input
        if not distributed.lost_peer(exc):
            raise
        log.warning(f"rank {distributed.launch_rank()} (sampler): the trainer ranks stopped before training "
                    f"(trainer rank 0 says why)")
        raise SystemExit(2) from None
    cfg.model.fsdp_policy_mp = hello["fsdp_policy_mp"]
    model, _ = models.Builder(cfg, device).policy()
    model.requires_grad_(False)
    sampler = build_sampler(cfg, model, tokenizer, cfg.run_dir)
    idle_since = time.perf_counter()
    try:
        while True:
            msg = link.recv(0)
            if msg[0] == "stop":
                break
            if msg[0] == "weights":
                link.send(("ready", None), 0)
                receive_weights(link, model, msg[1])
                sampler.sync_weights(model)
            elif msg[0] == "generate":
                _, ticket, prompts, params = msg
                t = time.perf_counter()
                samples = sampler.generate(distributed.share(prompts), params)
                link.send(("samples", ticket, samples, time.perf_counter() - t, t - idle_since), 0)
                idle_since = time.perf_counter()
    finally:
        sampler.close()


def receive_weights(link, model, names: list[str]):
    """The sampler's side of ``RemoteSampler.sync_weights``: each parameter of ``names``, whole,
    into this rank's copy (its shard of it, under FSDP over the sampler ranks)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    distributed.reshard(model)  # else the root's parameters gathered for the last generation would stay in use
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            whole = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            link.broadcast(whole, f"the weight sync from trainer rank 0 ({name})")
            if isinstance(p, DTensor):
                whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(whole)
