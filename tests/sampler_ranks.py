"""Helpers for tests/test_sampler.py, and its 2-rank vLLM check as a program of its own:

    torchrun --standalone --nproc_per_node 2 tests/sampler_ranks.py OUT_DIR WEIGHTS.pt

(vLLM cannot run in ranks forked from pytest: a fork inherits the parent's process group and
vLLM's global state, so this runs under torchrun.) Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import distributed  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402,F401  (registers the ${run_id:} resolver the config uses)
from data import load_rows  # noqa: E402
from data.packing import pack  # noqa: E402
from data.tokenize import IGNORE, prompt_ids, tokenize_sft  # noqa: E402
from logprobs import token_logps  # noqa: E402

TINY = REPO / "config" / "model" / "tiny.yaml"


def sampler_override(name: str) -> str:
    """``sampler=name`` once config.yaml's defaults list a sampler, ``+sampler=name`` before."""
    defaults = OmegaConf.to_container(OmegaConf.load(REPO / "config" / "config.yaml").defaults)
    listed = any(isinstance(d, dict) and "sampler" in d for d in defaults)
    return f"sampler={name}" if listed else f"+sampler={name}"


def make_cfg(*overrides: str):
    """The config train.py would see (as conftest.make_cfg; importable outside pytest too)."""
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def tiny_model(device, world: int, weights: dict | None = None):
    """The tiny Llama (fp32; random init, or ``weights``), sharded with FSDP2 over ``world``
    ranks as the trainer does."""
    model = models.load_model(OmegaConf.load(TINY), device, seed=0)
    if weights is not None:
        model.load_state_dict(weights)
    return models.shard(model, init_device_mesh(device.type, (world,)))


def trained_weights(steps: int = 40) -> dict:
    """The tiny model's weights after a few SFT steps on TASK (one process)."""
    model = models.load_model(OmegaConf.load(TINY), torch.device("cpu"), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sft_steps(model, optimizer, sft_examples(tokenizer(), 256), steps=steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tokenizer():
    return models.load_tokenizer(OmegaConf.load(TINY))


# Sorting digits: after ~40 SFT steps the tiny model's greedy replies vary in length and end with
# EOS ("1 1 3 8<|end|>"), which exercises more than a random init's endless repetition does.
TASK = "toy_sort"


def prompts(tok, n: int, start: int = 0) -> list[list[int]]:
    rows = load_rows(f"{TASK}_prompts", "test", "prompt")[start : start + n]
    assert len(rows) == n, f"the test split has no prompts {start}..{start + n - 1}"
    return [prompt_ids(tok, r["prompt"]) for r in rows]


def sft_examples(tok, n: int) -> list[dict]:
    limits = OmegaConf.create({"max_length": 64, "max_prompt_length": 32})
    return tokenize_sft(load_rows(TASK, "train", "sft")[:n], tok, limits, TASK)[0]


def sft_steps(model, optimizer, examples: list[dict], steps: int, per_step: int = 16):
    """A few optimizer steps of SFT on ``examples`` (every rank the same number of steps)."""
    model.train()
    for s in range(steps):
        mb = [examples[(s * per_step + i) % len(examples)] for i in range(per_step)]
        logps, mask = token_logps(model, pack(mb, 256, 0))
        (-(logps.sum() / mask.sum())).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def sampling_logps(logits: torch.Tensor, params=None) -> torch.Tensor:
    """log q over the vocabulary of the distribution ``params`` samples from, written out: logits / T,
    then top-k keeps the k largest, then top-p keeps the most likely tokens until their mass
    reaches p (a token is kept if the mass of the tokens above it is below p), renormalised.
    Greedy (T = 0) or no params: the raw log_softmax."""
    logits = logits.float()
    if params is None or params.temperature == 0:
        return torch.log_softmax(logits, -1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
        above = probs.cumsum(-1) - probs  # the mass of the tokens more likely than each
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, above < params.top_p)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def recomputed_logps(model, prompt_list: list[list[int]], samples, params=None) -> list[list[float]]:
    """Each completion token's log-prob under the distribution ``params`` samples from, from one
    plain forward per completion (no packing, no helpers of the project)."""
    out = []
    for p, ss in zip(prompt_list, samples):
        for s in ss:
            ids = torch.tensor([p + s.token_ids])
            logq = sampling_logps(model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1], params)
            out.append(logq.gather(1, torch.tensor(s.token_ids)[:, None])[:, 0].tolist())
    return out


def max_logp_diff(recomputed: list[list[float]], samples) -> float:
    flat = [s for ss in samples for s in ss]
    assert len(flat) == len(recomputed)
    diffs = [abs(a - b) for r, s in zip(recomputed, flat) for a, b in zip(r, s.logprobs, strict=True)]
    return max(diffs, default=0.0)


def two_rank_vllm(out_dir: Path, weights_file: Path):
    """Under torchrun: FSDP2 over 2 ranks, an engine per rank, syncs, seeds, uneven prompts."""
    from sampler import HFSampler, SamplingParams, build_sampler

    device = distributed.init(timeout_minutes=3)
    rank, world = distributed.rank(), distributed.world()
    tok = tokenizer()
    model = tiny_model(device, world, torch.load(weights_file))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = sft_examples(tok, 256)
    cfg = make_cfg(f"run_dir={out_dir}", sampler_override("vllm"), "max_length=128")
    vllm = build_sampler(cfg, model, tok, out_dir)
    hf = HFSampler(model, tok, batch_size=4)
    mine = prompts(tok, 8)[rank::world]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    rec = {"rank": rank, "engine_seed": cfg.sampler.seed + rank}
    rec["parity_before"] = [a[0].token_ids == b[0].token_ids for a, b in zip(vllm.generate(mine, greedy), hf.generate(mine, greedy))]
    sft_steps(model, optimizer, examples[rank::world], steps=5, per_step=8)  # each rank its own data
    stale = vllm.generate(mine, greedy)
    rec["sync_seconds"] = vllm.sync_weights(model)
    after, after_hf = vllm.generate(mine, greedy), hf.generate(mine, greedy)
    rec["parity_after"] = [a[0].token_ids == b[0].token_ids for a, b in zip(after, after_hf)]
    rec["changed_by_sync"] = sum(a[0].token_ids != b[0].token_ids for a, b in zip(stale, after))
    rec["logp_diff"] = max_logp_diff(recomputed_logps(model, mine, after), after)
    # the same prompt on both ranks: each rank's own stream
    rec["samples"] = [s.token_ids for s in vllm.generate(prompts(tok, 1), SamplingParams(n=4, max_new_tokens=16))[0]]
    # uneven: rank 1 passes nothing (vLLM engines are independent; HF steps in lockstep)
    uneven = vllm.generate(mine if rank == 0 else [], greedy)
    uneven_hf = hf.generate(mine[:3] if rank == 0 else [], greedy)
    rec["uneven"] = [len(uneven), len(uneven_hf)]
    rec["uneven_hf_parity"] = [a[0].token_ids == b[0].token_ids for a, b in zip(uneven, uneven_hf)]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(rec))
    vllm.close()  # shuts the engine down, and with it the process group


if __name__ == "__main__":
    two_rank_vllm(Path(sys.argv[1]), Path(sys.argv[2]))
