"""The SFT trainer end to end: world-size and accumulation invariance, the loop's bookkeeping,
exports, and the models users bring through ``model=blank_model``."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import FSDPModule
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import checkpointing
import distributed
import models
from conftest import fast_overrides, make_cfg, run_ranks
from helpers import assert_same_run, metrics, train_run
from trainers import TRAINERS, crossed, warmup_cosine


def test_runs_are_compared_on_continuous_metrics_only():
    """Two DPO runs at step 1 whose margins agree to rounding but whose accuracy (a count of
    margins > 0) flips: the same run. The margin itself still has to agree."""
    a = [{"step": 1, "eval/rewards/accuracy": 0.125, "eval/rewards/margin": 1e-9, "eval/loss": 0.6931}]
    b = [{"step": 1, "eval/rewards/accuracy": 0.0, "eval/rewards/margin": -1e-9, "eval/loss": 0.6931}]
    assert_same_run(a, b)
    with pytest.raises(AssertionError):
        assert_same_run(a, [{**b[0], "eval/rewards/margin": 0.01}])


def test_two_ranks_and_accumulation_equal_one_process(tmp_path):
    runs = {
        "1 rank, no accumulation": (1, 1, True, "null"),
        "1 rank, 4 micro-batches": (1, 4, True, "null"),
        "2 ranks, 2 micro-batches": (2, 2, True, "null"),
        # FSDP keeps each layer's gathered weights from forward to backward: the same numbers
        "2 ranks, 2 micro-batches, reshard_after_forward=false": (2, 2, False, "null"),
        # two replicas of the whole model (HSDP with shards of one rank): gradients all-reduced
        "2 ranks, 2 micro-batches, fsdp_shard_ranks=1": (2, 2, True, "1"),
    }
    results = {}
    for name, (world, accum, reshard, shard_ranks) in runs.items():
        run_dir = tmp_path / f"w{world}a{accum}r{reshard}s{shard_ranks}"
        overrides = [f"gradient_accumulation_steps={accum}", f"reshard_after_forward={str(reshard).lower()}",
                     f"fsdp_shard_ranks={shard_ranks}"]
        weights = run_ranks(train_run, world, tmp_path, fast_overrides(run_dir) + overrides)[0]
        results[name] = (metrics(run_dir), weights)
    (ref_metrics, ref_weights) = results["1 rank, no accumulation"]
    assert ref_metrics[-1]["step"] == 6 and ref_metrics[-1]["eval/loss"] < ref_metrics[0]["eval/loss"]
    for name in list(runs)[1:]:
        got_metrics, got_weights = results[name]
        assert_same_run(got_metrics, ref_metrics)
        # Adam turns rounding noise in a near-zero gradient into a step of up to lr (1e-3): a few
        # weights of the 854,656 move apart by up to 1.2e-5 (and the largest by 1.0e-5 or 1.2e-5
        # with AVX-512 or AVX2 kernels alone); 13-15 by more than 1e-6, the rest agree to rounding
        diffs = {k: (got_weights[k] - ref_weights[k]).abs() for k in ref_weights}
        worst = max(diffs, key=lambda k: diffs[k].max())
        assert diffs[worst].max() < 1e-4, (name, worst, diffs[worst].max())
        assert sum(int((d > 1e-6).sum()) for d in diffs.values()) < 100, name


def test_an_hsdp_run_resumes_as_an_fsdp_run_does(tmp_path):
    """6 steps on 2 ranks, sharded over both (FSDP) or two replicas (``fsdp_shard_ranks=1``), each
    resumed from its last checkpoint to 8 steps: the same run, the optimizer state restored alike."""
    runs = {}
    for shard_ranks in ("null", "1"):
        run_dir = tmp_path / f"shard-{shard_ranks}"
        overrides = fast_overrides(run_dir) + [f"fsdp_shard_ranks={shard_ranks}"]
        run_ranks(train_run, 2, tmp_path, overrides)
        run_ranks(train_run, 2, tmp_path, overrides + ["resume=true", "n_examples=64"])
        runs[shard_ranks] = metrics(run_dir)
    assert [r["step"] for r in runs["1"] if "loss/train" in r] == list(range(1, 9))
    assert_same_run(runs["1"], runs["null"])


def test_run_dir_holds_config_metrics_checkpoint_and_loadable_export(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "save_every=16", "keep_checkpoints=2")
    trainer = TRAINERS["SFTTrainer"](cfg, distributed.device())
    trainer.train()
    run = tmp_path / "run"
    assert OmegaConf.load(run / "config.yaml").run_dir == str(run)
    records = metrics(run)
    train_keys = {"step", "examples", "tokens", "lr", "loss/train", "grad_norm", "tokens_per_s"}
    assert train_keys <= set(records[1])
    assert [r["step"] for r in records if "eval/loss" in r] == [0, 3, 6]
    assert [p.name for p in checkpointing.complete(run)] == ["step-4", "step-6"]  # keep_checkpoints=2
    # the export loads anywhere and computes what the trained (sharded) model computes
    exported = AutoModelForCausalLM.from_pretrained(run / "LATEST")
    assert AutoConfig.from_pretrained(run / "LATEST").architectures == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(run / "LATEST")
    ids = torch.tensor([tok("12+34=", add_special_tokens=False)["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_profile_steps_profiles_exactly_those_steps(tmp_path, single_process):
    """profile_steps=[2,3] of a 6-step run: the trace holds two profiler steps, the loop's 2nd and
    3rd (torch numbers the intervals between ``step()`` calls from 0, so they are #1 and #2), and
    the ops table names the matrix products the model spends its time in."""
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "profile_steps=[2,3]")
    TRAINERS["SFTTrainer"](cfg, distributed.device()).train()
    profile = tmp_path / "run" / "profile"
    ops = (profile / "ops.txt").read_text()
    assert ops.startswith("steps 2-3, rank 0") and "aten::mm" in ops
    events = json.loads((profile / "trace.json").read_text())["traceEvents"]
    assert sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}) == \
        ["ProfilerStep#1", "ProfilerStep#2"]


@pytest.mark.parametrize("steps, error", [
    ("[3,2]", "expected \\[first, last\\]"), ("[0,1]", "expected \\[first, last\\]"), ("[2]", "expected"),
    ("[2,7]", "the run has 6 steps; choose steps between 1 and 6"), ("3", "expected \\[first, last\\]"),
])
def test_profile_steps_outside_the_run_are_refused(tmp_path, steps, error, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"profile_steps={steps}")
    with pytest.raises(ValueError, match=error):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


@pytest.mark.parametrize("shard_ranks", ["2", "0", "one"])
def test_fsdp_shard_ranks_that_do_not_divide_the_ranks_are_refused(tmp_path, shard_ranks, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"fsdp_shard_ranks={shard_ranks}")
    with pytest.raises(ValueError, match=f"fsdp_shard_ranks={shard_ranks} must divide the 1 ranks"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


def test_existing_checkpoints_are_not_overwritten(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "n_examples=8")
    TRAINERS["SFTTrainer"](cfg, distributed.device()).train()
    with pytest.raises(models.ConfigError, match="resume=true"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


def test_a_checkpoint_is_complete_only_with_every_file_its_manifest_lists(tmp_path):
    def checkpoint(name, files: dict[str, bytes], listed: dict[str, int] | None = None):
        (tmp_path / name).mkdir()
        for f, content in files.items():
            (tmp_path / name / f).write_bytes(content)
        if listed is not None:
            (tmp_path / name / checkpointing.MANIFEST).write_text(json.dumps({"files": listed}))

    written = {"__0_0.distcp": 100, checkpointing.STATE_FILE: 2}
    checkpoint("step-3", {"__0_0.distcp": b"x" * 100, checkpointing.STATE_FILE: b"{}"}, written)
    checkpoint("step-5.tmp", {"__0_0.distcp": b"x" * 100}, written)  # killed while saving
    checkpoint("step-7", {checkpointing.STATE_FILE: b"{}"})  # no manifest: not renamed by rank 0's last act
    checkpoint("step-9", {"__0_0.distcp": b"x" * 60, checkpointing.STATE_FILE: b"{}"}, written)  # truncated since
    checkpoint("step-11", {checkpointing.STATE_FILE: b"{}"}, written)  # a shard lost
    assert [p.name for p in checkpointing.complete(tmp_path)] == ["step-3"]
    shard = tmp_path / "step-9" / "__0_0.distcp"
    assert checkpointing.damage(tmp_path / "step-9") == f"{shard} has 60 bytes, 100 when it was written"
    assert checkpointing.damage(tmp_path / "step-11") == f"{tmp_path / 'step-11' / '__0_0.distcp'} is missing"
    assert checkpointing.resumable(tmp_path) == tmp_path / "step-3"  # warning of step-11, -9 and -7 on the way


def test_schedule_and_counters():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [round(f(s), 4) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(14) == pytest.approx(0.1)
    assert crossed(10, 8, 12) and not crossed(10, 10, 18) and not crossed(None, 0, 100)


ARCHITECTURES = {
    "llama": ("LlamaDecoderLayer", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2DecoderLayer", dict(num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXLayer", dict()),
    "mistral": ("MistralDecoderLayer", dict(num_key_value_heads=2, sliding_window=None)),
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_blank_model_shards_and_trains_any_causal_lm(tmp_path, model_type, single_process):
    block, extra = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=262, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "weights")
    AutoTokenizer.from_pretrained(models.REPO / "tokenizer" / "tiny").save_pretrained(tmp_path / "weights")

    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "model=blank_model", f"model.name_or_path={tmp_path / 'weights'}",
                   "model.fsdp_policy_mp=float32", "n_examples=64", "lr=3e-3")
    trainer = TRAINERS["SFTTrainer"](cfg, distributed.device())
    sharded = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
    assert sorted({type(m).__name__ for m in sharded}) == sorted({f"FSDP{block}", type(trainer.model).__name__})
    assert len(sharded) == 1 + 2  # each decoder layer, then the root
    trainer.train()
    evals = [r["eval/loss"] for r in metrics(tmp_path / "run") if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "LATEST").config.model_type == model_type


def test_block_name_override_and_unknown_block(single_process):
    import omegaconf

    model = models.load_model(omegaconf.OmegaConf.load(models.REPO / "config/model/tiny.yaml"), torch.device("cpu"))
    assert models.block_class(model, "LlamaMLP").__name__ == "LlamaMLP"
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        models.block_class(model, "GPT2Block")


def test_wandb_offline_run_is_written_by_rank_0(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "n_examples=16", "wandb.enabled=true", "wandb.mode=offline")
    TRAINERS["SFTTrainer"](cfg, distributed.device()).train()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
