"""What a new user meets first: the README's override syntax, small local files, and mistakes
answered with one line (``error: ...``, exit code 2, no traceback) before any model is built."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, fast_overrides, make_cfg, run_ranks
from helpers import metrics, train_run


def test_data_paths_and_columns_are_set_without_a_plus():
    cfg = make_cfg("data.paths.hh=/data/hh-rlhf", "data.columns.prompt_key=message", "data.columns.chosen_key=chose")
    assert cfg.data.paths.hh == "/data/hh-rlhf" and cfg.data.columns.prompt_key == "message"


def sft_file(path, n):
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i}"}) + "\n" for i in range(n)))
    return path


def test_a_file_smaller_than_the_holdout_trains_without_eval(tmp_path):
    data = sft_file(tmp_path / "tiny.jsonl", 12)  # fewer than 20 rows: no test rows
    run_dir = tmp_path / "run"
    overrides = fast_overrides(run_dir) + [f"datasets=[{data}]", "n_examples=16"]
    run_ranks(train_run, 1, tmp_path, overrides)
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2] and not any("eval/loss" in r for r in records)


def test_n_eval_examples_zero_turns_eval_off(tmp_path):
    run_dir = tmp_path / "run"
    run_ranks(train_run, 1, tmp_path, fast_overrides(run_dir) + ["n_eval_examples=0"])
    assert not any(k.startswith("eval/") for r in metrics(run_dir) for k in r)


def test_a_data_error_is_one_line_with_exit_code_2(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "train.py", f"datasets=[{tmp_path / 'missing.jsonl'}]", f"run_dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'missing.jsonl'}: no such file"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert lines[0] in (run_dir / "train.log").read_text()
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock", "train.log"]  # no model, checkpoint or config
    shown = subprocess.run([sys.executable, "train.py", f"datasets=[{tmp_path / 'missing.jsonl'}]", f"run_dir={run_dir}",
                            "debug=true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_local_files_are_checked_before_the_slow_imports_and_read_once(tmp_path):
    """train.py runs data.check_files before importing the trainers (a bad file: ~5 s to the
    error under torchrun on 2 cores, not ~11); the trainer then gets the same parse, not a second
    read, unless the file changed."""
    from data import DataError, check_files, load_rows, local

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: row 2: malformed JSON"):
        check_files([str(bad), "toy_add"], {})
    good = sft_file(tmp_path / "good.jsonl", 40)
    check_files([str(good)], {})
    hits = local._checked_rows.cache_info().hits
    assert len(load_rows(str(good), "train", "sft")) == 38 and local._checked_rows.cache_info().hits == hits + 1
    sft_file(good, 60)  # rewritten: read again
    assert len(load_rows(str(good), "train", "sft")) == 57
    src = (REPO / "train.py").read_text()
    assert src.index("check_files(cfg.datasets") < src.index("from trainers import")


@pytest.mark.parametrize("script", ["label_preferences", "generate"])
def test_the_scripts_answer_bad_input_with_one_line_and_exit_code_2(tmp_path, script):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completions": [{"text": "x"}]}) + "\n")
    args = {"label_preferences": ["--judge", "tiny", "--input", str(bad)],
            "generate": ["--model", "tiny", "--dataset", str(tmp_path / "missing.jsonl")]}[script]
    command = [sys.executable, f"scripts/{script}.py", *args, "--out", str(tmp_path / "out.jsonl")]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    want = {"label_preferences": f"error: {bad}: row 1: field 'completions': expected a list of at least 2",
            "generate": f"error: {tmp_path / 'missing.jsonl'}: no such file"}[script]
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(want), out.stderr
    shown = subprocess.run([*command, "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shown.returncode != 0 and "Traceback" in shown.stderr


def test_override_mistakes_name_the_closest_key_or_the_equivalent():
    import overrides

    def error(*argv):
        with pytest.raises(overrides.OverrideError) as e:
            overrides.check(list(argv), warn=lambda line: None)
        return str(e.value)

    assert error("loss=dpo", "loss.bta=0.1") == "unknown key loss.bta (in loss.bta=0.1): did you mean loss.beta?"
    assert error("lossbeta=0.1").endswith("did you mean loss.beta?")
    assert error("loss.beta=0.1").startswith("loss.beta (in loss.beta=0.1) is not an option of loss=sft: it is one of loss=cdpo")
    assert error("loss=dpoo").startswith("loss=dpoo: there is no config/loss/dpoo.yaml; choose one of cdpo, ")
    assert ", dpo, " in error("loss=dpoo")
    assert "n_examples=" in error("data_fraction=0.1") and "datasets=[" in error("prefs_path=/data/pairs.jsonl")
    assert "torchrun --nproc_per_node 1" in error("trainer=BasicTrainer")
    warned = []
    argv = ["trainer=FSDPTrainer", "loss=dpo", "+loss.bta=0.1", "+model.init.rope_theta=1e4", "data.paths.hh=/x"]
    assert overrides.check(argv, warn=warned.append) == argv[1:]  # FSDPTrainer is what runs anyway
    assert len(warned) == 2 and "+loss.bta=0.1 adds the key loss.bta" in warned[1]
    # every key the code reads is in a config file, so setting it needs no +
    assert overrides.check(["wandb.id=abc", "model.load_dtype=bfloat16"], warn=warned.append) == [
        "wandb.id=abc", "model.load_dtype=bfloat16"] and len(warned) == 2
    assert overrides.epochs_to_examples("epoch_3", 100) == 300 and overrides.epochs_to_examples(640, 100) == 640
    with pytest.raises(overrides.OverrideError, match="save_every=every_3"):
        overrides.epochs_to_examples("every_3", 100)


def test_each_key_means_one_thing_and_the_old_names_say_the_new_one():
    """beta meant DPO's KL strength, IPO's tau, SimPO's scale and ORPO's weight; gamma SimPO's
    margin and PPO's discount; margin the reward model's and online DPO's gap; ppo_epochs and
    epochs_per_iteration were one thing. Each old name now answers with the new one."""
    import overrides

    def error(*argv):
        with pytest.raises(overrides.OverrideError) as e:
            overrides.check(list(argv), warn=lambda line: None)
        return str(e.value)

    assert error("loss=ipo", "loss.beta=0.5") == (
        "loss.beta (in loss.beta=0.5) is called loss.tau under loss=ipo (renamed: the old name meant different "
        "things in different losses): write loss.tau=0.5")
    assert error("loss=simpo", "loss.beta=2").endswith("write loss.reward_scale=2")
    assert error("loss=simpo", "loss.gamma=0.3").endswith("write loss.target_margin=0.3")
    assert error("loss=orpo", "loss.beta=0.1").endswith("write loss.odds_ratio_weight=0.1")
    assert error("loss=online_dpo", "loss.margin=1").endswith("write loss.min_score_gap=1")
    for loss in ("ppo", "grpo", "rloo", "reinforce_pp"):
        assert error(f"loss={loss}", "loss.ppo_epochs=2").endswith("write loss.epochs_per_iteration=2")
    # where the name kept its meaning it is still the key
    for argv in (["loss=dpo", "loss.beta=0.1"], ["loss=kto", "loss.beta=0.1"], ["loss=online_dpo", "loss.beta=0.1"],
                 ["loss=rm", "loss.margin=1"], ["loss=ppo", "loss.gamma=0.99"], ["loss=raft", "loss.epochs_per_iteration=2"]):
        assert overrides.check(argv, warn=lambda line: None) == argv
    # one name per meaning across the loss files
    meanings = {"beta": {"dpo", "cdpo", "kto", "online_dpo"}, "gamma": {"ppo", "reinforce_pp"}, "margin": {"rm"},
                "epochs_per_iteration": {"ppo", "grpo", "rloo", "reinforce_pp", "online_dpo", "raft", "gspo", "cispo",
                                         "sapo", "distill"}}
    for key, losses in meanings.items():
        having = {p.stem for p in (REPO / "config" / "loss").glob("*.yaml") if key in OmegaConf.load(p)}
        assert having == losses, key
    assert not any("ppo_epochs" in OmegaConf.load(p) for p in (REPO / "config" / "loss").glob("*.yaml"))


def test_sampling_sections_and_sampler_keys_are_checked(tmp_path):
    """A sampling section's keys were passed to SamplingParams as they came (its code defaults
    filling the rest), and a sampler key no sampler takes was dropped silently. Every sampling
    section now sets exactly the sampling options, and a wrong key stops the run in one line."""
    import dataclasses

    import overrides
    import sampler
    from models import ConfigError

    keys = {f.name for f in dataclasses.fields(sampler.SamplingConfig)}
    assert keys == {f.name for f in dataclasses.fields(sampler.SamplingParams)} - {"n", "seed"}
    sections = {"eval_sampling": OmegaConf.load(REPO / "config" / "config.yaml").eval_sampling}
    for path in (REPO / "config" / "loss").glob("*.yaml"):
        if "sampling" in OmegaConf.load(path):
            sections[path.stem] = OmegaConf.load(path).sampling
    assert len(sections) == 11 and all(set(s) == keys for s in sections.values()), sections
    with pytest.raises(overrides.OverrideError, match=r"^loss\.sampling\.topk is not a sampling option: did you mean "
                                          r"loss\.sampling\.top_k\?$"):
        sampler.sampling_params({**sections["grpo"], "topk": 5}, "loss.sampling")
    with pytest.raises(overrides.OverrideError, match=r"^eval_sampling\.top_k is missing: SamplingConfig needs it$"):
        sampler.sampling_params({"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "stop": None}, "eval_sampling")
    with pytest.raises(ConfigError, match=r"^sampler\.kv_cache_bytes is not an argument of any sampler .*did you mean "
                                          r"sampler\.kv_cache_memory_bytes\?$"):
        sampler.check_config({"name": "vllm", "kv_cache_bytes": 1})
    out = subprocess.run([sys.executable, "train.py", "loss=grpo", "model=tiny", "datasets=[toy_add_prompts]",
                          "reward.functions=[toy_add]", "+loss.sampling.topk=5", f"run_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: loss.sampling.topk is not an option of loss=grpo: did you mean loss.sampling.top_k?")


def test_a_typo_stops_before_hydra_runs(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "loss=dpo", "loss.bta=0.1", f"run_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: unknown key loss.bta (in loss.bta=0.1): did you mean loss.beta?"]
    assert not (tmp_path / "run").exists()


def test_model_paths_that_cannot_be_loaded_are_one_line(tmp_path):
    from omegaconf import OmegaConf

    import models

    def cfg(**kw):
        return OmegaConf.create({"name": "x", "name_or_path": None, "archive": None, "init": None, **kw})

    (tmp_path / "policy.pt").write_bytes(b"\0")
    with pytest.raises(models.ConfigError, match=r"model.archive=.*policy.pt is a file: expected a Hugging Face model directory"):
        models.model_config(cfg(archive=str(tmp_path / "policy.pt")))
    with pytest.raises(models.ConfigError, match=r"model.name_or_path=.*nowhere: no such directory$"):
        models.model_config(cfg(name_or_path=str(tmp_path / "nowhere")))


def test_a_used_run_dir_is_refused_before_any_model_is_built(tmp_path, monkeypatch, single_process):
    import models
    from trainers import TRAINERS

    run_dir = tmp_path / "run"
    (run_dir / "step-8").mkdir(parents=True)
    (run_dir / "step-8" / "trainer_state.json").write_text("{}")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(models, "load_model", refuse)
    with pytest.raises(models.ConfigError, match="already holds checkpoints: pass resume=true or another run_dir"):
        TRAINERS["SFTTrainer"](make_cfg(*fast_overrides(run_dir)), torch.device("cpu"))


def test_file_encodings_and_formats_users_bring(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data import DataError, load_rows

    rows = [{"prompt": f"say {i}", "response": f"{i}"} for i in range(20)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    want = [r["response"] for r in rows[:19]]  # row 20 is the held-out one
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [r["response"] for r in load_rows(str(bom), "train", "sft")] == want
    upper = tmp_path / "UPPER.JSONL"
    upper.write_text(text)
    assert [r["response"] for r in load_rows(str(upper), "train", "sft")] == want
    disguised = tmp_path / "really_parquet.jsonl"
    pq.write_table(pa.Table.from_pylist(rows), disguised)
    assert [r["response"] for r in load_rows(str(disguised), "train", "sft")] == want
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(text.encode() + json.dumps({"prompt": "caf", "response": "x"}).encode()[:-3] + b"\xe9\"}\n")
    with pytest.raises(DataError) as e:
        load_rows(str(latin1), "train", "sft")
    assert str(e.value) == f"{latin1}: line 21, column 32: byte 0xe9 is not UTF-8 (save the file as UTF-8)"


def test_a_conversation_the_chat_template_refuses_names_its_row(tmp_path):
    from transformers import AutoTokenizer

    import models
    from data import DataError
    from data.tokenize import tokenize_sft

    tok = AutoTokenizer.from_pretrained(models.REPO / "tokenizer" / "tiny")
    # the strict alternation check of Llama-2 / Mistral style templates
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "response": "yo", "origin": "hh.jsonl row 1"},
            {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "response": "c",
             "origin": "hh.jsonl row 2"}]
    limits = make_cfg()
    with pytest.raises(DataError) as e:
        tokenize_sft(rows, tok, limits, "hh")
    assert str(e.value).startswith("hh.jsonl row 2: the model's chat template cannot render this conversation "
                                   "(roles user -> user): Conversation roles must alternate")


def test_an_eval_of_nothing_is_not_logged_as_zero(tmp_path, caplog):
    """Defect 3 of #26: one eval example on 2 ranks (each rank evaluates as many: none) logged
    ``eval/loss=0.0000``, a perfect score, at every eval. It is now left out, with a warning."""
    import metrics_log

    data = sft_file(tmp_path / "one_eval_row.jsonl", 20)  # row index 19 is the one test row
    run_dir = tmp_path / "run"
    run_ranks(train_run, 2, tmp_path, fast_overrides(run_dir) + [f"datasets=[{data}]", "n_examples=16"])
    records = metrics(run_dir)
    assert [r["step"] for r in records if "loss/train" in r] == [1, 2]
    assert not [r for r in records if "eval/loss" in r], records
    with caplog.at_level("WARNING", logger="train"):
        assert metrics_log.means({"loss": (0.0, 0.0), "tokens": (0.0, 0.0), "kl": (3.0, 2.0)}, "eval/{}", 5,
                              " (why)") == {"eval/kl": 1.5}
    assert caplog.messages == ["step 5: eval/loss is a mean over nothing (why): not logged"]


def test_the_compute_dtype_fits_the_device(monkeypatch, caplog):
    """Defect 4 of #26: bf16 (the real-model configs' default) on a CPU that emulates it runs
    40-70x slower than fp32, without a word. ``auto`` measures; an explicit bf16 is warned about."""
    import models

    cpu = torch.device("cpu")
    assert models.bf16_slowdown(cpu) > 0
    for slowdown, auto in ((40.0, "float32"), (0.4, "bfloat16")):
        monkeypatch.setattr(models, "bf16_slowdown", lambda device, s=slowdown: s)
        with caplog.at_level("WARNING", logger="train"):
            caplog.clear()
            assert models.compute_dtype("auto", cpu) == auto
            assert models.compute_dtype("float32", cpu) == "float32"
            assert models.compute_dtype("bfloat16", cpu) == "bfloat16"  # kept: it may be what you test
        warned = [m for m in caplog.messages if "bf16 matmuls" in m]
        assert warned == (["model.fsdp_policy_mp=bfloat16: this CPU computes bf16 matmuls 40x slower than fp32 "
                           "(measured): set model.fsdp_policy_mp=auto or float32 unless bf16 is what you test"]
                          if slowdown > 2 else [])
    with pytest.raises(models.ConfigError, match="model.fsdp_policy_mp=bf16: expected auto, float32, bfloat16, float16"):
        models.compute_dtype("bf16", cpu)
    for name in ("blank_model", "smollm2_135m", "llama3_8b"):  # the configs of real models choose by measurement
        assert make_cfg(f"model={name}").model.fsdp_policy_mp == "auto"
