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

The hooks, in the order a run meets them:

    hook               when it runs                            overridden by
    check_config       first, before anything is loaded        every family (a bad config costs nothing)
    load_model         building each trainable model           RewardTrainer (a scalar head)
    before_training    once built and restored, before eval    PreferenceTrainer (precomputed reference)
    train_step         each step of the loop                   PolicyGradientTrainer, online()
    examples_per_step  examples a step consumes                trainers that sample (prompts per iteration)
    updates_per_step   optimizer updates in a step             trainers that sample
    collate            a micro-batch -> packed tensors         PolicyGradientTrainer (a Rollout)
    n_loss_terms       what a micro-batch's loss is a sum of   pairs (1 per pair), PolicyGradientTrainer
    loss               summed loss of a packed micro-batch     every algorithm
    step_optimizers    after each update's backward            PPOTrainer (the critic's optimizer too)
    save_now           after each step: checkpoint anyway?     the online loops (every iteration)
    export             at each checkpoint: the HF directory    RewardTrainer (a sequence classifier)
    trainer_state      into each checkpoint                    PolicyGradientTrainer (KL coef), PPOTrainer

The families, each a single chain of classes: ``SFTTrainer``; ``PairTrainer`` -> ``RewardTrainer``
and ``PreferenceTrainer`` -> the DPO family (``DPOTrainer``, ``IPOTrainer``, ``KTOTrainer``,
``SimPOTrainer``, ``ORPOTrainer``); ``PolicyGradientTrainer`` -> ``PPOTrainer``, ``GRPOTrainer`` (->
``RLOOTrainer``, its groups with another baseline), ``ReinforcePPTrainer``; the online loops ``OnlineDPOTrainer`` and ``RAFTTrainer``,
``online(DPOTrainer)`` and ``online(SFTTrainer)``: the loop wrapped around a fixed-data trainer.
Every trainer that samples gets its rollout from ``sample_rollout``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import checkpointing
import distributed
import environments
import evaluation
import logprobs
import models
import overrides
import profiling
from data import DataError, load_rows
from data.packing import last_positions, pack, pad, per_sequence, unpack
from data.selection import best_of_k, best_vs_worst_pairs
from data.toy_env import ENVIRONMENTS
from data.tokenize import IGNORE, TOKENIZERS
from losses import sft_loss
from losses.preference import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from losses.rl import (AGGREGATIONS, AdaptiveKLController, FixedKLController, aggregation_units, aggregation_weights,
                       explained_variance, gae, grpo_advantages, kl_penalty, masked_mean,
                       masked_whiten, ppo_policy_loss, reinforce_pp_advantages, rloo_advantages, sequence_ppo_loss,
                       token_rewards, truncated_is_weight, value_loss)
from metrics_log import MetricsLog
from preemption import StopSignals
from rewards import Rewards
from rollout import TOKEN_FIELDS, Rollout
from sampler import SamplingParams, build_sampler

log = logging.getLogger("train")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup from 0, then cosine decay to ``min_ratio`` of the peak at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def means(sums: dict, name: str, step: int, why: str = "") -> dict:
    """``{name.format(k): sum / count}`` of a step's metric sums, without the metrics of nothing:
    a mean over zero tokens, pairs or samples is not 0, so it is left out and warned about."""
    out = {}
    for k, (value, count) in sums.items():
        if k in ("tokens", "padding"):
            continue
        if count > 0:
            out[name.format(k)] = value / count
        elif distributed.is_main():  # every rank has the same sums: say it once
            log.warning(f"step {step}: {name.format(k)} is a mean over nothing{why}: not logged")
    return out


def crossed(every: int | None, before: int, after: int) -> bool:
    """True when the counter passed a multiple of ``every`` going from ``before`` to ``after``."""
    return bool(every) and after // every > before // every


class Trainer:
    row_format = "sft"  # the rows it reads (data/__init__.py); "prompt": it samples its own completions
    starts_from_a_model = False  # a stage that refines a trained model (warned about when given none)
    plays_episodes = False  # it can sample multi-turn episodes of an environment (env=)

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.run_dir = Path(cfg.run_dir)
        # 1. everything a user can get wrong, before anything is loaded
        self.check_config()
        # every rank computes in the dtype rank 0 measured (model_config copies it to every other
        # model); resolved before the resume check, which compares it with the checkpoint's
        cfg.model.fsdp_policy_mp = distributed.from_main(
            models.compute_dtype(cfg.model.fsdp_policy_mp, device) if self.rank == 0 else None)
        self.packs = cfg.packing in (True, "auto")  # build_model turns it off for a model that cannot pack (auto)
        self.resume_from = checkpointing.to_resume(self.run_dir, cfg)
        # every model directory the run names, checked before anything is built
        models.model_config(cfg.model)
        for path in cfg.reward.models if self.row_format == "prompt" else ():
            models.model_config(self.model_config(path), key="reward.models")
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.rewards, self.env = None, None
        if cfg.env:  # an environment and reward functions load now: a bad name costs no model build
            env_cls = environments.load_environment(cfg.env, ENVIRONMENTS)
            self.env = environments.EpisodeRunner(env_cls, self.tokenizer, cfg.max_turns, cfg.max_length,
                                                  cfg.max_prompt_length, cfg.env_timeout_s)
        if self.row_format == "prompt":
            self.rewards = Rewards(cfg.reward, self.tokenizer, self.layout, self.forward_size(), cfg.row_tokens,
                                   env=self.env is not None)
        # 2. data before the model: bad input stops the run before any compute is spent
        self.train_examples = self.load_examples("train")
        self.eval_examples = self.load_examples("test")[: cfg.n_eval_examples] if cfg.n_eval_examples else []
        self.save_every = overrides.epochs_to_examples(cfg.save_every, len(self.train_examples))
        n = cfg.n_examples or cfg.n_epochs * len(self.train_examples)
        self.total_steps = n // self.examples_per_step()
        if self.total_steps < 1:
            raise DataError(f"{n} training examples make no step of {self.examples_per_step()}")
        if cfg.profile_steps and cfg.profile_steps[1] > self.total_steps:
            raise models.ConfigError(f"profile_steps={list(cfg.profile_steps)}: the run has {self.total_steps} steps; "
                                     f"choose steps between 1 and {self.total_steps}")
        log.info(f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, "
                 f"{self.total_steps} steps of {self.examples_per_step()}, {self.world} rank(s)")
        updates = self.total_steps * self.updates_per_step()
        if cfg.warmup_steps >= updates:
            log.warning(f"warmup_steps={cfg.warmup_steps} is not shorter than the run's {updates} optimizer updates: "
                        f"the learning rate never reaches lr={cfg.lr}")
        if self.starts_from_a_model and models.weights_path(cfg.model) is None:
            log.warning(f"loss={cfg.loss.name} normally starts from a trained model, but model.archive and "
                        f"model.name_or_path are unset: the policy is random init ({cfg.model.name})")
        # 3. the policy, its optimizer, the sampler and the reward models
        self.base_fingerprint = None  # of the weights the policy starts from (load_policy)
        self.model = self.build_model(cfg.model, load=self.load_policy, load_once=not cfg.lora.load_in_4bit)
        self.base_fingerprint = distributed.from_main(self.base_fingerprint)
        self.optimizer, self.scheduler = self.optimizer_for(self.model, cfg.lr)
        self.step, self.examples_seen, self.tokens_seen = 0, 0, 0
        self._permutation = (None, None)
        self.metrics = MetricsLog(cfg)
        self.sampler = None
        if cfg.sample_during_eval or self.row_format == "prompt":
            self.sampler = build_sampler(cfg, self.model, self.tokenizer, self.run_dir)
        for path in cfg.reward.models if self.rewards is not None else ():
            model_cfg = self.model_config(path)
            scorer = self.build_model(model_cfg, load=self.load_scorer).requires_grad_(False).eval()
            self.rewards.add_model(path, scorer, models.load_tokenizer(model_cfg))

    # --- what subclasses change -------------------------------------------------------------

    def check_config(self):
        cfg, per_step = self.cfg, self.world * self.cfg.gradient_accumulation_steps
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of ranks x gradient_accumulation_steps "
                             f"= {self.world} x {cfg.gradient_accumulation_steps}")
        if cfg.max_prompt_length >= cfg.max_length:
            raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below max_length={cfg.max_length}")
        if isinstance(cfg.datasets, str):
            raise ValueError(f"datasets={cfg.datasets}: expected a list, e.g. datasets=[{cfg.datasets}]")
        if cfg.packing not in (True, False, "auto"):
            raise ValueError(f"packing={cfg.packing!r}: expected true, false or auto")
        shard_ranks = cfg.fsdp_shard_ranks
        if shard_ranks is not None and (not isinstance(shard_ranks, int) or shard_ranks < 1 or self.world % shard_ranks):
            raise ValueError(f"fsdp_shard_ranks={cfg.fsdp_shard_ranks} must divide the {self.world} ranks "
                             f"(e.g. the GPUs of one node); null shards over all of them")
        if cfg.row_tokens < cfg.max_length:
            raise ValueError(f"row_tokens={cfg.row_tokens} must hold one whole sequence (max_length={cfg.max_length})")
        if cfg.lora.load_in_4bit and not cfg.lora.r:
            raise models.ConfigError("lora.load_in_4bit=true quantizes the frozen base of a LoRA run: set lora.r "
                                     "(e.g. lora.r=16), or lora.load_in_4bit=false")
        if cfg.env and not self.plays_episodes:
            raise models.ConfigError(f"env={cfg.env}: loss={cfg.loss.name} does not play episodes; the policy-gradient "
                                     f"losses do (loss=grpo, rloo, reinforce_pp, ppo)")
        if cfg.env and not cfg.max_turns >= 1:
            raise models.ConfigError(f"max_turns={cfg.max_turns}: an episode needs at least one reply")
        profiling.check_steps(cfg.profile_steps)
        if cfg.sample_during_eval and self.row_format == "prompt":
            raise models.ConfigError(f"sample_during_eval=true: loss={cfg.loss.name} always evaluates by sampling "
                                     f"(eval/reward, with eval_sampling); drop sample_during_eval")

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
        micro = self.micro_batches(self.global_batch(self.step), self.train_examples)
        return self.update(micro)

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

    def trainer_state(self) -> dict:
        return {"step": self.step, "examples": self.examples_seen, "tokens": self.tokens_seen,
                "metric_lines": self.metrics.lines, "scheduler": self.scheduler.state_dict(),
                "world_size": self.world, "config": OmegaConf.to_container(self.cfg, resolve=True),
                "base_fingerprint": self.base_fingerprint}

    def restore_state(self, state: dict):
        """The counters and schedules of ``trainer_state``, read back from a checkpoint."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen, self.tokens_seen = state["step"], state["examples"], state["tokens"]

    # --- building ---------------------------------------------------------------------------

    def load_model(self, model_cfg, meta: bool = False):
        """The unsharded model, full precision, on CPU (``meta``: its architecture on the meta device)."""
        return models.load_model(model_cfg, self.device, seed=self.cfg.seed, meta=meta)

    def load_policy(self, model_cfg, meta: bool = False):
        """The model being trained: ``load_model``, with LoRA adapters where ``lora.r`` is set and
        its frozen base in NF4 with ``lora.load_in_4bit`` (QLoRA). Records the starting weights'
        ``models.fingerprint``: a resumed run must start from the same ones."""
        model = self.load_model(model_cfg, meta)
        if not meta and distributed.is_main():  # __init__ sends rank 0's to every rank
            self.base_fingerprint = models.fingerprint(model)
        if self.cfg.lora.r:
            model = models.add_lora(model, self.cfg.lora, seed=self.cfg.seed)
        if self.cfg.lora.load_in_4bit and not meta:
            model = models.quantize_base(model, self.world, model_cfg.block_name)
        return model

    def load_scorer(self, model_cfg, meta: bool = False):
        """A reward model (or a critic): a scalar head on the last token."""
        return models.load_reward_model(model_cfg, self.device, seed=self.cfg.seed, meta=meta)

    def model_config(self, path: str):
        """The policy's model config (dtype, sharding) pointed at another model's directory."""
        return OmegaConf.create({**OmegaConf.to_container(self.cfg.model, resolve=True), "archive": path,
                                 "name_or_path": None, "tokenizer_name_or_path": None})

    def build_model(self, model_cfg, load=None, load_once: bool = True):
        """``load(model_cfg)`` (default ``self.load_model``), sharded over all ranks (``load_once``:
        as ``models.build_sharded``)."""
        load = load or self.load_model
        mesh = distributed.mesh(self.cfg.fsdp_shard_ranks)
        model = models.build_sharded(lambda meta: load(model_cfg, meta), mesh, self.device, load_once=load_once,
                                     param_dtype=model_cfg.fsdp_policy_mp, cpu_offload=self.cfg.cpu_offload,
                                     block_name=model_cfg.block_name,
                                     activation_checkpointing=self.cfg.activation_checkpointing,
                                     reshard_after_forward=self.cfg.reshard_after_forward)
        if self.packs and self.cfg.packing_check:
            self.check_packing(model, model_cfg)
        if self.cfg.logprob_chunk_tokens and not isinstance(model, models.RewardModel):
            self.check_logprob_head(model, model_cfg)
        return model

    def frozen_copy(self, model_cfg):
        """A model that is only read (the reference): sharded the same way, no gradients. With LoRA,
        the policy itself with its adapters off (``models.AdapterOff``)."""
        if self.cfg.lora.r and model_cfg is self.cfg.model:
            return models.AdapterOff(self.model)
        return self.build_model(model_cfg).requires_grad_(False).eval()

    def optimizer_for(self, model, lr: float):
        cfg = self.cfg
        # fused: one kernel over all parameters (CPU and CUDA); the default for-each path makes a
        # pass over memory per elementwise op, 0.35 s against 0.09 s a step for 135M fp32 parameters
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay,
                                      betas=tuple(cfg.adam_betas), fused=True)
        schedule = warmup_cosine(cfg.warmup_steps, self.total_steps * self.updates_per_step(), cfg.min_lr_ratio)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def check_packing(self, model, model_cfg):
        """Collective: refuse (``packing=true``) or stop packing (``packing=auto``) if ``model``'s
        output for a sequence changes when another sequence precedes it in the row: an
        architecture whose attention mask ignores ``position_ids`` (OPT, Falcon, BioGPT in
        transformers 5.19) lets packed sequences attend to each other, silently."""
        error = models.packing_error(model, self.device)
        distributed.reshard(model)
        tolerance = models.PACKING_TOLERANCE
        if error <= tolerance:
            return
        config = model.config
        what = (f"{type(model).__name__.removeprefix('FSDP')} (model_type {config.model_type}, attention "
                f"{config._attn_implementation}) attends across packed sequences: a probe sequence's output changes "
                f"by {error:.3g} (> {tolerance}) when another sequence precedes it in the row")
        if self.cfg.packing == "auto":
            log.warning(f"{what}; packing=auto: using padded batches instead")
            self.packs = False
            return
        raise models.ConfigError(f"{what}: set packing=false (or packing=auto to fall back to padding), "
                                 f"or a model.attn_implementation whose mask honours position_ids")

    def check_logprob_head(self, model, model_cfg):
        """Collective: refuse a model whose logits are not ``lm_head(last hidden state)`` (soft-capped
        or scaled after the head), which chunked log-probs would silently get wrong."""
        error = logprobs.head_error(model, self.device)
        distributed.reshard(model)
        if error > logprobs.HEAD_TOLERANCE[model_cfg.fsdp_policy_mp]:
            raise models.ConfigError(
                f"{type(model).__name__.removeprefix('FSDP')} (model_type {model.config.model_type}) computes its "
                f"logits from more than its LM head (chunked log-probs differ from its own logits by {error:.3g}): "
                f"set logprob_chunk_tokens=null to compute log-probs from the model's full logits")

    def token_logps(self, model, batch: dict, temperature: float = 1.0, **entropy):
        """``logprobs.token_logps`` with this run's ``logprob_chunk_tokens``."""
        if isinstance(model, models.AdapterOff):
            with model.policy.disable_adapter():
                return self.token_logps(model.policy, batch, temperature, **entropy)
        return logprobs.token_logps(model, batch, self.cfg.logprob_chunk_tokens, temperature, **entropy)

    def load_examples(self, split: str) -> list[dict]:
        examples, tokenize = [], TOKENIZERS[self.row_format]
        for name in self.cfg.datasets:
            rows = load_rows(name, split, self.row_format, paths=OmegaConf.to_container(self.cfg.data.paths),
                             keys=OmegaConf.to_container(self.cfg.data.columns))
            source = f"{name} ({split})"
            tokenized, stats = tokenize(rows, self.tokenizer, self.cfg, source, self.cfg.data.truncation_mode)
            if sum(stats.values()):
                log.warning(f"{source}: of {len(rows)} rows, " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items()))
            examples += tokenized
        return examples

    def forward_size(self) -> int:
        """Sequences per rank in one forward without gradients that feeds training."""
        return max(1, self.cfg.forward_batch_size // self.world)

    # --- batches ----------------------------------------------------------------------------

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

    def subset(self, data, indices: list[int]):
        """The examples of ``data`` at ``indices`` (a list here; a Rollout's ``select``)."""
        return [data[i] for i in indices]

    def micro_batches(self, indices: list[int], data) -> list:
        """This rank's share of the global batch ``indices`` of ``data``, in micro-batches."""
        mine, n_micro = distributed.share(indices), self.cfg.gradient_accumulation_steps
        size = len(mine) // n_micro
        return [self.subset(data, mine[k * size : (k + 1) * size]) for k in range(n_micro)]

    def collate(self, micro_batch) -> dict:
        return self.layout([s for ex in micro_batch for s in self.sequences(ex)], self.tokenizer.pad_token_id)

    def layout(self, seqs: list[dict], pad_id: int, fields: tuple[str, ...] = ()) -> dict:
        """``seqs`` as a batch on the device: packed rows, or one padded row each when the models
        cannot pack (``packing=false``, or ``auto`` after the self-check)."""
        batch = pack(seqs, self.cfg.row_tokens, pad_id, fields) if self.packs else pad(seqs, pad_id, fields)
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- the loop ---------------------------------------------------------------------------

    def train(self):
        cfg = self.cfg
        if cfg.resume:
            self.resume()
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
            record["memory/peak_gb"] = self.peak_memory_gb()
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
            if saved:
                self.save(export=True)
            if not last and stop.requested():
                if not saved:
                    self.save(export=False)
                stop.requeue(self.step, cfg.requeue_on_timeout, self.last_checkpoint())
                break
        profiler.close()
        self.metrics.close()

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
        means = {k: sum(u[k] for u in updates) / len(updates) for k in (updates[0] if updates else {})}
        return {**means, "iteration/updates": len(updates)}

    def clip_and_step(self, model, optimizer, scheduler) -> float:
        """Clip ``model``'s gradients to ``max_grad_norm``, step; returns the norm before clipping.
        A NaN/inf norm stops the run, naming the last checkpoint to go back to."""
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {self.step + 1}: gradient norm is {grad_norm.item()}; "
                                     f"last complete checkpoint: {self.last_checkpoint()}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return grad_norm.item()

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Collective: the loss on the eval examples (equal shares: every rank runs as many
        forwards) and, with ``sample_during_eval``, completions of the first eval prompts; a
        trainer that samples evaluates by sampling (``reward_eval``)."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        if self.row_format == "prompt":
            record = self.reward_eval()
        else:
            examples = self.eval_examples[: len(self.eval_examples) // self.world * self.world]
            mine, size = distributed.share(examples), max(1, self.cfg.eval_batch_size // self.world)
            sums = self.run_micro_batches([mine[i : i + size] for i in range(0, len(mine), size)], train=False)
            record = means(sums, "eval/{}", self.step, f" ({len(examples)} of {len(self.eval_examples)} eval examples: "
                                                       f"each of the {self.world} ranks evaluates as many)")
            if self.sampler is not None:
                record.update(self.sample_eval())
        if record:
            self.metrics.log(record, self.step, self.examples_seen, self.tokens_seen)
            log.info(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        return record

    def sample_eval(self) -> dict:
        """Collective: completions of the first ``n_eval_model_samples`` eval prompts from the
        current weights, written to ``run_dir/samples/step-<N>.jsonl`` (and a wandb table); with a
        verifier for the datasets (the toy tasks), also their task accuracy."""
        record = {"timing/weight_sync": self.sampler.sync_weights(self.model)}
        examples = self.eval_examples[: self.cfg.n_eval_model_samples]
        prompts = [seq["input_ids"][: prompt_length(seq)] for seq in (self.sequences(ex)[0] for ex in examples)]
        completions = evaluation.sample_completions(self.sampler, prompts, SamplingParams(**self.cfg.eval_sampling))
        self.model.eval()
        accuracy = evaluation.verified_fraction(self.cfg.datasets, [ex["prompt"] for ex in examples], completions)
        if accuracy is not None:
            record["eval/task_accuracy"] = accuracy
        self.metrics.samples([{"prompt": ex["prompt"], "completion": c} for ex, c in zip(examples, completions)],
                             self.step)
        return record

    def reward_eval(self) -> dict:
        """Collective: one completion per eval prompt with ``eval_sampling``, scored as in training:
        ``eval/reward`` and, for a toy task, ``eval/task_accuracy``; written to samples/."""
        self.sampler.sync_weights(self.model)
        examples = self.eval_examples[: len(self.eval_examples) // self.world * self.world]
        mine = distributed.share(examples)
        rollout = self.sample(mine, SamplingParams(**self.cfg.eval_sampling))
        self.rewards.score(rollout)
        rollout = Rollout.cat(distributed.gather([rollout]))
        if not len(rollout):
            if self.rank == 0:
                log.warning(f"step {self.step}: no eval prompt left over {self.world} ranks (each evaluates as "
                            f"many): eval/reward not logged")
            return {}
        self.rewards.check(rollout, self.step)  # a reward function that fails on most samples stops the run here too
        record = {"eval/reward": rollout.scores.mean().item()}
        if rollout.episodes is not None:  # the environment says whether an episode solved the task
            record.update(rollout.episode_metrics("eval"))
            accuracy = sum(bool(e.info.get("solved")) for e in rollout.episodes) / max(len(rollout), 1)
        else:
            accuracy = evaluation.verified_fraction(self.cfg.datasets, rollout.prompts, rollout.texts, rollout.rows)
        if accuracy is not None:
            record["eval/task_accuracy"] = accuracy
        self.metrics.samples([{"prompt": p, "completion": t, "score": s} for p, t, s in
                              zip(rollout.prompts, rollout.texts, rollout.scores.tolist())], self.step)
        return record

    def sample(self, examples: list[dict], params: SamplingParams) -> Rollout:
        """Collective: this rank's ``params.n`` samples of each prompt example, unscored: episodes
        of the environment (``env=``), else the sampler's completions."""
        if self.env is not None:
            return self.env.rollout(self.sampler, examples, params.n, params)
        return Rollout.of(examples, self.complete(examples, params), self.tokenizer.eos_token_id)

    def complete(self, examples: list[dict], params: SamplingParams) -> list[list]:
        """The sampler's completions (``sampler.Sample``) of each prompt example, ``params.n`` each."""
        return self.sampler.generate([ex["prompt_ids"] for ex in examples], params)

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, export: bool):
        path = checkpointing.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                  keep=self.cfg.keep_checkpoints, extra=self.extra_models())
        log.info(f"saved {path}")
        if export:
            self.export(self.run_dir / "LATEST", step=self.step)

    def check_base(self, saved: list[float] | None, path: Path):
        """Refuse to resume from weights other than those the checkpoint's run started
        from. A checkpoint holds only what trains; the frozen base of a LoRA policy and the
        reference are read again from ``model``, which may have been overwritten since."""
        if saved is None or all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, self.base_fingerprint)):
            return
        where = models.weights_path(self.cfg.model) or f"random init from seed={self.cfg.seed}"
        raise models.ConfigError(f"resume=true: {path} was trained from other starting weights than those at {where} now "
                                 f"(they changed since: an overwritten export?): put those weights back, or start a new "
                                 f"run_dir from these")

    def last_checkpoint(self) -> str:
        found = checkpointing.complete(self.run_dir)
        return str(found[-1]) if found else "none"

    def resume(self):
        path = self.resume_from
        if path is None:
            log.info(f"resume=true but {self.run_dir} has no complete checkpoint: starting fresh")
            return
        state = checkpointing.load(path, self.model, self.optimizer, extra=self.extra_models())
        self.check_base(state.get("base_fingerprint"), path)
        self.restore_state(state)
        self.metrics.truncate(state["metric_lines"], path)  # what the killed run logged after it goes
        log.info(f"resumed from {path} at step {self.step}")
        # what the killed run may have left undone after writing this checkpoint: LATEST (at the
        # last step the whole remaining run), and deleting the checkpoints it replaces
        latest = self.run_dir / "LATEST"
        if distributed.from_main(checkpointing.exported_step(latest)) != self.step:
            self.export(latest, step=self.step)
            log.info(f"exported {latest} (step {self.step})")
        if distributed.is_main() and self.cfg.keep_checkpoints:
            checkpointing.prune(self.run_dir, self.cfg.keep_checkpoints)

    def peak_memory_gb(self) -> float:
        """The largest peak over ranks: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return distributed.all_max([peak], self.device)[0]


def prompt_length(seq: dict) -> int:
    """Tokens before a sequence's first label: its (possibly truncated) prompt as the model saw it."""
    return next(i for i, label in enumerate(seq["labels"]) if label != IGNORE)


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


class RewardTrainer(PairTrainer):
    """Reward model: a scalar head on the last token (the end-of-turn token) of each sequence,
    trained with the Bradley-Terry loss, optionally with a margin and, as seed 000's
    ``logexpwithlm``, an LM loss on the chosen reply (``loss.lm_coef``). Exports a model that loads
    with ``AutoModelForSequenceClassification``."""

    def load_model(self, model_cfg, meta: bool = False):
        return self.load_scorer(model_cfg, meta)

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
        self.reference = self.frozen_copy(cfg.model) if self.reference_mode() == "model" else None

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


class DPOTrainer(PreferenceTrainer):
    """DPO (Rafailov et al. 2023); with ``loss.label_smoothing`` > 0 conservative DPO (``loss=cdpo``)."""

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, self.cfg.loss.beta, self.cfg.loss.label_smoothing)


class IPOTrainer(PreferenceTrainer):
    """IPO (Azar et al. 2023), on per-token average log-probs."""

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, self.cfg.loss.beta)


class KTOTrainer(PreferenceTrainer):
    """KTO (Ethayarajh et al. 2024): chosen replies are desirable, rejected ones undesirable."""

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        loss = self.cfg.loss
        return kto_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.desirable_weight, loss.undesirable_weight)


class SimPOTrainer(PreferenceTrainer):
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin."""

    def reference_mode(self) -> str:
        return "none"

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return simpo_loss(pi_c / n_c, pi_r / n_r, self.cfg.loss.beta, self.cfg.loss.gamma)


class ORPOTrainer(PreferenceTrainer):
    """ORPO (Hong et al. 2024): SFT on the chosen reply plus an odds-ratio term; no reference."""

    def reference_mode(self) -> str:
        return "none"

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        return orpo_loss(pi_c / n_c, pi_r / n_r, self.cfg.loss.beta)


# --- learning from its own samples --------------------------------------------------------------

def check_sampling(cfg, world: int):
    """The checks of every trainer that samples ``rollout_batch_size`` prompts per iteration."""
    loss = cfg.loss
    if loss.rollout_batch_size % world:
        raise ValueError(f"loss.rollout_batch_size={loss.rollout_batch_size} must be a multiple of the {world} ranks")
    if loss.sampling.max_new_tokens > cfg.max_length - cfg.max_prompt_length:
        raise ValueError(f"loss.sampling.max_new_tokens={loss.sampling.max_new_tokens} does not fit: a prompt may "
                         f"have max_prompt_length={cfg.max_prompt_length} of max_length={cfg.max_length} tokens")


def sample_rollout(trainer) -> tuple[Rollout, dict]:
    """Collective: this step's prompts, ``n_samples_per_prompt`` completions each from the current
    weights (each rank samples and scores its share), as one Rollout on every rank; and the
    seconds of each phase."""
    loss, step = trainer.cfg.loss, trainer.step
    timing = {"sync": trainer.sampler.sync_weights(trainer.model)}
    mine = distributed.share([trainer.train_examples[i] for i in trainer.global_batch(step)])
    t = time.perf_counter()
    # seeded by the step, so that a resumed run samples what the uninterrupted run sampled
    params = SamplingParams(n=loss.n_samples_per_prompt, seed=trainer.cfg.seed * 1_000_003 + step, **loss.sampling)
    rollout = trainer.sample(mine, params)
    timing["generate"], t = time.perf_counter() - t, time.perf_counter()
    trainer.rewards.score(rollout)
    timing["score"] = time.perf_counter() - t
    rollout = Rollout.cat(distributed.gather([rollout]))
    trainer.rewards.check(rollout, step + 1)
    return rollout, timing


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

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        loss = cfg.loss
        self.reference = self.frozen_copy(cfg.model) if loss.kl_coef > 0 else None
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

    def check_config(self):
        super().check_config()
        check_sampling(self.cfg, self.world)
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
        return loss.ppo_epochs * loss.rollout_batch_size * loss.n_samples_per_prompt // self.cfg.batch_size

    def subset(self, data: Rollout, indices: list[int]) -> Rollout:
        return data.select(indices)

    def collate(self, rollout: Rollout) -> dict:
        fields = tuple(f for f in TOKEN_FIELDS if getattr(rollout, f) is not None)
        return self.layout([rollout.sequence(i, fields) for i in range(len(rollout))], self.tokenizer.pad_token_id, fields)

    def n_loss_terms(self, rollout: Rollout) -> int:
        return sum(aggregation_units(int(n), self.cfg.loss.aggregation) for n in rollout.mask.sum(1))

    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "kl_coef": self.kl_ctl.value}

    def restore_state(self, state: dict):
        super().restore_state(state)
        self.kl_ctl.value = state["kl_coef"]

    def train_step(self) -> dict:
        loss, start = self.cfg.loss, time.perf_counter()
        # 1-3. sample this step's prompts, score the completions, gather the whole rollout everywhere
        rollout, timing = sample_rollout(self)
        record, n_sampled = self.rewards.metrics(rollout), len(rollout)
        kept = self.keep(rollout)
        if kept is not None:
            rollout = rollout.select(kept)
            record["rollout/kept_fraction"] = len(rollout) / n_sampled
        # 4. pi_old's and the reference's log-probs (and the critic's values) of every sample
        t = time.perf_counter()
        self.score_tokens(rollout)
        timing["logprobs"], t = time.perf_counter() - t, time.perf_counter()
        if len(rollout):  # (keep can leave none: then the iteration trains on nothing)
            # 5. KL, advantages and importance weights of the whole rollout (the same on every rank)
            record.update(self.estimate(rollout))
            if loss.save_rollouts and distributed.is_main():
                checkpointing.write_jsonl(self.run_dir / "rollouts" / f"step-{self.step + 1}.jsonl", rollout.sample_rows())
        # 6. ppo_epochs passes over it in mini-batches of batch_size samples, an update each
        record.update(self.train_epochs(rollout, loss.ppo_epochs))
        if len(rollout):
            self.kl_ctl.update(record["rollout/kl"], len(rollout))
        timing["train"] = time.perf_counter() - t
        record.update({f"timing/{k}": v for k, v in timing.items()})
        elapsed = time.perf_counter() - start
        record.update({"timing/iteration": elapsed, "samples_per_s": n_sampled / elapsed, "kl_coef": self.kl_ctl.value})
        return record

    def policy_logps(self, model, batch: dict, **entropy):
        """Log-probs at the sampling temperature: the policy being optimised is the distribution the
        samples were drawn from, softmax(logits / T), as in verl and OpenRLHF; the sampler reports
        its log-probs of that same distribution (sampler.py)."""
        return self.token_logps(model, batch, self.cfg.loss.sampling.temperature, **entropy)

    @torch.no_grad()
    def score_tokens(self, rollout: Rollout):
        """Collective: per completion token, pi_old's and the reference's log-probs (at the sampling
        temperature) and the critic's values, into ``rollout``; each rank computes a share."""

        def forward(chunk: list[int]) -> list[dict]:
            part = rollout.select(chunk)
            batch, n = self.collate(part), len(part)
            out = {"old_logps": unpack(self.policy_logps(self.model, batch)[0], batch, n)}
            if self.reference is not None:
                ref = self.policy_logps(self.reference, batch)[0]
                out["ref_logps"] = unpack(ref, batch, n)
            if self.critic is not None:
                out["old_values"] = unpack(self.critic(batch["input_ids"], batch["position_ids"])[0].float(), batch, n)
            # unpack gives the values at the trained tokens only: lay them out over all the completion's
            # tokens (a multi-turn episode's observations between the replies get 0)
            trained = [part.mask[i, : part.lengths[i]] > 0 for i in range(n)]
            return [{name: torch.zeros(len(trained[i])).masked_scatter(trained[i], values[i].float().cpu())
                     for name, values in out.items()} for i in range(n)]

        frozen = (self.reference,) if isinstance(self.reference, torch.nn.Module) else ()  # not an AdapterOff
        mine = distributed.lockstep(forward, distributed.share(list(range(len(rollout)))), self.forward_size(),
                                    stand_in=0, frozen=frozen)
        computed = distributed.gather(mine)
        width = rollout.tokens.shape[1]
        for name in computed[0] if computed else ():
            setattr(rollout, name, torch.stack([F.pad(c[name], (0, width - len(c[name]))) for c in computed]))

    def reward_kl_coef(self) -> float:
        """The KL coefficient in the reward (0 when the KL is in the loss instead)."""
        return self.kl_ctl.value if self.cfg.loss.kl_in_reward else 0.0

    def estimate(self, rollout: Rollout) -> dict:
        """KL, advantages (``advantages``) and importance weights of the rollout; its metrics."""
        loss, mask = self.cfg.loss, rollout.mask
        # both of the tempered policy (an empty completion's end-of-turn token has no sampler log-prob)
        old, sampler = rollout.old_logps, torch.where(torch.isnan(rollout.sampler_logps), rollout.old_logps,
                                                      rollout.sampler_logps)
        rollout.kl = torch.zeros_like(old)
        if self.reference is not None:
            rollout.kl = kl_penalty(old, rollout.ref_logps, loss.kl_estimator) * mask
        self.advantages(rollout)
        if not loss.tis_cap:
            rollout.is_weight = torch.ones_like(old)
        elif self.sequence_level():  # the completion's probability ratio, the same for each of its tokens
            seq_weight = truncated_is_weight(((old - sampler) * mask).sum(1), torch.zeros(len(rollout)), loss.tis_cap)
            rollout.is_weight = seq_weight[:, None] * mask + (1 - mask)
        else:
            rollout.is_weight = truncated_is_weight(old, sampler, loss.tis_cap, mask)
        record = {"rollout/kl": rollout.kl.sum(1).mean().item(),
                  "rollout/advantage_mean": masked_mean(rollout.advantages, mask).item(),
                  "rollout/logp_mismatch": masked_mean((old - sampler).abs(), mask).item(),
                  "rollout/is_weight_mean": masked_mean(rollout.is_weight, mask).item()}
        if self.critic is not None:
            record["critic/explained_variance"] = explained_variance(rollout.old_values, rollout.returns, mask).item()
        return record

    def loss(self, batch: dict, rollout: Rollout) -> tuple[torch.Tensor, dict]:
        """Summed over the micro-batch with ``aggregation_weights``: divided by the global
        ``n_loss_terms`` it is the mini-batch's aggregated loss."""
        loss, n = self.cfg.loss, len(rollout)
        logps, mask, entropy = self.policy_logps(self.model, batch, with_entropy=True, entropy_grad=loss.entropy_coef > 0)
        weights = aggregation_weights(mask, batch["seq_ids"], n, loss.aggregation, loss.sampling.max_new_tokens)
        terms, tokens = self.n_loss_terms(rollout), mask.sum()
        if self.sequence_level():
            per_seq, stats = sequence_ppo_loss(logps, batch["old_logps"], batch["advantages"], mask, batch["seq_ids"], n,
                                               loss.clip, loss.clip_high, is_weight=batch["is_weight"])
            total, clip_units = per_seq.sum(), n
        else:
            per_token, stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, loss.clip,
                                               loss.clip_high, is_weight=batch["is_weight"])
            total, clip_units = (per_token * weights).sum(), tokens
        metrics = {"policy/loss": (total.detach(), terms), "policy/clipfrac": (stats["clipfrac"] * clip_units, clip_units),
                   "policy/approx_kl": (stats["approx_kl"] * clip_units, clip_units)}
        if self.reference is not None and not loss.kl_in_reward:
            kl = kl_penalty(logps, batch["ref_logps"], loss.kl_estimator) * mask
            total = total + self.kl_ctl.value * (kl * weights).sum()
            metrics["policy/kl"] = (kl.sum().detach(), tokens)
        total = total - loss.entropy_coef * (entropy * weights).sum()
        metrics["policy/entropy"] = (entropy.sum().detach(), tokens)
        return total + self.critic_loss(batch, mask, weights, metrics), metrics

    def critic_loss(self, batch: dict, mask, weights, metrics: dict):
        """PPO's value loss, summed with ``weights`` (nothing without a critic)."""
        return 0.0


class PPOTrainer(PolicyGradientTrainer):
    """PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022): a critic (``loss.critic_init``:
    the first reward model, the policy, or a model directory) with its own optimizer and clipped
    value loss; advantages by GAE over per-token rewards (the score at the last token, -KL at
    every token when ``kl_in_reward``)."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        loss = cfg.loss
        init = loss.critic_init
        critic_cfg = (cfg.model if init == "policy"
                      else self.model_config(cfg.reward.models[0] if init == "reward" else init))
        self.critic = self.build_model(critic_cfg, load=self.load_scorer)
        self.critic_optimizer, self.critic_scheduler = self.optimizer_for(self.critic, loss.critic_lr)

    def check_config(self):
        super().check_config()
        if self.cfg.loss.critic_init == "reward" and not self.cfg.reward.models:
            raise ValueError("loss.critic_init=reward needs a reward model (reward.models); or set loss.critic_init=policy")
        if self.cfg.loss.critic_init not in ("reward", "policy"):  # a model directory: checked before anything is built
            models.model_config(self.model_config(self.cfg.loss.critic_init), key="loss.critic_init")

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


class GRPOTrainer(PolicyGradientTrainer):
    """GRPO (Shao et al. 2024, DeepSeekMath): no critic; a sample's advantage is its score against
    the mean (and, with ``scale_rewards``, the std) of its prompt's samples, the same for each of its
    tokens. ``filter_groups`` trains only on prompts whose samples score differently (the others
    have zero advantage: DAPO's dynamic-sampling filter, without its re-sampling)."""

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


class RLOOTrainer(GRPOTrainer):
    """RLOO (Ahmadian et al. 2024): GRPO's groups with another baseline: the mean score of the other
    samples of the prompt, a sample's summed KL to the reference subtracted from its score; as in
    the paper the whole completion is one action (``sequence_level`` in rloo.yaml)."""

    def advantages(self, rollout: Rollout):
        loss, mask = self.cfg.loss, rollout.mask
        scores = rollout.scores - self.reward_kl_coef() * rollout.kl.sum(1)
        adv = rloo_advantages(scores, loss.n_samples_per_prompt)[:, None] * mask
        rollout.advantages = masked_whiten(adv, mask) if loss.whiten_advantages else adv


class ReinforcePPTrainer(PolicyGradientTrainer):
    """REINFORCE++ (Hu 2025): no critic; per-token rewards (the score at the last token, -KL at
    every token), returns-to-go whitened over the whole batch."""

    def advantages(self, rollout: Rollout):
        rewards = token_rewards(rollout.scores, rollout.kl, rollout.mask, self.reward_kl_coef())
        rollout.advantages = reinforce_pp_advantages(rewards, rollout.mask, self.cfg.loss.gamma)


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

        def make_data(self, rollout: Rollout) -> list[dict]:
            """Collective: the examples this iteration trains on, from the whole scored rollout."""
            raise NotImplementedError

        def check_config(self):
            super().check_config()
            check_sampling(self.cfg, self.world)

        def examples_per_step(self) -> int:
            return self.cfg.loss.rollout_batch_size

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


class OnlineDPOTrainer(online(DPOTrainer)):
    """Iterative online DPO (RLHFlow, seed 001): per prompt, its best and its worst sample by score
    make a pair if the best wins by more than ``loss.margin`` (``data.selection``), trained on with
    the DPO loss; the reference is the model the iteration starts from (the previous iteration's),
    its log-probs of each pair computed with the pairs and stored with them."""

    def check_config(self):
        super().check_config()
        if self.cfg.loss.n_samples_per_prompt < 2:
            raise ValueError("loss=online_dpo pairs samples of a prompt: n_samples_per_prompt must be >= 2")

    def reference_mode(self) -> str:
        return "with_pairs"

    def before_training(self):
        """Nothing precomputed: the reference's log-probs come with each iteration's pairs."""

    def make_data(self, rollout: Rollout) -> list[dict]:
        scores = rollout.scores.tolist()
        pairs = [{"prompt": rollout.prompts[best], "chosen": rollout.sequence(best), "rejected": rollout.sequence(worst),
                  "chosen_text": rollout.texts[best], "rejected_text": rollout.texts[worst],
                  "scores": [scores[best], scores[worst]]}
                 for best, worst in best_vs_worst_pairs(scores, self.cfg.loss.n_samples_per_prompt, self.cfg.loss.margin)]
        for pair, ref in zip(pairs, self.pair_logps(pairs)):
            pair["ref"] = list(ref)
        return pairs


class RAFTTrainer(online(SFTTrainer)):
    """RAFT / rejection sampling (LMFlow, seed 003; seed 004's rejection sampling): per prompt its
    best sample by score; of those the top ``loss.top_reward_percentage``, and only those scoring
    at least ``loss.min_reward`` (``data.selection``); fine-tuned on with the SFT loss."""

    def make_data(self, rollout: Rollout) -> list[dict]:
        loss = self.cfg.loss
        keep = best_of_k(rollout.scores.tolist(), loss.n_samples_per_prompt, loss.top_reward_percentage, loss.min_reward)
        return [{**rollout.sequence(i), "prompt": rollout.prompts[i], "text": rollout.texts[i],
                 "score": rollout.scores[i].item()} for i in keep]


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, RewardTrainer, DPOTrainer, IPOTrainer, KTOTrainer, SimPOTrainer,
                                          ORPOTrainer, PPOTrainer, GRPOTrainer, RLOOTrainer, ReinforcePPTrainer,
                                          OnlineDPOTrainer, RAFTTrainer)}
