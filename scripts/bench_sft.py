"""SFT throughput, packed vs padded, full fine-tuning vs LoRA and QLoRA, on the same data
through the real trainer (``train.py``).

    python scripts/bench_sft.py [--nproc 2] [--steps 30] [--only packed] [--lora-r 16] [--out bench_sft.json] \
        [-- extra hydra overrides]

For each configuration (packed, padded, and packed with ``lora.r=<--lora-r>``, without and with
``lora.load_in_4bit``) it launches ``torchrun train.py ...`` on a synthetic chat-like dataset with
long-tailed lengths, then reads the run's metrics.jsonl. Reported per configuration: the trained
parameters (the policy's ``requires_grad`` ones, counted on its meta-device build), real
(non-padding) tokens/s (median over steps after the first few), the padding fraction, the peak
memory of the busiest rank (CUDA allocator peak on GPU, peak RSS on CPU), real tokens/s per rank
(per GPU on CUDA), and model FLOPs utilisation: model FLOPs per token (``training_flops``: 6 x
parameters + 12 x layers x hidden x mean sequence length, as in the PaLM paper; with LoRA the
frozen weights' gradients are not computed, 4 x parameters + 2 x trained) times tokens/s, over
the peak FLOP/s of all ranks. A rank's peak is the datasheet's dense bf16 rate on the GPUs in ``DATASHEET_PEAK``
(or ``--peak-tflops``); on other GPUs and on CPU, the matrix-product FLOP/s timed in this run on
the same device with the same threads per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def synthetic_chat(path: Path, n: int, max_chars: int, seed: int = 0, pairs: bool = False):
    """Prompts and responses (or chosen/rejected pairs) with log-normal lengths, like real chat
    data: many short, a long tail."""
    rng = random.Random(seed)
    words = "the a of to and in is it you that he was for on are with as I his they be at one have this".split()

    def text(mean_words):
        k = max(1, min(int(rng.lognormvariate(math.log(mean_words), 0.8)), max_chars // 4))
        return " ".join(rng.choice(words) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            replies = {"chosen": text(30), "rejected": text(30)} if pairs else {"response": text(30)}
            f.write(json.dumps({"prompt": text(12), **replies}) + "\n")


def matmul_flops(device: torch.device, threads: int) -> float:
    """Achieved FLOP/s of a square matrix product: the practical peak of one rank."""
    torch.set_num_threads(threads)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# Dense (no sparsity) bf16 tensor-core FLOP/s of one GPU from NVIDIA's datasheets, by a part of
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part): published MFU numbers
# are against these, so a measured matmul rate would flatter the run.
DATASHEET_PEAK = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def peak_flops_per_rank(device: torch.device, threads: int, tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one rank, where that number comes from)."""
    if tflops:
        return tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, flops in DATASHEET_PEAK.items():
            if part in name:
                return flops, f"datasheet bf16 dense, {name}"
    return matmul_flops(device, threads), "matmul timed in this run"


def add_throughput(results: dict, flops_per_token: dict | float, peak_per_rank: float, nproc: int):
    """Each result's tokens/s per rank and MFU; ``flops_per_token`` per result name, or one for all."""
    for name, r in results.items():
        per_token = flops_per_token[name] if isinstance(flops_per_token, dict) else flops_per_token
        r["tokens_per_s_per_rank"] = r["tokens_per_s"] / nproc
        r["mfu"] = r["tokens_per_s"] * per_token / (peak_per_rank * nproc)


def model_shape(export_dir: Path) -> tuple[int, int, int]:
    """(parameters, layers, hidden size) read from an exported checkpoint, without loading it."""
    config = json.loads((export_dir / "config.json").read_text())
    n = 0
    for f in export_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n, config["num_hidden_layers"], config["hidden_size"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


CONFIGS = {"packed": ["packing=true"], "padded": ["packing=false"], "packed+lora": ["packing=true"],
           "packed+qlora": ["packing=true", "lora.load_in_4bit=true"]}


def with_lora(configs: dict, r: int) -> dict:
    """The configurations' overrides, ``lora.r=r`` added to those named ``+lora`` / ``+qlora``
    (dropped when ``r`` is 0)."""
    out = {}
    for name, settings in configs.items():
        if "lora" in name.lower():
            if not r:
                continue
            settings = [*settings, f"lora.r={r}"]
        out[name] = settings
    return out


def trained_parameters(overrides: list[str]) -> int:
    """The parameters ``train.py <overrides>`` trains: its policy built on the meta device (nothing
    allocated or read but the config), with the LoRA adapters where ``lora.r`` is set."""
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(REPO))
    import models

    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    model = models.load_model(cfg.model, torch.device("cpu"), meta=True)
    if cfg.lora.r:
        model = models.add_lora(model, cfg.lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_flops(params: int, trained: int, layers: int, hidden: int, mean_tokens: float) -> float:
    """Model FLOPs per token of a training step: forward 2 P, backward 2 P for the inputs' gradients
    and 2 x trained for the weights' (6 P in full fine-tuning), attention 12 x layers x hidden x
    sequence length."""
    return 4 * params + 2 * trained + 12 * layers * hidden * mean_tokens
WARMUP_STEPS = 3  # not timed: the first steps include warm-up


def check_steps(parser, steps: int):
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps {steps}: the first {WARMUP_STEPS} steps are warm-up and not timed; pass at least {WARMUP_STEPS + 1}")


def run(name: str, settings: list[str], args, data: Path, workdir: Path) -> dict:
    """Train with ``settings`` (hydra overrides) for ``args.steps`` steps; its metrics, summarised."""
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           str(REPO / "train.py"), f"run_dir={run_dir}", f"datasets=[{data}]", *settings,
           f"batch_size={args.batch_size}", f"n_examples={args.batch_size * args.steps}", "eval_at_start=false",
           "eval_at_end=false", "eval_every=null", "n_eval_examples=0", "lr=1e-4", "warmup_steps=0",
           f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}", *args.overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][WARMUP_STEPS:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in steps),
        "peak_memory_gb": max(r["memory/peak_gb"] for r in records if "memory/peak_gb" in r),
        "mean_tokens_per_sequence": records[-1]["tokens"] / records[-1]["examples"],
        "run_dir": str(run_dir),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="bench_sft.json")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of one GPU (default: DATASHEET_PEAK)")
    parser.add_argument("--only", choices=CONFIGS, help="run one configuration only")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the +lora/+qlora rows (0: no such rows)")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for train.py, e.g. model=... (after --)")
    args = parser.parse_args()
    check_steps(parser, args.steps)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    threads = int(os.environ.get("OMP_NUM_THREADS", 1)) if device.type == "cpu" else 1
    peak_per_rank, peak_source = peak_flops_per_rank(device, threads, args.peak_tflops)
    peak = peak_per_rank * args.nproc
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "chat.jsonl"
        synthetic_chat(data, n=args.batch_size * args.steps + 40, max_chars=args.max_length * 2)
        configs = {name: settings for name, settings in with_lora(CONFIGS, args.lora_r).items() if args.only in (None, name)}
        results = {name: run(name, settings, args, data, workdir) for name, settings in configs.items()}
        first = next(iter(results.values()))
        params, layers, hidden = model_shape(Path(first["run_dir"]) / "LATEST")
    mean_tokens = first["mean_tokens_per_sequence"]
    flops_per_token = {}
    for name, r in results.items():
        r["trained_parameters"] = trained_parameters([*configs[name], *args.overrides])
        flops_per_token[name] = training_flops(params, r["trained_parameters"], layers, hidden, mean_tokens)
    add_throughput(results, flops_per_token, peak_per_rank, args.nproc)
    for r in results.values():
        del r["run_dir"]
    report = {"device": device.type, "device_name": device_name(device), "nproc": args.nproc, "parameters": params,
              "peak_flops": peak, "peak_source": peak_source, "flops_per_token": flops_per_token,
              "overrides": args.overrides, "results": results}

    print(f"{device_name(device)}, {args.nproc} rank(s), {params / 1e6:.2f}M parameters, "
          f"peak {peak / 1e9:.1f} GFLOP/s over all ranks ({peak_source})")
    per = "GPU" if device.type == "cuda" else "rank"
    print(f"{'configuration':13} {'trained params':>14} {'real tokens/s':>14} {f'tokens/s/{per}':>15} {'padding':>8} "
          f"{'peak mem/rank GB':>17} {'MFU':>7}")
    for name, r in results.items():
        print(f"{name:13} {r['trained_parameters'] / 1e6:13.2f}M {r['tokens_per_s']:14.0f} {r['tokens_per_s_per_rank']:15.0f} "
              f"{r['padding_fraction']:8.1%} {r['peak_memory_gb']:17.2f} {r['mfu']:7.2%}")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
