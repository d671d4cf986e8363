"""Label preference pairs with an LLM judge under one written principle (AI feedback, RLAIF).

    torchrun --nproc_per_node 2 scripts/label_preferences.py --judge runs/readme/sft/LATEST \
        --input pairs.jsonl --out labeled.jsonl [--principle "..."] [--with-reference] \
        [--min-confidence 0.6] [--sampler auto|vllm|hf] [--set batch_size=32]
    python scripts/label_preferences.py --judge http://127.0.0.1:8000/v1 --input pairs.jsonl \
        --out labeled.jsonl [--set template=config/judge/templates/self_reference.txt] [--set model=...]

A judge at an address (``--judge http://...``, any OpenAI-compatible server: ``vllm serve``, a hosted
API) is asked through judges.py, both orders, as config/judge/default.yaml says with ``mode:
pairwise`` and the ``pairwise.txt`` template unless ``--set`` changes them (its keys). A pair is
kept when both orders' verdicts pick the same response (``judges.combine``), or, with ``--set
logprobs=true`` and a template that asks for the letter alone (``pairwise_letter.txt``), when
P(a better) averaged over the orders is not exactly 0.5, as for a local judge below; each is
written with the two verdicts (and ``judge_prob_a_better``). The rest of this text is about a
local judge.

``python scripts/label_preferences.py ...`` runs it as a world of one. ``--judge`` is an HF causal
LM directory (e.g. ``<run_dir>/LATEST``) or a config of config/model (``tiny``: random init, for
tests). ``--input`` is a .json/.jsonl/.parquet file of rows

    {"prompt": [messages] or str, "response_a": str, "response_b": str}

or of preference rows ``{"prompt", "chosen", "rejected"}`` to re-label (``chosen`` is then
response a), or ``scripts/generate.py`` output (``--k 2`` or more; its first two completions are
the responses, and a row whose two are identical or empty is skipped and counted). Every row is
checked before the judge is loaded; errors name the file, row and field.

The judge reads one user turn holding the principle, the conversation, Response A, Response B and
"Which response is better? Answer A or B."; the log-probs of its next token being "A" or "B"
(``Sampler.choice_logprobs``) give p(A) = softmax over just those two. Each pair is judged twice,
a shown first and then second, which cancels the judge's position bias:

    P(a better) = (p(A | a first) + p(B | a second)) / 2

chosen is the better response. A tie (P exactly 0.5, e.g. a judge that always answers "A") and,
with ``--min-confidence c``, a pair with P(chosen better) < c give no pair. Rows are dealt
round-robin to the ranks; rank 0 writes the pairs, in input order, to ``--out`` (via a .tmp file),
which ``train.py loss=rm|dpo datasets=[<out>]`` reads as is:

    {"index": i, <the row's other fields>, "prompt": [messages], "chosen": str, "rejected": str,
     "judge_prob_chosen": P(chosen better), "judge_prob_a_first": p(A | a first),
     "judge_prob_a_second": p(B | a second), "chosen_was": "a" | "b",
     "judge_logprobs_a_first": [log p(A), log p(B)], "judge_logprobs_a_second": [...],
     "principle": str, "judge": str}

The raw log-probs show how much probability the judge puts on the two answers at all; the summary
printed at the end reports its mean, and how often the two orders agree.

``--with-reference`` adds each row's reference answer (its ``reference`` field, else ``answer``) to
the judge's prompt, as a yardstick: seed 000's self-reference, where the policy judges its own
samples (``--judge`` its checkpoint) against a reference answer under one principle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import checkpointing  # noqa: E402
import distributed  # noqa: E402
import judges  # noqa: E402
import models  # noqa: E402
from data import DataError, where  # noqa: E402
from data import local  # noqa: E402
from data.tokenize import prompt_ids  # noqa: E402
from sampler import VLLMSampler, build_sampler, config_kwargs, vllm_available  # noqa: E402
from judges import LABELS, PRINCIPLE, QUESTION, choice_ids, decide, judge_messages, two_way  # noqa: E402,F401
from scripts.generate import sampler_config  # noqa: E402

PAIR_KEYS = (("response_a", "response_b"), ("chosen", "rejected"))  # input shapes, first match wins
GENERATED = "completions"  # scripts/generate.py's rows: judge each prompt's first two completions


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--judge", required=True, help="an HF checkpoint directory, a config/model name (e.g. tiny), or "
                                                  "a judge server's address (http://host:port/v1)")
    p.add_argument("--input", required=True, help="a .json/.jsonl/.parquet of pairs to judge")
    p.add_argument("--out", required=True, help="the JSONL of pairs to write")
    p.add_argument("--principle", default=PRINCIPLE, help="what 'better' means to the judge")
    p.add_argument("--with-reference", action="store_true",
                   help="show the judge each row's reference answer (its reference or answer field)")
    p.add_argument("--min-confidence", "--min_confidence", type=float, default=0.5,
                   help="drop pairs whose P(chosen better) is below this (0.5: keep all but exact ties)")
    p.add_argument("--max-length", type=int, default=None, help="skip rows whose judge prompt is longer (tokens)")
    p.add_argument("--sampler", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--seed", type=int, default=0, help="random init of a config judge without weights")
    p.add_argument("--dtype", default="float32", choices=list(models.DTYPES), help="compute dtype")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key: the sampler's (a local judge), config/judge's (a judge server)")
    p.add_argument("--debug", action="store_true", help="show vLLM's own INFO lines")
    args = p.parse_args(argv)
    args.server = args.judge.startswith(("http://", "https://"))
    if args.server and (args.principle != PRINCIPLE or args.with_reference or args.min_confidence != 0.5):
        p.error("--principle, --with-reference and --min-confidence are a local judge's: a judge server reads its "
                "template (--set template=...; self_reference.txt shows it the row's reference)")
    if not 0.5 <= args.min_confidence <= 1:
        p.error(f"--min-confidence {args.min_confidence}: expected a probability in [0.5, 1]")
    return args


# --- input ---------------------------------------------------------------------------------------


def load_pairs(path: str) -> tuple[list[dict], int]:
    """(rows ``{"prompt", "a", "b", "extra", "origin"}`` of the records of ``path``, all checked;
    the number of generated rows skipped for two identical or empty completions)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in local.EXTENSIONS:
        raise DataError(f"{path}: unsupported extension {ext!r}; expected one of {', '.join(local.EXTENSIONS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = local._read(path, ext)
    if not records:
        raise DataError(f"{path}: empty file (no rows)")
    n, first = records[0]
    if isinstance(first, dict) and GENERATED in first:
        rows = [generated_pair(obj, path, n) for n, obj in records]
        return [r for r in rows if r is not None], rows.count(None)
    keys = pair_keys(path, n, first)
    return [pair_row(obj, path, n, keys) for n, obj in records], 0


def generated_pair(obj, path: str, n: int) -> dict | None:
    """A scripts/generate.py row as a pair of its first two completions; None if they are the same
    text or either is empty (sampling gives both often, and neither is a comparison)."""
    completions = obj.get(GENERATED) if isinstance(obj, dict) else None
    if not (isinstance(completions, list) and len(completions) >= 2
            and all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in completions[:2])):
        raise DataError(f"{where(path, n, GENERATED)}: expected a list of at least 2 completions, each with a "
                        f"'text' (scripts/generate.py --k 2 or more writes them)")
    a, b = (c["text"] for c in completions[:2])
    if a == b or not a.strip() or not b.strip():
        return None
    rest = {k: v for k, v in obj.items() if k != GENERATED}
    return pair_row({**rest, "response_a": a, "response_b": b}, path, n, PAIR_KEYS[0])


def pair_keys(path: str, n: int, first) -> tuple[str, str]:
    """The input's shape, from its first record, as data/local.py decides a file's shape."""
    if isinstance(first, dict):
        for keys in PAIR_KEYS:
            if any(k in first for k in keys):
                return keys
    raise DataError(f"{where(path, n, 'response_a')}: missing (a row needs response_a and response_b, "
                    f"or chosen and rejected, or completions from scripts/generate.py)")


def pair_row(obj, path: str, n: int, keys: tuple[str, str]) -> dict:
    # data/local.py's own row check: the same prompt forms and messages train.py accepts
    row = local._row(obj, path, n, "prompt", {"a": keys[0], "b": keys[1]})
    if row["a"] == row["b"]:
        raise DataError(f"{where(path, n, keys[1])}: identical to {keys[0]!r}; the judge has nothing to compare")
    row["extra"] = {k: v for k, v in obj.items() if k not in ("prompt", *keys)}
    return row


# --- the judge's prompt and its answer -----------------------------------------------------------


def judge_prompts(tokenizer, principle: str, row: dict, reference: str | None = None) -> list[list[int]]:
    """Token ids of the judge prompt with a first, then with b first."""
    return [prompt_ids(tokenizer, judge_messages(principle, row["prompt"], x, y, reference))
            for x, y in ((row["a"], row["b"]), (row["b"], row["a"]))]


def reference_of(row: dict) -> str:
    """``--with-reference``: the row's reference answer, its ``reference`` field, else ``answer``."""
    found = judges.reference_of(row["extra"])
    if found is None:
        raise DataError(f"{row['origin']}: no reference or answer field (--with-reference shows the judge each "
                        f"row's reference answer)")
    return found


def label(row: dict, index: int, logps_a_first: list[float], logps_a_second: list[float], args) -> dict:
    """The judged row: its verdict, and the pair unless the verdict is a tie or unsure."""
    p_first, p_second = two_way(logps_a_first), two_way(logps_a_second[::-1])  # p(A | a first), p(B | a second)
    verdict, p = decide(p_first, p_second, args.min_confidence)
    out = {"index": index, "verdict": verdict, "orders_agree": (p_first > 0.5) == (p_second > 0.5),
           "mass": [sum(math.exp(x) for x in logps_a_first), sum(math.exp(x) for x in logps_a_second)]}
    if verdict in ("a", "b"):
        chosen, rejected = (row["a"], row["b"]) if verdict == "a" else (row["b"], row["a"])
        out["pair"] = {**row["extra"], "index": index, "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                       "judge_prob_chosen": max(p, 1 - p), "judge_prob_a_first": p_first,
                       "judge_prob_a_second": p_second, "chosen_was": verdict,
                       "judge_logprobs_a_first": logps_a_first, "judge_logprobs_a_second": logps_a_second,
                       "principle": args.principle, "judge": args.judge}
    return out


# --- the judge model -----------------------------------------------------------------------------


def judge_config(judge: str):
    """A model config for ``--judge``: an HF directory, or a config/model name or .yaml path."""
    if Path(judge).is_dir():
        return OmegaConf.create({"name_or_path": str(Path(judge).resolve())})
    yaml = Path(judge) if judge.endswith(".yaml") else REPO / "config" / "model" / f"{judge}.yaml"
    if yaml.is_file():
        return OmegaConf.load(yaml)
    known = ", ".join(sorted(p.stem for p in (REPO / "config" / "model").glob("*.yaml")))
    raise models.ConfigError(f"--judge {judge!r}: not a model directory, nor a config in config/model ({known})")


def make_sampler(name: str, judge_cfg, tokenizer, args, max_model_len: int, device, work_dir: Path):
    section = sampler_config(name, args, max_model_len)
    path = models.weights_path(judge_cfg)
    if name == "vllm" and path and Path(path).is_dir() and not judge_cfg.get("tokenizer_name_or_path"):
        return VLLMSampler(path, load_format="auto", debug=args.debug, **config_kwargs(VLLMSampler, section))  # reads the weights itself
    model = models.load_model(judge_cfg, device, seed=args.seed)
    if name == "hf":
        model = models.shard(model, init_device_mesh(device.type, (distributed.world(),)), param_dtype=args.dtype)
    # vLLM: an engine built from config + tokenizer (written to work_dir), then given the weights
    return build_sampler(OmegaConf.create({"sampler": section, "debug": args.debug}), model, tokenizer, work_dir)


# --- the run -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """The exit code: 1 when no pair was kept (an empty --out is no data set), else 0."""
    args = parse(argv)
    rows, skipped = load_pairs(args.input)  # bad input stops here, before anything is loaded
    if args.with_reference:
        args.references = [reference_of(row) for row in rows]
    if args.server:
        return label_with_server(args, rows, skipped)
    judge_cfg = judge_config(args.judge)
    owns_group = not dist.is_initialized()
    device = distributed.init()
    rank, world = distributed.rank(), distributed.world()
    work_dir = Path(args.out).with_name(Path(args.out).name + ".judge")  # vLLM's model dir, for a judge without one
    sampler, kept = None, None
    try:
        tokenizer = models.load_tokenizer(judge_cfg)
        prompts, too_long = my_prompts(tokenizer, rows, rank, world, args)
        name = args.sampler if args.sampler != "auto" else ("vllm" if vllm_available() else "hf")
        longest = int(distributed.all_max([max((len(p) for ids in prompts.values() for p in ids), default=1)],
                                          device)[0])
        sampler = make_sampler(name, judge_cfg, tokenizer, args, longest + 1, device, work_dir)
        logps = sampler.choice_logprobs([p for ids in prompts.values() for p in ids], choice_ids(tokenizer))
        judged = [label(rows[i], i, logps[2 * k], logps[2 * k + 1], args) for k, i in enumerate(prompts)]
        parts = [None] * world
        dist.all_gather_object(parts, (judged, too_long))
        if rank == 0:
            summary = {**write(args.out, parts, len(rows)), "skipped_identical_or_empty": skipped}
            print(json.dumps({"out": args.out, "sampler": name, "ranks": world, **summary}))
            warn(summary)
            kept = summary["pairs"]
    finally:
        if sampler is not None:
            sampler.close()  # a vLLM engine takes the process group down with it
        if owns_group:
            distributed.close()
    if rank == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if kept == 0 else 0


def label_with_server(args, rows: list[dict], skipped: int) -> int:
    """``--judge http://...``: every pair asked of the server in both orders (judges.Judge.compare)
    in this process (under torchrun, rank 0 alone asks and writes); the exit code as ``main``'s."""
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    node = OmegaConf.load(REPO / "config" / "judge" / "default.yaml")
    node.update({"mode": "pairwise", "template": "config/judge/templates/pairwise.txt"})
    for item in args.set:  # a key that is not the judge's is refused by load_config, with the closest one
        key, _, value = item.partition("=")
        node[key] = yaml.safe_load(value)
    judge = judges.Judge(judges.load_config(node, args.judge))
    results = judge.compare([{**row["extra"], "prompt": row["prompt"], "response_a": row["a"], "response_b": row["b"]}
                             for row in rows])
    pairs = []
    for i, (row, result) in enumerate(zip(rows, results)):
        if result.winner is None:
            continue
        chosen, rejected = (row["a"], row["b"]) if result.winner == 0 else (row["b"], row["a"])
        pairs.append({**row["extra"], "index": i, "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                      "chosen_was": "ab"[result.winner], "judge_verdict_a_first": result.ab_verdict,
                      "judge_verdict_b_first": result.ba_verdict, "judge": args.judge, "judge_model": judge.cfg.model,
                      "judge_template": judge.cfg.template,
                      **({} if result.prob_a is None else {"judge_prob_a_better": result.prob_a})})
    checkpointing.write_jsonl(args.out, pairs)
    errors = [r.error for r in results if r.error is not None]
    summary = {"rows": len(rows), "pairs": len(pairs), "ties": sum(r.error is None and r.winner is None and
                                                                   not r.disagreement for r in results),
               "order_disagreements": sum(r.disagreement for r in results), "errors": len(errors),
               "skipped_identical_or_empty": skipped, **judge.stats()}
    print(json.dumps({"out": args.out, "judge": args.judge, **summary}))
    if errors:
        print(f"warning: {len(errors)} pairs got no verdict; first: {errors[0]}", file=sys.stderr)
    if not pairs:
        print("error: no pair was kept (see ties / order_disagreements / errors in the summary above)",
              file=sys.stderr)
    return 1 if not pairs else 0


def my_prompts(tokenizer, rows: list[dict], rank: int, world: int, args) -> tuple[dict[int, list], list[int]]:
    """This rank's rows (round-robin): {row index: its two judge prompts}, and the rows skipped
    for a judge prompt longer than ``--max-length``."""
    prompts, too_long = {}, []
    for i in range(rank, len(rows), world):
        ids = judge_prompts(tokenizer, args.principle, rows[i], args.references[i] if args.with_reference else None)
        if args.max_length and max(map(len, ids)) > args.max_length:
            too_long.append(i)
        else:
            prompts[i] = ids
    return prompts, too_long


def warn(summary: dict):
    if summary["pairs"] == 0:
        print("error: no pair was kept (see ties / below_min_confidence / too_long in the summary above)", file=sys.stderr)
    if summary["mean_prob_on_choices"] < 0.5:
        print(f"warning: the judge puts {summary['mean_prob_on_choices']:.3f} of its next-token probability on "
              f"{' / '.join(LABELS)} on average: it may not follow the answer format (a base model? "
              f"another answer token?), which makes its verdicts noise", file=sys.stderr)


def write(out: str, parts: list, n_rows: int) -> dict:
    """Merge the ranks' judgments; write the pairs in input order; return the counts."""
    judged = sorted((j for part, _ in parts for j in part), key=lambda j: j["index"])
    too_long = sum(len(t) for _, t in parts)
    if [j["index"] for j in judged] != sorted(set(range(n_rows)) - {i for _, t in parts for i in t}):
        raise RuntimeError("a row was judged twice or not at all")
    pairs = [j["pair"] for j in judged if "pair" in j]
    checkpointing.write_jsonl(out, pairs)
    count = {v: sum(j["verdict"] == v for j in judged) for v in ("tie", "unsure")}
    masses = [m for j in judged for m in j["mass"]]
    return {"rows": n_rows, "pairs": len(pairs), "ties": count["tie"], "below_min_confidence": count["unsure"],
            "too_long": too_long, "chosen_was_a": sum(p["chosen_was"] == "a" for p in pairs),
            "orders_agree": sum(j["orders_agree"] for j in judged) / max(len(judged), 1),
            "mean_prob_on_choices": sum(masses) / max(len(masses), 1)}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataError, models.ConfigError, judges.JudgeConfigError) as exc:  # bad input: one line, as train.py says it
        if "--debug" in sys.argv:
            raise
        distributed.report_user_error(exc)
        sys.exit(2)
