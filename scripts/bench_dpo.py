"""DPO throughput and memory: packed vs padded, reference model resident vs precomputed, full
fine-tuning vs LoRA and QLoRA (whose reference is the policy with its adapters off).

    python scripts/bench_dpo.py [--nproc 2] [--steps 30] [--lora-r 16] [--out bench_dpo.json] [-- extra hydra overrides]

Each configuration is a real ``torchrun train.py loss=dpo`` run on the same synthetic pairs
(log-normal lengths); reported: real (non-padding) tokens/s of the policy's forward and backward
(median over steps after the first few), the same per rank (per GPU on CUDA), the padding
fraction, the peak memory of the busiest rank (CUDA allocator peak on GPU, peak RSS on CPU), and
model FLOPs utilisation as in bench_sft.py: per token, the policy's forward and backward (6 x
parameters + 12 x layers x hidden x mean sequence length) plus, with a resident reference, its
forward (a third of that); with LoRA the frozen weights' gradients are not computed
(``bench_sft.training_flops``). A precomputed reference spends one extra pass before training
(not in tokens/s) and holds one model instead of two. The trained parameters are counted as in
``bench_sft.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_sft import (  # noqa: E402
    add_throughput,
    check_steps,
    device_name,
    model_shape,
    peak_flops_per_rank,
    run,
    synthetic_chat,
    trained_parameters,
    training_flops,
    with_lora,
)

CONFIGS = {
    "packed, resident ref": ["packing=true", "loss.precompute_ref_logps=false"],
    "packed, precomputed ref": ["packing=true", "loss.precompute_ref_logps=true"],
    "padded, resident ref": ["packing=false", "loss.precompute_ref_logps=false"],
    "padded, precomputed ref": ["packing=false", "loss.precompute_ref_logps=true"],
    "packed, LoRA, adapters-off ref": ["packing=true", "loss.precompute_ref_logps=false"],
    "packed, QLoRA, adapters-off ref": ["packing=true", "loss.precompute_ref_logps=false", "lora.load_in_4bit=true"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="bench_dpo.json")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of one GPU (default: bench_sft.DATASHEET_PEAK)")
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA/QLoRA rows (0: no such rows)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for train.py, e.g. model=... (after --)")
    args = parser.parse_args()
    check_steps(parser, args.steps)
    configs = {name: settings for name, settings in with_lora(CONFIGS, args.lora_r).items()
               if args.only is None or args.only in name}
    if not configs:
        parser.error(f"--only {args.only!r} matches none of: {', '.join(CONFIGS)}")
    args.overrides = ["loss=dpo", *args.overrides]

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    threads = int(os.environ.get("OMP_NUM_THREADS", 1)) if device.type == "cpu" else 1
    peak_per_rank, peak_source = peak_flops_per_rank(device, threads, args.peak_tflops)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "pairs.jsonl"
        synthetic_chat(data, n=args.batch_size * args.steps + 40, max_chars=args.max_length * 2, pairs=True)
        results = {name: run(name.replace(", ", "-").replace(" ", "_"), settings, args, data, workdir)
                   for name, settings in configs.items()}
        params, layers, hidden = model_shape(Path(next(iter(results.values()))["run_dir"]) / "LATEST")
    for name, r in results.items():
        r["trained_parameters"] = trained_parameters([*configs[name], *args.overrides])
    flops = {name: flops_per_token(params, r["trained_parameters"], layers, hidden, r, "precomputed" not in name)
             for name, r in results.items()}
    add_throughput(results, flops, peak_per_rank, args.nproc)
    for r in results.values():
        del r["run_dir"]
    print(f"DPO, {device_name(device)}, {args.nproc} rank(s), {args.batch_size} pairs per step, "
          f"peak {peak_per_rank * args.nproc / 1e9:.1f} GFLOP/s over all ranks ({peak_source})")
    per = "GPU" if device.type == "cuda" else "rank"
    print(f"{'configuration':32} {'trained params':>14} {'real tokens/s':>14} {f'tokens/s/{per}':>15} {'padding':>8} "
          f"{'peak mem/rank GB':>17} {'MFU':>7}")
    for name, r in results.items():
        print(f"{name:32} {r['trained_parameters'] / 1e6:13.2f}M {r['tokens_per_s']:14.0f} {r['tokens_per_s_per_rank']:15.0f} "
              f"{r['padding_fraction']:8.1%} {r['peak_memory_gb']:17.2f} {r['mfu']:7.2%}")
    report = {"device": device.type, "device_name": device_name(device), "nproc": args.nproc, "parameters": params,
              "peak_flops": peak_per_rank * args.nproc, "peak_source": peak_source, "flops_per_token": flops,
              "overrides": args.overrides, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def flops_per_token(params: int, trained: int, layers: int, hidden: int, result: dict, resident_reference: bool) -> float:
    """Model FLOPs per real token: the policy's forward and backward (``training_flops``), and the
    reference's forward (a resident model, or the policy with its adapters off)."""
    mean_length = result["mean_tokens_per_sequence"] / 2  # run() counts a pair (both replies) as one example
    forward = 2 * params + 4 * layers * hidden * mean_length
    return training_flops(params, trained, layers, hidden, mean_length) + forward * resident_reference


if __name__ == "__main__":
    main()
