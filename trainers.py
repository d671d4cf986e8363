"""Trainer classes. ``Trainer`` owns the loop, sharding, checkpoints and logging; each subclass
adds only what its algorithm needs: the row shape it reads, how a row becomes sequences, and the
loss of a packed micro-batch.

One optimizer step consumes ``batch_size`` examples (global). They are split evenly over the ranks
and each rank's share into ``gradient_accumulation_steps`` micro-batches, each packed into rows
with no padding between sequences. A loss is a *sum* over its units (response tokens for SFT)
divided by the number of units in the whole global batch, counted before the forward pass, so the
gradient is the same for any number of ranks and accumulation steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh

import checkpointing
import distributed
import models
import overrides
import rewards
from data import DataError, load_rows
from data.packing import pack, pad, per_sequence, unpack
from data.selection import best_of_k, best_vs_worst_pairs
from data.tokenize import IGNORE, prompt_ids, response_ids, tokenize_pairs, tokenize_prompts, tokenize_sft
from losses import sft_loss
from losses.preference import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from losses.rl import (AGGREGATIONS, AdaptiveKLController, FixedKLController, aggregation_units, aggregation_weights,
                       entropy_from_logits, explained_variance, gae, grpo_advantages, kl_penalty, masked_mean,
                       masked_whiten, ppo_policy_loss, reinforce_pp_advantages, rloo_advantages, sequence_ppo_loss,
                       token_rewards, truncated_is_weight, value_loss)
from sampler import SamplingParams, build_sampler, reshard

log = logging.getLogger("train")

# Config keys that may differ when a run resumes: they change how long it trains (the schedule then
# follows the new length), what it evaluates, logs and keeps, or how it is launched, but not what
# the steps it has done would compute. Every other key (loss, model, data, batch sizes, lr and
# schedule, seed, lengths, sampler, ...) must equal what the checkpoint was trained with.
MAY_CHANGE_ON_RESUME = ("n_examples", "n_epochs", "eval_every", "eval_at_start", "eval_at_end", "eval_sampling",
                        "n_eval_model_samples", "save_every", "keep_checkpoints", "loss.save_rollouts",
                        "loss.save_iteration_models", "wandb", "exp_name", "run_dir", "resume", "debug",
                        "dist_timeout_minutes", "requeue_on_timeout", "activation_checkpointing", "packing_check")


def config_differences(saved: dict, now: dict) -> list[str]:
    """``key=<saved> (now <now>)`` for every key outside ``MAY_CHANGE_ON_RESUME`` whose value differs."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def may_change(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)

    a, b = flat(saved), flat(now)
    unset = "(unset)"
    return [f"{k}={a.get(k, unset)} (now {b.get(k, unset)})" for k in sorted(a.keys() | b.keys())
            if not may_change(k) and a.get(k, unset) != b.get(k, unset)]


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


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position, in fp32, zero where there is no target; and that mask."""
    logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    mask = (targets != IGNORE).to(logps.dtype)
    return logps.view_as(targets) * mask, mask


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logps`` of a causal LM's forward over a packed batch."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return target_logps(out.logits, batch["targets"])


def last_positions(seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index (into ``seq_ids.flatten()``) of each sequence's last token -> [n]."""
    flat = seq_ids.flatten()
    valid = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    return torch.zeros(n, dtype=torch.long, device=flat.device).scatter_reduce(
        0, flat[valid], positions[valid], reduce="amax", include_self=False)


class Trainer:
    shape = "sft"  # the row shape this trainer reads (see data/__init__.py)
    token_fields: tuple[str, ...] = ()  # per-token float fields of a sequence that collate packs (RL)
    starts_from_a_model = False  # a stage that refines a trained model (warned about when given none)
    needs_sampler = False  # generates during training (RL); otherwise only with sample_during_eval

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.run_dir = Path(cfg.run_dir)
        self.check_config()
        self.packs = cfg.packing in (True, "auto")  # build_model turns it off for a model that cannot pack (auto)
        self.resume_from = self.checkpoint_to_resume()  # before anything is loaded or built
        self.tokenizer = models.load_tokenizer(cfg.model)
        # data before the model: bad input stops the run before any compute is spent
        self.train_examples = self.load_examples("train")
        self.eval_examples = self.load_examples("test")[: cfg.n_eval_examples] if cfg.n_eval_examples else []
        self.save_every = overrides.epochs_to_examples(cfg.save_every, len(self.train_examples))
        n = cfg.n_examples or cfg.n_epochs * len(self.train_examples)
        self.total_steps = n // self.examples_per_step()
        if self.total_steps < 1:
            raise DataError(f"{n} training examples make no step of {self.examples_per_step()}")
        log.info(f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, "
                 f"{self.total_steps} steps of {self.examples_per_step()}, {self.world} rank(s)")
        updates = self.total_steps * self.updates_per_step()
        if cfg.warmup_steps >= updates:
            log.warning(f"warmup_steps={cfg.warmup_steps} is not shorter than the run's {updates} optimizer updates: "
                        f"the learning rate never reaches lr={cfg.lr}")
        if self.starts_from_a_model and models.weights_path(cfg.model) is None:
            log.warning(f"loss={cfg.loss.name} normally starts from a trained model, but model.archive and "
                        f"model.name_or_path are unset: the policy is random init ({cfg.model.name})")

        self.model = self.build_model(cfg.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=tuple(cfg.adam_betas))
        self.scheduler = self.lr_schedule(self.optimizer)
        self.step, self.examples_seen, self.tokens_seen, self.metric_lines = 0, 0, 0, 0
        self._permutation = (None, None)
        self.wandb = None
        self.sampler = None
        if cfg.sample_during_eval or self.needs_sampler:
            self.sampler = build_sampler(cfg, self.model, self.tokenizer, self.run_dir)

    # --- what subclasses change -------------------------------------------------------------

    def tokenize(self, rows: list[dict], source: str) -> list[dict]:
        examples, stats = tokenize_sft(rows, self.tokenizer, self.cfg, source, self.cfg.data.truncation_mode)
        self.report_truncation(source, len(rows), stats)
        return examples

    def sequences(self, example: dict) -> list[dict]:
        """The token sequences an example puts into a packed row (a pair puts two)."""
        return [example]

    def units(self, example: dict) -> int:
        """What the loss is averaged over: here, the response tokens."""
        return sum(label != IGNORE for label in example["labels"][1:])

    def prompt_ids(self, example: dict) -> list[int]:
        """The (possibly truncated) prompt tokens of an example, as the model saw them."""
        seq = self.sequences(example)[0]
        n = next(i for i, label in enumerate(seq["labels"]) if label != IGNORE)
        return seq["input_ids"][:n]

    def loss(self, batch: dict, examples: list[dict]) -> tuple[torch.Tensor, dict]:
        """Summed loss of a packed micro-batch, and extra metrics as {name: (sum, count)}."""
        logps, mask = token_logps(self.model, batch)
        return sft_loss(logps, mask), {}

    def before_training(self):
        """Runs once the model is built and any checkpoint restored, before the first eval."""

    def examples_per_step(self) -> int:
        """Training examples one step of the loop consumes (RL: prompts per rollout)."""
        return self.cfg.batch_size

    def updates_per_step(self) -> int:
        """Optimizer updates in one step of the loop (RL: several per rollout)."""
        return 1

    def train_step(self) -> dict:
        """One step of the loop: here one optimizer update on the next global batch."""
        micro = self.micro_batches(self.global_batch(self.step), self.train_examples,
                                   self.cfg.gradient_accumulation_steps)
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

    # --- setup ------------------------------------------------------------------------------

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
        if cfg.row_tokens < cfg.max_length:
            raise ValueError(f"row_tokens={cfg.row_tokens} must hold one whole sequence (max_length={cfg.max_length})")

    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``resume=true`` continues from (None: a fresh start), once its files and
        the config it was trained with are checked; without ``resume=true``, run_dir must hold none."""
        if not self.cfg.resume:
            if checkpointing.checkpoints(self.run_dir):
                raise models.ConfigError(f"run_dir={self.run_dir} already holds checkpoints: pass resume=true or "
                                         f"another run_dir")
            return None
        path = checkpointing.resumable(self.run_dir)
        if path is None:
            return None
        saved = json.loads((path / checkpointing.STATE_FILE).read_text()).get("config")
        if saved is None:
            log.warning(f"{path} records no config (an older checkpoint): resuming without checking that the "
                        f"config is the one it was trained with")
            return path
        differences = config_differences(saved, OmegaConf.to_container(self.cfg, resolve=True))
        if differences:
            raise models.ConfigError(
                f"resume=true: {path} was trained with another config: {', '.join(differences)}. These keys shape "
                f"what the run computes: resume with the checkpoint's values (its trainer_state.json lists them all), "
                f"or start a new run_dir (model.archive={self.run_dir / 'LATEST'} starts it from these weights). Keys that may "
                f"change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}")
        return path

    def load_model(self, model_cfg):
        """The unsharded model, full precision, on CPU."""
        return models.load_model(model_cfg, self.device, seed=self.cfg.seed)

    def build_model(self, model_cfg, load=None):
        """``load(model_cfg)`` (default ``self.load_model``), sharded over all ranks."""
        mesh = init_device_mesh(self.device.type, (self.world,))
        model = (load or self.load_model)(model_cfg)
        model = models.shard(model, mesh, param_dtype=model_cfg.fsdp_policy_mp, cpu_offload=self.cfg.cpu_offload,
                             block_name=model_cfg.get("block_name"),
                             activation_checkpointing=self.cfg.activation_checkpointing)
        if self.packs and self.cfg.packing_check:
            self.check_packing(model, model_cfg)
        return model

    def check_packing(self, model, model_cfg):
        """Collective: refuse (``packing=true``) or stop packing (``packing=auto``) if ``model``'s
        output for a sequence changes when another sequence precedes it in the row: an
        architecture whose attention mask ignores ``position_ids`` (OPT, Falcon, BioGPT in
        transformers 5.19) lets packed sequences attend to each other, silently."""
        error = models.packing_error(model, self.device)
        reshard(model)
        tolerance = models.PACKING_TOLERANCE[model_cfg.fsdp_policy_mp]
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

    def load_examples(self, split: str) -> list[dict]:
        examples = []
        for name in self.cfg.datasets:
            rows = load_rows(name, split, self.shape, paths=OmegaConf.to_container(self.cfg.data.paths),
                             keys=OmegaConf.to_container(self.cfg.data.columns))
            examples += self.tokenize(rows, f"{name} ({split})")
        return examples

    def report_truncation(self, source: str, n_rows: int, stats):
        if sum(stats.values()):
            log.warning(f"{source}: of {n_rows} rows, " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items()))

    # --- the loop ---------------------------------------------------------------------------

    def lr_schedule(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            self.cfg.warmup_steps, self.total_steps * self.updates_per_step(), self.cfg.min_lr_ratio))

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

    def micro_batches(self, indices: list[int], examples: list[dict], n_micro: int) -> list[list[dict]]:
        share = len(indices) // self.world
        mine = indices[self.rank * share : (self.rank + 1) * share]
        size = share // n_micro
        return [[examples[i] for i in mine[k * size : (k + 1) * size]] for k in range(n_micro)]

    def collate(self, examples: list[dict]) -> dict:
        seqs = [s for ex in examples for s in self.sequences(ex)]
        return self.layout(seqs, self.tokenizer.pad_token_id, self.token_fields)

    def layout(self, seqs: list[dict], pad_id: int, fields: tuple[str, ...] = ()) -> dict:
        """``seqs`` as a batch on the device: packed rows, or one padded row each when the models
        cannot pack (``packing=false``, or ``auto`` after the self-check)."""
        batch = pack(seqs, self.cfg.row_tokens, pad_id, fields) if self.packs else pad(seqs, pad_id, fields)
        return {k: v.to(self.device) for k, v in batch.items()}

    def run_micro_batches(self, micro: list[list[dict]], train: bool) -> dict[str, list[float]]:
        """Forward (and backward) every micro-batch; returns metric sums, already summed over ranks."""
        units = distributed.all_sum([sum(self.units(ex) for mb in micro for ex in mb)], self.device)[0]
        sums = defaultdict(lambda: [0.0, 0.0])
        for mb in micro:
            batch = self.collate(mb)
            with torch.set_grad_enabled(train):
                loss_sum, metrics = self.loss(batch, mb)
                if train:
                    # FSDP averages gradients over ranks; the loss is already a global mean
                    (loss_sum * self.world / max(units, 1)).backward()
            real = (batch["seq_ids"] >= 0).sum().item()
            sums["loss"][0] += loss_sum.item()
            for name, (value, count) in metrics.items():
                sums[name][0] += float(value.detach() if torch.is_tensor(value) else value)
                sums[name][1] += float(count)
            sums["tokens"][0] += real
            sums["padding"][0] += batch["seq_ids"].numel() - real
        sums["loss"][1] = units / self.world  # summed over ranks below: the global count
        names = sorted(sums)
        flat = distributed.all_sum([x for n in names for x in sums[n]], self.device)
        return {n: flat[2 * i : 2 * i + 2] for i, n in enumerate(names)}

    def train(self):
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        self.start_logging()
        self.catch_stop_signals()
        self.before_training()
        if self.step == 0 and cfg.eval_at_start:
            self.evaluate()
        bar = None
        if distributed.is_main():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.exp_name, dynamic_ncols=True,
                       mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
        self.model.train()
        while self.step < self.total_steps:
            record = self.train_step()
            record["memory/peak_gb"] = self.peak_memory_gb()
            before = self.examples_seen
            self.step += 1
            self.examples_seen += self.examples_per_step()
            self.log_metrics(record)
            if bar is not None:
                bar.update(1)
                # refresh=False: the bar redraws at its own interval (30 s into a log file), not every step
                bar.set_postfix(loss=f"{record.get('loss/train', float('nan')):.4f}", refresh=False)
            last = self.step == self.total_steps
            if crossed(cfg.eval_every, before, self.examples_seen) or (last and cfg.eval_at_end):
                self.evaluate()
                self.model.train()
            saved = crossed(self.save_every, before, self.examples_seen) or last or self.save_now()
            if saved:
                self.save(export=True)
            if not last and self.stop_requested():
                if not saved:
                    self.save(export=False)
                self.requeue()
                break
        if bar is not None:
            bar.close()
        if self.wandb is not None:
            self.wandb.finish()

    def update(self, micro: list[list[dict]]) -> dict:
        """One optimizer update on the micro-batches of this rank; returns its metrics."""
        t0 = time.perf_counter()
        sums = self.run_micro_batches(micro, train=True)
        lr = self.scheduler.get_last_lr()[0]
        record = self.step_optimizers()
        self.tokens_seen += int(sums["tokens"][0])
        record.update({"lr": lr, "tokens_per_s": sums["tokens"][0] / (time.perf_counter() - t0),
                       "padding_fraction": sums["padding"][0] / (sums["tokens"][0] + sums["padding"][0])})
        record.update({f"{k}/train": v / max(c, 1e-12) for k, (v, c) in sums.items() if k not in ("tokens", "padding")})
        return record

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_examples:
            return {}
        self.model.eval()
        examples = self.eval_examples
        share = len(examples) // self.world  # equal shares: every rank runs the same number of forwards
        mine = examples[self.rank * share : (self.rank + 1) * share]
        size = max(1, self.cfg.eval_batch_size // self.world)
        micro = [mine[i : i + size] for i in range(0, len(mine), size)]
        sums = self.run_micro_batches(micro, train=False)
        record = {f"eval/{k}": v / max(c, 1e-12) for k, (v, c) in sums.items() if k not in ("tokens", "padding")}
        if self.sampler is not None:
            record.update(self.sample_eval())
        self.log_metrics(record)
        log.info(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        return record

    # --- preemption ---------------------------------------------------------------------------

    def catch_stop_signals(self):
        """SIGTERM (preemption, scancel), SIGINT (Ctrl-C) and SIGUSR1 (slurm's warning before the
        time limit) let the current step finish; then every rank checkpoints and the run stops (see
        ``stop_requested``). A repeated signal changes nothing, as one request often arrives twice
        (slurm signals every process of the step, and torchrun forwards what it gets too); except
        a Ctrl-C repeated more than a second after a SIGINT, which stops the rank at once, without
        a checkpoint. torchrun passes a second Ctrl-C on as SIGTERM, so that counts too."""
        self._stop_signal, self._stop_since = 0, 0.0

        def note(signum, frame):
            now = time.monotonic()
            if self._stop_signal == signal.SIGINT and signum in (signal.SIGINT, signal.SIGTERM) \
                    and now - self._stop_since > 1:
                if distributed.is_main():
                    log.warning(f"{signal.Signals(signum).name} after SIGINT: stopping at once, without a checkpoint "
                                f"(resume=true continues from the last complete one)")
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            if not self._stop_signal:
                self._stop_signal, self._stop_since = signum, now
                if distributed.is_main():
                    again = "; Ctrl-C again to stop at once, without it" if signum == signal.SIGINT else ""
                    log.warning(f"{signal.Signals(signum).name}: finishing this step, then checkpointing and "
                                f"stopping{again}")

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, note)

    def stop_requested(self) -> bool:
        """Collective: True on every rank if any rank caught a stop signal."""
        agreed = int(distributed.all_max([self._stop_signal], self.device)[0])
        # a signal caught during the all-reduce is not in ``agreed``: keep it for the next step
        if agreed and not self._stop_signal:
            self._stop_signal, self._stop_since = agreed, time.monotonic()
        return bool(agreed)

    def requeue(self):
        """After the stop checkpoint: on slurm's time-limit warning, put the job back in the queue
        (it keeps its id, hence its run_dir, and resumes); otherwise just stop."""
        name = signal.Signals(self._stop_signal).name
        job = os.environ.get("SLURM_JOB_ID")
        if self.cfg.requeue_on_timeout and job and self._stop_signal == signal.SIGUSR1 and distributed.is_main():
            log.warning(f"{name} at step {self.step}: checkpointed; requeueing slurm job {job}")
            subprocess.run(["scontrol", "requeue", job], check=False)
        else:
            log.warning(f"{name} at step {self.step}: checkpointed in {self.last_checkpoint()}; stopping")

    def verifier(self):
        """The toy task's reward function when every dataset is one toy task (any shape), else None."""
        from data.toy import REWARDS

        found = {REWARDS.get(name.removesuffix("_pref").removesuffix("_prompts")) for name in self.cfg.datasets}
        return found.pop() if len(found) == 1 else None

    def write_samples(self, rows: list[dict]):
        """Rank 0: ``run_dir/samples/step-<N>.jsonl`` and a wandb table of what the model generated."""
        if not distributed.is_main():
            return
        checkpointing.write_jsonl(self.run_dir / "samples" / f"step-{self.step}.jsonl", rows)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["prompt", "completion"],
                                data=[[r["prompt"][-1]["content"], r["completion"]] for r in rows])
            self.wandb.log({"eval/samples": table}, step=self.step)

    def sample_eval(self) -> dict:
        """Collective: completions for the first ``n_eval_model_samples`` eval prompts from the current
        weights, written to ``run_dir/samples/step-<N>.jsonl`` (and a wandb table); with a verifier
        for every dataset (the toy tasks), also their task accuracy."""
        sync_seconds = self.sampler.sync_weights(self.model)
        examples = self.eval_examples[: self.cfg.n_eval_model_samples]
        mine = list(range(self.rank, len(examples), self.world))
        params = SamplingParams(**self.cfg.eval_sampling)
        outs = self.sampler.generate([self.prompt_ids(examples[i]) for i in mine], params)
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, [(i, o[0].text) for i, o in zip(mine, outs)])
        self.model.eval()
        record = {"timing/weight_sync": sync_seconds}
        completions = dict(pair for part in parts for pair in part)
        rows = [{"prompt": examples[i]["prompt"], "completion": completions[i]} for i in range(len(examples))]
        verifier = self.verifier()
        if rows and verifier is not None:
            record["eval/task_accuracy"] = sum(verifier(r["prompt"], r["completion"]) for r in rows) / len(rows)
        self.write_samples(rows)
        return record

    # --- logging, checkpoints ---------------------------------------------------------------

    def start_logging(self):
        if not distributed.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpointing.writing(self.run_dir / "config.yaml"):
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            if self.step == 0:  # a fresh start: what a killed run logged before its first checkpoint goes
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=self.cfg.wandb.project, entity=self.cfg.wandb.get("entity"),
                                    name=self.cfg.exp_name, dir=str(self.run_dir), mode=self.cfg.wandb.mode,
                                    config=OmegaConf.to_container(self.cfg, resolve=True),
                                    id=self.cfg.wandb.get("id"), resume="allow")

    def log_metrics(self, record: dict):
        if not distributed.is_main():
            return
        record = {"step": self.step, "examples": self.examples_seen, "tokens": self.tokens_seen, **record}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpointing.writing(self.run_dir / "metrics.jsonl"), open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metric_lines += 1
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)

    def trainer_state(self) -> dict:
        return {"step": self.step, "examples": self.examples_seen, "tokens": self.tokens_seen,
                "metric_lines": self.metric_lines, "scheduler": self.scheduler.state_dict(),
                "world_size": self.world, "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def save(self, export: bool):
        path = checkpointing.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                  keep=self.cfg.keep_checkpoints, extra=self.extra_models())
        log.info(f"saved {path}")
        if export:
            self.export(self.run_dir / "LATEST", step=self.step)

    def peak_memory_gb(self) -> float:
        """The largest peak over ranks: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return distributed.all_max([peak], self.device)[0]

    def last_checkpoint(self) -> str:
        found = checkpointing.complete(self.run_dir)
        return str(found[-1]) if found else "none"

    def restore_state(self, state: dict):
        """The counters and schedules of ``trainer_state``, read back from a checkpoint."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen, self.tokens_seen = state["step"], state["examples"], state["tokens"]
        self.metric_lines = state["metric_lines"]

    def resume(self):
        path = self.resume_from
        if path is None:
            log.info(f"resume=true but {self.run_dir} has no complete checkpoint: starting fresh")
            return
        self.restore_state(checkpointing.load(path, self.model, self.optimizer, extra=self.extra_models()))
        if distributed.is_main():  # drop what the killed run logged after its last checkpoint
            with checkpointing.writing(self.run_dir / "metrics.jsonl"):
                had = checkpointing.truncate_jsonl(self.run_dir / "metrics.jsonl", self.metric_lines)
            if had < self.metric_lines:
                log.warning(f"{self.run_dir / 'metrics.jsonl'} has {had} lines, {self.metric_lines} when {path} was "
                            f"written: the lines of steps it lost are not written again")
        log.info(f"resumed from {path} at step {self.step}")
        # what the killed run may have left undone after writing this checkpoint: LATEST (at the
        # last step the whole remaining run), and deleting the checkpoints it replaces
        latest = self.run_dir / "LATEST"
        if distributed.from_main(checkpointing.exported_step(latest)) != self.step:
            self.export(latest, step=self.step)
            log.info(f"exported {latest} (step {self.step})")
        if distributed.is_main() and self.cfg.keep_checkpoints:
            checkpointing.prune(self.run_dir, self.cfg.keep_checkpoints)


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the base trainer's loss is already the response-token NLL."""


class PairTrainer(Trainer):
    """Trainers that read preference pairs: both replies of a pair go into the same packed
    micro-batch, chosen at sequence index 2i and rejected at 2i + 1; the loss is a mean over pairs."""

    shape = "pref"
    starts_from_a_model = True

    def tokenize(self, rows: list[dict], source: str) -> list[dict]:
        examples, stats = tokenize_pairs(rows, self.tokenizer, self.cfg, source, self.cfg.data.truncation_mode)
        self.report_truncation(source, len(rows), stats)
        return examples

    def sequences(self, example: dict) -> list[dict]:
        return [example["chosen"], example["rejected"]]

    def units(self, example: dict) -> int:
        return 1

    @staticmethod
    def pair_metrics(r_c, r_r, **extra) -> dict:
        n = len(r_c)
        out = {"rewards/chosen": (r_c.sum(), n), "rewards/rejected": (r_r.sum(), n),
               "rewards/accuracy": ((r_c > r_r).float().sum(), n), "rewards/margin": ((r_c - r_r).sum(), n)}
        out.update({k: (v.detach().sum(), n) for k, v in extra.items()})
        return out


class PreferenceTrainer(PairTrainer):
    """The DPO family: ``loss.name`` is one of dpo, cdpo, ipo, kto, simpo, orpo (losses/preference.py).
    ``loss.rpo_alpha`` > 0 adds alpha times each chosen reply's per-token NLL (RPO, Pang et al. 2024,
    arXiv:2404.19733), which stops DPO from lowering the chosen reply's likelihood along with the
    rejected one's.

    The reference model is the policy's starting point, sharded like it and frozen; or, with
    ``loss.precompute_ref_logps=true``, its log-probs are computed in one pass before training and
    saved to ``run_dir/reference_logps.pt``, so training holds one model.
    """

    REFERENCE_FREE = ("simpo", "orpo")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.objective = cfg.loss.get("objective", cfg.loss.name)  # online_dpo names the loss it trains with
        self.needs_reference = self.objective not in self.REFERENCE_FREE and not cfg.loss.get("reference_free", False)
        self.reference = None
        if self.needs_reference and not cfg.loss.get("precompute_ref_logps", False):
            self.reference = self.build_model(cfg.model).requires_grad_(False).eval()

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        loss, objective = self.cfg.loss, self.objective
        if objective in ("dpo", "cdpo"):
            return dpo_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.get("label_smoothing", 0.0))
        if objective == "ipo":
            return ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, loss.beta)
        if objective == "kto":
            return kto_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.desirable_weight, loss.undesirable_weight)
        if objective == "simpo":
            return simpo_loss(pi_c / n_c, pi_r / n_r, loss.beta, loss.gamma)
        if objective == "orpo":
            return orpo_loss(pi_c / n_c, pi_r / n_r, loss.beta)
        raise ValueError(f"loss {objective!r} is not a preference loss: dpo, cdpo, ipo, kto, simpo, orpo")

    def loss(self, batch: dict, examples: list[dict]) -> tuple[torch.Tensor, dict]:
        n = 2 * len(examples)
        logps, mask = token_logps(self.model, batch)
        seq_logps, seq_tokens = per_sequence(logps, batch["seq_ids"], n), per_sequence(mask, batch["seq_ids"], n)
        if not self.needs_reference:
            ref = torch.zeros_like(seq_logps)
        elif self.reference is not None:
            with torch.no_grad():
                ref = per_sequence(token_logps(self.reference, batch)[0], batch["seq_ids"], n)
        else:
            ref = torch.tensor([x for ex in examples for x in ex["ref"]], device=self.device, dtype=seq_logps.dtype)
        losses, r_c, r_r = self.pair_losses(seq_logps[0::2], seq_logps[1::2], seq_tokens[0::2], seq_tokens[1::2],
                                            ref[0::2], ref[1::2])
        extra = {"logps/chosen": seq_logps[0::2], "logps/rejected": seq_logps[1::2]}
        if self.cfg.loss.get("rpo_alpha"):  # RPO: keep the chosen reply likely while pushing the rejected one down
            nll = -seq_logps[0::2] / seq_tokens[0::2]
            losses = losses + self.cfg.loss.rpo_alpha * nll
            extra["nll/chosen"] = nll
        return losses.sum(), self.pair_metrics(r_c, r_r, **extra)

    def before_training(self):
        if not self.needs_reference or self.reference is not None:
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
        """(chosen, rejected) summed log-probs of every pair under the current model, computed on
        all ranks (equal shares, the last round padded with repeats) and gathered everywhere."""
        self.model.eval()
        n = len(examples)
        size = max(1, min(self.cfg.eval_batch_size // self.world, -(-n // self.world)))
        per_round = size * self.world
        # every rank runs as many forwards (FSDP's lockstep): the last round is filled with
        # repeats, cycling, since there may be fewer pairs than ranks
        order = [k % n for k in range(n + -n % per_round)] if n else []
        mine = []
        for start in range(0, len(order), per_round):
            idx = order[start + self.rank * size : start + (self.rank + 1) * size]
            batch = self.collate([examples[i] for i in idx])
            seq = per_sequence(token_logps(self.model, batch)[0], batch["seq_ids"], 2 * len(idx)).tolist()
            mine += [(i, seq[2 * k], seq[2 * k + 1]) for k, i in enumerate(idx)]
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, mine)
        out = [None] * len(examples)
        for part in parts:
            for i, c, r in part:
                out[i] = (c, r)
        self.model.train()
        return out


class RewardTrainer(PairTrainer):
    """Reward model: a scalar head on the last token (the end-of-turn token) of each sequence,
    trained with the Bradley-Terry loss, optionally with a margin and, as seed 000's
    ``logexpwithlm``, an LM loss on the chosen reply (``loss.lm_coef``). Exports a model that loads
    with ``AutoModelForSequenceClassification``."""

    def load_model(self, model_cfg):
        return models.load_reward_model(model_cfg, self.device, seed=self.cfg.seed)

    def loss(self, batch: dict, examples: list[dict]) -> tuple[torch.Tensor, dict]:
        n, lm_coef = 2 * len(examples), self.cfg.loss.lm_coef
        scores, logits = self.model(batch["input_ids"], batch["position_ids"], with_logits=lm_coef > 0)
        rewards = scores.float().flatten()[last_positions(batch["seq_ids"], n)]
        r_c, r_r = rewards[0::2], rewards[1::2]
        total = bradley_terry_loss(r_c, r_r, self.cfg.loss.margin).sum()
        extra = {}
        if lm_coef > 0:  # mean NLL per token of each chosen reply
            logps, mask = target_logps(logits, batch["targets"])
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


class RolloutTrainer(Trainer):
    """What every trainer that learns from its own samples shares: prompts in, the policy's
    completions out of the colocated sampler (its weights synced at the start of every step),
    scored by ``reward.functions`` and ``reward.models`` (sharded like the policy), weighted and
    summed; evaluation by greedy completions scored the same way. One step of the loop is one
    iteration over ``loss.rollout_batch_size`` prompts, each sampled ``loss.n_samples_per_prompt``
    times. A sample is a dict: the prompt, its tokens, the response's tokens, text and sampler
    log-probs, its ``scores`` by reward and the weighted ``score``.
    """

    shape = "prompt"
    needs_sampler = True
    starts_from_a_model = True

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.reward_models = {path: self.build_reward_model(path) for path in cfg.reward.models}

    def check_config(self):
        super().check_config()
        cfg, loss = self.cfg, self.cfg.loss
        if loss.rollout_batch_size % self.world:
            raise ValueError(f"loss.rollout_batch_size={loss.rollout_batch_size} must be a multiple of the {self.world} ranks")
        if loss.sampling.max_new_tokens > cfg.max_length - cfg.max_prompt_length:
            raise ValueError(f"loss.sampling.max_new_tokens={loss.sampling.max_new_tokens} does not fit: a prompt may "
                             f"have max_prompt_length={cfg.max_prompt_length} of max_length={cfg.max_length} tokens")
        # reward functions are loaded now: a bad name stops the run before any model is built
        self.reward_fns = {spec: rewards.load_function(spec) for spec in cfg.reward.functions}
        names = list(cfg.reward.models) + list(cfg.reward.functions)
        if not names:
            raise ValueError("nothing scores the samples: set reward.functions and/or reward.models")
        for path in cfg.reward.models:
            if not (Path(models.resolve(path)) / "config.json").exists():
                raise ValueError(f"reward.models: {path} is not a model directory (no config.json)")
        weights = cfg.reward.weights
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"reward.weights has {len(weights)} values for {len(names)} rewards {names} (models first)")
        self.reward_weights = dict(zip(names, weights if weights is not None else [1.0] * len(names)))

    def examples_per_step(self) -> int:
        return self.cfg.loss.rollout_batch_size

    def tokenize(self, rows: list[dict], source: str) -> list[dict]:
        examples, stats = tokenize_prompts(rows, self.tokenizer, self.cfg, source, self.cfg.data.truncation_mode)
        self.report_truncation(source, len(rows), stats)
        return examples

    def prompt_ids(self, example: dict) -> list[int]:
        return example["prompt_ids"]

    @staticmethod
    def sequence(sample: dict) -> dict:
        """A sample as a training sequence: its prompt's tokens, then its response's."""
        p = sample["prompt_ids"]
        return {"input_ids": p + sample["response_ids"], "labels": [IGNORE] * len(p) + sample["response_ids"]}

    def load_scorer(self, model_cfg):
        return models.load_reward_model(model_cfg, self.device, seed=self.cfg.seed)

    def model_config(self, path: str):
        """The policy's model config (dtype, sharding) pointed at another model's directory."""
        return OmegaConf.create({**OmegaConf.to_container(self.cfg.model, resolve=True), "archive": path,
                                 "name_or_path": None, "tokenizer_name_or_path": None})

    def build_reward_model(self, path: str) -> tuple:
        """(sharded reward model, its tokenizer, whether the policy's tokens can be fed to it as they are)."""
        model_cfg = self.model_config(path)
        model = self.build_model(model_cfg, load=self.load_scorer).requires_grad_(False).eval()
        tokenizer = models.load_tokenizer(model_cfg)
        same = (tokenizer.get_vocab() == self.tokenizer.get_vocab()
                and tokenizer.chat_template == self.tokenizer.chat_template)
        if not same:
            log.info(f"reward model {path}: its tokenizer differs from the policy's; samples are re-tokenized from text")
        return model, tokenizer, same

    # --- a rollout ----------------------------------------------------------------------------

    def rollout(self) -> tuple[list[dict], dict]:
        """This rank's scored samples of this step's prompts, and the seconds of each phase."""
        timing = {"sync": self.sampler.sync_weights(self.model)}
        indices = self.global_batch(self.step)
        share = len(indices) // self.world
        mine = [self.train_examples[i] for i in indices[self.rank * share : (self.rank + 1) * share]]
        t = time.perf_counter()
        # seeded by the step, so that a resumed run samples what the uninterrupted run sampled
        params = SamplingParams(n=self.cfg.loss.n_samples_per_prompt, seed=self.cfg.seed * 1_000_003 + self.step,
                                **self.cfg.loss.sampling)
        samples = self.generate(mine, params)
        timing["generate"], t = time.perf_counter() - t, time.perf_counter()
        self.score(samples)
        timing["score"] = time.perf_counter() - t
        return samples, timing

    def generate(self, examples: list[dict], params) -> list[dict]:
        """This rank's samples, ``params.n`` per prompt, in prompt order."""
        return self.samples_of(examples, self.sampler.generate([ex["prompt_ids"] for ex in examples], params))

    def samples_of(self, examples: list[dict], outs: list[list]) -> list[dict]:
        """Sample dicts from the sampler's ``Sample``s of each example's prompt."""
        samples = []
        for ex, group in zip(examples, outs):
            for out in group:
                ids, logps = list(out.token_ids), list(out.logprobs)
                if not ids:  # nothing at all: train on the end-of-turn token alone (no sampler log-prob for it)
                    ids, logps = [self.tokenizer.eos_token_id], [float("nan")]
                samples.append({"prompt": ex["prompt"], "row": ex["row"], "prompt_ids": ex["prompt_ids"],
                                "response_ids": ids, "sampler_logps": logps, "text": out.text,
                                "finish_reason": out.finish_reason})
        return samples

    def score(self, samples: list[dict]):
        """Collective (reward models): each sample's ``scores`` by reward and weighted ``score``. A
        sample on which a function fails gets ``reward.invalid_score`` and an ``error``."""
        per_reward = {path: self.reward_model_scores(*rm, samples) for path, rm in self.reward_models.items()}
        for i, s in enumerate(samples):
            s["scores"] = {path: values[i] for path, values in per_reward.items()}
            for name, fn in self.reward_fns.items():
                value, error = rewards.call(fn, s["prompt"], s["text"], s["row"])
                s["scores"][name] = value
                if error is not None and "error" not in s:
                    s["error"] = f"reward function {name} {error} (completion {s['text']!r:.80})"
            valid = all(v is not None and math.isfinite(v) for v in s["scores"].values())
            if not valid and "error" not in s:
                s["error"] = f"a reward model gave a non-finite score ({s['scores']})"
            s["score"] = (sum(self.reward_weights[k] * v for k, v in s["scores"].items()) if valid
                          else self.cfg.reward.invalid_score)

    def chunks(self, samples: list[dict], per_rank: int | None = None) -> list[list[dict]]:
        """Forward-pass chunks of this rank's ``samples``, as many on every rank (FSDP): enough for
        ``per_rank``, the largest rank's count (default: every rank holds as many as this one),
        so a rank holding fewer gets empty chunks at the end."""
        size = max(1, self.cfg.eval_batch_size // self.world)
        n_chunks = math.ceil((len(samples) if per_rank is None else per_rank) / size)
        return [samples[k * size : (k + 1) * size] for k in range(n_chunks)]

    @torch.no_grad()
    def reward_model_scores(self, model, tokenizer, same: bool, samples: list[dict]) -> list[float]:
        """A reward model's score of each sample, read at its last token, the end-of-turn token the
        model was trained to score at. A model with another tokenizer reads the re-tokenized text."""
        scores = []
        for chunk in self.chunks(samples):
            seqs = []
            for s in chunk:
                if same:
                    ids = s["prompt_ids"] + s["response_ids"]
                    ids += [] if ids[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
                else:
                    ids = prompt_ids(tokenizer, s["prompt"]) + response_ids(tokenizer, s["text"])
                ids = ids[-self.cfg.row_tokens :]  # a re-tokenized sample can be longer; keep its end
                seqs.append({"input_ids": ids, "labels": ids})
            batch = self.layout(seqs, tokenizer.pad_token_id)
            values, _ = model(batch["input_ids"], batch["position_ids"])
            scores += values.float().flatten()[last_positions(batch["seq_ids"], len(chunk))].tolist()
        reshard(model)  # a frozen model's root stays gathered after a forward without backward
        return scores

    def gather(self, samples: list[dict]) -> list[dict]:
        """Every rank's samples on every rank, in global prompt order (rank shares are contiguous)."""
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, samples)
        out = [s for part in parts for s in part]
        errors = [s["error"] for s in out if "error" in s]
        if len(errors) > self.cfg.reward.max_invalid_fraction * len(out):
            raise RuntimeError(f"step {self.step + 1}: {len(errors)} of {len(out)} samples have no valid score "
                               f"(reward.max_invalid_fraction={self.cfg.reward.max_invalid_fraction}); first: {errors[0]}")
        if errors:
            log.warning(f"step {self.step + 1}: {len(errors)} of {len(out)} samples scored "
                        f"reward.invalid_score={self.cfg.reward.invalid_score}; first: {errors[0]}")
        return out

    def train_on(self, data: list[dict], epochs: int) -> dict:
        """``epochs`` passes over ``data`` (the same list on every rank) in mini-batches of
        ``batch_size``, shuffled with a seed of the step and epoch, one update each (a partial
        mini-batch is dropped); the mean of the updates' metrics."""
        updates, size = [], self.cfg.batch_size
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 101 + epoch)
            order = torch.randperm(len(data), generator=g).tolist()
            for k in range(len(data) // size):
                mini = order[k * size : (k + 1) * size]
                updates.append(self.update(self.micro_batches(mini, data, self.cfg.gradient_accumulation_steps)))
        return {k: sum(u[k] for u in updates) / len(updates) for k in (updates[0] if updates else {})}

    def rollout_metrics(self, samples: list[dict]) -> dict:
        scores = torch.tensor([s["score"] for s in samples])
        n = len(samples)
        record = {"rollout/score_mean": scores.mean().item(), "rollout/score_std": scores.std(unbiased=False).item(),
                  "rollout/response_length": sum(len(s["response_ids"]) for s in samples) / n,
                  "rollout/truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / n,
                  "rollout/empty_fraction": sum(not s["text"].strip() for s in samples) / n,
                  "rollout/invalid_fraction": sum("error" in s for s in samples) / n}
        for name in self.reward_weights:
            valid = [s["scores"][name] for s in samples if s["scores"][name] is not None]
            record[f"reward/{Path(name).name if name in self.reward_models else name}"] = sum(valid) / max(len(valid), 1)
        return record

    def write_rollout(self, samples: list[dict]):
        """Rank 0, with ``loss.save_rollouts``: ``run_dir/rollouts/step-<N>.jsonl``, one line per sample."""
        if not (self.cfg.loss.save_rollouts and distributed.is_main()):
            return
        checkpointing.write_jsonl(self.run_dir / "rollouts" / f"step-{self.step + 1}.jsonl", sample_rows(samples))

    # --- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Collective: one completion per eval prompt with ``eval_sampling``, scored as in training:
        ``eval/reward`` and, for a toy task, ``eval/task_accuracy``; written to samples/."""
        if not self.eval_examples:
            return {}
        self.sampler.sync_weights(self.model)
        share = len(self.eval_examples) // self.world
        mine = self.eval_examples[self.rank * share : (self.rank + 1) * share]
        samples = self.generate(mine, SamplingParams(**self.cfg.eval_sampling))
        self.score(samples)
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, [(s["prompt"], s["row"], s["text"], s["score"]) for s in samples])
        rows = [{"prompt": p, "completion": text, "score": score} for part in parts for p, _, text, score in part]
        record = {"eval/reward": sum(r["score"] for r in rows) / max(len(rows), 1)}
        verifier = self.verifier()
        if rows and verifier is not None:
            record["eval/task_accuracy"] = sum(verifier(p, text, **row) for part in parts for p, row, text, _ in part) / len(rows)
        self.write_samples(rows)
        self.log_metrics(record)
        log.info(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        return record


class RLTrainer(RolloutTrainer):
    """On-policy RL: PPO with a critic (``loss=ppo``) and the critic-free GRPO, RLOO and
    REINFORCE++ (``loss=grpo|rloo|reinforce_pp``), as one SPMD program: policy, critic, frozen
    reference and reward models are FSDP modules on the same ranks, and the colocated sampler
    generates from the policy's weights, synced at the start of every iteration.

    One step of the loop is one iteration (``rollout_batch_size`` prompts):

    1. each rank samples ``n_samples_per_prompt`` completions for its share of the prompts and
       scores them (``RolloutTrainer``);
    2. the rollout is gathered on every rank; with ``loss.filter_groups`` (grpo, rloo) only the
       prompts whose samples score differently stay;
    3. the ranks recompute, each a share, on packed batches, the policy's log-probs (pi_old), the
       reference's and the critic's values;
    4. every rank computes KL, rewards and advantages (losses/rl.py) of the whole rollout;
    5. runs ``ppo_epochs`` passes over it in shuffled mini-batches of ``batch_size`` samples, one
       optimizer update each: PPO's clipped surrogate times the truncated importance weight
       exp(pi_old - pi_sampler) (capped at ``tis_cap``; both log-probs of the tempered policy),
       which corrects for the sampler and the trainer disagreeing on log-probs; plus the KL term
       (if not in the reward), the entropy bonus and the critic's clipped value loss.

    ``loss.aggregation`` says how per-token losses become the mini-batch's loss (losses/rl.py
    ``aggregation_weights``): token_mean (DAPO), sequence_mean (GRPO's paper) or constant (Dr.
    GRPO). ``loss.sequence_level`` (RLOO's default) treats a completion as one action
    (``sequence_ppo_loss``). Samples also carry, per response token, ``token_fields``.
    """

    token_fields = ("old_logps", "ref_logps", "old_values", "advantages", "returns", "is_weight")
    ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        loss = cfg.loss
        self.reference = None
        if loss.kl_coef > 0:
            self.reference = self.build_model(cfg.model).requires_grad_(False).eval()
        self.critic = None
        if loss.advantage == "gae":
            self.critic = self.build_model(self.critic_config(), load=self.load_scorer)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=loss.critic_lr,
                                                      weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
            self.critic_scheduler = self.lr_schedule(self.critic_optimizer)
        if loss.kl_target:
            self.kl_ctl = AdaptiveKLController(loss.kl_coef, loss.kl_target, loss.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(loss.kl_coef)

    # --- configuration ------------------------------------------------------------------------

    def check_config(self):
        super().check_config()
        cfg, loss = self.cfg, self.cfg.loss
        n, samples = loss.n_samples_per_prompt, loss.rollout_batch_size * loss.n_samples_per_prompt
        if loss.advantage not in self.ADVANTAGES:
            raise ValueError(f"loss.advantage={loss.advantage!r}: expected one of {self.ADVANTAGES}")
        if samples % cfg.batch_size:
            raise ValueError(f"rollout_batch_size x n_samples_per_prompt = {samples} samples must split into "
                             f"mini-batches of batch_size={cfg.batch_size}")
        if loss.filter_groups and loss.advantage not in ("grpo", "rloo"):
            raise ValueError(f"loss.filter_groups drops prompts whose samples all score the same, which only grpo "
                             f"and rloo give zero advantage (loss.advantage={loss.advantage})")
        if loss.advantage in ("grpo", "rloo") and n < 2:
            raise ValueError(f"loss.advantage={loss.advantage} compares the samples of a prompt: n_samples_per_prompt must be >= 2")
        if loss.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation={loss.aggregation!r}: expected one of {AGGREGATIONS}")
        if loss.sequence_level and loss.advantage not in ("grpo", "rloo"):
            raise ValueError(f"loss.sequence_level treats a completion as one action with one advantage, which "
                             f"loss.advantage={loss.advantage} does not give (its advantages are per token)")
        if loss.sequence_level and loss.aggregation != "sequence_mean":
            raise ValueError(f"loss.sequence_level gives one loss per completion, averaged over completions: it needs "
                             f"loss.aggregation=sequence_mean (got {loss.aggregation})")
        if not loss.sampling.temperature > 0:
            raise ValueError("loss.sampling.temperature must be > 0: the policy is softmax(logits / temperature)")
        if loss.advantage == "gae" and loss.critic_init == "reward" and not cfg.reward.models:
            raise ValueError("loss.critic_init=reward needs a reward model (reward.models); or set loss.critic_init=policy")

    def updates_per_step(self) -> int:
        loss = self.cfg.loss
        return loss.ppo_epochs * loss.rollout_batch_size * loss.n_samples_per_prompt // self.cfg.batch_size

    def sequences(self, sample: dict) -> list[dict]:
        seq, p, r = self.sequence(sample), len(sample["prompt_ids"]), len(sample["response_ids"])
        for name in self.token_fields:  # aligned with the labels: zero on the prompt
            seq[name] = [0.0] * p + sample.get(name, [0.0] * r)
        return [seq]

    def units(self, sample: dict) -> int:
        return aggregation_units(len(sample["response_ids"]), self.cfg.loss.aggregation)

    # --- models -------------------------------------------------------------------------------

    def critic_config(self):
        init = self.cfg.loss.critic_init
        if init == "policy":
            return self.cfg.model
        return self.model_config(self.cfg.reward.models[0] if init == "reward" else init)

    def extra_models(self) -> dict:
        return {"critic": (self.critic, self.critic_optimizer)} if self.critic is not None else {}

    def trainer_state(self) -> dict:
        state = {**super().trainer_state(), "kl_coef": self.kl_ctl.value}
        if self.critic is not None:
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        return state

    def restore_state(self, state: dict):
        super().restore_state(state)
        self.kl_ctl.value = state["kl_coef"]
        if self.critic is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])

    # --- one iteration ------------------------------------------------------------------------

    def train_step(self) -> dict:
        loss, start = self.cfg.loss, time.perf_counter()
        samples, timing = self.rollout()
        samples = self.gather(samples)
        record, n_sampled = self.rollout_metrics(samples), len(samples)
        if loss.filter_groups:
            samples = self.varied_groups(samples)
            record["rollout/kept_fraction"] = len(samples) / n_sampled
        t = time.perf_counter()
        self.rollout_logps(samples)
        timing["logprobs"], t = time.perf_counter() - t, time.perf_counter()
        if samples:  # (filter_groups can leave none: then the iteration trains on nothing)
            record.update(self.advantages(samples))
            self.write_rollout(samples)
            record.update(self.train_on(samples, loss.ppo_epochs))
            self.kl_ctl.update(record["rollout/kl"], len(samples))
        timing["train"] = time.perf_counter() - t
        record.update({f"timing/{k}": v for k, v in timing.items()})
        elapsed = time.perf_counter() - start
        record.update({"timing/iteration": elapsed, "samples_per_s": n_sampled / elapsed, "kl_coef": self.kl_ctl.value})
        return record

    def policy_logits(self, model, batch: dict) -> torch.Tensor:
        """Logits at the sampling temperature: the policy being optimised is the distribution the
        samples were drawn from, softmax(logits / T), as in verl and OpenRLHF; the sampler reports
        its log-probs of that same distribution (sampler.py)."""
        raw = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        temperature = self.cfg.loss.sampling.temperature
        return raw if temperature == 1 else raw.float() / temperature

    def varied_groups(self, samples: list[dict]) -> list[dict]:
        """The samples of the prompts whose samples do not all score the same: under grpo and rloo
        the others have zero advantage (DAPO's dynamic-sampling filter, without its re-sampling)."""
        n = self.cfg.loss.n_samples_per_prompt
        groups = [samples[i : i + n] for i in range(0, len(samples), n)]
        return [s for group in groups if len({s["score"] for s in group}) > 1 for s in group]

    @torch.no_grad()
    def rollout_logps(self, samples: list[dict]):
        """Collective, on the gathered rollout (the same list on every rank): per response token,
        pi_old's and the reference's log-probs (at the sampling temperature) and the critic's values. Each rank computes a
        contiguous share, in as many forwards as every other rank (FSDP), then the shares are
        gathered."""
        bounds = [len(samples) * r // self.world for r in range(self.world + 1)]
        mine = samples[bounds[self.rank] : bounds[self.rank + 1]]
        computed = []
        for chunk in self.chunks(mine, per_rank=math.ceil(len(samples) / self.world)):
            fields = self.logps_of(chunk or samples[:1])  # an empty chunk still joins the forward
            computed += [{name: values[i].tolist() for name, values in fields.items()} for i in range(len(chunk))]
        if self.reference is not None:
            reshard(self.reference)  # a frozen model's root stays gathered after a forward without backward
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, computed)
        for s, fields in zip(samples, [f for part in parts for f in part]):
            s.update(fields)

    def logps_of(self, chunk: list[dict]) -> dict[str, list[torch.Tensor]]:
        """One packed forward of each model over ``chunk``: {field: one tensor per sample}."""
        batch, n = self.collate(chunk), len(chunk)
        fields = {"old_logps": unpack(target_logps(self.policy_logits(self.model, batch), batch["targets"])[0], batch, n)}
        if self.reference is not None:
            ref = target_logps(self.policy_logits(self.reference, batch), batch["targets"])[0]
            fields["ref_logps"] = unpack(ref, batch, n)
        if self.critic is not None:
            fields["old_values"] = unpack(self.critic(batch["input_ids"], batch["position_ids"])[0].float(), batch, n)
        return fields

    def advantages(self, samples: list[dict]) -> dict:
        """KL, rewards, advantages and returns of the whole rollout (the same on every rank); stores
        them per response token in the samples, returns the rollout's metrics."""
        loss = self.cfg.loss

        lengths = [len(s["response_ids"]) for s in samples]
        width = max(lengths)

        def padded(name: str) -> torch.Tensor:
            return torch.tensor([s[name] + [0.0] * (width - len(s[name])) for s in samples], dtype=torch.float32)

        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
        old, sampler = padded("old_logps"), padded("sampler_logps")
        # both of the tempered policy (an empty completion's end-of-turn token has no sampler log-prob)
        sampler = torch.where(torch.isnan(sampler), old, sampler)
        scores = torch.tensor([s["score"] for s in samples])
        kl = torch.zeros_like(old)
        if self.reference is not None:
            kl = kl_penalty(old, padded("ref_logps"), loss.kl_estimator) * mask
        coef = self.kl_ctl.value if loss.kl_in_reward else 0.0
        n = loss.n_samples_per_prompt
        returns = torch.zeros_like(old)
        if loss.advantage in ("grpo", "rloo"):
            seq_scores = scores - coef * kl.sum(1)
            if loss.advantage == "grpo":
                adv = grpo_advantages(seq_scores, n, scale=loss.scale_rewards)
            else:
                adv = rloo_advantages(seq_scores, n)
            adv = adv[:, None] * mask
        else:
            token_r = token_rewards(scores, kl, mask, coef)
            if loss.advantage == "reinforce_pp":
                adv = reinforce_pp_advantages(token_r, mask, loss.gamma)
            else:
                if loss.whiten_rewards:
                    token_r = masked_whiten(token_r, mask, shift_mean=False)
                adv, returns = gae(token_r, padded("old_values"), mask, loss.gamma, loss.lam)
        if loss.whiten_advantages and loss.advantage in ("gae", "rloo"):
            adv = masked_whiten(adv, mask)
        if not loss.tis_cap:
            is_weight = torch.ones_like(old)
        elif loss.sequence_level:  # the completion's probability ratio, the same for each of its tokens
            seq_weight = truncated_is_weight(((old - sampler) * mask).sum(1), torch.zeros(len(samples)), loss.tis_cap)
            is_weight = seq_weight[:, None] * mask + (1 - mask)
        else:
            is_weight = truncated_is_weight(old, sampler, loss.tis_cap, mask)
        for i, (s, r) in enumerate(zip(samples, lengths)):
            s["advantages"], s["returns"], s["is_weight"] = adv[i, :r].tolist(), returns[i, :r].tolist(), is_weight[i, :r].tolist()
            s.setdefault("ref_logps", [0.0] * r)
            s.setdefault("old_values", [0.0] * r)
        record = {"rollout/kl": kl.sum(1).mean().item(), "rollout/advantage_mean": masked_mean(adv, mask).item(),
                  "rollout/logp_mismatch": masked_mean((old - sampler).abs(), mask).item(),
                  "rollout/is_weight_mean": masked_mean(is_weight, mask).item()}
        if self.critic is not None:
            record["critic/explained_variance"] = explained_variance(padded("old_values"), returns, mask).item()
        return record

    # --- the update ---------------------------------------------------------------------------

    def loss(self, batch: dict, examples: list[dict]) -> tuple[torch.Tensor, dict]:
        """Summed over the micro-batch with ``aggregation_weights``: divided by the global
        ``units`` it is the mini-batch's aggregated loss."""
        loss, n = self.cfg.loss, len(examples)
        logits = self.policy_logits(self.model, batch)
        logps, mask = target_logps(logits, batch["targets"])
        weights = aggregation_weights(mask, batch["seq_ids"], n, loss.aggregation, loss.sampling.max_new_tokens)
        units = sum(self.units(ex) for ex in examples)
        tokens = mask.sum()
        if loss.sequence_level:
            per_seq, stats = sequence_ppo_loss(logps, batch["old_logps"], batch["advantages"], mask, batch["seq_ids"], n,
                                               loss.clip, loss.clip_high, is_weight=batch["is_weight"])
            total, clip_units = per_seq.sum(), n
        else:
            per_token, stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, loss.clip,
                                               loss.clip_high, is_weight=batch["is_weight"])
            total, clip_units = (per_token * weights).sum(), tokens
        metrics = {"policy/loss": (total.detach(), units), "policy/clipfrac": (stats["clipfrac"] * clip_units, clip_units),
                   "policy/approx_kl": (stats["approx_kl"] * clip_units, clip_units)}
        if self.reference is not None and not loss.kl_in_reward:
            kl = kl_penalty(logps, batch["ref_logps"], loss.kl_estimator) * mask
            total = total + self.kl_ctl.value * (kl * weights).sum()
            metrics["policy/kl"] = (kl.sum().detach(), tokens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and loss.entropy_coef > 0):
            entropy = entropy_from_logits(logits.float()) * mask
        total = total - loss.entropy_coef * (entropy * weights).sum()
        metrics["policy/entropy"] = (entropy.sum().detach(), tokens)
        if self.critic is not None:
            values = self.critic(batch["input_ids"], batch["position_ids"])[0].float()
            per_value = value_loss(values, batch["old_values"], batch["returns"], mask, loss.value_clip)
            total = total + loss.vf_coef * (per_value * weights).sum()
            metrics["critic/value_loss"] = (per_value.sum().detach(), tokens)
        return total, metrics

    def step_optimizers(self) -> dict:
        record = super().step_optimizers()
        if self.critic is not None:
            record["critic/grad_norm"] = self.clip_and_step(self.critic, self.critic_optimizer, self.critic_scheduler)
        return record


class OnlineTrainer(RolloutTrainer):
    """The seeds' online loops as one program: each step of the loop is one iteration that
    samples ``n_samples_per_prompt`` completions for ``rollout_batch_size`` prompts, scores them,
    turns them into training data (``make_data``) and trains on that data for ``epochs_per_iteration``
    epochs in mini-batches of ``batch_size`` examples. Every iteration writes, under
    ``run_dir/iterations/<N>/``, ``samples.jsonl`` (every scored sample), ``rollout.json`` (their
    metrics) and ``train.jsonl`` (the data it trains on, before training), optionally ``model/`` (the model it ends with), and a
    checkpoint. A run resumes at the iteration it stopped in; if that iteration's data was
    written, it trains on it instead of sampling again.

    The learning-rate schedule counts one example per prompt per epoch; iterations that make
    fewer examples take fewer updates (a partial mini-batch is dropped).
    """

    def updates_per_step(self) -> int:
        loss = self.cfg.loss
        return max(1, loss.epochs_per_iteration * loss.rollout_batch_size // self.cfg.batch_size)

    def before_training(self):
        """Nothing precomputed: the data, and any reference log-probs, are made every iteration."""

    def make_data(self, samples: list[dict]) -> list[dict]:
        """Collective: the examples this iteration trains on, from the whole scored rollout."""
        raise NotImplementedError

    def train_step(self) -> dict:
        loss, start = self.cfg.loss, time.perf_counter()
        out = self.run_dir / "iterations" / str(self.step + 1)
        # only when resuming: a fresh start in the run_dir of a killed run samples anew
        written = distributed.all_sum([float((out / "train.jsonl").exists())], self.device)[0] if self.cfg.resume else 0
        resumed = written == self.world
        if resumed:
            data = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
            record = json.loads((out / "rollout.json").read_text())  # this iteration's rollout metrics
            log.info(f"iteration {self.step + 1}: training on the data it wrote before it stopped ({out / 'train.jsonl'})")
        else:
            samples, timing = self.rollout()
            samples = self.gather(samples)
            data = self.make_data(samples)
            record = {**self.rollout_metrics(samples), **{f"timing/{k}": v for k, v in timing.items()}}
            if distributed.is_main():
                checkpointing.write_jsonl(out / "samples.jsonl", sample_rows(samples))
                checkpointing.write_jsonl(out / "rollout.json", [record])
                checkpointing.write_jsonl(out / "train.jsonl", data)  # last: its presence means sampling is done
            distributed.barrier()
        t = time.perf_counter()
        n_updates = loss.epochs_per_iteration * (len(data) // self.cfg.batch_size)
        if not n_updates:
            log.warning(f"iteration {self.step + 1}: {len(data)} training examples, fewer than "
                        f"batch_size={self.cfg.batch_size}: no update")
        record.update(self.train_on(data, loss.epochs_per_iteration))
        record.update({"iteration/examples": len(data), "iteration/updates": n_updates,
                       "timing/train": time.perf_counter() - t, "timing/iteration": time.perf_counter() - start})
        if loss.save_iteration_models:
            self.export(out / "model")
        return record

    def save_now(self) -> bool:
        return True  # a checkpoint every iteration: iterations are long and resume at their start


class OnlineDPOTrainer(OnlineTrainer, PreferenceTrainer):
    """Iterative online DPO (RLHFlow, seed 001): per prompt, its best and its worst sample by
    score make a pair if the best wins by more than ``loss.margin`` (``data.selection``); the
    reference is the model the iteration starts from (the previous iteration's), its log-probs of
    each pair computed before training and stored with the pair. ``loss.objective`` picks the
    preference loss (dpo, ipo, ...; see ``PreferenceTrainer``)."""

    def check_config(self):
        super().check_config()
        if self.cfg.loss.n_samples_per_prompt < 2:
            raise ValueError("loss=online_dpo pairs samples of a prompt: n_samples_per_prompt must be >= 2")

    def make_data(self, samples: list[dict]) -> list[dict]:
        scores = [s["score"] for s in samples]
        pairs = []
        for best, worst in best_vs_worst_pairs(scores, self.cfg.loss.n_samples_per_prompt, self.cfg.loss.margin):
            pairs.append({"prompt": samples[best]["prompt"], "chosen": self.sequence(samples[best]),
                          "rejected": self.sequence(samples[worst]), "chosen_text": samples[best]["text"],
                          "rejected_text": samples[worst]["text"], "scores": [scores[best], scores[worst]]})
        for pair, ref in zip(pairs, self.pair_logps(pairs)):
            pair["ref"] = list(ref)
        return pairs


class RAFTTrainer(OnlineTrainer, SFTTrainer):
    """RAFT / rejection sampling (LMFlow, seed 003; seed 004's rejection sampling): per prompt
    its best sample by score; of those the top ``loss.top_reward_percentage``, and only those
    scoring at least ``loss.min_reward`` (``data.selection``); fine-tuned on with the SFT loss."""

    def make_data(self, samples: list[dict]) -> list[dict]:
        loss = self.cfg.loss
        keep = best_of_k([s["score"] for s in samples], loss.n_samples_per_prompt, loss.top_reward_percentage,
                         loss.min_reward)
        return [{**self.sequence(samples[i]), "prompt": samples[i]["prompt"], "text": samples[i]["text"],
                 "score": samples[i]["score"]} for i in keep]


def sample_rows(samples: list[dict]) -> list[dict]:
    """What a user reads of scored samples (rollouts/, iterations/<N>/samples.jsonl)."""
    keep = ("prompt", "text", "score", "scores", "finish_reason", "error")
    return [{k: s[k] for k in keep if k in s} for s in samples]


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, PreferenceTrainer, RewardTrainer, RLTrainer, OnlineDPOTrainer,
                                          RAFTTrainer)}
