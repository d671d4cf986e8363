"""RL iteration time by phase, samples/s and memory: PPO (critic) and GRPO, vLLM vs HF generate.

    python scripts/bench_ppo.py [--nproc 2] [--iterations 6] [--out bench_ppo.json] [-- extra hydra overrides]

Each configuration is a real ``torchrun train.py loss=<ppo|grpo>`` run on the toy_add prompts,
scored by the toy verifier (add ``reward.models=[<rm export>]`` to time a reward model too), from
the tiny model by default (``model.archive=<sft export>`` for a trained start). Reported per
configuration: the median over iterations (after the first) of the seconds of each phase,
generate, weight sync, score, log-probs (pi_old, reference, critic) and train (the updates); the
whole iteration; samples/s and samples/s per rank (seed 004's "samples/GPU/s"); the mean response
length; the peak memory of the busiest rank (CUDA allocator peak on GPU, peak RSS on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "sync", "score", "logprobs", "train", "iteration")

CONFIGS = {
    "grpo, vllm": ["loss=grpo", "sampler=vllm"],
    "ppo, vllm": ["loss=ppo", "sampler=vllm", "loss.critic_init=policy"],
    "grpo, hf generate": ["loss=grpo", "sampler=hf"],
}


def run(name: str, settings: list[str], args, workdir: Path) -> dict:
    run_dir = workdir / name.replace(", ", "-").replace(" ", "_")
    prompts = args.prompts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(REPO / "train.py"), *settings, f"run_dir={run_dir}", "datasets=[toy_add_prompts]",
           "reward.functions=[toy_add]", f"loss.rollout_batch_size={prompts}", f"loss.n_samples_per_prompt={args.n}",
           f"batch_size={prompts * args.n // 2}", f"n_examples={prompts * args.iterations}",
           f"loss.sampling.max_new_tokens={args.max_new_tokens}", "eval_at_start=false", "eval_at_end=false",
           "eval_every=null", "n_eval_examples=0", "lr=1e-5", "warmup_steps=0", "max_length=128",
           "max_prompt_length=64", *args.overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "timing/iteration" in r][1:]  # the first includes warm-up
    result = {f"{p}_s": statistics.median(r[f"timing/{p}"] for r in iterations) for p in PHASES}
    samples = prompts * args.n
    result.update({"samples_per_s": samples / result["iteration_s"],
                   "samples_per_s_per_rank": samples / result["iteration_s"] / args.nproc,
                   "response_tokens": statistics.mean(r["rollout/response_length"] for r in iterations),
                   "peak_memory_gb": max(r["memory/peak_gb"] for r in records if "memory/peak_gb" in r)})
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=32, help="rollout_batch_size")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench_ppo.json")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for train.py, e.g. model.archive=... (after --)")
    args = parser.parse_args()
    configs = {name: settings for name, settings in CONFIGS.items() if args.only is None or args.only in name}
    if not configs:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, settings, args, Path(tmp)) for name, settings in configs.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"RL iterations, {device}, {args.nproc} rank(s), {args.prompts} prompts x {args.n} samples, "
          f"up to {args.max_new_tokens} new tokens; seconds per iteration (median)")
    header = f"{'':<20}" + "".join(f"{p:>10}" for p in PHASES) + f"{'samples/s':>11}{'/rank':>8}{'resp tok':>10}{'peak GB':>9}"
    print(header)
    for name, r in results.items():
        print(f"{name:<20}" + "".join(f"{r[p + '_s']:>10.2f}" for p in PHASES)
              + f"{r['samples_per_s']:>11.1f}{r['samples_per_s_per_rank']:>8.1f}{r['response_tokens']:>10.1f}"
              + f"{r['peak_memory_gb']:>9.2f}")
    Path(args.out).write_text(json.dumps({"device": device, "nproc": args.nproc, "prompts": args.prompts,
                                          "n_samples_per_prompt": args.n, "max_new_tokens": args.max_new_tokens,
                                          "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
