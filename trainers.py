"""Trainer classes. ``Trainer`` owns the loop, the update, sharding, checkpoints and the global
normalisation of the loss; an algorithm is a loss function (``losses/``), one class here and a
``config/loss/*.yaml`` of exactly the keys that class reads (``loss.trainer`` names the class).

Words: a *step* is one pass of the loop: one global batch (SFT, RM, DPO), or one *iteration* of
the RL and online loops (sample a rollout, then train on it); an *update* is one optimizer step, of
which an iteration makes several. One update consumes ``batch_size`` examples (global), split
evenly over the ranks and each rank's share into ``gradient_accumulation_steps`` micro-batches,
each packed into rows with no padding between sequences. A loss is a *sum* over its terms (response
tokens for SFT, pairs for DPO) divided by the number of terms in the whole global batch, counted
before the forward pass, so the gradient is the same for any number of ranks and accumulation steps.

What is not the loop lives with its concern: building and self-checking models in
``models.Builder``, data in ``data.tokenize.load_examples``, evaluations in ``evaluation.py``,
checkpoint/resume in ``checkpointing.save_run``/``resume_run``, per-token log-probs of a rollout in
``logprobs.score_tokens``, the RL estimators in ``losses/rl.py``. The hooks, in the order a run
meets them:

    hook               when it runs                            overridden by
    check_config       first, before anything is loaded        every family (a bad config costs nothing)
    scalar_head        (attribute) the policy is a reward model RewardTrainer
    before_training    once built and restored, before eval    PreferenceTrainer (precomputed reference)
    train_step         each step of the loop                   PolicyGradientTrainer, online()
    examples_per_step  examples a step consumes                trainers that sample (prompts per iteration)
    updates_per_step   optimizer updates in a step             trainers that sample
    collate            a micro-batch -> packed tensors         PolicyGradientTrainer (a Rollout)
    n_loss_terms       what a micro-batch's loss is a sum of   pairs (1 per pair), PolicyGradientTrainer
    loss               summed loss of a packed micro-batch     every algorithm
    step_optimizers    after each update's backward            PPOTrainer (the critic's optimizer too)
    eval_metrics       at each evaluation                      trainers that sample (evaluation.reward_eval)
    save_now           after each step: checkpoint anyway?     the online loops (every iteration)
    export             at each checkpoint: the HF directory    RewardTrainer (a sequence classifier)
    trainer_state      into each checkpoint                    PolicyGradientTrainer (KL coef), PPOTrainer

The families, each a single chain of classes: ``SFTTrainer``; ``PairTrainer`` -> ``RewardTrainer``
and ``PreferenceTrainer`` -> the DPO family (``DPOTrainer``, ``IPOTrainer``, ``KTOTrainer``,
``SimPOTrainer``, ``ORPOTrainer``); ``PolicyGradientTrainer`` -> ``PPOTrainer``, ``GRPOTrainer`` (->
``RLOOTrainer``, its groups with another baseline), ``ReinforcePPTrainer``; the online loops ``OnlineDPOTrainer`` and ``RAFTTrainer``,
``online(DPOTrainer)`` and ``online(SFTTrainer)``: the loop wrapped around a fixed-data trainer.
Every trainer that samples holds what ``start_sampling`` builds (environment, rewards, sampler) and
gets its rollout from ``sample_rollout``. ``PolicyGradientTrainer.train_step`` reads as the
numbered phases of an RL iteration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

import checkpointing
import distributed
import environments
import evaluation
import judges
import logprobs
import models
import overrides
import monitors
import profiling
import rewards
import sampler
from data import DataError
from data.packing import last_positions, pack, pad, per_sequence
from data.selection import best_of_k, best_vs_worst_pairs
from data.tokenize import IGNORE, load_examples, prompt_ids
from data.toy_env import ENVIRONMENTS
from losses import sft_loss
from losses.preference import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from losses.rl import (AGGREGATIONS, AdaptiveKLController, FixedKLController, aggregation_units, aggregation_weights,
                       cispo_loss, gae, grpo_advantages, gspo_loss, masked_mean, sapo_loss, importance_weights, kl_penalty, masked_whiten, ppo_policy_loss,
                       reinforce_pp_advantages, rloo_advantages, rollout_stats, sequence_ppo_loss, token_rewards,
                       value_loss)
from metrics_log import MetricsLog, means
from preemption import StopSignals
from rollout import TOKEN_FIELDS, Rollout
from sampler import SamplingConfig, build_sampler, rollout_of, sampling_params
from sampler_service import RemoteSampler

log = logging.getLogger("train")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup from 0, then cosine decay to ``min_ratio`` of the peak at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def crossed(every: int | None, before: int, after: int) -> bool:
    """True when the counter passed a multiple of ``every`` going from ``before`` to ``after``."""
    return bool(every) and after // every > before // every


def check_run_config(cfg, world: int, plays_episodes: bool):
    """The checks of every run, before anything is loaded: a bad config costs nothing."""
    per_step = world * cfg.gradient_accumulation_steps
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of ranks x gradient_accumulation_steps "
                         f"= {world} x {cfg.gradient_accumulation_steps}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below max_length={cfg.max_length}")
    if isinstance(cfg.datasets, str):
        raise ValueError(f"datasets={cfg.datasets}: expected a list, e.g. datasets=[{cfg.datasets}]")
    if cfg.packing not in (True, False, "auto"):
        raise ValueError(f"packing={cfg.packing!r}: expected true, false or auto")
    shard_ranks = cfg.fsdp_shard_ranks
    if shard_ranks is not None and (not isinstance(shard_ranks, int) or shard_ranks < 1 or world % shard_ranks):
        raise ValueError(f"fsdp_shard_ranks={cfg.fsdp_shard_ranks} must divide the {world} ranks "
                         f"(e.g. the GPUs of one node); null shards over all of them")
    if cfg.row_tokens < cfg.max_length:
        raise ValueError(f"row_tokens={cfg.row_tokens} must hold one whole sequence (max_length={cfg.max_length})")
    if cfg.lora.load_in_4bit and not cfg.lora.r:
        raise models.ConfigError("lora.load_in_4bit=true quantizes the frozen base of a LoRA run: set lora.r "
                                 "(e.g. lora.r=16), or lora.load_in_4bit=false")
    if cfg.env and not plays_episodes:
        raise models.ConfigError(f"env={cfg.env}: loss={cfg.loss.name} does not play episodes; the policy-gradient "
                                 f"losses do (loss=grpo, rloo, reinforce_pp, ppo)")
    if cfg.env and not cfg.max_turns >= 1:
        raise models.ConfigError(f"max_turns={cfg.max_turns}: an episode needs at least one reply")
    profiling.check_steps(cfg.profile_steps)
    sampling_params(cfg.eval_sampling, "eval_sampling")
    sampler.check_config(cfg.sampler)
    monitors.check_config(cfg.monitors)


@dataclass
class SFTConfig:
    """``loss:`` of SFT: nothing but its name and class."""


class Trainer:
    """The loop and the update. ``__init__`` builds a run in three phases (the checks, the data,
    the policy and its optimizer); ``train`` runs the loop; ``update`` is one optimizer step on the
    global batch, its loss normalised by the global count of loss terms."""

    row_format = "sft"  # the rows it reads (data/__init__.py); "prompt": it samples its own completions
    starts_from_a_model = False  # a stage that refines a trained model (warned about when given none)
    plays_episodes = False  # it can sample multi-turn episodes of an environment (env=)
    scalar_head = False  # the policy is a reward model (RewardTrainer)
    sampler = None  # the colocated sampler: trainers that sample, or sample_during_eval
    loss_config = SFTConfig  # the schema of ``loss:`` (its keys, their types); each class names its own

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.run_dir = Path(cfg.run_dir)
        # 1. everything a user can get wrong, before anything is loaded
        self.check_config()
        # every rank computes in the dtype rank 0 measured (config_for copies it to every other
        # model); resolved before the resume check, which compares it with the checkpoint's
        cfg.model.fsdp_policy_mp = distributed.from_main(
            models.compute_dtype(cfg.model.fsdp_policy_mp, device) if self.rank == 0 else None)
        self.resume_from = checkpointing.to_resume(self.run_dir, cfg)
        models.model_config(cfg.model)
        self.tokenizer = models.load_tokenizer(cfg.model)
        # 2. data before the model: bad input stops the run before any compute is spent
        self.train_examples = load_examples(cfg, "train", self.row_format, self.tokenizer)
        self.eval_examples = (load_examples(cfg, "test", self.row_format, self.tokenizer)[: cfg.n_eval_examples]
                              if cfg.n_eval_examples else [])
        self.save_every = overrides.epochs_to_examples(cfg.save_every, len(self.train_examples))
        self.total_steps = self.count_steps()
        # 3. the policy and its optimizer
        self.models = models.Builder(cfg, device)
        self.model, self.base_fingerprint = self.models.policy(self.scalar_head)
        self.optimizer, self.scheduler = self.optimizer_for(self.model, cfg.lr)
        self.step, self.examples_seen, self.tokens_seen = 0, 0, 0
        self._permutation = (None, None)
        self.metrics = MetricsLog(cfg)
        self.monitors, self.stop_reasons = monitors.Monitors(cfg.monitors, distributed.is_main()), []
        if cfg.sample_during_eval:
            self.sampler = build_sampler(cfg, self.model, self.tokenizer, self.run_dir)

    def count_steps(self) -> int:
        """The run's steps, from ``n_examples`` or ``n_epochs``; what they imply is warned about."""
        cfg, per_step = self.cfg, self.examples_per_step()
        n = cfg.n_examples or cfg.n_epochs * len(self.train_examples)
        steps = n // per_step
        if steps < 1:
            raise DataError(f"{n} training examples make no step of {per_step}")
        if cfg.profile_steps and cfg.profile_steps[1] > steps:
            raise models.ConfigError(f"profile_steps={list(cfg.profile_steps)}: the run has {steps} steps; "
                                     f"choose steps between 1 and {steps}")
        log.info(f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, "
                 f"{steps} steps of {per_step}, {self.world} rank(s)")
        if cfg.warmup_steps >= steps * self.updates_per_step():
            log.warning(f"warmup_steps={cfg.warmup_steps} is not shorter than the run's {steps * self.updates_per_step()} "
                        f"optimizer updates: the learning rate never reaches lr={cfg.lr}")
        if self.starts_from_a_model and models.weights_path(cfg.model) is None:
            log.warning(f"loss={cfg.loss.name} normally starts from a trained model, but model.archive and "
                        f"model.name_or_path are unset: the policy is random init ({cfg.model.name})")
        return steps

    # --- what subclasses change -------------------------------------------------------------

    def check_config(self):
        check_run_config(self.cfg, self.world, self.plays_episodes)
        check_rollout(self.cfg, distributed.launch_world(), type(self))
        overrides.check_schema(self.cfg.loss, self.loss_config, "loss", f"an option of loss={self.cfg.loss.name}")

    def sequences(self, example: dict) -> list[dict]:
        """The token sequences an example puts into a packed row (a pair puts two)."""
        return [example]

    def n_loss_terms(self, micro_batch) -> int:
        """What the loss of ``micro_batch`` is a sum of, counted before the forward: response tokens."""
        return sum(label != IGNORE for ex in micro_batch for label in ex["labels"][1:])

    def loss(self, batch: dict, micro_batch) -> tuple[torch.Tensor, dict]:
        """Summed loss of a packed micro-batch, and extra metrics as {name: (sum, count)}."""
        logps, mask = self.token_logps(self.model, batch)
        return sft_loss(logps, mask), {}

    def before_training(self):
        """Runs once the model is built and any checkpoint restored, before the first eval."""

    def examples_per_step(self) -> int:
        """Training examples one step of the loop consumes (RL: prompts per iteration)."""
        return self.cfg.batch_size

    def updates_per_step(self) -> int:
        """Optimizer updates in one step of the loop (RL: several per iteration)."""
        return 1

    def train_step(self) -> dict:
        """One step of the loop: here one optimizer update on the next global batch."""
        return self.update(self.micro_batches(self.global_batch(self.step), self.train_examples))

    def eval_metrics(self) -> dict:
        """Collective: what ``evaluate`` logs (trainers that sample evaluate by sampling)."""
        return evaluation.loss_eval(self)

    def save_now(self) -> bool:
        """Checkpoint after this step whatever ``save_every`` says (the online loops' iterations)."""
        return False

    def extra_models(self) -> dict:
        """{name: (model, optimizer)} trained alongside the policy, checkpointed with it (PPO's critic)."""
        return {}

    def step_optimizers(self) -> dict:
        """Clip and apply the gradients of one update; returns its metrics."""
        return {"grad_norm": self.clip_and_step(self.model, self.optimizer, self.scheduler)}

    def export(self, out_dir: Path, step: int | None = None):
        """Collective: the Hugging Face directory the next stage loads (``step``: the checkpoint it is)."""
        checkpointing.export_hf(self.model, self.tokenizer, out_dir, step=step)

    def checkpoint_files(self) -> dict:
        """{file name: object} a checkpoint holds beside the state (rank 0's; ``torch.save``)."""
        return {}

    def restore_files(self, path: Path):
        """What ``checkpoint_files`` saved in the checkpoint at ``path``, read back."""

    def trainer_state(self) -> dict:
        return {"step": self.step, "examples": self.examples_seen, "tokens": self.tokens_seen,
                "metric_lines": self.metrics.lines, "scheduler": self.scheduler.state_dict(),
                "world_size": self.world, "config": OmegaConf.to_container(self.cfg, resolve=True),
                "base_fingerprint": self.base_fingerprint, "monitors": self.monitors.state()}

    def restore_state(self, state: dict):
        """The counters and schedules of ``trainer_state``, read back from a checkpoint."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen, self.tokens_seen = state["step"], state["examples"], state["tokens"]
        if "monitors" in state:  # (not in checkpoints from before the monitors)
            self.monitors.restore(state["monitors"])

    # --- the loop ---------------------------------------------------------------------------

    def train(self):
        cfg = self.cfg
        if cfg.resume:
            checkpointing.resume_run(self)
        self.metrics.start(self.step, self.total_steps)
        stop = StopSignals()
        self.before_training()
        if self.step == 0 and cfg.eval_at_start:
            self.evaluate()
        self.model.train()
        profiler = profiling.StepProfiler(cfg.profile_steps, self.step, self.run_dir / "profile", self.device,
                                          distributed.is_main())
        while self.step < self.total_steps:
            record = self.train_step()
            profiler.step()
            record["memory/peak_gb"] = profiling.peak_memory_gb(self.device)
            self.stop_reasons += self.monitors.check(record, self.step + 1)
            before = self.examples_seen
            self.step += 1
            self.examples_seen += self.examples_per_step()
            self.metrics.log(record, self.step, self.examples_seen, self.tokens_seen)
            self.metrics.stepped(record)
            last = self.step == self.total_steps
            if crossed(cfg.eval_every, before, self.examples_seen) or (last and cfg.eval_at_end):
                self.evaluate()
                self.model.train()
            saved = crossed(self.save_every, before, self.examples_seen) or last or self.save_now()
            if saved or self.stop_reasons:
                checkpointing.save_run(self, export=True)
            if self.stop_reasons:
                break
            if not last and stop.requested():
                if not saved:
                    checkpointing.save_run(self, export=False)
                stop.requeue(self.step, cfg.requeue_on_timeout, checkpointing.last_checkpoint(self.run_dir))
                break
        profiler.close()
        self.metrics.close()
        if self.stop_reasons:
            self.stop_for_monitor()

    def evaluate(self) -> dict:
        """Collective: ``eval_metrics`` on the eval examples, logged (nothing without eval examples)."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        record = self.eval_metrics()
        self.stop_reasons += self.monitors.check(record, self.step)
        if record:
            self.metrics.log(record, self.step, self.examples_seen, self.tokens_seen)
            log.info(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        return record

    def stop_for_monitor(self):
        """A monitor in ``monitors.stop_on`` crossed: the checkpoint is written; every rank (they see
        the same metrics) stops with exit code 3, rank 0 saying why in one line."""
        if distributed.is_main():
            log.error(f"{self.stop_reasons[0]}: stopped (monitors.stop_on); checkpoint "
                      f"{checkpointing.last_checkpoint(self.run_dir)}; resume=true goes on from it")
        raise SystemExit(3)

    def global_batch(self, step: int) -> list[int]:
        """Indices of the examples of step ``step``: a fixed-seed shuffle per epoch, the same on
        every rank and for every world size."""
        n, size = len(self.train_examples), self.examples_per_step()
        out = []
        for pos in range(step * size, (step + 1) * size):
            epoch, i = divmod(pos, n)
            if self._permutation[0] != epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
                self._permutation = (epoch, torch.randperm(n, generator=g).tolist())
            out.append(self._permutation[1][i])
        return out

    def micro_batches(self, indices: list[int], data) -> list:
        """This rank's share of the global batch ``indices`` of ``data`` (a list of examples, or a
        Rollout), in micro-batches."""
        mine, n_micro = distributed.share(indices), self.cfg.gradient_accumulation_steps
        size = len(mine) // n_micro
        pick = data.select if isinstance(data, Rollout) else (lambda idx: [data[i] for i in idx])
        return [pick(mine[k * size : (k + 1) * size]) for k in range(n_micro)]

    def collate(self, micro_batch) -> dict:
        """A micro-batch as packed tensors on the device (``layout``)."""
        return self.layout([s for ex in micro_batch for s in self.sequences(ex)], self.tokenizer.pad_token_id)

    def layout(self, seqs: list[dict], pad_id: int, fields: tuple[str, ...] = ()) -> dict:
        """``seqs`` as a batch on the device: packed rows, or one padded row each when the models
        cannot pack (``packing=false``, or ``auto`` after the self-check)."""
        batch = pack(seqs, self.cfg.row_tokens, pad_id, fields) if self.models.packs else pad(seqs, pad_id, fields)
        return {k: v.to(self.device) for k, v in batch.items()}

    def token_logps(self, model, batch: dict, temperature: float = 1.0, **options):
        """``logprobs.token_logps`` with this run's ``logprob_chunk_tokens``."""
        if isinstance(model, models.AdapterOff):
            with model.policy.disable_adapter():
                return self.token_logps(model.policy, batch, temperature, **options)
        return logprobs.token_logps(model, batch, self.cfg.logprob_chunk_tokens, temperature, **options)

    def run_micro_batches(self, micro: list, train: bool) -> dict[str, list[float]]:
        """Forward (and backward) every micro-batch; returns metric sums, already summed over ranks.
        The sums stay on the device until the end: one read of them per update, not a host sync
        per micro-batch."""
        terms = distributed.reduce_sum(torch.tensor(float(sum(self.n_loss_terms(mb) for mb in micro)),
                                                    dtype=torch.float64, device=self.device))
        sums = {}

        def add(name: str, value, count=0.0):
            pair = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device).detach().reshape(())
                                for x in (value, count)])
            sums[name] = sums[name] + pair if name in sums else pair

        for mb in micro:
            batch = self.collate(mb)
            with torch.set_grad_enabled(train):
                loss_sum, metrics = self.loss(batch, mb)
                if train:
                    # FSDP averages gradients over ranks; the loss is already a global mean
                    (loss_sum * self.world / terms.to(loss_sum.dtype).clamp(min=1)).backward()
            real = (batch["seq_ids"] >= 0).sum()
            add("loss", loss_sum)
            for name, (value, count) in metrics.items():
                add(name, value, count)
            add("tokens", real)
            add("padding", batch["seq_ids"].numel() - real)
        add("loss", 0.0, terms / self.world)  # summed over ranks below: the global count
        names = sorted(sums)
        flat = distributed.reduce_sum(torch.cat([sums[n] for n in names])).tolist()
        return {n: flat[2 * i : 2 * i + 2] for i, n in enumerate(names)}

    def update(self, micro: list) -> dict:
        """One optimizer update on the micro-batches of this rank; returns its metrics."""
        t0 = time.perf_counter()
        sums = self.run_micro_batches(micro, train=True)
        lr = self.scheduler.get_last_lr()[0]
        record = self.step_optimizers()
        self.tokens_seen += int(sums["tokens"][0])
        record.update({"lr": lr, "tokens_per_s": sums["tokens"][0] / (time.perf_counter() - t0),
                       "padding_fraction": sums["padding"][0] / (sums["tokens"][0] + sums["padding"][0])})
        record.update(means(sums, "{}/train", self.step + 1))
        return record

    def train_epochs(self, data, epochs: int) -> dict:
        """``epochs`` passes over ``data`` (the same on every rank: a rollout, an iteration's
        examples) in mini-batches of ``batch_size``, shuffled with a seed of the step and epoch, one
        update each (a partial mini-batch is dropped); the mean of the updates' metrics and their
        number (``iteration/updates``), warned about when it is none."""
        updates, size = [], self.cfg.batch_size
        if not len(data) // size and distributed.is_main():  # e.g. filter_groups kept less than a mini-batch
            log.warning(f"iteration {self.step + 1}: {len(data)} examples to train on, fewer than "
                        f"batch_size={size}: no update")
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 101 + epoch)
            order = torch.randperm(len(data), generator=g).tolist()
            for k in range(len(data) // size):
                updates.append(self.update(self.micro_batches(order[k * size : (k + 1) * size], data)))
        averaged = {k: sum(u[k] for u in updates) / len(updates) for k in (updates[0] if updates else {})}
        return {**averaged, "iteration/updates": len(updates)}

    def optimizer_for(self, model, lr: float):
        cfg = self.cfg
        # fused: one kernel over all parameters (CPU and CUDA); the default for-each path makes a
        # pass over memory per elementwise op, 0.35 s against 0.09 s a step for 135M fp32 parameters
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas), fused=True)
        schedule = warmup_cosine(cfg.warmup_steps, self.total_steps * self.updates_per_step(), cfg.min_lr_ratio)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def clip_and_step(self, model, optimizer, scheduler) -> float:
        """Clip ``model``'s gradients to ``max_grad_norm``, step; returns the norm before clipping.
        A NaN/inf norm stops the run, naming the last checkpoint to go back to."""
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {self.step + 1}: gradient norm is {grad_norm.item()}; "
                                     f"last complete checkpoint: {checkpointing.last_checkpoint(self.run_dir)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return grad_norm.item()

    def forward_size(self) -> int:
        """Sequences per rank in one forward without gradients that feeds training."""
        return max(1, self.cfg.forward_batch_size // self.world)


# --- supervised ---------------------------------------------------------------------------------

class SFTTrainer(Trainer):
    """Supervised fine-tuning: the base trainer's loss is already the response-token NLL."""


class PairTrainer(Trainer):
    """Trainers that read preference pairs: both replies of a pair go into the same packed
    micro-batch, chosen at sequence index 2i and rejected at 2i + 1; the loss is a mean over pairs."""

    row_format = "pref"
    starts_from_a_model = True

    def sequences(self, example: dict) -> list[dict]:
        return [example["chosen"], example["rejected"]]

    def n_loss_terms(self, micro_batch) -> int:
        return len(micro_batch)

    @staticmethod
    def pair_metrics(r_c, r_r, **extra) -> dict:
        n = len(r_c)
        out = {"rewards/chosen": (r_c.sum(), n), "rewards/rejected": (r_r.sum(), n),
               "rewards/accuracy": ((r_c > r_r).float().sum(), n), "rewards/margin": ((r_c - r_r).sum(), n)}
        out.update({k: (v.detach().sum(), n) for k, v in extra.items()})
        return out


@dataclass
class RewardConfig:
    margin: float   # Bradley-Terry's margin
    lm_coef: float  # > 0: an LM loss on the chosen reply too


class RewardTrainer(PairTrainer):
    """Reward model: a scalar head on the last token (the end-of-turn token) of each sequence,
    trained with the Bradley-Terry loss, optionally with a margin and, as seed 000's
    ``logexpwithlm``, an LM loss on the chosen reply (``loss.lm_coef``). Exports a model that loads
    with ``AutoModelForSequenceClassification``."""

    scalar_head = True
    loss_config = RewardConfig

    def loss(self, batch: dict, micro_batch) -> tuple[torch.Tensor, dict]:
        n, lm_coef = 2 * len(micro_batch), self.cfg.loss.lm_coef
        scores, logits = self.model(batch["input_ids"], batch["position_ids"], with_logits=lm_coef > 0)
        rewards = scores.float().flatten()[last_positions(batch["seq_ids"], n)]
        r_c, r_r = rewards[0::2], rewards[1::2]
        total = bradley_terry_loss(r_c, r_r, self.cfg.loss.margin).sum()
        extra = {}
        if lm_coef > 0:  # mean NLL per token of each chosen reply
            logps, mask = logprobs.target_logps(logits, batch["targets"])
            nll = -per_sequence(logps, batch["seq_ids"], n)[0::2] / per_sequence(mask, batch["seq_ids"], n)[0::2]
            total = total + lm_coef * nll.sum()
            extra["lm/nll_chosen"] = nll
        return total, self.pair_metrics(r_c.detach(), r_r.detach(), **extra)

    def export(self, out_dir: Path, step: int | None = None):
        weights = checkpointing.full_state_dict(self.model)

        def write():
            head, config = self.model.export_weights(weights)
            checkpointing.write_hf(out_dir, head, config, self.tokenizer, step=step)

        checkpointing.on_main(out_dir, write)


# --- the DPO family -----------------------------------------------------------------------------

@dataclass
class PreferenceConfig:
    """What the DPO family with a reference shares."""
    reference_free: bool
    precompute_ref_logps: bool
    rpo_alpha: float


class PreferenceTrainer(PairTrainer):
    """What the DPO family shares: each class gives ``pair_losses`` (losses/preference.py).
    ``loss.rpo_alpha`` > 0 adds alpha times each chosen reply's per-token NLL (RPO, Pang et al. 2024,
    arXiv:2404.19733), which stops DPO from lowering the chosen reply's likelihood along with the
    rejected one's.

    The reference (``reference_mode``) is the policy's starting point, sharded like it and frozen
    (``model``); or, with ``loss.precompute_ref_logps=true``, its log-probs are computed in one pass
    before training and saved to ``run_dir/reference_logps.pt`` (``precomputed``), so training holds
    one model; or there is none (``none``: ``loss.reference_free``, and SimPO and ORPO by design).
    """

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.reference = self.models.frozen(cfg.model, self.model) if self.reference_mode() == "model" else None

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        """(per-pair loss, implied reward of chosen, of rejected) from summed log-probs ``pi_*``,
        token counts ``n_*`` and the reference's summed log-probs ``ref_*``."""
        raise NotImplementedError

    def reference_mode(self) -> str:
        """Where the reference log-probs come from: "model" | "precomputed" | "none" (the
        online loop: "with_pairs", computed with each iteration's pairs)."""
        if self.cfg.loss.reference_free:
            return "none"
        return "precomputed" if self.cfg.loss.precompute_ref_logps else "model"

    def loss(self, batch: dict, micro_batch) -> tuple[torch.Tensor, dict]:
        n, mode = 2 * len(micro_batch), self.reference_mode()
        logps, mask = self.token_logps(self.model, batch)
        seq_logps, seq_tokens = per_sequence(logps, batch["seq_ids"], n), per_sequence(mask, batch["seq_ids"], n)
        if mode == "none":
            ref = torch.zeros_like(seq_logps)
        elif mode == "model":
            with torch.no_grad():
                ref = per_sequence(self.token_logps(self.reference, batch)[0], batch["seq_ids"], n)
        else:
            ref = torch.tensor([x for ex in micro_batch for x in ex["ref"]], device=self.device, dtype=seq_logps.dtype)
        losses, r_c, r_r = self.pair_losses(seq_logps[0::2], seq_logps[1::2], seq_tokens[0::2], seq_tokens[1::2],
                                            ref[0::2], ref[1::2])
        extra = {"logps/chosen": seq_logps[0::2], "logps/rejected": seq_logps[1::2]}
        if self.cfg.loss.rpo_alpha:  # RPO: keep the chosen reply likely while pushing the rejected one down
            nll = -seq_logps[0::2] / seq_tokens[0::2]
            losses = losses + self.cfg.loss.rpo_alpha * nll
            extra["nll/chosen"] = nll
        return losses.sum(), self.pair_metrics(r_c, r_r, **extra)

    def before_training(self):
        if self.reference_mode() != "precomputed":
            return
        path = self.run_dir / "reference_logps.pt"
        if self.step > 0:
            if not path.exists():
                raise RuntimeError(f"resuming at step {self.step} but {path} is missing: the reference is gone")
            saved = torch.load(path)
        else:  # a fresh start computes it, whatever a killed run (maybe with another config) left
            used = sorted({i for step in range(self.total_steps) for i in self.global_batch(step)})
            saved = {"train": dict(zip(used, self.pair_logps([self.train_examples[i] for i in used]))),
                     "eval": dict(enumerate(self.pair_logps(self.eval_examples)))}
            if distributed.is_main():
                torch.save(saved, path.with_suffix(".tmp"))
                os.replace(path.with_suffix(".tmp"), path)
            log.info(f"precomputed reference log-probs of {len(saved['train'])} + {len(saved['eval'])} pairs")
        for examples, logps in ((self.train_examples, saved["train"]), (self.eval_examples, saved["eval"])):
            for i, pair in logps.items():  # only the pairs the run will use
                examples[i]["ref"] = pair

    @torch.no_grad()
    def pair_logps(self, examples: list[dict]) -> list[tuple[float, float]]:
        """Collective: (chosen, rejected) summed log-probs of every pair of ``examples`` (the same
        list on every rank) under the current model, each rank a share, gathered everywhere."""
        self.model.eval()
        size = max(1, min(self.forward_size(), -(-len(examples) // self.world)))

        def forward(chunk: list[dict]) -> list[tuple[float, float]]:
            batch = self.collate(chunk)
            seq = per_sequence(self.token_logps(self.model, batch)[0], batch["seq_ids"], 2 * len(chunk)).tolist()
            return list(zip(seq[0::2], seq[1::2]))

        mine = distributed.lockstep(forward, distributed.share(examples), size, stand_in=examples[:1] and examples[0])
        self.model.train()
        return distributed.gather(mine)


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float
    label_smoothing: float


class DPOTrainer(PreferenceTrainer):
    """DPO (Rafailov et al. 2023); with ``loss.label_smoothing`` > 0 conservative DPO (``loss=cdpo``)."""

    loss_config = DPOConfig

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, self.cfg.loss.beta, self.cfg.loss.label_smoothing)


@dataclass
class IPOConfig(PreferenceConfig):
    tau: float


class IPOTrainer(PreferenceTrainer):
    """IPO (Azar et al. 2023), on per-token average log-probs."""

    loss_config = IPOConfig

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, self.cfg.loss.tau)


@dataclass
class KTOConfig(PreferenceConfig):
    beta: float
    desirable_weight: float
    undesirable_weight: float


class KTOTrainer(PreferenceTrainer):
    """KTO (Ethayarajh et al. 2024): chosen replies are desirable, rejected ones undesirable."""

    loss_config = KTOConfig

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        loss = self.cfg.loss
        return kto_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.desirable_weight, loss.undesirable_weight)


@dataclass
class SimPOConfig:
    reward_scale: float  # the paper's beta
    target_margin: float  # the paper's gamma
    rpo_alpha: float


class SimPOTrainer(PreferenceTrainer):
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin."""

    loss_config = SimPOConfig

    def reference_mode(self) -> str:
        return "none"

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return simpo_loss(pi_c / n_c, pi_r / n_r, self.cfg.loss.reward_scale, self.cfg.loss.target_margin)


@dataclass
class ORPOConfig:
    odds_ratio_weight: float  # the paper's lambda
    rpo_alpha: float


class ORPOTrainer(PreferenceTrainer):
    """ORPO (Hong et al. 2024): SFT on the chosen reply plus an odds-ratio term; no reference."""

    loss_config = ORPOConfig

    def reference_mode(self) -> str:
        return "none"

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return orpo_loss(pi_c / n_c, pi_r / n_r, self.cfg.loss.odds_ratio_weight)


# --- learning from its own samples --------------------------------------------------------------

@dataclass
class SamplingRunConfig:
    """What every trainer that samples reads: its prompts and samples per iteration."""
    rollout_batch_size: int  # prompts per iteration, over all ranks
    n_samples_per_prompt: int
    epochs_per_iteration: int  # passes over each iteration's data, in mini-batches of batch_size
    sampling: SamplingConfig


@dataclass
class PolicyGradientConfig(SamplingRunConfig):
    truncate_like_sampler: bool  # the trainer's log-probs of the sampler's top-k/top-p truncated distribution
    aggregation: str
    tis_cap: Optional[float]
    kl_coef: float
    kl_estimator: str
    kl_in_reward: bool
    kl_target: Optional[float]
    kl_horizon: float
    entropy_coef: float
    save_rollouts: bool


@dataclass
class ClippedConfig(PolicyGradientConfig):
    """The objectives with a clip range (PPO's surrogate, GSPO's, CISPO's weight)."""
    clip: float
    clip_high: Optional[float]


def check_sampling(cfg, world: int, reward_required: bool = True):
    """The checks of every trainer that samples ``rollout_batch_size`` prompts per iteration and
    scores them (``reward_required``: it learns from the scores); the reward functions and
    environment it names are loaded to check them."""
    loss = cfg.loss
    if loss.rollout_batch_size % world:
        raise ValueError(f"loss.rollout_batch_size={loss.rollout_batch_size} must be a multiple of the {world} ranks")
    if loss.sampling.max_new_tokens > cfg.max_length - cfg.max_prompt_length:
        raise ValueError(f"loss.sampling.max_new_tokens={loss.sampling.max_new_tokens} does not fit: a prompt may "
                         f"have max_prompt_length={cfg.max_prompt_length} of max_length={cfg.max_length} tokens")
    if cfg.sample_during_eval:
        raise models.ConfigError(f"sample_during_eval=true: loss={loss.name} always evaluates by sampling "
                                 f"(eval/reward, with eval_sampling); drop sample_during_eval")
    for path in cfg.reward.models:
        models.model_config(models.config_for(cfg, path), key="reward.models")
    if cfg.env:
        environments.load_environment(cfg.env, ENVIRONMENTS)
    rewards.check_config(cfg.reward, cfg.judge, env=bool(cfg.env), required=reward_required)


def start_sampling(trainer, reward_required: bool):
    """What a trainer that samples holds besides its models: ``env`` (the environment's episode
    runner, ``env=``), ``rewards`` (the functions, the reward models, sharded like the policy, and
    the judges), the ``sampler`` (colocated, built from the policy; or the sampler ranks, with
    ``rollout.sampler_ranks``) and the ``rollouts`` it generates ahead (``RolloutQueue``)."""
    cfg, t = trainer.cfg, trainer
    t.env = None
    if cfg.env:
        t.env = environments.EpisodeRunner(environments.load_environment(cfg.env, ENVIRONMENTS), t.tokenizer,
                                           cfg.max_turns, cfg.max_length, cfg.max_prompt_length, cfg.env_timeout_s)
    t.rewards = rewards.Rewards(cfg.reward, cfg.judge, t.tokenizer, t.layout, t.forward_size(), cfg.row_tokens,
                                env=t.env is not None, required=reward_required,
                                judge_cache=str(t.run_dir / "judge_cache"))
    if cfg.rollout.sampler_ranks:
        t.sampler = RemoteSampler(distributed.LINK, cfg.rollout.sampler_ranks)
        if distributed.LINK is not None:  # what the sampler ranks build their copy of the policy with
            for k in range(1, cfg.rollout.sampler_ranks + 1):
                distributed.LINK.send({"fsdp_policy_mp": cfg.model.fsdp_policy_mp}, k)
    else:
        t.sampler = build_sampler(cfg, t.model, t.tokenizer, t.run_dir)
    t.rollouts = RolloutQueue(t)
    for path in cfg.reward.models:
        model_cfg = models.config_for(cfg, path)
        scorer = t.models.scorer(model_cfg).requires_grad_(False).eval()
        t.rewards.add_model(path, scorer, models.load_tokenizer(model_cfg))


def check_rollout(cfg, launch_world: int, trainer_class):
    """``rollout:``'s checks, before the launch is split into trainer and sampler ranks."""
    section = cfg.rollout
    k, samplers = section.max_staleness, section.sampler_ranks
    if not isinstance(k, int) or k < 0:
        raise models.ConfigError(f"rollout.max_staleness={k}: expected 0 (on-policy) or a number of updates >= 1")
    if not isinstance(samplers, int) or not 0 <= samplers < launch_world:
        raise models.ConfigError(f"rollout.sampler_ranks={samplers}: expected 0 (every rank samples and trains) or "
                                 f"fewer than the launch's {launch_world} ranks (the rest train)")
    if (k or samplers) and not issubclass(trainer_class, PolicyGradientTrainer):
        raise models.ConfigError(f"rollout.max_staleness / rollout.sampler_ranks: loss={cfg.loss.name} samples "
                                 f"on-policy in every rank; they apply to the policy-gradient losses (grpo, ppo, "
                                 f"rloo, reinforce_pp, gspo, cispo, sapo, distill)")
    if samplers and cfg.env:
        raise models.ConfigError(f"rollout.sampler_ranks={samplers} with env={cfg.env}: the sampler ranks do not "
                                 f"run environments yet; use rollout.sampler_ranks=0")
    if samplers and cfg.fsdp_shard_ranks not in (None, launch_world - samplers):
        raise models.ConfigError(f"fsdp_shard_ranks={cfg.fsdp_shard_ranks} with rollout.sampler_ranks={samplers}: "
                                 f"the trainer ranks shard over all of them (fsdp_shard_ranks=null)")
    if samplers and cfg.sampler.get("tensor_parallel_size", 1) > 1:
        raise models.ConfigError(f"sampler.tensor_parallel_size={cfg.sampler.tensor_parallel_size} with "
                                 f"rollout.sampler_ranks={samplers}: each sampler rank runs an engine of its own "
                                 f"(tensor parallelism across sampler ranks is not built yet)")
    if not section.sync_timeout_s > 0:
        raise models.ConfigError(f"rollout.sync_timeout_s={section.sync_timeout_s}: expected seconds > 0")


def rollout_request(trainer, step: int) -> tuple[list[dict], sampler.SamplingParams]:
    """Step ``step``'s prompt examples (every rank's) and sampling parameters, seeded by the step,
    so that a resumed run samples what the uninterrupted run sampled."""
    loss = trainer.cfg.loss
    params = sampling_params(loss.sampling, "loss.sampling", n=loss.n_samples_per_prompt,
                             seed=trainer.cfg.seed * 1_000_003 + step)
    return [trainer.train_examples[i] for i in trainer.global_batch(step)], params


AHEAD_FILE = "rollouts_ahead.pt"  # in a checkpoint: the RolloutQueue's rollouts for the steps after it


@dataclass
class Started:
    """A rollout whose generation has started: for step ``step``, from the weights after
    ``version`` updates. The colocated layout generates it at once (``rollout``); the sampler
    ranks send it later (``ticket``)."""
    step: int
    version: int
    examples: list[dict]
    ticket: int | None = None
    rollout: Rollout | None = None


class RolloutQueue:
    """The rollouts generated ahead of the step that trains on them. With ``rollout.max_staleness``
    k, step j's rollout is sampled from the weights after update max(0, j - k): at step s the
    trainer takes rollout s, then starts those of the steps up to s + k from its current weights,
    which the sampler ranks generate while the trainers train (``rollout.sampler_ranks``); the
    colocated layout generates them at once, on the same ranks. k = 0 is on-policy: each step
    syncs and samples, then trains. A checkpoint holds the rollouts started and not yet trained
    on (``state``), waiting for any still in flight: a resumed run trains on exactly those."""

    def __init__(self, trainer):
        self.trainer, self.ahead, self.synced = trainer, {}, None

    def take(self, step: int) -> tuple[Rollout, dict]:
        """Collective: step ``step``'s rollout (unscored, the whole of it on every rank, each sample's
        ``versions``); then the rollouts of the next steps started; and the seconds of each phase."""
        t, timing = self.trainer, {"sync": 0.0, "generate": 0.0}
        if step not in self.ahead:
            self.start(step, timing)
        rollout = self.finish(self.ahead.pop(step), timing)
        for j in range(step + 1, min(step + t.cfg.rollout.max_staleness, t.total_steps - 1) + 1):
            if j not in self.ahead:
                self.start(j, timing)
        return rollout, timing

    def start(self, step: int, timing: dict):
        t = self.trainer
        if self.synced != t.step:  # the weights it samples from: those after t.step updates
            timing["sync"] += t.sampler.sync_weights(t.model)
            if isinstance(t.sampler, RemoteSampler):  # waiting for the sampler ranks to finish what they generate
                timing["sync_wait"] = t.sampler.sync_stats["wait"]
            self.synced = t.step
        examples, params = rollout_request(t, step)
        started = Started(step, t.step, examples)
        clock = time.perf_counter()
        if isinstance(t.sampler, RemoteSampler):
            started.ticket = t.sampler.submit([ex["prompt_ids"] for ex in examples], params)
        else:  # each rank samples its share of the prompts
            mine = rollout_of(t.sampler, distributed.share(examples), params, t.tokenizer.eos_token_id, t.env)
            started.rollout = Rollout.cat(distributed.gather([mine]))
            started.rollout.versions = torch.full((len(started.rollout),), t.step, dtype=torch.long)
        timing["generate"] += time.perf_counter() - clock
        self.ahead[step] = started

    def finish(self, started: Started, timing: dict | None = None) -> Rollout:
        """The rollout of ``started``, waiting for the sampler ranks if it is still in flight."""
        if started.rollout is None:
            t, clock = self.trainer, time.perf_counter()
            samples = t.sampler.result(started.ticket)
            started.rollout = Rollout.of(started.examples, samples, t.tokenizer.eos_token_id)
            started.rollout.versions = torch.full((len(started.rollout),), started.version, dtype=torch.long)
            if timing is not None:
                timing["generate"] += time.perf_counter() - clock  # the trainers' idle time
                timing["sampler_generate"], timing["sampler_idle"] = t.sampler.sampler_seconds
        return started.rollout

    def state(self) -> list[Started]:
        """Collective: the rollouts started for the steps after this one, each received."""
        for started in self.ahead.values():
            self.finish(started)
        return [self.ahead[j] for j in sorted(self.ahead)]

    def restore(self, saved: list[Started]):
        self.ahead, self.synced = {s.step: s for s in saved}, None


def sample_rollout(trainer) -> tuple[Rollout, dict]:
    """Collective: this step's rollout (``RolloutQueue``), scored (each rank scores a share), as one
    Rollout on every rank; and the seconds of each phase."""
    rollout, timing = trainer.rollouts.take(trainer.step)
    t = time.perf_counter()
    mine = rollout.select(distributed.share(list(range(len(rollout)))))
    trainer.rewards.score(mine)
    timing["score"] = time.perf_counter() - t
    rollout = Rollout.cat(distributed.gather([mine]))
    trainer.rewards.check(rollout, trainer.step + 1)
    return rollout, timing


def staleness(rollout: Rollout, step: int, max_staleness: int) -> dict:
    """How many updates old the weights that sampled each sample are, at step ``step``: their mean
    and max; a sample older than ``max_staleness`` is a fault of the queue, not of the user."""
    age = step - rollout.versions
    if len(rollout) and not 0 <= int(age.min()) <= int(age.max()) <= max_staleness:
        raise RuntimeError(f"step {step + 1}: samples {age.max().item()} updates old with rollout.max_staleness="
                           f"{max_staleness} (versions {sorted(set(rollout.versions.tolist()))})")
    return {"rollout/staleness_mean": age.float().mean().item(), "rollout/staleness_max": int(age.max())} if len(rollout) else {}


def token_term(per_token, stats: dict, mask, weights) -> tuple[torch.Tensor, dict]:
    """A per-token policy loss summed with the aggregation ``weights``, and its metrics (means over
    the tokens) as {name: (sum, count)}: what ``policy_loss`` returns."""
    tokens = mask.sum()
    return (per_token * weights).sum(), {f"policy/{k}": (v * tokens, tokens) for k, v in stats.items()}


class PolicyGradientTrainer(Trainer):
    """On-policy RL as one SPMD program: policy, frozen reference, reward models (and PPO's critic)
    are FSDP modules on the same ranks, and the colocated sampler generates from the policy's
    weights, synced at the start of every iteration. A subclass gives ``advantages``.

    ``loss.aggregation`` says how per-token losses become the mini-batch's loss (losses/rl.py
    ``aggregation_weights``): token_mean (DAPO), sequence_mean (GRPO's paper) or constant (Dr.
    GRPO). The policy update is PPO's clipped surrogate times the truncated importance weight
    exp(pi_old - pi_sampler) (capped at ``tis_cap``; both log-probs of the tempered policy), which
    corrects for the sampler and the trainer disagreeing on log-probs; plus the KL term (if not in
    the reward) and the entropy bonus.
    """

    row_format = "prompt"
    starts_from_a_model = True
    plays_episodes = True
    critic = None  # PPOTrainer's
    teacher = None  # DistillTrainer's
    loss_config = PolicyGradientConfig

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        start_sampling(self, self.reward_required())
        loss = cfg.loss
        self.reference = self.models.frozen(cfg.model, self.model) if loss.kl_coef > 0 else None
        if loss.kl_target:
            self.kl_ctl = AdaptiveKLController(loss.kl_coef, loss.kl_target, loss.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(loss.kl_coef)

    def advantages(self, rollout: Rollout):
        """``rollout.advantages`` (and ``returns`` where a critic learns them), [N, T]."""
        raise NotImplementedError

    def sequence_level(self) -> bool:
        """Whether a completion is one action (its probability ratio clipped as one): RLOO's paper."""
        return False

    def keep(self, rollout: Rollout) -> list[int] | None:
        """The samples to train on (None: all of them)."""
        return None

    def reward_required(self) -> bool:
        """Whether the scores are what the policy learns from (on-policy distillation may not)."""
        return True

    def check_config(self):
        super().check_config()
        check_sampling(self.cfg, self.world, self.reward_required())
        loss, samples = self.cfg.loss, self.cfg.loss.rollout_batch_size * self.cfg.loss.n_samples_per_prompt
        if samples % self.cfg.batch_size:
            raise ValueError(f"rollout_batch_size x n_samples_per_prompt = {samples} samples must split into "
                             f"mini-batches of batch_size={self.cfg.batch_size}")
        if loss.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation={loss.aggregation!r}: expected one of {AGGREGATIONS}")
        if self.sequence_level() and loss.aggregation != "sequence_mean":
            raise ValueError(f"loss.sequence_level gives one loss per completion, averaged over completions: it needs "
                             f"loss.aggregation=sequence_mean (got {loss.aggregation})")
        if not loss.sampling.temperature > 0:
            raise ValueError("loss.sampling.temperature must be > 0: the policy is softmax(logits / temperature)")

    def examples_per_step(self) -> int:
        return self.cfg.loss.rollout_batch_size

    def updates_per_step(self) -> int:
        loss = self.cfg.loss
        return loss.epochs_per_iteration * loss.rollout_batch_size * loss.n_samples_per_prompt // self.cfg.batch_size

    def eval_metrics(self) -> dict:
        return evaluation.reward_eval(self)

    def collate(self, rollout: Rollout) -> dict:
        fields = tuple(f for f in TOKEN_FIELDS if getattr(rollout, f) is not None)
        return self.layout([rollout.sequence(i, fields) for i in range(len(rollout))], self.tokenizer.pad_token_id, fields)

    def n_loss_terms(self, rollout: Rollout) -> int:
        return sum(aggregation_units(int(n), self.cfg.loss.aggregation) for n in rollout.mask.sum(1))

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "kl_coef": self.kl_ctl.value}

    def checkpoint_files(self) -> dict:
        """The rollouts generated for the next steps (``rollout.max_staleness``), received."""
        return {AHEAD_FILE: self.rollouts.state()} if self.cfg.rollout.max_staleness else {}

    def restore_files(self, path: Path):
        if self.cfg.rollout.max_staleness:
            self.rollouts.restore(torch.load(path / AHEAD_FILE, weights_only=False))

    def restore_state(self, state: dict):
        super().restore_state(state)
        self.kl_ctl.value = state["kl_coef"]

    def train_step(self) -> dict:
        loss, start = self.cfg.loss, time.perf_counter()
        # 1. this step's rollout, sampled now or (rollout.max_staleness) up to k updates ago, scored: the
        #    whole rollout on every rank; the next steps' rollouts started
        rollout, timing = sample_rollout(self)
        record, n_sampled = self.rewards.metrics(rollout), len(rollout)
        record.update(staleness(rollout, self.step, self.cfg.rollout.max_staleness))
        # 2. the samples to train on (GRPO's filter_groups: the groups whose scores differ)
        kept = self.keep(rollout)
        if kept is not None:
            rollout = rollout.select(kept)
            record["rollout/kept_fraction"] = len(rollout) / n_sampled
        # 3. per completion token: pi_old's and the reference's log-probs, the critic's values
        t = time.perf_counter()
        self.score_tokens(rollout)
        timing["logprobs"], t = time.perf_counter() - t, time.perf_counter()
        if len(rollout):  # (keep can leave none: then the iteration trains on nothing)
            # 4. per token: the KL to the reference, the advantages, the importance weights
            record.update(self.estimate(rollout))
            if loss.save_rollouts and distributed.is_main():
                checkpointing.write_jsonl(self.run_dir / "rollouts" / f"step-{self.step + 1}.jsonl", rollout.sample_rows())
        # 5. epochs_per_iteration passes over it in mini-batches of batch_size samples, an update each (loss)
        record.update(self.train_epochs(rollout, loss.epochs_per_iteration))
        # 6. the adaptive KL coefficient moves toward its target
        if len(rollout):
            self.kl_ctl.update(record["rollout/kl"], len(rollout))
        timing["train"] = time.perf_counter() - t
        record.update({f"timing/{k}": v for k, v in timing.items()})
        elapsed = time.perf_counter() - start
        record.update({"timing/iteration": elapsed, "samples_per_s": n_sampled / elapsed, "kl_coef": self.kl_ctl.value})
        return record

    def score_tokens(self, rollout: Rollout):
        """Collective: per completion token, pi_old's and the reference's log-probs (at the sampling
        temperature) and the critic's values, into ``rollout`` (``logprobs.score_tokens``)."""
        scorers = {"old_logps": lambda batch: self.policy_logps(self.model, batch)[0]}
        if self.reference is not None:
            scorers["ref_logps"] = lambda batch: self.policy_logps(self.reference, batch, truncated=False)[0]
        if self.critic is not None:
            scorers["old_values"] = lambda batch: self.critic(batch["input_ids"], batch["position_ids"])[0].float()
        if self.teacher is not None:
            scorers["teacher_logps"] = lambda batch: self.policy_logps(self.teacher, batch, truncated=False)[0]
        frozen = tuple(m for m in (self.reference, self.teacher) if isinstance(m, torch.nn.Module))  # not AdapterOff
        logprobs.score_tokens(rollout, self.collate, self.forward_size(), scorers, frozen)

    def estimate(self, rollout: Rollout) -> dict:
        """Per token of ``rollout``: the KL to the reference, the advantages (``advantages``) and the
        truncated importance weights; their metrics."""
        loss = self.cfg.loss
        rollout.kl = torch.zeros_like(rollout.old_logps)
        if self.reference is not None:
            rollout.kl = kl_penalty(rollout.old_logps, rollout.ref_logps, loss.kl_estimator) * rollout.mask
        self.advantages(rollout)
        rollout.is_weight = importance_weights(rollout.old_logps, rollout.sampler_logps, rollout.mask, loss.tis_cap,
                                               self.sequence_level())
        return rollout_stats(rollout)

    def policy_logps(self, model, batch: dict, truncated: bool = True, **entropy):
        """Log-probs of the policy being optimised, the distribution the samples were drawn from:
        softmax(logits / T) (as in verl and OpenRLHF), and with ``loss.truncate_like_sampler`` that
        distribution truncated to the sampler's top-k/top-p set and renormalised
        (``logprobs.truncate``), so that on-policy the importance weight is exactly 1; the sampler
        reports its log-probs of that same distribution (sampler.py). ``truncated=False``: the full
        tempered softmax (the reference's)."""
        sampling = self.cfg.loss.sampling
        if truncated and self.cfg.loss.truncate_like_sampler:
            entropy.update(top_k=sampling.top_k, top_p=sampling.top_p)
        return self.token_logps(model, batch, sampling.temperature, **entropy)

    def reward_kl_coef(self) -> float:
        """The KL coefficient in the reward (0 when the KL is in the loss instead)."""
        return self.kl_ctl.value if self.cfg.loss.kl_in_reward else 0.0

    def loss(self, batch: dict, rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """Summed over the micro-batch with ``aggregation_weights``: divided by the global
        ``n_loss_terms`` it is the mini-batch's aggregated loss."""
        loss, n = self.cfg.loss, len(rollout)
        logps, mask, entropy = self.policy_logps(self.model, batch, with_entropy=True, entropy_grad=loss.entropy_coef > 0)
        weights = aggregation_weights(mask, batch["seq_ids"], n, loss.aggregation, loss.sampling.max_new_tokens)
        terms, tokens = self.n_loss_terms(rollout), mask.sum()
        total, metrics = self.policy_loss(logps, mask, batch, weights, n)
        metrics["policy/loss"] = (total.detach(), terms)
        if self.reference is not None and not loss.kl_in_reward:
            kl = kl_penalty(logps, batch["ref_logps"], loss.kl_estimator) * mask
            total = total + self.kl_ctl.value * (kl * weights).sum()
            metrics["policy/kl"] = (kl.sum().detach(), tokens)
        total = total - loss.entropy_coef * (entropy * weights).sum()
        metrics["policy/entropy"] = (entropy.sum().detach(), tokens)
        return total + self.critic_loss(batch, mask, weights, metrics), metrics

    def policy_loss(self, logps, mask, batch: dict, weights, n: int) -> tuple[torch.Tensor, dict]:
        """The policy term of the micro-batch's loss, summed with ``weights``, and its metrics as
        {name: (sum, count)}: PPO's clipped surrogate per token, or (``sequence_level``) per
        completion. The objectives of GRPO's family that differ (GSPO, CISPO, SAPO) override it."""
        loss = self.cfg.loss
        if self.sequence_level():
            per_seq, stats = sequence_ppo_loss(logps, batch["old_logps"], batch["advantages"], mask, batch["seq_ids"], n,
                                               loss.clip, loss.clip_high, is_weight=batch["is_weight"])
            return per_seq.sum(), {f"policy/{k}": (v * n, n) for k, v in stats.items()}
        return token_term(*ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, loss.clip,
                                           loss.clip_high, is_weight=batch["is_weight"]), mask, weights)

    def critic_loss(self, batch: dict, mask, weights, metrics: dict):
        """PPO's value loss, summed with ``weights`` (nothing without a critic)."""
        return 0.0


@dataclass
class PPOConfig(ClippedConfig):
    gamma: float
    lam: float
    whiten_rewards: bool
    whiten_advantages: bool
    critic_init: str
    critic_lr: float
    vf_coef: float
    value_clip: Optional[float]


class PPOTrainer(PolicyGradientTrainer):
    """PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022): a critic (``loss.critic_init``:
    the first reward model, the policy, or a model directory) with its own optimizer and clipped
    value loss; advantages by GAE over per-token rewards (the score at the last token, -KL at
    every token when ``kl_in_reward``)."""

    loss_config = PPOConfig

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        loss = cfg.loss
        init = loss.critic_init
        critic_cfg = cfg.model if init == "policy" else models.config_for(cfg, cfg.reward.models[0] if init == "reward" else init)
        self.critic = self.models.scorer(critic_cfg)
        self.critic_optimizer, self.critic_scheduler = self.optimizer_for(self.critic, loss.critic_lr)

    def check_config(self):
        super().check_config()
        if self.cfg.loss.critic_init == "reward" and not self.cfg.reward.models:
            raise ValueError("loss.critic_init=reward needs a reward model (reward.models); or set loss.critic_init=policy")
        if self.cfg.loss.critic_init not in ("reward", "policy"):  # a model directory: checked before anything is built
            models.model_config(models.config_for(self.cfg, self.cfg.loss.critic_init), key="loss.critic_init")

    def advantages(self, rollout: Rollout):
        loss, mask = self.cfg.loss, rollout.mask
        rewards = token_rewards(rollout.scores, rollout.kl, mask, self.reward_kl_coef())
        if loss.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, rollout.returns = gae(rewards, rollout.old_values, mask, loss.gamma, loss.lam)
        rollout.advantages = masked_whiten(adv, mask) if loss.whiten_advantages else adv

    def critic_loss(self, batch: dict, mask, weights, metrics: dict):
        values = self.critic(batch["input_ids"], batch["position_ids"])[0].float()
        per_value = value_loss(values, batch["old_values"], batch["returns"], mask, self.cfg.loss.value_clip)
        metrics["critic/value_loss"] = (per_value.sum().detach(), mask.sum())
        return self.cfg.loss.vf_coef * (per_value * weights).sum()

    def extra_models(self) -> dict:
        return {"critic": (self.critic, self.critic_optimizer)}

    def step_optimizers(self) -> dict:
        record = super().step_optimizers()
        record["critic/grad_norm"] = self.clip_and_step(self.critic, self.critic_optimizer, self.critic_scheduler)
        return record

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "critic_scheduler": self.critic_scheduler.state_dict()}

    def restore_state(self, state: dict):
        super().restore_state(state)
        self.critic_scheduler.load_state_dict(state["critic_scheduler"])


@dataclass
class GRPOConfig(ClippedConfig):
    scale_rewards: bool
    sequence_level: bool
    filter_groups: bool


class GRPOTrainer(PolicyGradientTrainer):
    """GRPO (Shao et al. 2024, DeepSeekMath): no critic; a sample's advantage is its score against
    the mean (and, with ``scale_rewards``, the std) of its prompt's samples, the same for each of its
    tokens. ``filter_groups`` trains only on prompts whose samples score differently (the others
    have zero advantage: DAPO's dynamic-sampling filter, without its re-sampling)."""

    loss_config = GRPOConfig

    def check_config(self):
        super().check_config()
        if self.cfg.loss.n_samples_per_prompt < 2:
            raise ValueError(f"loss={self.cfg.loss.name} compares the samples of a prompt: n_samples_per_prompt must be >= 2")

    def sequence_level(self) -> bool:
        return self.cfg.loss.sequence_level

    def keep(self, rollout: Rollout) -> list[int] | None:
        return rollout.varied_groups(self.cfg.loss.n_samples_per_prompt) if self.cfg.loss.filter_groups else None

    def advantages(self, rollout: Rollout):
        loss = self.cfg.loss
        scores = rollout.scores - self.reward_kl_coef() * rollout.kl.sum(1)
        rollout.advantages = grpo_advantages(scores, loss.n_samples_per_prompt, scale=loss.scale_rewards)[:, None] * rollout.mask


@dataclass
class RLOOConfig(ClippedConfig):
    whiten_advantages: bool
    sequence_level: bool
    filter_groups: bool


class RLOOTrainer(GRPOTrainer):
    """RLOO (Ahmadian et al. 2024): GRPO's groups with another baseline: the mean score of the other
    samples of the prompt, a sample's summed KL to the reference subtracted from its score; as in
    the paper the whole completion is one action (``sequence_level`` in rloo.yaml)."""

    loss_config = RLOOConfig

    def advantages(self, rollout: Rollout):
        loss, mask = self.cfg.loss, rollout.mask
        scores = rollout.scores - self.reward_kl_coef() * rollout.kl.sum(1)
        adv = rloo_advantages(scores, loss.n_samples_per_prompt)[:, None] * mask
        rollout.advantages = masked_whiten(adv, mask) if loss.whiten_advantages else adv


@dataclass
class ReinforcePPConfig(ClippedConfig):
    gamma: float


class ReinforcePPTrainer(PolicyGradientTrainer):
    """REINFORCE++ (Hu 2025): no critic; per-token rewards (the score at the last token, -KL at
    every token), returns-to-go whitened over the whole batch."""

    loss_config = ReinforcePPConfig

    def advantages(self, rollout: Rollout):
        rewards = token_rewards(rollout.scores, rollout.kl, rollout.mask, self.reward_kl_coef())
        rollout.advantages = reinforce_pp_advantages(rewards, rollout.mask, self.cfg.loss.gamma)


@dataclass
class GSPOConfig(ClippedConfig):
    scale_rewards: bool
    filter_groups: bool
    token_level: bool  # GSPO-token: the sequence's ratio, a gradient path per token


class GSPOTrainer(GRPOTrainer):
    """GSPO (Zheng et al. 2025): GRPO's group advantages with the importance ratio and its clip at
    the sequence level, the ratio a per-token geometric mean (``losses.rl.gspo_loss``), averaged
    over sequences; ``loss.token_level``: GSPO-token."""

    loss_config = GSPOConfig

    def check_config(self):
        super().check_config()
        if self.cfg.loss.aggregation != "sequence_mean":
            raise ValueError(f"loss=gspo averages its per-sequence losses over sequences: it needs "
                             f"loss.aggregation=sequence_mean (got {self.cfg.loss.aggregation})")

    def sequence_level(self) -> bool:
        return False  # the ratio is the sequence's inside the loss; the sampler's importance weight stays per token

    def policy_loss(self, logps, mask, batch: dict, weights, n: int) -> tuple[torch.Tensor, dict]:
        loss, token_level = self.cfg.loss, self.cfg.loss.token_level
        out, stats = gspo_loss(logps, batch["old_logps"], batch["advantages"], mask, batch["seq_ids"], n, loss.clip,
                               loss.clip_high, is_weight=batch["is_weight"], token_level=token_level)
        total, units = ((out * weights).sum(), mask.sum()) if token_level else (out.sum(), n)
        return total, {"policy/clipfrac": (stats["clipfrac"] * units, units),
                       "policy/approx_kl": (stats["approx_kl"] * n, n)}


@dataclass
class CISPOConfig(ClippedConfig):
    scale_rewards: bool
    filter_groups: bool


class CISPOTrainer(GRPOTrainer):
    """CISPO (MiniMax-M1): GRPO's group advantages, REINFORCE weighted by the clipped, detached
    importance ratio (``losses.rl.cispo_loss``), token mean."""

    loss_config = CISPOConfig

    def sequence_level(self) -> bool:
        return False

    def policy_loss(self, logps, mask, batch: dict, weights, n: int) -> tuple[torch.Tensor, dict]:
        return token_term(*cispo_loss(logps, batch["old_logps"], batch["advantages"], mask, self.cfg.loss.clip,
                                      self.cfg.loss.clip_high, is_weight=batch["is_weight"]), mask, weights)


@dataclass
class SAPOConfig(PolicyGradientConfig):
    scale_rewards: bool
    filter_groups: bool
    tau_pos: float  # the gate's temperature where the advantage is positive
    tau_neg: float  # and where it is not (larger: the gate closes faster)


class SAPOTrainer(GRPOTrainer):
    """SAPO (Gao et al. 2025): GRPO's group advantages, a smooth temperature-controlled gate on the
    ratio instead of a clip (``losses.rl.sapo_loss``), token mean."""

    loss_config = SAPOConfig

    def sequence_level(self) -> bool:
        return False

    def policy_loss(self, logps, mask, batch: dict, weights, n: int) -> tuple[torch.Tensor, dict]:
        return token_term(*sapo_loss(logps, batch["old_logps"], batch["advantages"], mask, self.cfg.loss.tau_pos,
                                     self.cfg.loss.tau_neg, is_weight=batch["is_weight"]), mask, weights)


@dataclass
class DistillConfig(ClippedConfig):
    teacher: Optional[str]  # the teacher's model directory (same tokenizer as the policy)
    divergence: str  # sampled_reverse_kl | jsd
    jsd_beta: float  # divergence=jsd: GKD's beta (0: forward KL, 1: reverse KL)
    reward_weight: float  # 0: distillation alone; > 0: plus this times GRPO's group advantage of the reward


DIVERGENCES = ("sampled_reverse_kl", "jsd")


class DistillTrainer(PolicyGradientTrainer):
    """On-policy distillation (Agarwal et al. 2024's GKD): the student samples, a frozen teacher
    (``loss.teacher``, sharded like the reference) scores the samples, and the student moves toward
    it at every sampled position. ``loss.divergence`` says how:

    - ``sampled_reverse_kl`` (the form of Qwen3 and Thinking Machines): each token's advantage is
      minus the per-token reverse KL, sampled,

        A_t = -(log pi_student(y_t) - log pi_teacher(y_t))   [+ reward_weight x GRPO's A_i]

      dense, undiscounted (each token answers for itself), trained with the clipped surrogate; on
      policy its gradient is that of -KL(pi_student || pi_teacher) over the sampled sequences.
    - ``jsd``: GKD's generalised JSD with ``jsd_beta`` over the whole vocabulary at each sampled
      position (``losses.rl.generalized_jsd``), minimised directly (``jsd_loss``): the teacher's
      full distribution is computed per micro-batch, N x V floats. The clipped surrogate then
      carries only the reward's advantage, and runs (a second forward) only where there is a
      reward, a reference or an entropy bonus.

    Both distributions at the sampling temperature (T = 1 in distill.yaml), untruncated."""

    loss_config = DistillConfig

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        teacher_cfg = models.config_for(cfg, cfg.loss.teacher)
        self.teacher = self.models.frozen(teacher_cfg)

    def reward_required(self) -> bool:
        return self.cfg.loss.reward_weight > 0

    def check_config(self):
        super().check_config()
        loss = self.cfg.loss
        if not loss.teacher:
            raise models.ConfigError("loss=distill needs a teacher: loss.teacher=<its model directory, e.g. a run's "
                                     "LATEST export>")
        if loss.divergence not in DIVERGENCES:
            raise ValueError(f"loss.divergence={loss.divergence}: one of {', '.join(DIVERGENCES)}")
        if not 0 <= loss.jsd_beta <= 1:
            raise ValueError(f"loss.jsd_beta={loss.jsd_beta}: GKD's beta is in [0, 1] (0: forward KL, 1: reverse KL)")
        teacher_cfg = models.config_for(self.cfg, loss.teacher)
        models.model_config(teacher_cfg, key="loss.teacher")
        ours, theirs = models.load_tokenizer(self.cfg.model), models.load_tokenizer(teacher_cfg)
        if ours.get_vocab() != theirs.get_vocab():
            raise models.ConfigError(f"loss.teacher={loss.teacher}: its tokenizer is not the policy's: on-policy "
                                     f"distillation compares the two models' log-probs token by token; use a teacher "
                                     f"with the policy's tokenizer")
        if loss.reward_weight > 0 and loss.n_samples_per_prompt < 2:
            raise ValueError("loss.reward_weight > 0 adds GRPO's group advantage: n_samples_per_prompt must be >= 2")

    def advantages(self, rollout: Rollout):
        loss, mask = self.cfg.loss, rollout.mask
        if loss.divergence == "sampled_reverse_kl":
            rollout.advantages = -(rollout.old_logps - rollout.teacher_logps) * mask
        else:
            rollout.advantages = torch.zeros_like(rollout.old_logps)
        if loss.reward_weight > 0:
            scores = rollout.scores - self.reward_kl_coef() * rollout.kl.sum(1)
            group = grpo_advantages(scores, loss.n_samples_per_prompt)[:, None] * mask
            rollout.advantages = rollout.advantages + loss.reward_weight * group

    def estimate(self, rollout: Rollout) -> dict:
        record = super().estimate(rollout)
        record["distill/reverse_kl"] = masked_mean(rollout.old_logps - rollout.teacher_logps, rollout.mask).item()
        return record

    def loss(self, batch: dict, rollout: Rollout) -> tuple[torch.Tensor, dict]:
        return self.jsd_loss(batch, rollout) if self.cfg.loss.divergence == "jsd" else super().loss(batch, rollout)

    def jsd_loss(self, batch: dict, rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """The micro-batch's generalised JSD summed with ``aggregation_weights`` (plus the clipped
        surrogate's loss where a reward, reference or entropy bonus needs it)."""
        loss, chunk = self.cfg.loss, self.cfg.logprob_chunk_tokens
        temperature = loss.sampling.temperature
        with torch.no_grad():
            teacher = logprobs.vocab_logps(self.teacher, batch, chunk, temperature)
        divergence = logprobs.jsd(self.model, batch, teacher, loss.jsd_beta, chunk, temperature)
        mask = (batch["targets"] != IGNORE).float()
        weights = aggregation_weights(mask, batch["seq_ids"], len(rollout), loss.aggregation,
                                      loss.sampling.max_new_tokens)
        total, metrics = (divergence * weights).sum(), {"distill/jsd": (divergence.sum().detach(), mask.sum())}
        if loss.reward_weight > 0 or self.reference is not None or loss.entropy_coef:
            rest, more = super().loss(batch, rollout)
            total, metrics = total + rest, {**more, **metrics}
        return total, metrics


# --- the online loops ---------------------------------------------------------------------------

def online(base):
    """``base``, a trainer of a fixed dataset (SFT, DPO), as an online loop: it reads prompts, and
    each step is one iteration that samples ``n_samples_per_prompt`` completions for
    ``rollout_batch_size`` prompts, scores them, turns them into ``base``'s training examples
    (``make_data``, collective) and trains on those with ``base``'s loss for
    ``epochs_per_iteration`` epochs in mini-batches of ``batch_size``.

    Every iteration writes, under ``run_dir/iterations/<N>/``, ``samples.jsonl`` (every scored
    sample), ``rollout.json`` (their metrics), ``train.jsonl`` (the examples, before training) and,
    with ``save_iteration_models``, ``model/`` (the model it ends with), and a checkpoint. A run
    resumes at the iteration it stopped in; if that iteration's examples were written it trains on
    them instead of sampling again. The learning-rate schedule counts one example per prompt per
    epoch; iterations that make fewer examples take fewer updates (a partial mini-batch is dropped).
    """

    class Online(base):
        row_format = "prompt"
        starts_from_a_model = True

        def __init__(self, cfg, device):
            super().__init__(cfg, device)
            start_sampling(self, self.reward_required())

        def make_data(self, rollout: Rollout) -> list[dict]:
            """Collective: the examples this iteration trains on, from the whole scored rollout."""
            raise NotImplementedError

        def reward_required(self) -> bool:
            """Whether the examples are chosen by score (online DPO's self-judged pairs are not)."""
            return True

        def check_config(self):
            super().check_config()
            check_sampling(self.cfg, self.world, self.reward_required())

        def examples_per_step(self) -> int:
            return self.cfg.loss.rollout_batch_size

        def eval_metrics(self) -> dict:
            return evaluation.reward_eval(self)

        def updates_per_step(self) -> int:
            loss = self.cfg.loss
            return max(1, loss.epochs_per_iteration * loss.rollout_batch_size // self.cfg.batch_size)

        def save_now(self) -> bool:
            return True  # a checkpoint every iteration: iterations are long and resume at their start

        def train_step(self) -> dict:
            cfg, start = self.cfg, time.perf_counter()
            out = self.run_dir / "iterations" / str(self.step + 1)
            # only when resuming: a fresh start in the run_dir of a killed run samples anew
            written = distributed.all_sum([float((out / "train.jsonl").exists())], self.device)[0] if cfg.resume else 0
            if written == self.world:
                data = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
                record = json.loads((out / "rollout.json").read_text())  # this iteration's rollout metrics
                log.info(f"iteration {self.step + 1}: training on the data it wrote before it stopped "
                         f"({out / 'train.jsonl'})")
            else:
                rollout, timing = sample_rollout(self)
                data = self.make_data(rollout)
                record = {**self.rewards.metrics(rollout), **{f"timing/{k}": v for k, v in timing.items()}}
                if distributed.is_main():
                    checkpointing.write_jsonl(out / "samples.jsonl", rollout.sample_rows())
                    checkpointing.write_jsonl(out / "rollout.json", [record])
                    checkpointing.write_jsonl(out / "train.jsonl", data)  # last: its presence means sampling is done
                distributed.barrier()
            t = time.perf_counter()
            record.update(self.train_epochs(data, cfg.loss.epochs_per_iteration))
            record.update({"iteration/examples": len(data),
                           "timing/train": time.perf_counter() - t, "timing/iteration": time.perf_counter() - start})
            if cfg.loss.save_iteration_models:
                self.export(out / "model")
            return record

    return Online


@dataclass
class OnlineDPOConfig(SamplingRunConfig):
    min_score_gap: float
    self_judge: bool  # true: the policy judges its own pairs (seed 000), no reward
    principle: str  # what "better" means to it
    beta: float
    label_smoothing: float
    rpo_alpha: float
    save_iteration_models: bool


class OnlineDPOTrainer(online(DPOTrainer)):
    """Iterative online DPO (RLHFlow, seed 001): per prompt, its best and its worst sample by score
    make a pair if the best wins by more than ``loss.min_score_gap`` (``data.selection``), trained on with
    the DPO loss; the reference is the model the iteration starts from (the previous iteration's),
    its log-probs of each pair computed with the pairs and stored with them. With
    ``loss.self_judge`` the policy itself judges each prompt's pair instead (``self_judged``)."""

    loss_config = OnlineDPOConfig

    def reward_required(self) -> bool:
        return not self.cfg.loss.self_judge

    def check_config(self):
        super().check_config()
        if self.cfg.loss.n_samples_per_prompt < 2:
            raise ValueError("loss=online_dpo pairs samples of a prompt: n_samples_per_prompt must be >= 2")

    def reference_mode(self) -> str:
        return "with_pairs"

    def before_training(self):
        """Nothing precomputed: the reference's log-probs come with each iteration's pairs."""

    def make_data(self, rollout: Rollout) -> list[dict]:
        loss, scores = self.cfg.loss, rollout.scores.tolist()
        judged = self.self_judged(rollout) if loss.self_judge else {}
        chosen_rejected = list(judged) if loss.self_judge else best_vs_worst_pairs(scores, loss.n_samples_per_prompt,
                                                                                    loss.min_score_gap)
        pairs = [{"prompt": rollout.prompts[best], "chosen": rollout.sequence(best), "rejected": rollout.sequence(worst),
                  "chosen_text": rollout.texts[best], "rejected_text": rollout.texts[worst],
                  "scores": [scores[best], scores[worst]],
                  **({"judge_prob_chosen": judged[best, worst]} if judged else {})}
                 for best, worst in chosen_rejected]
        for pair, ref in zip(pairs, self.pair_logps(pairs)):
            pair["ref"] = list(ref)
        return pairs

    def self_judged(self, rollout: Rollout) -> dict[tuple[int, int], float]:
        """Collective. Seed 000's self-reference: each prompt's first two samples whose texts differ
        (and are not empty), judged by the policy itself through the colocated sampler as
        label_preferences.py judges with a local model (``judges.judge_messages``: ``loss.principle``,
        the row's reference answer when it has one, both orders, P(a better) averaged); (chosen,
        rejected) indices of each pair with a verdict, an exact tie giving none, and the judge's
        probability that the chosen one is better."""
        n = self.cfg.loss.n_samples_per_prompt
        candidates = []
        for start in range(0, len(rollout), n):
            group = [i for i in range(start, start + n) if rollout.texts[i].strip()]
            second = next((j for j in group[1:] if rollout.texts[j] != rollout.texts[group[0]]), None)
            if second is not None:
                candidates.append((group[0], second))
        prompts, fits = [], []
        for a, b in candidates:
            reference = judges.reference_of(rollout.rows[a])
            both = [prompt_ids(self.tokenizer, judges.judge_messages(self.cfg.loss.principle, rollout.prompts[a],
                                                                      x, y, reference))
                    for x, y in ((rollout.texts[a], rollout.texts[b]), (rollout.texts[b], rollout.texts[a]))]
            if max(map(len, both)) < self.cfg.max_length:  # the sampler's limit, with room for the answer
                prompts += both
                fits.append((a, b))
        if len(fits) < len(candidates):
            log.warning(f"iteration {self.step + 1}: {len(candidates) - len(fits)} of {len(candidates)} pairs not "
                        f"self-judged: their judge prompt is max_length={self.cfg.max_length} tokens or longer")
        candidates = fits
        mine = distributed.share(list(range(len(candidates))))
        logps = self.sampler.choice_logprobs([prompts[2 * k + o] for k in mine for o in (0, 1)],
                                             judges.choice_ids(self.tokenizer))
        logps = distributed.gather([logps[i:i + 2] for i in range(0, len(logps), 2)])
        pairs = {}
        for (a, b), (a_first, b_first) in zip(candidates, logps):
            verdict, p = judges.decide(judges.two_way(a_first), judges.two_way(b_first[::-1]))
            if verdict in ("a", "b"):
                pairs[(a, b) if verdict == "a" else (b, a)] = max(p, 1 - p)
        return pairs


@dataclass
class RAFTConfig(SamplingRunConfig):
    top_reward_percentage: float
    min_reward: Optional[float]
    save_iteration_models: bool


class RAFTTrainer(online(SFTTrainer)):
    """RAFT / rejection sampling (LMFlow, seed 003; seed 004's rejection sampling): per prompt its
    best sample by score; of those the top ``loss.top_reward_percentage``, and only those scoring
    at least ``loss.min_reward`` (``data.selection``); fine-tuned on with the SFT loss."""

    loss_config = RAFTConfig

    def make_data(self, rollout: Rollout) -> list[dict]:
        loss = self.cfg.loss
        keep = best_of_k(rollout.scores.tolist(), loss.n_samples_per_prompt, loss.top_reward_percentage, loss.min_reward)
        return [{**rollout.sequence(i), "prompt": rollout.prompts[i], "text": rollout.texts[i],
                 "score": rollout.scores[i].item()} for i in keep]


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, RewardTrainer, DPOTrainer, IPOTrainer, KTOTrainer, SimPOTrainer,
                                          ORPOTrainer, PPOTrainer, GRPOTrainer, RLOOTrainer, ReinforcePPTrainer,
                                          GSPOTrainer, CISPOTrainer, SAPOTrainer, DistillTrainer,
                                          OnlineDPOTrainer, RAFTTrainer)}
