"""GPU check: SFT, DPO and GRPO steps of a ~1B random-init model through the real ``torchrun train.py``,
packed = unpacked log-probs, tokens/s and MFU, measured peak memory against memory_estimate.py.

    bash scripts/gpu_check.sh [--smoke] [--out FILE] [--keep DIR] [--stages sft,dpo,grpo]

On a GPU (NCCL, bf16 compute, one rank; nothing downloaded) it takes ``config/model/gpu_check_1b.yaml``
(Llama-3.2-1B's shape, random init) through four parts:

1. packing: the model built in fp32 and in bf16 with each attention implementation present (sdpa;
   flash_attention_2 where ``flash_attn`` imports), per-token log-probs of sequences packed into rows
   (``logprobs.token_logps``, full logits and chunked) against each sequence run alone; passes when
   the largest difference is within ``ALONE_TOLERANCE`` for the dtype (bf16: or within
   twice bf16's own error against fp32, ``packing_check``);
2. SFT on ``toy_add``, DPO on ``toy_add_pref``, GRPO on ``toy_add_prompts`` with the ``toy_add``
   reward and ``sampler=hf``, a few steps each, ``torchrun --nproc_per_node 1 train.py``;
3. from each run's metrics.jsonl: tokens/s per GPU (median after warm-up) and MFU against the
   datasheet peak (``bench_sft.peak_flops_per_rank``; FLOPs per token as ``bench_dpo.flops_per_token``);
4. each run's measured peak (``memory/peak_gb``, the CUDA allocator's) against
   ``memory_estimate.estimate`` for the same config. ``max_length`` is set just above the toy
   sequences' lengths, because the estimate bounds a micro-batch at every sequence full length.

``--smoke`` (or ``GPU_CHECK_SMOKE=1``) runs the same code with the same architecture shrunk to 0.1M
parameters, float32 and 2 steps: on CPU (gloo) in about 40 s on 2 cores, which
tests/test_gpu_check.py does so that this script cannot rot; on a GPU, a one-minute rehearsal. It prints markdown tables and writes a
JSON report to ``--out`` (default ``$OUT/gpu_check.json`` where ``OUT`` is set, else
``runs/gpu_check/gpu_check.json``), rewritten after each part so that a run cut short keeps what it
measured. Exit code 1 if a part failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import models  # noqa: E402
from bench_dpo import flops_per_token  # noqa: E402
from bench_sft import add_throughput, device_name, model_shape, peak_flops_per_rank  # noqa: E402
from data.packing import IGNORE, pack, unpack  # noqa: E402
from logprobs import token_logps  # noqa: E402

MODEL = "gpu_check_1b"
# The toy tasks' sequences: prompts of 8-10 tokens, answers of 2-4 (tokenizer/tiny). max_length is
# kept just above them so that memory_estimate's bound (every sequence at max_length) is near the
# real micro-batch; row_tokens keeps the rows long, so that sequences really share them.
PROMPT, ANSWER = 12, 4  # max_prompt_length, and the tokens after it that the longest answer needs
COMMON = ["eval_at_start=false", "eval_at_end=false", "eval_every=null", "n_eval_examples=0", "lr=1e-5",
          "warmup_steps=0", "row_tokens=512", "keep_checkpoints=1"]
STAGES = {
    "sft": ["loss=sft", "datasets=[toy_add]", f"max_length={PROMPT + ANSWER}", f"max_prompt_length={PROMPT}"],
    "dpo": ["loss=dpo", "datasets=[toy_add_pref]", f"max_length={PROMPT + ANSWER}", f"max_prompt_length={PROMPT}"],
    "grpo": ["loss=grpo", "datasets=[toy_add_prompts]", "reward.functions=[toy_add]", "sampler=hf",
             f"max_prompt_length={PROMPT}"],
}

# What differs between a GPU and the smoke run: sizes and dtypes only. ``batch``: examples per
# update (DPO: pairs; GRPO: samples); ``rollout``: GRPO's prompts x samples per prompt per iteration.
SIZES = {
    "gpu": dict(
        # timeout_s: one run's limit; budget_s: the whole check's, inside the device tool's 10 minutes a command
        dtype="bfloat16", model=[], timeout_s=180, budget_s=540,
        pack=dict(n=16, lengths=(32, 400), row_tokens=2048, chunk=512),
        steps={"sft": 8, "dpo": 8, "grpo": 5},
        # large enough to keep an H200 busy on ~13-token sequences: ~13k tokens per update
        batch={"sft": 1024, "dpo": 512, "grpo": 256}, rollout=(64, 8), new_tokens=20),
    "smoke": dict(
        dtype="float32", timeout_s=120, budget_s=600,
        # vocab above the tokenizer's 262, as on the GPU: sampled ids it cannot decode must not matter
        model=["model.init.vocab_size=512", "model.init.hidden_size=64", "model.init.intermediate_size=128",
               "model.init.num_hidden_layers=2", "model.init.num_attention_heads=4", "model.init.num_key_value_heads=2"],
        pack=dict(n=6, lengths=(5, 30), row_tokens=64, chunk=16),
        steps={"sft": 2, "dpo": 2, "grpo": 2},
        batch={"sft": 16, "dpo": 8, "grpo": 8}, rollout=(4, 2), new_tokens=4),
}


def log(line: str):
    print(line, flush=True)


# --- 1. packed = unpacked ---------------------------------------------------------------------


def model_cfg(size: dict, attn: str):
    cfg = OmegaConf.load(REPO / "config" / "model" / f"{MODEL}.yaml")
    cfg.merge_with_dotlist([o.removeprefix("model.") for o in size["model"]] + [f"attn_implementation={attn}"])
    return cfg


def random_sequences(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[dict]:
    """Prompt + response token ids over the whole vocabulary; the prompt's labels IGNOREd."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        length = rng.randint(*lengths)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        seqs.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return seqs


@torch.no_grad()
def alone(model, seq: dict, device) -> torch.Tensor:
    """log p of each response token of one sequence by itself, one row, default positions: no packing helper."""
    logits = model(input_ids=torch.tensor([seq["input_ids"]], device=device), use_cache=False).logits[0]
    at = [t for t, label in enumerate(seq["labels"][1:]) if label != IGNORE]  # logits at t predict token t + 1
    return logits.float().log_softmax(-1)[at, [seq["labels"][t + 1] for t in at]]


# packed against alone compares two shapes' rounding: ~1e-6 in fp32, up to ~1e-2 in half precision
# on small models (the trainer's own check, ``models.packing_error``, compares like with like)
ALONE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


@torch.no_grad()
def packing_check(size: dict, device: torch.device) -> list[dict]:
    """For each attention implementation and dtype: the largest per-token difference between
    packed log-probs (full logits, and chunked) and each sequence alone.

    fp32 is the sharp test (a correct model differs by ~1e-6, a leak by 1e-2 or more). In bf16 the
    bound is also twice bf16's own error, the largest difference between the sequences alone in
    bf16 and in fp32: at 1B parameters rounding alone moves a log-prob by up to ~0.08 (measured on
    CPU), more than ``ALONE_TOLERANCE`` allows, so only a leak larger than that shows."""
    p = size["pack"]
    attns = ["sdpa"] + (["flash_attention_2"] if device.type == "cuda" and importable("flash_attn") else [])
    rows, exact = [], None
    for attn in attns:  # the same seed: the same weights for every implementation
        model = models.load_model(model_cfg(size, attn), device, seed=0).to(device).eval()
        seqs = random_sequences(p["n"], p["lengths"], model.config.vocab_size)
        batch = {k: v.to(device) for k, v in pack(seqs, p["row_tokens"], pad_id=0).items()}
        assert batch["input_ids"].shape[0] < len(seqs), "the sequences must share rows"
        # flash-attention computes in half precision only
        for dtype in ["bfloat16"] if attn.startswith("flash") else ["float32", "bfloat16"]:
            model.to(models.DTYPES[dtype])  # fp32 first: bf16 is the same weights, rounded
            singles = torch.cat([alone(model, s, device) for s in seqs])
            row = {"attention": attn, "dtype": dtype, "sequences": len(seqs), "rows": batch["input_ids"].shape[0],
                   "tokens": int((batch["seq_ids"] >= 0).sum()), "tolerance": ALONE_TOLERANCE[dtype]}
            if dtype == "float32":
                exact = singles
            else:
                row["alone_vs_fp32"] = (singles - exact).abs().max().item()
                row["tolerance"] = max(row["tolerance"], 2 * row["alone_vs_fp32"])
            for name, chunk in (("full", None), ("chunked", p["chunk"])):
                packed = torch.cat(unpack(token_logps(model, batch, chunk=chunk)[0], batch, len(seqs)))
                row[f"max_diff_{name}"] = (packed - singles).abs().max().item()
                row[f"mean_diff_{name}"] = (packed - singles).abs().mean().item()
            row["passed"] = max(row["max_diff_full"], row["max_diff_chunked"]) <= row["tolerance"]
            rows.append(row)
            log(f"  packing {attn} {dtype}: max |packed - alone| {row['max_diff_full']:.2e} (full logits), "
                f"{row['max_diff_chunked']:.2e} (chunked); tolerance {row['tolerance']:.2g}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- 2. the runs ------------------------------------------------------------------------------


def run_overrides(stage: str, size: dict, dtype: str | None = None) -> list[str]:
    """The run's overrides but model=, loss= and run_dir: what memory_estimate is given too."""
    out = [o for o in STAGES[stage] if not o.startswith("loss=")] + COMMON + size["model"] + [
        f"model.fsdp_policy_mp={dtype or size['dtype']}", f"batch_size={size['batch'][stage]}"]
    examples = size["batch"][stage] * size["steps"][stage]
    if stage == "grpo":
        prompts, n = size["rollout"]
        examples = prompts * size["steps"][stage]  # an iteration consumes prompts
        out += [f"loss.rollout_batch_size={prompts}", f"loss.n_samples_per_prompt={n}", f"forward_batch_size={prompts * n}",
                f"sampler.batch_size={prompts * n}", f"loss.sampling.max_new_tokens={size['new_tokens']}",
                f"max_length={PROMPT + size['new_tokens']}"]
    return out + [f"n_examples={examples}"]


def sequences_per_step(stage: str, size: dict) -> int:
    if stage == "grpo":  # one epoch over the rollout (epochs_per_iteration=1)
        return size["rollout"][0] * size["rollout"][1]
    return size["batch"][stage] * (2 if stage == "dpo" else 1)


def train(stage: str, size: dict, workdir: Path, timeout: float) -> dict:
    """One ``torchrun train.py`` run; its metrics.jsonl, summarised."""
    run_dir = workdir / stage
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(REPO / "train.py"),
           f"model={MODEL}", f"loss={stage}", f"run_dir={run_dir}", *run_overrides(stage, size)]
    t0 = time.perf_counter()
    out_file = workdir / f"{stage}.log"
    with open(out_file, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:  # the ranks die with torchrun (distributed.die_with_launcher)
            rc = f"timeout after {timeout:.0f} s"
    result = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        tail = out_file.read_text(errors="replace").splitlines()[-40:]
        return {**result, "error": f"exit {rc}", "log_tail": tail}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = steps[min(2, len(steps) - 1):]  # the first steps build kernels, the allocator's pools, AdamW's states
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + steps, steps)]
    sequences = sequences_per_step(stage, size)
    result.update({
        "steps": len(steps), "timed_steps": len(timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tokens_per_step": statistics.mean(tokens),
        "mean_tokens_per_sequence": statistics.mean(tokens) / sequences,
        "padding_fraction": statistics.mean(r["padding_fraction"] for r in timed),
        "peak_memory_gib": max(r["memory/peak_gb"] for r in records if "memory/peak_gb" in r),
        "shape": model_shape(run_dir / "LATEST"),
        "final_loss": steps[-1].get("loss/train"),
    })
    if stage == "grpo":  # an iteration: sample, score, log-probs, updates; tokens/s is the updates'
        result["timing"] = {k.removeprefix("timing/"): statistics.median(r[k] for r in timed)
                            for k in timed[-1] if k.startswith("timing/")}
        result["samples_per_s"] = statistics.median(r["samples_per_s"] for r in timed)
    result["records"] = records
    return result


def throughput(runs: dict, device: torch.device) -> str:
    """Adds tokens/s per GPU and MFU to each run (bench_sft's formula); returns where the peak comes from."""
    peak, source = peak_flops_per_rank(device, torch.get_num_threads())
    ok = {stage: r for stage, r in runs.items() if "error" not in r}
    per_token = {}
    for stage, r in ok.items():
        # bench_dpo counts a pair as one example; the reference's forward only where it runs inside the timed update
        per_pair = {"mean_tokens_per_sequence": 2 * r["mean_tokens_per_sequence"]}
        params, layers, hidden = r["shape"]  # full fine-tuning: every parameter trained
        per_token[stage] = flops_per_token(params, params, layers, hidden, per_pair, resident_reference=stage == "dpo")
        r["flops_per_token"] = per_token[stage]
    add_throughput(ok, per_token, peak, nproc=1)
    return f"{peak / 1e12:.3g} TFLOP/s ({source})"


# --- 4. memory against the estimate -----------------------------------------------------------


def memory_check(runs: dict, size: dict, device: torch.device):
    """memory_estimate's prediction for each run's config, beside its measured peak."""
    import memory_estimate

    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 80.0
    for stage, r in runs.items():
        # the estimate models bf16 compute; the smoke run's float32 is a size-only difference
        overrides = run_overrides(stage, size, dtype="bfloat16")
        try:
            est = memory_estimate.estimate(MODEL, stage, 1, gpu_gib, overrides)
            key = "activation_checkpointing" if est["default_activation_checkpointing"] else "no_checkpointing"
            r["estimate"] = {"total_gib": est[key]["total_gib"], "tokens_per_micro_batch": est["tokens_per_micro_batch"],
                             "parts_gib": est[key]}
            if "peak_memory_gib" in r:
                r["measured_over_estimate"] = r["peak_memory_gib"] / est[key]["total_gib"]
        except Exception as e:  # its interface is another part's; say what broke rather than stop
            r["estimate"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


# --- the report -------------------------------------------------------------------------------


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # absent, or broken beside this torch: either way not used
        return False


def environment(device: torch.device) -> dict:
    import transformers

    env = {"device": device.type, "device_name": device_name(device), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "flash_attn": importable("flash_attn")}
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int before
        env["cuda"], env["nccl"] = torch.version.cuda, ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return env


def print_tables(report: dict):
    env = report["environment"]
    params = report.get("parameters") or 0
    log(f"\n{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{report['model']} ({params / 1e6:,.1f}M parameters), {report['mode']} mode")
    log("\n| attention | dtype | tokens (rows) | max diff, full logits | max diff, chunked | alone vs fp32 | tolerance | |")
    log("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in report.get("packing", []):
        if "error" in r:
            log(f"| FAILED: {r['error']} | | | | | | | |")
            continue
        own = f"{r['alone_vs_fp32']:.2e}" if "alone_vs_fp32" in r else "-"
        log(f"| {r['attention']} | {r['dtype']} | {r['tokens']} ({r['rows']}) | {r['max_diff_full']:.2e} | "
            f"{r['max_diff_chunked']:.2e} | {own} | {r['tolerance']:.2g} | {'pass' if r['passed'] else 'FAIL'} |")
    per = "GPU" if env["device"] == "cuda" else "rank"
    peak = "CUDA allocator" if env["device"] == "cuda" else "RSS"
    log(f"\nMFU against {report.get('peak', '?')}; peak memory: {peak}")
    log(f"| stage | steps | tokens/step | tokens/s/{per} | MFU | peak GiB | estimate GiB | measured/estimate | run s |")
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage, r in report.get("runs", {}).items():
        if "error" in r:
            log(f"| {stage} | FAILED ({r['error']}) | | | | | | | {r['seconds']} |")
            continue
        est = r.get("estimate", {})
        estimate = f"{est['total_gib']:.2f}" if "total_gib" in est else est.get("error", "-")
        ratio = f"{r['measured_over_estimate']:.2f}" if "measured_over_estimate" in r else "-"
        log(f"| {stage} | {r['steps']} | {r['tokens_per_step']:.0f} | {r['tokens_per_s_per_rank']:.0f} | {r['mfu']:.1%} | "
            f"{r['peak_memory_gib']:.2f} | {estimate} | {ratio} | {r['seconds']} |")
    grpo = report.get("runs", {}).get("grpo", {})
    if "timing" in grpo:
        log("GRPO iteration (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in grpo["timing"].items()))


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else REPO / "runs" / "gpu_check" / "gpu_check.json"


def scratch_dir() -> Path:
    """Each run ends with a checkpoint (16 bytes a parameter: 20 GB at 1.2B) and an export: memory
    when /dev/shm has room for them, else the temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return Path(tempfile.mkdtemp(prefix="gpu_check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu_check-"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                        help="a tiny model, float32, 2 steps (CPU: gloo); also GPU_CHECK_SMOKE=1")
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--keep", type=Path, help="keep the runs (checkpoints, logs) in this directory")
    parser.add_argument("--stages", default="sft,dpo,grpo")
    args = parser.parse_args()
    if set(args.stages.split(",")) - set(STAGES):
        parser.error(f"--stages {args.stages}: a comma-separated subset of {','.join(STAGES)}")
    start = time.perf_counter()
    mode = "smoke" if args.smoke else "gpu"
    size = SIZES[mode]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {"mode": mode, "model": MODEL, "model_overrides": size["model"], "environment": environment(device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["seconds"] = round(time.perf_counter() - start, 1)
        args.out.write_text(json.dumps(report, indent=1))

    log(f"gpu_check ({mode}): {json.dumps(report['environment'])}")
    if device.type == "cpu" and not args.smoke:
        log("warning: no CUDA device; the full-size check on CPU takes hours: use --smoke")
    save()

    log(f"[{time.perf_counter() - start:.0f}s] 1. packed vs alone")
    try:
        report["packing"] = packing_check(size, device)
    except Exception as e:  # the runs still tell what they can: a GPU's minutes are few
        log(f"  packing check failed: {type(e).__name__}: {e}")
        report["packing"] = [{"error": f"{type(e).__name__}: {e}", "passed": False}]
    save()

    workdir = args.keep or scratch_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    report["runs"] = {}
    try:
        for stage in args.stages.split(","):
            log(f"[{time.perf_counter() - start:.0f}s] 2. {stage}: torchrun train.py, {size['steps'][stage]} steps")
            left = size["budget_s"] - (time.perf_counter() - start)
            report["runs"][stage] = r = train(stage, size, workdir, timeout=max(10, min(size["timeout_s"], left)))
            if "error" in r:
                log(f"  {stage} failed ({r['error']}); its log ends:\n    " + "\n    ".join(r["log_tail"]))
            if args.keep is None:  # the checkpoints go at once: three at 1.2B would not fit in memory
                shutil.rmtree(workdir / stage, ignore_errors=True)
            save()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    shape = next((r["shape"] for r in report["runs"].values() if "shape" in r), None)
    report["parameters"] = shape[0] if shape else None

    log(f"[{time.perf_counter() - start:.0f}s] 3. throughput, 4. memory against memory_estimate.py")
    report["peak"] = throughput(report["runs"], device)
    memory_check(report["runs"], size, device)
    report["passed"] = all(r["passed"] for r in report["packing"]) and all("error" not in r for r in report["runs"].values())
    save()
    print_tables(report)
    log(f"\n{'passed' if report['passed'] else 'FAILED'} in {time.perf_counter() - start:.0f} s; wrote {args.out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
