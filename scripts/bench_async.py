"""Colocated against split, on-policy against one-step-off: iteration time and who waits, measured
on this machine's ranks, and a timing model that projects the phase times to a GPU node.

    python scripts/bench_async.py [--workloads toy,real] [--steps 6] [--out runs/bench_async/bench_async.json]

1. Four real ``torchrun`` GRPO runs per workload, generation-heavy (long completions, the vLLM
   engine): ``rollout.sampler_ranks`` 0 (every rank trains and samples) or 1 (the last rank only
   samples), and ``rollout.max_staleness`` 0 (sync: sample, then train) or 1 (one-step-off: the
   next rollout is generated while this one trains). Per iteration, the median after the first two
   (the second is where one-step-off starts overlapping), from metrics.jsonl's timing/ fields:
   - trainer busy: the pi_old log-probs, the updates and the scoring (the ranks that train);
   - trainer idle: the seconds the trainers spent not training: generating (colocated) or waiting
     for the sampler ranks' rollout (split), and the weight sync;
   - sampler busy / idle: the seconds the engine generated / did not (split: the sampler rank's own
     clock; colocated: the engine's ranks are the trainers).
   workloads: ``toy`` (the tiny model, toy_sort prompts) and ``real`` (SmolLM2-135M-Instruct,
   the demo's arithmetic prompts).
2. The timing model, checked against those runs: an iteration is its phases in sequence, G + T +
   S (generation, training, weight sync), except split one-step-off, where generation runs beside
   training: max(G, T) + S. G and T of the split runs are the sampler rank's and the trainer rank's
   own (its sync run's); colocated one-step-off is colocated sync (the same ranks do both). From
   the two layouts' phases: alpha, how generation time grows with the batch per engine
   (G_split / G_colocated = (W / K)^alpha: 1 when compute-bound, near 0 for memory-bound decoding),
   and beta, the same for training (1: linear).
3. The projection to an 8-GPU node, split one-step-off against colocated sync, for a range of
   generation shares g = G / (G + T) of the colocated iteration and of alpha (training linear), with
   the best number K of sampler GPUs: G_K = g (8 / K)^alpha, T_K = (1 - g) 8 / (8 - K).

Prints the tables and writes JSON. Timings are only meaningful with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (rollout.sampler_ranks, rollout.max_staleness)
    "colocated sync": (0, 0), "colocated one-step-off": (0, 1), "split sync": (1, 0), "split one-step-off": (1, 1)}
SKIP = 2  # iterations not timed: the first builds, the second is where one-step-off starts overlapping


def workload(name: str, workdir: Path) -> list[str]:
    """A generation-heavy GRPO run: few prompts, many samples, long completions."""
    if name == "toy":
        return ["model=tiny", "datasets=[toy_sort_prompts]", "reward.functions=[toy_sort]", "loss.rollout_batch_size=32",
                "loss.n_samples_per_prompt=8", "loss.sampling.max_new_tokens=64", "batch_size=128", "max_length=128",
                "max_prompt_length=48"]
    prompts = workdir / "arithmetic.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "arithmetic.py"), "--out", str(prompts)], check=True,
                   capture_output=True)
    if not (REPO / ".cache" / "SmolLM2-135M-Instruct" / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "get_real_model.py")], check=True, cwd=REPO)
    return ["model=smollm2_135m", "model.fsdp_policy_mp=float32", "fsdp_shard_ranks=1", f"datasets=[{prompts}]",
            "reward.functions=[scripts/arithmetic.py:reward]", "loss.rollout_batch_size=8", "loss.n_samples_per_prompt=4",
            "loss.sampling.max_new_tokens=96", "batch_size=16", "lr=1e-6"]


def run(overrides: list[str], run_dir: Path, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "train.py"), "loss=grpo", "sampler=vllm", f"run_dir={run_dir}", "eval_at_start=false",
           "eval_at_end=false", "eval_every=null", "n_eval_examples=0", "warmup_steps=0", "loss.kl_coef=0",
           "wandb.enabled=false", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"train.py {' '.join(overrides)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def phases(records: list[dict], split: bool) -> dict:
    """The medians of section 1's quantities over the timed iterations."""
    timed = [r for r in records if "timing/iteration" in r][SKIP:]
    med = lambda f: statistics.median(f(r) for r in timed)  # noqa: E731
    g = lambda r, k: r.get(f"timing/{k}", 0.0)  # noqa: E731
    busy = lambda r: g(r, "logprobs") + g(r, "train") + g(r, "score")  # noqa: E731
    out = {"iteration_s": med(lambda r: g(r, "iteration")), "trainer_busy_s": med(busy),
           "trainer_idle_s": med(lambda r: g(r, "generate") + g(r, "sync") + g(r, "sync_wait")),
           "sync_s": med(lambda r: g(r, "sync")), "iterations_timed": len(timed)}
    if split:
        out["sampler_busy_s"] = med(lambda r: g(r, "sampler_generate"))
    else:
        out["sampler_busy_s"] = med(lambda r: g(r, "generate"))
    out["sampler_idle_s"] = med(lambda r: g(r, "iteration")) - out["sampler_busy_s"]
    return out


def model(measured: dict, world: int, samplers: int) -> dict:
    """Section 2: each layout's iteration time from the phase times, and alpha and beta."""
    coloc, split = measured["colocated sync"], measured["split sync"]
    G, T = coloc["sampler_busy_s"], coloc["trainer_busy_s"]
    G_K, T_K = split["sampler_busy_s"], split["trainer_busy_s"]
    out = {"colocated sync": G + T + coloc["sync_s"],
           "colocated one-step-off": G + T + measured["colocated one-step-off"]["sync_s"],
           "split sync": G_K + T_K + split["sync_s"],
           "split one-step-off": max(G_K, T_K) + measured["split one-step-off"]["sync_s"]}
    return {"iteration_s": out, "alpha": math.log(G_K / G) / math.log(world / samplers),
            "beta": math.log(T_K / T) / math.log(world / (world - samplers))}


def projection(alphas=(1.0, 0.5, 0.0), shares=(0.5, 0.7, 0.9), gpus: int = 8) -> list[dict]:
    """Section 3: split one-step-off against colocated sync on ``gpus`` GPUs (colocated iteration
    = 1, sync left out), with the best number of sampler GPUs."""
    rows = []
    for share in shares:
        for alpha in alphas:
            time_with = {k: max(share * (gpus / k) ** alpha, (1 - share) * gpus / (gpus - k)) for k in range(1, gpus)}
            best = min(time_with, key=time_with.get)
            rows.append({"generation_share": share, "alpha": alpha, "sampler_gpus": best, "speedup": 1 / time_with[best]})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="toy,real")
    p.add_argument("--steps", type=int, default=6, help="iterations per run (the first two are not timed)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/bench_async/bench_async.json")
    p.add_argument("--report", help="print the tables of a JSON this script wrote, without running anything")
    args = p.parse_args()
    if args.report:
        return print_report(json.loads(Path(args.report).read_text()))
    report = {"nproc": args.nproc, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            base = workload(name, Path(tmp))
            prompts = int(next(o for o in base if o.startswith("loss.rollout_batch_size=")).split("=")[1])
            measured = {}
            for layout, (samplers, k) in LAYOUTS.items():
                records = run([*base, f"n_examples={prompts * args.steps}", f"rollout.sampler_ranks={samplers}",
                               f"rollout.max_staleness={k}"], Path(tmp) / name / layout.replace(" ", "_"), args.nproc)
                measured[layout] = phases(records, split=samplers > 0)
                print(f"{name} {layout}: {measured[layout]['iteration_s']:.2f} s/iteration", flush=True)
            report["workloads"][name] = measured
    report["projection_8_gpus"] = projection()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwritten {out}")


def print_report(report: dict):
    head = f"{'workload':9}{'layout':26}{'s/iter':>8}{'model':>8}{'trainer busy':>14}{'trainer idle':>14}" \
           f"{'sampler busy':>14}{'sampler idle':>14}"
    print("\n" + head)
    for name, measured in report["workloads"].items():
        fit = model(measured, report["nproc"], 1)
        for layout, m in measured.items():
            print(f"{name:9}{layout:26}{m['iteration_s']:8.2f}{fit['iteration_s'][layout]:8.2f}{m['trainer_busy_s']:14.2f}"
                  f"{m['trainer_idle_s']:14.2f}{m['sampler_busy_s']:14.2f}{m['sampler_idle_s']:14.2f}")
        print(f"{name:9}alpha (generation) {fit['alpha']:.2f}, beta (training) {fit['beta']:.2f}")
    print("\nprojection, 8 GPUs: split one-step-off against colocated sync (best number of sampler GPUs)")
    print(f"{'generation share':>18}{'alpha':>7}{'sampler GPUs':>14}{'speedup':>9}")
    for row in report["projection_8_gpus"]:
        print(f"{row['generation_share']:18.1f}{row['alpha']:7.1f}{row['sampler_gpus']:14d}{row['speedup']:9.2f}")


if __name__ == "__main__":
    main()
