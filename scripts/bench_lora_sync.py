"""LoRA policy -> vLLM every iteration: merged weights vs vLLM's own LoRA adapters (``enable_lora``).

    python scripts/bench_lora_sync.py [--model medium] [--iters 4] [--rank 8] [--prompts 16] \
        [--max-new-tokens 32] [--modes merged,adapter-disk,adapter-tensors] [--out bench_lora_sync.json]

One random-init Llama (``--model``: bench_generate.py's ``tiny`` or ``medium``, nothing is
downloaded) gets peft LoRA adapters on every linear layer of its decoder (``models.add_lora``,
as ``lora.target_modules=all-linear``) and is sharded with FSDP2 over a world of one, as the
trainer holds it. Every iteration gives the adapters new random values (A and a nonzero B, drawn
from the iteration's seed, so each mode sees the same adapters and the adapter changes what is
generated), syncs them into a colocated ``sampler.VLLMSampler`` engine, then runs one fixed batch
of greedy generations. Modes:

- ``merged``: what ``VLLMSampler.sync_weights`` does today: every decoder layer gathered, each
  adapted weight merged (W + alpha/r B A, ``models.merged_lora_weights``) and reloaded in place
  (``reload_weights``), the prefix cache reset.
- ``adapter-disk``: the engine built with ``enable_lora=True, max_lora_rank=...`` and its base
  loaded once (the first ``sync_weights``, B = 0, so W); then per iteration only the adapters are
  gathered, written as a peft directory (adapter_config.json + adapter_model.safetensors) and
  loaded under a new ``LoRARequest`` (new name and ``lora_int_id``; ``llm_engine.add_lora``),
  which the generations name.
- ``adapter-tensors``: the same without the disk: the tensors handed to the worker in memory
  (``collective_rpc``, the engine being in this process) and built into vLLM's ``LoRAModel``
  there (``_add_lora_from_tensors``).

Reported per mode: sync seconds and generation seconds (median over iterations after the first,
which is also reported), completion tokens/s, and, per iteration, whether the greedy completions
are the tokens the merged engine generated (and the largest log-prob difference over the tokens
both generated alike). The ``merged`` run also generates with HF ``generate`` on the peft model
itself (``HFSampler``) for the last iteration's adapter, and with the adapters off (how much the
adapter changes the completions). Each mode runs in a fresh process, a world of one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import MODELS  # noqa: E402

MODES = ("merged", "adapter-disk", "adapter-tensors")
# vLLM 0.32's LoRAConfig.max_lora_rank takes only these (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank ``r``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise SystemExit(f"--rank {r}: vLLM takes adapters of rank at most {VLLM_LORA_RANKS[-1]}")


def _add_lora_from_tensors(worker, request, tensors: dict, config: dict) -> bool:
    """Runs in the engine's worker (this process): the adapter ``tensors`` (peft's names,
    ``...q_proj.lora_A.weight``) loaded as ``request``, as if vLLM had read them from
    ``request.lora_path``: the worker's own ``add_adapter`` (validation, LRU eviction of the
    oldest adapter) with its file loading replaced by ``LoRAModel.from_lora_tensors``."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)

    def load(req):
        return LoRAModel.from_lora_tensors(req.lora_int_id, tensors, helper, device="cpu",
                                           dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
                                           weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
                                           skip_prefixes=getattr(model, "lora_skip_prefixes", None))

    manager._load_adapter = load  # this call only: the instance attribute shadows the method
    try:
        return manager.add_adapter(request)
    finally:
        del manager._load_adapter


def set_adapters(model, iteration: int, b_std: float):
    """New values for every adapter: A ~ N(0, 1/fan_in), B ~ N(0, b_std), from the iteration's seed
    (the same in every mode). Written into each rank's local shard (the whole tensor on one rank)."""
    import torch
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(1000 + iteration)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                full = torch.randn(p.shape, generator=gen)
                full *= (1 / p.shape[1] ** 0.5) if ".lora_A." in name else b_std
                local = p.to_local() if isinstance(p, DTensor) else p
                local.copy_(full[: local.shape[0]])  # Shard(0) over one rank: the whole tensor


def adapter_tensors(model) -> dict:
    """The adapters, gathered whole, under peft's saved names (``.default`` dropped)."""
    from models import full_tensor
    from sampler import _clean_name

    return {_clean_name(name).replace(".default.", "."): full_tensor(p).clone()
            for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def bench_mode(mode: str, args) -> dict:
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh

    import distributed
    import models
    import sampler
    from sampler import HFSampler, SamplingParams, VLLMSampler, write_model_dir

    torch.set_num_threads(args.threads)
    sampler._vllm_env()
    with sampler.contained():  # vLLM's import leaves the process as it was (sampler.contained)
        import vllm
    device = distributed.init()
    model_cfg = OmegaConf.load(REPO / "config" / "model" / "tiny.yaml")
    model_cfg.init.update(MODELS[args.model])
    tok = models.load_tokenizer(model_cfg)
    lora_cfg = OmegaConf.create({"r": args.rank, "alpha": args.alpha, "dropout": 0.0, "target_modules": "all-linear",
                                 "modules_to_save": None})
    model = models.shard(models.add_lora(models.load_model(model_cfg, device), lora_cfg), init_device_mesh(device.type, (1,)))
    adapter_config = model.peft_config["default"].to_dict()
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # a set: not JSON
    adapter_config = json.loads(json.dumps(adapter_config, default=str))
    gen = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id or 1] + torch.randint(3, model_cfg.init.vocab_size, (int(n),), generator=gen).tolist()
               for n in torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=gen)]
    max_len = max(map(len, prompts)) + args.max_new_tokens

    lora = mode != "merged"
    if lora:  # the engine the sampler builds, with vLLM's LoRA layers: VLLMSampler calls vllm.LLM
        llm_cls = vllm.LLM
        vllm.LLM = lambda **kw: llm_cls(**kw, enable_lora=True, max_lora_rank=vllm_max_lora_rank(args.rank), max_loras=1)
    vcfg = OmegaConf.load(REPO / "config" / "sampler" / "vllm.yaml")
    workdir = Path(args.workdir)
    write_model_dir(model, tok, workdir / f"{mode}-model")
    t0 = time.perf_counter()
    engine = VLLMSampler(str(workdir / f"{mode}-model"), seed=0, dtype="float32", enforce_eager=vcfg.enforce_eager,
                         kv_cache_memory_bytes=vcfg.kv_cache_memory_bytes, max_model_len=max_len,
                         max_num_seqs=vcfg.max_num_seqs, enable_prefix_caching=vcfg.enable_prefix_caching,
                         sync_bucket_mb=vcfg.sync_bucket_mb, debug=args.debug)
    build_seconds = time.perf_counter() - t0
    if lora:
        vllm.LLM = llm_cls
    base_sync = engine.sync_weights(model)  # B = 0 (add_lora): the base model, merged or not
    llm = engine.llm
    from vllm import SamplingParams as VP
    from vllm.lora.request import LoRARequest

    params = VP(n=1, temperature=0, max_tokens=args.max_new_tokens, logprobs=0, skip_special_tokens=True)
    iters, adapter_dir = [], None
    for it in range(args.iters):
        set_adapters(model, it, args.b_std)
        request = None
        t0 = time.perf_counter()
        if mode == "merged":
            engine.sync_weights(model)
        else:
            tensors = adapter_tensors(model)
            name, lora_id = f"policy-{it}", it + 1  # new name, new id: a new adapter to vLLM (and its prefix cache)
            if mode == "adapter-disk":
                old, adapter_dir = adapter_dir, workdir / f"adapter-{it}"
                adapter_dir.mkdir()
                (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
                save_file({k: v.contiguous() for k, v in tensors.items()}, adapter_dir / "adapter_model.safetensors")
                request = LoRARequest(name, lora_id, str(adapter_dir))
                llm.llm_engine.add_lora(request)  # loaded now, not at the first step that needs it
                if old is not None:
                    shutil.rmtree(old)  # vLLM holds the loaded adapter in memory
            else:
                request = LoRARequest(name, lora_id, f"in-memory/{name}")  # a path is required, never read
                llm.collective_rpc(_add_lora_from_tensors, args=(request, tensors, adapter_config))
        sync_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with engine.rng.active():
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=request, use_tqdm=False)
        gen_seconds = time.perf_counter() - t0
        completions = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
        tokens = sum(map(len, completions))
        iters.append({"sync_seconds": sync_seconds, "gen_seconds": gen_seconds, "tokens": tokens,
                      "tokens_per_s": tokens / gen_seconds, "completions": completions, "logprobs": logprobs,
                      "adapters_loaded": sorted(llm.llm_engine.list_loras()) if lora else None})
    result = {"mode": mode, "build_seconds": build_seconds, "base_sync_seconds": base_sync, "iters": iters,
              "parameters": sum(p.numel() for p in model.parameters()),
              "adapter_parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
              "threads": args.threads, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    if mode == "merged":  # references: HF generate on the peft model, with the last adapters and without any
        hf = HFSampler(model, tok)
        greedy = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
        out = hf.generate(prompts, greedy)
        result["hf"] = {"completions": [s[0].token_ids for s in out], "logprobs": [s[0].logprobs for s in out]}
        with model.disable_adapter():
            result["hf_no_adapter"] = [s[0].token_ids for s in hf.generate(prompts, greedy)]
    engine.close()
    return result


def compare(a: list[list[int]], b: list[list[int]], la=None, lb=None) -> tuple[float, float | None]:
    """(fraction of completions identical, max |log-prob difference| over the tokens before the
    first that differs)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    if la is None:
        return same, None
    diffs = []
    for x, y, lx, ly in zip(a, b, la, lb):
        for tx, ty, px, py in zip(x, y, lx, ly):
            if tx != ty:
                break
            diffs.append(abs(px - py))
    return same, max(diffs, default=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", choices=sorted(MODELS))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    parser.add_argument("--iters", type=int, default=4, help="sync + generate rounds per mode (the first is warm-up)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA r")
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--b-std", type=float, default=0.1, help="std of the random B (0 would be no adapter)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48, help="prompt tokens, at most (random ids, half to all)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--out", default="bench_lora_sync.json")
    parser.add_argument("--debug", action="store_true", help="vLLM's own log lines")
    parser.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: MODE WORKDIR JSON_OUT
    args = parser.parse_args()
    if args.one:
        mode, args.workdir, out = args.one
        Path(out).write_text(json.dumps(bench_mode(mode, args)))
        return
    if args.iters < 2:
        parser.error("--iters: at least 2 (the first is warm-up)")
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes: unknown {sorted(unknown)}; of {MODES}")
    if "merged" not in modes:
        modes.insert(0, "merged")  # the reference the others are checked against
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("modes", "out", "one", "debug")] + ["--debug"] * args.debug
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            workdir, out = Path(tmp) / mode, Path(tmp) / f"{mode}.json"
            workdir.mkdir()
            # not this process's engine variables, if any (vLLM's shared-memory names and the like)
            env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
            run = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode, str(workdir), str(out)],
                                 cwd=REPO, env=env, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{mode} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
            results[mode] = json.loads(out.read_text())

    ref = results["merged"]
    hf = ref["hf"]
    summary = {}
    for mode, r in results.items():
        timed = r["iters"][1:]
        agree = [compare(it["completions"], m["completions"], it["logprobs"], m["logprobs"])
                 for it, m in zip(r["iters"], ref["iters"])]
        last = r["iters"][-1]
        summary[mode] = {
            "build_seconds": r["build_seconds"], "base_sync_seconds": r["base_sync_seconds"],
            "first_sync_seconds": r["iters"][0]["sync_seconds"], "first_gen_seconds": r["iters"][0]["gen_seconds"],
            "sync_seconds": statistics.median(it["sync_seconds"] for it in timed),
            "gen_seconds": statistics.median(it["gen_seconds"] for it in timed),
            "tokens_per_s": statistics.median(it["tokens_per_s"] for it in timed),
            "same_as_merged": [a[0] for a in agree], "max_logp_diff_vs_merged": max(a[1] for a in agree),
            "same_as_hf_last": compare(last["completions"], hf["completions"], last["logprobs"], hf["logprobs"])[0],
            "max_logp_diff_vs_hf_last": compare(last["completions"], hf["completions"], last["logprobs"], hf["logprobs"])[1],
            "adapters_loaded_after": last["adapters_loaded"],
        }
    changed = 1 - compare(hf["completions"], ref["hf_no_adapter"])[0]
    print(f"LoRA sync into vLLM, cpu, model {args.model} ({ref['parameters'] / 1e6:.1f}M parameters, "
          f"{ref['adapter_parameters'] / 1e6:.2f}M in adapters, r={args.rank}), {ref['prompts']} prompts x "
          f"{ref['max_new_tokens']} greedy tokens, {ref['threads']} thread(s); medians of iterations 2..{args.iters}; "
          f"the adapter changes {changed:.0%} of HF's greedy completions")
    print()
    print("| mode | sync s | first sync s | generate s | first generate s | tokens/s | same tokens as merged "
          "| max logp diff vs merged | same tokens as HF peft (last) | engine build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['sync_seconds']:.3f} | {s['first_sync_seconds']:.3f} | {s['gen_seconds']:.3f} | "
              f"{s['first_gen_seconds']:.3f} | {s['tokens_per_s']:.0f} | "
              f"{' '.join(f'{x:.0%}' for x in s['same_as_merged'])} | {s['max_logp_diff_vs_merged']:.1e} | "
              f"{s['same_as_hf_last']:.0%} (logp diff {s['max_logp_diff_vs_hf_last']:.1e}) | {s['build_seconds']:.1f} |")
    report = {"args": {k: v for k, v in vars(args).items() if k != "one"}, "adapter_changes_fraction": changed,
              "summary": summary, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
