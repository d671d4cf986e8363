"""RL iteration time by phase, samples/s, tokens/s and memory: PPO (critic) and GRPO, vLLM vs HF
generate, and GRPO on multi-turn calculator episodes.

    python scripts/bench_ppo.py [--nproc 2] [--iterations 6] [--out bench_ppo.json] [-- extra hydra overrides]

Each configuration is a real ``torchrun train.py loss=<ppo|grpo>`` run on the toy_add prompts (the
calculator on toy_calc_prompts),
scored by the toy verifier (add ``reward.models=[<rm export>]`` to time a reward model too), from
the tiny model by default (``model.archive=<sft export>`` for a trained start). Reported per
configuration: the median over iterations (after the first) of the seconds of each phase,
generate, weight sync, score, log-probs (pi_old, reference, critic) and train (the updates); the
whole iteration; samples/s and samples/s per rank (seed 004's "samples/GPU/s"); the mean response
length; for episodes, the turns and the policy's tokens per episode, and episodes/s
(samples/s) and generated tokens/s; the peak memory of the busiest rank (CUDA allocator peak on GPU, peak RSS on CPU).
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

ADD = ["datasets=[toy_add_prompts]", "reward.functions=[toy_add]"]
# Episodes of up to 3 replies with the calculator tool; from a random init every reply is cut at
# max_new_tokens and ends its episode, so time it from a warm start: -- model.archive=<toy_calc SFT>
CALCULATOR = ["datasets=[toy_calc_prompts]", "reward.functions=[]", "env=calculator", "max_turns=3"]
CONFIGS = {
    "grpo, vllm": ["loss=grpo", "sampler=vllm", *ADD],
    "ppo, vllm": ["loss=ppo", "sampler=vllm", "loss.critic_init=policy", *ADD],
    "grpo, hf generate": ["loss=grpo", "sampler=hf", *ADD],
    "grpo, vllm, calculator": ["loss=grpo", "sampler=vllm", *CALCULATOR],
}


def run(name: str, settings: list[str], args, workdir: Path) -> dict:
    run_dir = workdir / name.replace(", ", "-").replace(" ", "_")
    prompts = args.prompts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(REPO / "train.py"), *settings, f"run_dir={run_dir}", f"loss.rollout_batch_size={prompts}", f"loss.n_samples_per_prompt={args.n}",
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
                   # an episode's policy tokens are its replies' (observations are not generated)
                   "policy_tokens": statistics.mean(r.get("rollout/policy_tokens", r["rollout/response_length"])
                                                    for r in iterations),
                   "turns": statistics.mean(r.get("rollout/turns", 1.0) for r in iterations),
                   "peak_memory_gb": max(r["memory/peak_gb"] for r in records if "memory/peak_gb" in r)})
    result["policy_tokens_per_s"] = samples * result["policy_tokens"] / result["iteration_s"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=32, help="rollout_batch_size")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench_ppo.json")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this (the calculator's only so)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for train.py, e.g. model.archive=... (after --)")
    args = parser.parse_args()
    # the calculator row needs a warm start (model.archive), so it runs only when --only names it
    configs = {name: settings for name, settings in CONFIGS.items()
               if (args.only is None and "calculator" not in name) or (args.only is not None and args.only in name)}
    if not configs:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, settings, args, Path(tmp)) for name, settings in configs.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"RL iterations, {device}, {args.nproc} rank(s), {args.prompts} prompts x {args.n} samples, "
          f"up to {args.max_new_tokens} new tokens; seconds per iteration (median)")
    print("(a sample is a whole episode; turns = replies per sample; tok/s = generated tokens per second)")
    header = (f"{'':<24}" + "".join(f"{p:>10}" for p in PHASES)
              + f"{'samples/s':>11}{'/rank':>8}{'turns':>7}{'policy tok':>11}{'tok/s':>8}{'peak GB':>9}")
    print(header)
    for name, r in results.items():
        print(f"{name:<24}" + "".join(f"{r[p + '_s']:>10.2f}" for p in PHASES)
              + f"{r['samples_per_s']:>11.1f}{r['samples_per_s_per_rank']:>8.1f}{r['turns']:>7.2f}"
              + f"{r['policy_tokens']:>11.1f}{r['policy_tokens_per_s']:>8.0f}{r['peak_memory_gb']:>9.2f}")
    Path(args.out).write_text(json.dumps({"device": device, "nproc": args.nproc, "prompts": args.prompts,
                                          "n_samples_per_prompt": args.n, "max_new_tokens": args.max_new_tokens,
                                          "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
