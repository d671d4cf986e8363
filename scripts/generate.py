"""Generate K completions per prompt of a dataset from any HF checkpoint (seed 001's step 1).

    torchrun --nproc_per_node 2 scripts/generate.py --model runs/readme/sft/LATEST --dataset toy_add_prompts \
        --split test --k 4 --out samples.jsonl [--sampler auto|vllm|hf] [--temperature 1.0] [--set batch_size=32]

``python scripts/generate.py ...`` runs it as a world of one. ``--dataset`` is a registry name or a
local .json/.jsonl/.parquet file (any row shape: its prompts are used). Prompts are dealt
round-robin to the ranks; rank 0 gathers every rank's results and writes one JSON line per
prompt, in dataset order:

    {"index": i, "prompt": [messages], <the row's other fields, e.g. "answer">,
     "completions": [{"token_ids", "text", "logprobs", "finish_reason"}, ... K]}

vLLM loads the weights from ``--model`` itself; HF generate shards the model with FSDP2 as the
trainer does. ``--set key=value`` overrides a key of config/sampler/<name>.yaml.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import checkpointing  # noqa: E402
import distributed  # noqa: E402
import models  # noqa: E402
from data import DataError, load_rows  # noqa: E402
from data.tokenize import prompt_ids  # noqa: E402
from sampler import HFSampler, SamplingParams, VLLMSampler, config_kwargs, vllm_available  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an HF checkpoint directory (e.g. <run_dir>/LATEST)")
    p.add_argument("--dataset", required=True, help="registry name or .json/.jsonl/.parquet file")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=4, help="completions per prompt")
    p.add_argument("--out", required=True, help="the JSONL to write")
    p.add_argument("--sampler", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--n-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-prompt-length", type=int, default=None, help="keep the end of longer prompts")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=list(models.DTYPES), help="compute dtype")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sampler config key")
    p.add_argument("--debug", action="store_true", help="show vLLM's own INFO lines")
    return p.parse_args(argv)


def sampler_config(name: str, args, max_model_len: int):
    """config/sampler/<name>.yaml, its interpolations resolved as train.py's config would."""
    root = OmegaConf.create({"seed": args.seed, "max_length": max_model_len, "model": {"fsdp_policy_mp": args.dtype}})
    root.sampler = OmegaConf.load(REPO / "config" / "sampler" / f"{name}.yaml")
    root.sampler = OmegaConf.merge(root.sampler, OmegaConf.from_dotlist(args.set))
    return OmegaConf.to_container(root.sampler, resolve=True)


def main(argv=None):
    args = parse(argv)
    owns_group = not dist.is_initialized()
    device = distributed.init()
    rank, world = distributed.rank(), distributed.world()
    rows = load_rows(args.dataset, args.split, "prompt")[: args.n_prompts]
    model_cfg = OmegaConf.create({"name_or_path": args.model})
    tokenizer = models.load_tokenizer(model_cfg)
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    if args.max_prompt_length:
        ids = [x[-args.max_prompt_length:] for x in ids]
    mine = list(range(rank, len(rows), world))
    name = args.sampler if args.sampler != "auto" else ("vllm" if vllm_available() else "hf")
    section = sampler_config(name, args, max(map(len, ids)) + args.max_new_tokens)
    if name == "vllm":
        sampler = VLLMSampler(args.model, load_format="auto", debug=args.debug, **config_kwargs(VLLMSampler, section))
    else:
        model = models.load_model(model_cfg, device, seed=args.seed)
        model = models.shard(model, init_device_mesh(device.type, (world,)), param_dtype=args.dtype)
        sampler = HFSampler(model, tokenizer, **config_kwargs(HFSampler, section))
    params = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    try:
        results = sampler.generate([ids[i] for i in mine], params)
        records = [{"index": i, **{k: v for k, v in rows[i].items() if k != "origin"},
                    "completions": [asdict(s) for s in samples]} for i, samples in zip(mine, results)]
        parts = [None] * world
        dist.all_gather_object(parts, records)
        if rank == 0:
            write(args.out, parts, len(rows), args.k)
            print(f"{len(rows)} prompts x {args.k} completions ({name}, {world} rank(s)) -> {args.out}")
    finally:
        sampler.close()  # a vLLM engine takes the process group down with it
        if owns_group:
            distributed.close()


def write(out: str, parts: list[list[dict]], n_prompts: int, k: int):
    """Merge the ranks' records in dataset order; every prompt exactly once, with k completions."""
    by_index = {}
    for part in parts:
        for record in part:
            if record["index"] in by_index:
                raise RuntimeError(f"prompt {record['index']} was generated twice")
            by_index[record["index"]] = record
    missing = sorted(set(range(n_prompts)) - set(by_index))
    short = [i for i, r in by_index.items() if len(r["completions"]) != k]
    if missing or short:
        raise RuntimeError(f"prompts missing: {missing[:10]}, with other than {k} completions: {short[:10]}")
    checkpointing.write_jsonl(out, [by_index[i] for i in range(n_prompts)])


if __name__ == "__main__":
    try:
        main()
    except (DataError, models.ConfigError) as exc:  # bad input: one line, as train.py says it
        if "--debug" in sys.argv:
            raise
        distributed.report_user_error(exc)
        sys.exit(2)
