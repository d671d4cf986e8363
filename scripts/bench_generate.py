"""Generation throughput, vLLM in the training process vs HF generate, and weight-sync time.

    python scripts/bench_generate.py [--models tiny,medium] [--prompts 64] [--n 4] [--max-new-tokens 64] \
        [--out bench_generate.json]

Both samplers generate from the same random-init model (nothing is downloaded; ``tiny`` is
config/model/tiny.yaml, ``medium`` the same Llama widened and deepened to ~25M parameters), on
the same toy_add prompts, sampling at temperature 1; HF generate runs on the model sharded with
FSDP2 as in training. Tokens/s counts the completion tokens actually generated (a random model
rarely emits EOS, so nearly ``max_new_tokens`` each). Weight sync is ``VLLMSampler.sync_weights``
from the FSDP2 model, median of 3, also per million parameters. Each model runs in a fresh
process, a world of one (closing a vLLM engine takes the process group down with it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "tiny": {},
    "medium": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
               "num_key_value_heads": 4},
}


def bench_one(name: str, args) -> dict:
    import torch
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh

    import distributed
    import models
    from data import load_rows
    from data.tokenize import prompt_ids
    from sampler import HFSampler, SamplingParams, build_sampler

    device = distributed.init()
    model_cfg = OmegaConf.load(REPO / "config" / "model" / "tiny.yaml")
    model_cfg.init.update(MODELS[name])
    tok = models.load_tokenizer(model_cfg)
    model = models.shard(models.load_model(model_cfg, device), init_device_mesh(device.type, (1,)))
    n_params = sum(p.numel() for p in model.parameters())
    rows = load_rows("toy_add_prompts", "test", "prompt")[: args.prompts]
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(n=1, temperature=1.0, max_new_tokens=4)

    def timed(sampler) -> dict:
        sampler.generate(prompts[:2], warm)  # first-call costs (kernels, allocator) are not throughput
        t0 = time.perf_counter()
        out = sampler.generate(prompts, params)
        seconds = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for ss in out for s in ss)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}

    result = {"model": name, "parameters": n_params, "prompts": len(prompts), "n": args.n,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads()}
    result["hf"] = timed(HFSampler(model, tok, batch_size=args.hf_batch_size))
    cfg = OmegaConf.create({"seed": 0, "max_length": max(map(len, prompts)) + args.max_new_tokens,
                            "model": {"fsdp_policy_mp": "float32"}})
    cfg.sampler = OmegaConf.load(REPO / "config" / "sampler" / "vllm.yaml")
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        vllm = build_sampler(cfg, model, tok, run_dir)
        result["vllm_build_seconds"] = time.perf_counter() - t0
        syncs = [vllm.sync_weights(model) for _ in range(3)]
        result["weight_sync_seconds"] = statistics.median(syncs)
        result["weight_sync_s_per_million_params"] = result["weight_sync_seconds"] / (n_params / 1e6)
        result["vllm"] = timed(vllm)
        vllm.close()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,medium", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="sequences per HF generate call")
    parser.add_argument("--out", default="bench_generate.json")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: MODEL JSON_OUT
    args = parser.parse_args()
    if args.one:
        Path(args.one[1]).write_text(json.dumps(bench_one(args.one[0], args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--one", name, str(out), "--prompts", str(args.prompts), "--n", str(args.n),
                   "--max-new-tokens", str(args.max_new_tokens), "--hf-batch-size", str(args.hf_batch_size)]
            run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(out.read_text()))
    print(f"{'model':8} {'params':>8} {'HF tok/s':>9} {'vLLM tok/s':>11} {'speedup':>8} {'sync s':>7} {'sync s/M':>9}")
    for r in results:
        print(f"{r['model']:8} {r['parameters'] / 1e6:7.2f}M {r['hf']['tokens_per_s']:9.0f} "
              f"{r['vllm']['tokens_per_s']:11.0f} {r['vllm']['tokens_per_s'] / r['hf']['tokens_per_s']:7.1f}x "
              f"{r['weight_sync_seconds']:7.3f} {r['weight_sync_s_per_million_params']:9.4f}")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
