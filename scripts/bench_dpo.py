"""DPO throughput and memory: packed vs padded, reference model resident vs precomputed.

    python scripts/bench_dpo.py [--nproc 2] [--steps 30] [--out bench_dpo.json] [-- extra hydra overrides]

Each configuration is a real ``torchrun train.py loss=dpo`` run on the same synthetic pairs
(log-normal lengths); reported: real (non-padding) tokens/s of the policy's forward and backward
(median over steps after the first few), the padding fraction, and the peak memory of the busiest
rank (CUDA allocator peak on GPU, peak RSS on CPU). A precomputed reference spends one extra pass
before training (not in tokens/s) and holds one model instead of two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_sft import run, synthetic_chat  # noqa: E402

CONFIGS = {
    "packed, resident ref": ["packing=true", "loss.precompute_ref_logps=false"],
    "packed, precomputed ref": ["packing=true", "loss.precompute_ref_logps=true"],
    "padded, resident ref": ["packing=false", "loss.precompute_ref_logps=false"],
    "padded, precomputed ref": ["packing=false", "loss.precompute_ref_logps=true"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="bench_dpo.json")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for train.py, e.g. model=... (after --)")
    args = parser.parse_args()
    args.overrides = ["loss=dpo", *args.overrides]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "pairs.jsonl"
        synthetic_chat(data, n=args.batch_size * args.steps + 40, max_chars=args.max_length * 2, pairs=True)
        results = {name: run(name.replace(", ", "-").replace(" ", "_"), settings, args, data, workdir)
                   for name, settings in CONFIGS.items()}
    for r in results.values():
        del r["run_dir"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"DPO, {device}, {args.nproc} rank(s), {args.batch_size} pairs per step")
    print(f"{'configuration':26} {'real tokens/s':>14} {'padding':>8} {'peak mem/rank GB':>17}")
    for name, r in results.items():
        print(f"{name:26} {r['tokens_per_s']:14.0f} {r['padding_fraction']:8.1%} {r['peak_memory_gb']:17.2f}")
    report = {"device": device, "nproc": args.nproc, "overrides": args.overrides, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
