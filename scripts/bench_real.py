"""Speed on the real model (SmolLM2-135M-Instruct) against this machine's limit, phase by phase.

    python scripts/bench_real.py [--nproc 2] [--only sft,dpo,grpo] [--out bench_real.json] [-- overrides]

1. The limit, measured here on the cores the runs use (``--nproc`` processes at once, each with
   the threads a rank gets): dense matrix-product FLOP/s in fp32 and bf16 (square 2048 products,
   the best of several timings), and memory bandwidth (a copy of the model's fp32 bytes).
2. SFT and DPO: real ``torchrun train.py`` runs on synthetic chat rows (bench_sft.synthetic_chat),
   their median tokens/s after warm-up; model FLOPs per token as bench_sft/bench_dpo count them
   (6 N + attention for training, 2 N + attention for a forward; N counts the tied LM head once,
   as it is one matrix product per token).
3. GRPO on the demo's arithmetic prompts (scripts/arithmetic.py), per iteration (median after the
   first): generate (vLLM; its FLOPs 2 N per prompt and generated token, and the weight bytes
   each decoding step reads, against the measured bandwidth), weight sync (seconds and GB/s
   against the copy), the pi_old log-prob forward and the updates (FLOPs from the tokens they
   process).

MFU = model FLOPs / seconds / (the fp32 peak of all ranks): every phase here runs in fp32
(``model.fsdp_policy_mp=float32``, the demo's and CI-class machines' dtype). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_sft  # noqa: E402
from bench_dpo import flops_per_token as dpo_flops_per_token  # noqa: E402

MODEL = ["model=smollm2_135m", "model.fsdp_policy_mp=float32"]
WARMUP = 1  # iterations or steps not timed


# --- 1. the limit --------------------------------------------------------------------------


def _matmul_worker(dtype: str, threads: int, seconds: float, start, out):
    torch.set_num_threads(threads)
    n, dt = 2048, getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    start.wait()  # every process times at once: they share caches, memory and the chip's power
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    out.put(best)


def peak_flops(dtype: str, nproc: int, threads: int, seconds: float = 3.0) -> float:
    """Dense matmul FLOP/s summed over ``nproc`` processes running at once."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(dtype, threads, seconds, start, out)) for _ in range(nproc)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join()
    return total


def copy_bandwidth(n_bytes: int, threads: int) -> float:
    """Bytes/s of copying ``n_bytes`` (read + write counted once, as a sync moves them once)."""
    torch.set_num_threads(threads)
    src, dst = torch.empty(n_bytes, dtype=torch.uint8).fill_(1), torch.empty(n_bytes, dtype=torch.uint8)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return n_bytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- 2-3. the runs -------------------------------------------------------------------------


def train(overrides: list[str], run_dir: Path, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "train.py"), *MODEL, f"run_dir={run_dir}", "eval_at_start=false", "eval_at_end=false",
           "eval_every=null", "n_eval_examples=0", "warmup_steps=0", "wandb.enabled=false", *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def supervised(algo: str, args, workdir: Path, shape: tuple[int, int, int], peak: float) -> dict:
    """SFT or DPO: median tokens/s after warm-up, model FLOPs per token, MFU."""
    params, layers, hidden = shape
    data = workdir / f"{algo}.jsonl"
    bench_sft.synthetic_chat(data, n=args.batch_size * (args.steps + 2) + 40, max_chars=args.max_length * 2,
                             pairs=algo == "dpo")
    run_dir = workdir / algo
    records = train([f"loss={algo}", f"datasets=[{data}]", f"batch_size={args.batch_size}",
                     f"n_examples={args.batch_size * args.steps}", "lr=1e-5", f"max_length={args.max_length}",
                     f"max_prompt_length={args.max_length // 2}", *args.overrides], run_dir, args.nproc)
    steps = [r for r in records if "tokens_per_s" in r][WARMUP:]
    result = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
              "mean_tokens_per_sequence": records[-1]["tokens"] / records[-1]["examples"]}
    if algo == "sft":
        per_token = bench_sft.training_flops(params, params, layers, hidden, result["mean_tokens_per_sequence"])
    else:
        per_token = dpo_flops_per_token(params, params, layers, hidden, result, resident_reference=True)
    result.update({"flops_per_token": per_token, "seconds_per_step": statistics.median(
        r["tokens"] / r["tokens_per_s"] for r in _per_step(steps)), "mfu": result["tokens_per_s"] * per_token / peak})
    return result


def _per_step(records: list[dict]) -> list[dict]:
    """Each record's own tokens (metrics.jsonl's ``tokens`` is cumulative)."""
    return [{**b, "tokens": b["tokens"] - a["tokens"]} for a, b in zip(records, records[1:])]


def grpo(args, workdir: Path, shape: tuple[int, int, int], peak: float, bandwidth: float) -> dict:
    params, layers, hidden = shape
    prompts = workdir / "arithmetic.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "arithmetic.py"), "--out", str(prompts)], check=True,
                   capture_output=True)
    n_prompts, n = args.prompts, args.n
    records = train(["loss=grpo", "sampler=vllm", f"datasets=[{prompts}]", "reward.functions=[scripts/arithmetic.py:reward]",
                     f"loss.rollout_batch_size={n_prompts}", f"loss.n_samples_per_prompt={n}", "loss.kl_coef=0",
                     f"loss.sampling.max_new_tokens={args.max_new_tokens}", f"batch_size={n_prompts * n // 2}",
                     f"n_examples={n_prompts * (args.iterations + WARMUP)}", "lr=1e-6", *args.overrides],
                    workdir / "grpo", args.nproc)
    iterations = _per_step([r for r in records if "timing/iteration" in r])  # from the second on (WARMUP = 1)
    median = lambda key: statistics.median(r[key] for r in iterations)  # noqa: E731
    samples = n_prompts * n
    response = median("rollout/response_length")
    trained_tokens = median("tokens")  # prompt + completion tokens through the updates
    sequence = trained_tokens / samples  # every sample is trained once (2 updates of half the rollout)
    prompt = sequence - response
    forward = 2 * params + 4 * layers * hidden * sequence
    out = {"prompt_tokens": prompt, "response_tokens": response}
    # generate: each prompt's tokens once (its n samples share the prefix cache), each generated token once
    gen_flops = 2 * params * (n_prompts * prompt + samples * response)
    # a decoding step reads every weight once per rank; about max response length steps per iteration
    gen_bytes = args.nproc * 4 * params * args.max_new_tokens
    out["generate"] = {"seconds": median("timing/generate"), "mfu": gen_flops / median("timing/generate") / peak,
                       "bandwidth_fraction": gen_bytes / median("timing/generate") / (bandwidth * args.nproc),
                       "tokens_per_s": samples * response / median("timing/generate")}
    sync_bytes = 4 * params
    sync_s = median("timing/sync")  # 0 with HF generate: it samples from the trained weights themselves
    out["sync"] = {"seconds": sync_s, "gb_per_s": sync_bytes / sync_s / 1e9 if sync_s else None,
                   "copy_gb_per_s": bandwidth / 1e9}
    out["logprobs"] = {"seconds": median("timing/logprobs"), "tokens_per_s": trained_tokens / median("timing/logprobs"),
                       "mfu": forward * trained_tokens / median("timing/logprobs") / peak}
    per_token = bench_sft.training_flops(params, params, layers, hidden, sequence)
    out["train"] = {"seconds": median("timing/train"), "tokens_per_s": trained_tokens / median("timing/train"),
                    "mfu": per_token * trained_tokens / median("timing/train") / peak}
    out["iteration_s"] = median("timing/iteration")
    return out


def model_shape() -> tuple[int, int, int]:
    return bench_sft.model_shape(REPO / ".cache" / "SmolLM2-135M-Instruct")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--only", default="sft,dpo,grpo", help="the runs to time (the limit is always measured)")
    p.add_argument("--steps", type=int, default=6, help="SFT/DPO optimizer steps (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="SFT rows / DPO pairs per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--iterations", type=int, default=4, help="GRPO iterations timed (after one not timed)")
    p.add_argument("--prompts", type=int, default=16, help="GRPO prompts per iteration")
    p.add_argument("--n", type=int, default=8, help="GRPO samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", default="bench_real.json")
    p.add_argument("overrides", nargs="*", help="hydra overrides for train.py (after --)")
    args = p.parse_args()
    only = args.only.split(",")
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    shape = model_shape()
    params = shape[0]
    report = {"nproc": args.nproc, "threads_per_rank": threads, "parameters": params, "cpu": _cpu_name()}
    report["peak_flops"] = {dt: peak_flops(dt, args.nproc, threads) for dt in ("float32", "bfloat16")}
    report["copy_bytes_per_s"] = copy_bandwidth(4 * params, threads)
    peak = report["peak_flops"]["float32"]
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ("sft", "dpo"):
            if algo in only:
                report[algo] = supervised(algo, args, Path(tmp), shape, peak)
        if "grpo" in only:
            report["grpo"] = grpo(args, Path(tmp), shape, peak, report["copy_bytes_per_s"])
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def print_table(r: dict):
    pf = r["peak_flops"]
    print(f"{r['cpu']}, {r['nproc']} rank(s) x {r['threads_per_rank']} thread(s); SmolLM2-135M-Instruct "
          f"({r['parameters'] / 1e6:.1f}M parameters), fp32")
    print(f"limit: matmul {pf['float32'] / 1e9:.1f} GFLOP/s fp32, {pf['bfloat16'] / 1e9:.1f} bf16 (all ranks); "
          f"copy {r['copy_bytes_per_s'] / 1e9:.1f} GB/s (one rank)")
    print(f"{'phase':24}{'seconds':>9}{'tokens/s':>10}{'MFU fp32':>10}  other")
    for algo in ("sft", "dpo"):
        if algo in r:
            x = r[algo]
            print(f"{algo + ' (per step)':24}{x['seconds_per_step']:9.2f}{x['tokens_per_s']:10.0f}{x['mfu']:10.1%}")
    if "grpo" in r:
        g = r["grpo"]
        print(f"{'grpo generate':24}{g['generate']['seconds']:9.2f}{g['generate']['tokens_per_s']:10.0f}"
              f"{g['generate']['mfu']:10.1%}  weight reads {g['generate']['bandwidth_fraction']:.0%} of copy bandwidth")
        if g["sync"]["gb_per_s"]:
            print(f"{'grpo weight sync':24}{g['sync']['seconds']:9.2f}{'':>10}{'':>10}  {g['sync']['gb_per_s']:.2f} GB/s "
                  f"(copy {g['sync']['copy_gb_per_s']:.1f})")
        for phase in ("logprobs", "train"):
            print(f"{'grpo ' + phase:24}{g[phase]['seconds']:9.2f}{g[phase]['tokens_per_s']:10.0f}{g[phase]['mfu']:10.1%}")
        print(f"{'grpo iteration':24}{g['iteration_s']:9.2f}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
