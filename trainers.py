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
from data import DataError, load_rows
from data.packing import pack, pad
from data.tokenize import IGNORE, tokenize_pairs, tokenize_sft
from losses import sft_loss
from losses.preference import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss

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


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position, in fp32, zero where there is no target; and that mask."""
    logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    mask = (targets != IGNORE).to(logps.dtype)
    return logps.view_as(targets) * mask, mask


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logps`` of a causal LM's forward over a packed batch."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return target_logps(out.logits, batch["targets"])


def per_sequence(values: torch.Tensor, seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Sum ``values`` ([R, L]) over each packed sequence's positions -> [n]."""
    valid = seq_ids >= 0
    return values.new_zeros(n).index_add(0, seq_ids[valid], values[valid])


def last_positions(seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index (into ``seq_ids.flatten()``) of each sequence's last token -> [n]."""
    flat = seq_ids.flatten()
    valid = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    return torch.zeros(n, dtype=torch.long, device=flat.device).scatter_reduce(
        0, flat[valid], positions[valid], reduce="amax", include_self=False)


class Trainer:
    shape = "sft"  # the row shape this trainer reads (see data/__init__.py)

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rank, self.world = distributed.rank(), distributed.world()
        self.run_dir = Path(cfg.run_dir)
        self.check_config()
        self.tokenizer = models.load_tokenizer(cfg.model)
        # data before the model: bad input stops the run before any compute is spent
        self.train_examples = self.load_examples("train")
        self.eval_examples = self.load_examples("test")[: cfg.n_eval_examples]
        n = cfg.n_examples or cfg.n_epochs * len(self.train_examples)
        self.total_steps = n // cfg.batch_size
        if self.total_steps < 1:
            raise DataError(f"{n} training examples make no batch of batch_size={cfg.batch_size}")
        log.info(f"{len(self.train_examples)} train / {len(self.eval_examples)} eval examples, "
                 f"{self.total_steps} steps of {cfg.batch_size}, {self.world} rank(s)")

        self.model = self.build_model(cfg.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=tuple(cfg.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        self.step, self.examples_seen, self.tokens_seen, self.metric_lines = 0, 0, 0, 0
        self._permutation = (None, None)
        self.wandb = None
        self.sampler = None
        if cfg.sample_during_eval:
            from sampler import build_sampler

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

    def export(self, out_dir: Path):
        """Collective: the Hugging Face directory the next stage loads."""
        checkpointing.export_hf(self.model, self.tokenizer, out_dir)

    # --- setup ------------------------------------------------------------------------------

    def check_config(self):
        cfg, per_step = self.cfg, self.world * self.cfg.gradient_accumulation_steps
        if cfg.batch_size % per_step:
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of ranks x gradient_accumulation_steps "
                             f"= {self.world} x {cfg.gradient_accumulation_steps}")
        if cfg.max_prompt_length >= cfg.max_length:
            raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below max_length={cfg.max_length}")
        if cfg.row_tokens < cfg.max_length:
            raise ValueError(f"row_tokens={cfg.row_tokens} must hold one whole sequence (max_length={cfg.max_length})")

    def load_model(self, model_cfg):
        """The unsharded model, full precision, on CPU."""
        return models.load_model(model_cfg, self.device, seed=self.cfg.seed)

    def build_model(self, model_cfg):
        mesh = init_device_mesh(self.device.type, (self.world,))
        model = self.load_model(model_cfg)
        return models.shard(model, mesh, param_dtype=model_cfg.fsdp_policy_mp, cpu_offload=self.cfg.cpu_offload,
                            block_name=model_cfg.get("block_name"),
                            activation_checkpointing=self.cfg.activation_checkpointing)

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

    def global_batch(self, step: int) -> list[int]:
        """Indices of the examples of optimizer step ``step``: a fixed-seed shuffle per epoch,
        the same on every rank and for every world size."""
        n, size = len(self.train_examples), self.cfg.batch_size
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
        if self.cfg.packing:
            batch = pack(seqs, self.cfg.row_tokens, self.tokenizer.pad_token_id)
        else:
            batch = pad(seqs, self.tokenizer.pad_token_id)
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
        elif checkpointing.complete(self.run_dir):
            raise RuntimeError(f"{self.run_dir} already holds checkpoints: pass resume=true or another run_dir")
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
            t0 = time.perf_counter()
            micro = self.micro_batches(self.global_batch(self.step), self.train_examples, cfg.gradient_accumulation_steps)
            sums = self.run_micro_batches(micro, train=True)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"step {self.step + 1}: gradient norm is {grad_norm.item()}; "
                                         f"last complete checkpoint: {self.last_checkpoint()}")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            before = self.examples_seen
            self.step += 1
            self.examples_seen += cfg.batch_size
            self.tokens_seen += int(sums["tokens"][0])
            elapsed = time.perf_counter() - t0
            record = {"lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": sums["tokens"][0] / elapsed,
                      "padding_fraction": sums["padding"][0] / (sums["tokens"][0] + sums["padding"][0]),
                      "memory/peak_gb": self.peak_memory_gb()}
            record.update({f"{k}/train": v / max(c, 1e-12) for k, (v, c) in sums.items() if k not in ("tokens", "padding")})
            self.log_metrics(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss/train']:.4f}")
            last = self.step == self.total_steps
            if crossed(cfg.eval_every, before, self.examples_seen) or (last and cfg.eval_at_end):
                self.evaluate()
                self.model.train()
            saved = crossed(cfg.save_every, before, self.examples_seen) or last
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
        """SIGTERM (preemption, scancel) and SIGUSR1 (slurm's warning before the time limit) let the
        current step finish; then every rank checkpoints and the run stops (see ``stop_requested``).
        A second signal changes nothing: torchrun forwards what slurm may also deliver directly."""
        self._stop_signal = 0

        def note(signum, frame):
            self._stop_signal = self._stop_signal or signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, note)

    def stop_requested(self) -> bool:
        """Collective: True on every rank if any rank caught a stop signal."""
        flag = torch.tensor([float(self._stop_signal)], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._stop_signal = int(flag.item())
        return bool(self._stop_signal)

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

    def sample_eval(self) -> dict:
        """Collective: completions for the first ``n_eval_model_samples`` eval prompts from the current
        weights, written to ``run_dir/samples/step-<N>.jsonl`` (and a wandb table); with a verifier
        for every dataset (the toy tasks), also their task accuracy."""
        from data.toy import REWARDS
        from sampler import SamplingParams

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
        verifiers = [REWARDS.get(name.removesuffix("_pref").removesuffix("_prompts")) for name in self.cfg.datasets]
        if rows and all(verifiers) and len(set(verifiers)) == 1:
            record["eval/task_accuracy"] = sum(verifiers[0](r["prompt"], r["completion"]) for r in rows) / len(rows)
        if distributed.is_main():
            out = self.run_dir / "samples" / f"step-{self.step}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
            if self.wandb is not None:
                import wandb

                table = wandb.Table(columns=["prompt", "completion"],
                                    data=[[r["prompt"][-1]["content"], r["completion"]] for r in rows])
                self.wandb.log({"eval/samples": table}, step=self.step)
        return record

    # --- logging, checkpoints ---------------------------------------------------------------

    def start_logging(self):
        if not distributed.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
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
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metric_lines += 1
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)

    def trainer_state(self) -> dict:
        return {"step": self.step, "examples": self.examples_seen, "tokens": self.tokens_seen,
                "metric_lines": self.metric_lines, "scheduler": self.scheduler.state_dict(),
                "world_size": self.world}

    def save(self, export: bool):
        path = checkpointing.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                  keep=self.cfg.keep_checkpoints)
        log.info(f"saved {path}")
        if export:
            self.export(self.run_dir / "LATEST")

    def peak_memory_gb(self) -> float:
        """The largest peak over ranks: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        t = torch.tensor([peak], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    def last_checkpoint(self) -> str:
        found = checkpointing.complete(self.run_dir)
        return str(found[-1]) if found else "none"

    def resume(self):
        found = checkpointing.complete(self.run_dir)
        if not found:
            log.info(f"resume=true but {self.run_dir} has no complete checkpoint: starting fresh")
            return
        state = checkpointing.load(found[-1], self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen, self.tokens_seen = state["step"], state["examples"], state["tokens"]
        self.metric_lines = state["metric_lines"]
        if distributed.is_main():  # drop what the killed run logged after its last checkpoint
            path = self.run_dir / "metrics.jsonl"
            lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            path.write_text("".join(lines[: self.metric_lines]))
        log.info(f"resumed from {found[-1]} at step {self.step}")


class SFTTrainer(Trainer):
    """Supervised fine-tuning: the base trainer's loss is already the response-token NLL."""


class PairTrainer(Trainer):
    """Trainers that read preference pairs: both replies of a pair go into the same packed
    micro-batch, chosen at sequence index 2i and rejected at 2i + 1; the loss is a mean over pairs."""

    shape = "pref"

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
        self.needs_reference = cfg.loss.name not in self.REFERENCE_FREE and not cfg.loss.get("reference_free", False)
        self.reference = None
        if self.needs_reference and not cfg.loss.get("precompute_ref_logps", False):
            self.reference = self.build_model(cfg.model).requires_grad_(False).eval()

    def pair_losses(self, pi_c, pi_r, n_c, n_r, ref_c, ref_r):
        loss = self.cfg.loss
        if loss.name in ("dpo", "cdpo"):
            return dpo_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.get("label_smoothing", 0.0))
        if loss.name == "ipo":
            return ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, loss.beta)
        if loss.name == "kto":
            return kto_loss(pi_c, pi_r, ref_c, ref_r, loss.beta, loss.desirable_weight, loss.undesirable_weight)
        if loss.name == "simpo":
            return simpo_loss(pi_c / n_c, pi_r / n_r, loss.beta, loss.gamma)
        if loss.name == "orpo":
            return orpo_loss(pi_c / n_c, pi_r / n_r, loss.beta)
        raise ValueError(f"loss.name={loss.name!r} is not a preference loss: dpo, cdpo, ipo, kto, simpo, orpo")

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
        distributed.barrier()  # every rank looks before rank 0 may write it
        if path.exists():
            saved = torch.load(path)
        elif self.step > 0:
            raise RuntimeError(f"resuming at step {self.step} but {path} is missing: the reference is gone")
        else:
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
        size = max(1, self.cfg.eval_batch_size // self.world)
        per_round = size * self.world
        order = list(range(len(examples)))
        order += order[: -len(order) % per_round]
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

    def export(self, out_dir: Path):
        weights = checkpointing.full_state_dict(self.model)
        if distributed.is_main():
            weights, config = self.model.export_weights(weights)
            checkpointing.write_hf(out_dir, weights, config, self.tokenizer)
        distributed.barrier()


TRAINERS = {cls.__name__: cls for cls in (SFTTrainer, PreferenceTrainer, RewardTrainer)}
