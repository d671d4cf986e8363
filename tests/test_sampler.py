"""The sampler (sampler.py): vLLM inside the training process and HF generate, against each
other and against the log-probs the trainer computes; weight sync under FSDP2; seeds, ranks,
uneven prompts; scripts/generate.py.

Order matters in this file. The vLLM tests share one engine (``engine``, module scope: importing
vLLM and building it take ~10 s), and while it lives it holds this process's process group. So
the tests that fork ranks (``conftest.run_ranks``: a child would inherit the group) or open and
close a world of one come first, the engine's tests last; the engine is shut down, and the group
with it, when the module ends. Two-rank vLLM runs go through ``torchrun`` (tests/sampler_ranks.py).
Without a working vLLM the vLLM tests skip and the HF ones still run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import distributed
import models
import sampler
from conftest import REPO, make_cfg, run_ranks
from helpers import plain_tiny, tiny_checkpoint, trained_tiny, trained_tiny_weights, vllm_or_skip, vllm_subprocess
from data.packing import pack, unpack
from data.tokenize import IGNORE, prompt_ids
from losses.rl import truncated_is_weight
from trainers import PolicyGradientTrainer, Trainer
from sampler import HFSampler, SamplingParams, VLLMSampler, build_sampler, weight_groups
from sampler_ranks import (TINY, max_logp_diff, prompts, recomputed_logps, sampler_override, sft_examples,
                           sft_steps, tiny_model, tokenizer)

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy machine an OpenMP pool
    that spins for a core another process holds makes every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(samples):
    return [[s.token_ids for s in ss] for ss in samples]


def forked(fn, world, tmp_path, *args):
    assert not dist.is_initialized(), "forking with a live process group: run this test before the vLLM ones"
    return run_ranks(fn, world, tmp_path, *args)


# --- HF generate (always runs) ------------------------------------------------------------------


def test_hf_batches_left_padded_and_logprobs_are_the_trainers():
    tok, model = tokenizer(), trained_tiny()
    p = prompts(tok, 7, start=3) + [prompts(tok, 1)[0] + [22, 23]]  # different lengths: left padding
    one, batched = HFSampler(model, tok, batch_size=1), HFSampler(model, tok, batch_size=3)
    assert ids(batched.generate(p, GREEDY)) == ids(one.generate(p, GREEDY))
    model.train()
    rng = torch.get_rng_state()
    for params in (GREEDY, SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=24)):
        out = batched.generate(p, params)
        assert [len(ss) for ss in out] == [params.n] * len(p)
        assert all(len(s.logprobs) == len(s.token_ids) for ss in out for s in ss)
        # log q under the distribution sampled from (tempered, truncated), written out in the test
        assert max_logp_diff(recomputed_logps(model, p, out, params), out) < 1e-4
    assert torch.equal(torch.get_rng_state(), rng), "sampling moved the trainer's RNG"
    assert model.training and model.config.use_cache is False, "generate must restore training mode and use_cache"


def on_policy_logps(sampler, model, prompt_list, top_p: float = 1.0, truncate: bool = True):
    """pi_old (the trainer's PolicyGradientTrainer.policy_logps on a packed batch) and q (what the
    sampler reported) of every token of samples the sampler just drew from the same weights, at
    T = 0.7 (and ``top_p``; ``truncate``: loss.truncate_like_sampler)."""
    params = SamplingParams(n=4, temperature=0.7, top_p=top_p, max_new_tokens=16, seed=3)
    out = sampler.generate(prompt_list, params)
    pairs = [(p, s) for p, ss in zip(prompt_list, out) for s in ss]
    batch = pack([{"input_ids": p + s.token_ids, "labels": [IGNORE] * len(p) + s.token_ids} for p, s in pairs], 1024, 0)
    sampling = {"temperature": 0.7, "top_p": top_p, "top_k": 0}
    trainer = SimpleNamespace(cfg=OmegaConf.create({"loss": {"sampling": sampling, "truncate_like_sampler": truncate},
                                                    "logprob_chunk_tokens": 64}))
    trainer.token_logps = functools.partial(Trainer.token_logps, trainer)
    with torch.no_grad():
        old = unpack(PolicyGradientTrainer.policy_logps(trainer, model, batch)[0], batch, len(pairs))
    return torch.cat(old), torch.tensor([x for _, s in pairs for x in s.logprobs])


def assert_on_policy_weight_is_one(sampler, model, prompt_list, top_p: float = 1.0):
    """TIS's weight exp(pi_old - q) on samples the sampler just drew from the same weights:
    E_q[pi_old / q] = 1, and per token the two log-probs agree (the sampler reports the tempered
    distribution, truncated to top_p's set, and so does the trainer). Under top_p < 1 the full
    softmax (``truncate_like_sampler=false``) gives the weight S, the kept mass, instead: its mean
    is below 1 by more than the noise."""
    old, q = on_policy_logps(sampler, model, prompt_list, top_p)
    weights = truncated_is_weight(old, q, cap=float("inf"))
    assert len(weights) > 200
    assert abs(weights.mean().item() - 1) < 1e-3, weights.mean()
    assert (old - q).abs().max() < 1e-4
    if top_p < 1:
        full, _ = on_policy_logps(sampler, model, prompt_list, top_p, truncate=False)
        kept_mass = truncated_is_weight(full, q, cap=float("inf"))
        assert kept_mass.max() <= 1 + 1e-4 and kept_mass.mean() < 0.99, kept_mass.mean()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_hf_importance_weight_on_policy_is_one_under_temperature(top_p):
    tok, model = tokenizer(), trained_tiny()
    assert_on_policy_weight_is_one(HFSampler(model, tok, batch_size=16), model, prompts(tok, 16, start=150), top_p)


def test_hf_eos_stop_strings_and_seeds():
    tok, model = tokenizer(), trained_tiny()
    hf = HFSampler(model, tok, batch_size=4)
    p = prompts(tok, 8, start=40)
    full = hf.generate(p, GREEDY)
    ended = [ss[0] for ss in full if ss[0].finish_reason == "stop"]
    assert ended and all(s.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in s.token_ids[:-1] for s in ended)
    assert all("<|" not in s.text for ss in full for s in ss)  # special tokens skipped
    stop = most_common_char(full)
    cut = hf.generate(p, replace(GREEDY, stop=[stop]))
    for a, b in zip(full, cut):
        a, b = a[0], b[0]
        if stop in a.text:  # ends at the token that completes the stop string; the text before it
            assert b.finish_reason == "stop" and b.text == a.text[: a.text.index(stop)]
            assert b.token_ids == a.token_ids[: len(b.token_ids)] and len(b.token_ids) < len(a.token_ids)
        else:
            assert b.token_ids == a.token_ids
    seeded = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=7)
    assert ids(hf.generate(p, seeded)) == ids(hf.generate(p, seeded))
    free = replace(seeded, seed=None)
    first, second = ids(hf.generate(p, free)), ids(hf.generate(p, free))
    assert first != second  # the stream moves on
    assert any(len({tuple(x) for x in per_prompt}) > 1 for per_prompt in first)  # the n samples differ


def most_common_char(samples) -> str:
    text = "".join(s.text for ss in samples for s in ss)
    return max(set(text), key=text.count)


def hf_two_ranks(rank, world, prompt_list):
    tok = tokenizer()
    model = tiny_model(distributed.device(), world)
    hf = HFSampler(model, tok, batch_size=2)
    mine = prompt_list if rank == 1 else []  # rank 0 has nothing to do but must keep stepping
    return {"greedy": ids(hf.generate(mine, GREEDY)),
            "sampled": ids(hf.generate(mine, SamplingParams(n=2, max_new_tokens=12))),
            "same_prompt": ids(hf.generate(prompt_list[:1], SamplingParams(n=4, max_new_tokens=12)))}


def test_hf_under_fsdp_two_ranks_with_uneven_prompts(tmp_path):
    p = prompts(tokenizer(), 5)
    out = forked(hf_two_ranks, 2, tmp_path, p)  # a hang fails after conftest's 2-minute timeout
    assert out[0]["greedy"] == out[0]["sampled"] == []
    reference = HFSampler(plain_tiny(), tokenizer(), batch_size=3).generate(p, GREEDY)
    assert out[1]["greedy"] == ids(reference)  # the sharded model generates what the whole one does
    assert [len(x) for x in out[1]["sampled"]] == [2] * 5
    assert out[0]["same_prompt"] != out[1]["same_prompt"]  # each rank samples with its own seed


def generate_args(ckpt, out, name, k=3, n_prompts=7, temperature=1.0):
    return ["--model", str(ckpt), "--dataset", "toy_add_prompts", "--k", str(k), "--n-prompts", str(n_prompts),
            "--out", str(out), "--sampler", name, "--max-new-tokens", "8", "--temperature", str(temperature)]


def check_generated(out: Path, k: int, n_prompts: int):
    from data import load_rows

    rows = load_rows("toy_add_prompts", "test", "prompt")[:n_prompts]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(n_prompts))  # none lost, none twice, in order
    assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
    assert all(r["answer"] == row["answer"] for r, row in zip(records, rows))
    for r in records:
        assert len(r["completions"]) == k
        for c in r["completions"]:
            assert 1 <= len(c["token_ids"]) == len(c["logprobs"]) <= 8 and c["finish_reason"] in ("stop", "length")
    return records


def run_generate_script(rank, world, argv):
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_generate_script_hf_two_ranks(tmp_path):
    ckpt, out = tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "samples.jsonl"
    forked(run_generate_script, 2, tmp_path, generate_args(ckpt, out, "hf"))
    check_generated(out, k=3, n_prompts=7)


def test_sampler_configs_compose_and_match_the_code(tmp_path, monkeypatch):
    for name, classes in (("vllm", [VLLMSampler]), ("hf", [HFSampler]), ("auto", [VLLMSampler, HFSampler])):
        cfg = make_cfg(f"run_dir={tmp_path}", sampler_override(name))
        assert cfg.sampler.name == name
        args = set().union(*(sampler.config_kwargs(c, cfg.sampler) for c in classes))
        assert set(cfg.sampler) - {"name"} == args, f"config/sampler/{name}.yaml keys that are no argument"
    assert cfg.sampler.seed == cfg.seed and cfg.sampler.max_model_len == cfg.max_length
    monkeypatch.setattr(sampler, "vllm_available", lambda: False)  # auto falls back to HF generate
    assert isinstance(build_sampler(cfg, plain_tiny(), tokenizer(), tmp_path), HFSampler)


def test_weight_groups_keep_each_decoder_layer_whole(single_process):
    model = plain_tiny()
    groups = [[name for name, _ in g] for g in weight_groups(model)]
    assert groups[0] == ["model.embed_tokens.weight"] and groups[-1] == ["model.norm.weight"]
    assert [len(g) for g in groups[1:-1]] == [9] * 4
    assert all({n.split(".")[2] for n in g} == {str(i)} for i, g in enumerate(groups[1:-1]))
    assert "lm_head.weight" not in sum(groups, [])  # tied: the engine ties it itself
    sharded = tiny_model(distributed.device(), 1)  # fully_shard renames the classes, not the parameters
    assert [[n for n, _ in g] for g in weight_groups(sharded)] == groups
    cfg = OmegaConf.load(TINY)
    cfg.init.tie_word_embeddings = False
    untied = models.load_model(cfg, torch.device("cpu"))
    assert [n for n, _ in weight_groups(untied)[-1]] == ["lm_head.weight"]


# --- vLLM (one engine for the tests below) ------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    vllm_or_skip()
    assert not dist.is_initialized()
    device = distributed.init()  # a world of one, which the engine joins
    tok = tokenizer()
    model = tiny_model(device, 1, trained_tiny_weights())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = sft_examples(tok, 256)
    run_dir = tmp_path_factory.mktemp("vllm")
    cfg = make_cfg(f"run_dir={run_dir}", sampler_override("vllm"), "max_length=128")
    rng, set_threads, env = torch.get_rng_state(), torch.set_num_threads, dict(os.environ)
    vllm = build_sampler(cfg, model, tok, run_dir)
    side_effects = {"rng": not torch.equal(rng, torch.get_rng_state()), "set_num_threads": torch.set_num_threads is not set_threads,
                    "env": sorted(k for k in set(os.environ) | set(env) if os.environ.get(k) != env.get(k)
                                  and not k.startswith("VLLM_"))}

    def restore():  # back to the trained weights, engine synced: tests that train undo it
        distributed.reshard(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.to_local().copy_(trained_tiny_weights()[name])  # a world of one: the shard is the whole
        vllm.sync_weights(model)

    yield SimpleNamespace(vllm=vllm, hf=HFSampler(model, tok, batch_size=8), model=model, optimizer=optimizer,
                          examples=examples, tok=tok, side_effects=side_effects, restore=restore)
    vllm.close()  # takes the process group down too
    distributed.close()
    for key in [k for k in os.environ if k.startswith("VLLM_") and k not in env]:
        del os.environ[key]


@pytest.fixture
def trained_engine(engine):
    """The engine, for a test that trains the model: the trained weights are restored after it."""
    yield engine
    engine.restore()


def test_vllm_build_leaves_the_trainer_process_alone(engine):
    assert engine.side_effects == {"rng": False, "set_num_threads": False, "env": []}
    assert isinstance(engine.vllm, VLLMSampler) and engine.vllm.sync_stats["buckets"] == 1


def test_vllm_greedy_equals_hf_through_optimizer_steps_and_syncs(trained_engine):
    engine = trained_engine
    p = prompts(engine.tok, 8, start=100)
    changed = 0
    for _ in range(3):
        v, h = engine.vllm.generate(p, GREEDY), engine.hf.generate(p, GREEDY)
        assert ids(v) == ids(h)
        assert [s[0].text for s in v] == [s[0].text for s in h]
        assert [s[0].finish_reason for s in v] == [s[0].finish_reason for s in h]
        sft_steps(engine.model, engine.optimizer, engine.examples, steps=2)
        assert ids(engine.vllm.generate(p, GREEDY)) == ids(v)  # the engine holds its own copy until a sync
        seconds = engine.vllm.sync_weights(engine.model)
        assert seconds > 0
        changed += ids(engine.vllm.generate(p, GREEDY)) != ids(v)
    assert changed >= 2, "syncs after optimizer steps should change the greedy samples"
    assert ids(engine.vllm.generate(p, GREEDY)) == ids(engine.hf.generate(p, GREEDY))


def test_vllm_logprobs_are_the_trainers(engine):
    p = prompts(engine.tok, 6, start=200)
    for params in (GREEDY, SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=24)):
        out = engine.vllm.generate(p, params)
        assert [len(ss) for ss in out] == [params.n] * len(p)
        assert max_logp_diff(recomputed_logps(engine.model, p, out, params), out) < 1e-4


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_vllm_importance_weight_on_policy_is_one_under_temperature(engine, top_p):
    assert_on_policy_weight_is_one(engine.vllm, engine.model, prompts(engine.tok, 16, start=150), top_p)


def test_vllm_seeded_sampling_of_many_long_prompts(engine):
    """More prompt tokens than vLLM's default step budget (4096): with chunked prefill, vLLM 0.32
    rewinds a seeded request's generator, which CPU generators cannot do ("CPU Generator does not
    use offset"); the sampler gives the engine a budget that holds every prompt whole."""
    long = [(p * 12)[:100] for p in prompts(engine.tok, 48, start=400)]  # 48 x 4 x 100 prefill tokens
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=4, seed=7)
    first, again = engine.vllm.generate(long, params), engine.vllm.generate(long, params)
    assert [len(s) for s in first] == [4] * len(long)
    assert ids(first) == ids(again)  # seeded: reproducible


def test_vllm_choice_logprobs_are_a_plain_forwards(engine):
    """A judge's next-token log-probs (scripts/label_preferences.py): vLLM's raw log-probs of the
    candidates equal the HF forward's, for prompts of different lengths."""
    p = prompts(engine.tok, 5, start=300)
    choices = engine.tok("AB", add_special_tokens=False)["input_ids"] + [engine.tok.eos_token_id]
    v, h = engine.vllm.choice_logprobs(p, choices), engine.hf.choice_logprobs(p, choices)
    assert len(v) == len(p) and all(len(row) == len(choices) for row in v)
    assert max(abs(a - b) for rv, rh in zip(v, h) for a, b in zip(rv, rh)) < 1e-4


def test_vllm_sync_in_small_buckets_loads_every_layer(trained_engine):
    """Each bucket is a separate partial reload: layers not in it must keep their weights."""
    engine = trained_engine
    groups = weight_groups(engine.model)
    engine.vllm.bucket_bytes = 1  # every group its own bucket
    try:
        sft_steps(engine.model, engine.optimizer, engine.examples, steps=2)
        engine.vllm.sync_weights(engine.model)
    finally:
        engine.vllm.bucket_bytes = int(512 * 2**20)
    stats = engine.vllm.sync_stats
    assert stats["buckets"] == len(groups) == 6
    assert stats["max_bucket_bytes"] == max(sum(p.numel() * p.element_size() for _, p in g) for g in groups)
    p = prompts(engine.tok, 8, start=300)
    assert ids(engine.vllm.generate(p, GREEDY)) == ids(engine.hf.generate(p, GREEDY))
    params = SamplingParams(n=2, max_new_tokens=16)
    out = engine.vllm.generate(p, params)
    assert max_logp_diff(recomputed_logps(engine.model, p, out, params), out) < 1e-4


def test_vllm_eos_and_stop_strings_match_hf(engine):
    p = prompts(engine.tok, 8, start=400)
    full = engine.vllm.generate(p, GREEDY)
    eos = engine.tok.eos_token_id
    assert any(s[0].finish_reason == "stop" and s[0].token_ids[-1] == eos for s in full)  # EOS kept in token_ids
    params = replace(GREEDY, stop=[most_common_char(full)])
    v, h = engine.vllm.generate(p, params), engine.hf.generate(p, params)
    assert [(s[0].token_ids, s[0].text, s[0].finish_reason) for s in v] == \
        [(s[0].token_ids, s[0].text, s[0].finish_reason) for s in h]
    assert sum(len(a[0].token_ids) < len(b[0].token_ids) for a, b in zip(v, full)) >= 1  # some stopped early


def test_vllm_text_is_the_tokenizers_decode(trained_engine):
    """A random model emits byte tokens that form no character; vLLM's own detokenizer drops
    them, the samplers both return ``tokenizer.decode`` (U+FFFD where bytes are invalid)."""
    engine = trained_engine
    distributed.reshard(engine.model)
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            p.to_local().copy_(plain_tiny().state_dict()[name])
    engine.vllm.sync_weights(engine.model)
    p = [prompt_ids(engine.tok, [{"role": "user", "content": c}]) for c in ("16+9=", "97+54=", "8+54=")]
    params = replace(GREEDY, max_new_tokens=64)
    v, h = engine.vllm.generate(p, params), engine.hf.generate(p, params)
    assert ids(v) == ids(h) and [s[0].text for s in v] == [s[0].text for s in h]
    assert any("\ufffd" in s[0].text for s in v)


def test_vllm_seeds_and_the_trainer_rng(engine):
    p = prompts(engine.tok, 4, start=450)
    seeded = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=11)
    rng = torch.get_rng_state()
    a = ids(engine.vllm.generate(p, seeded))
    assert a == ids(engine.vllm.generate(p, seeded))
    free = replace(seeded, seed=None)
    assert ids(engine.vllm.generate(p, free)) != ids(engine.vllm.generate(p, free))
    assert any(len({tuple(x) for x in per_prompt}) > 1 for per_prompt in a)  # the n samples of a prompt differ
    assert torch.equal(torch.get_rng_state(), rng), "sampling moved the trainer's RNG"


def test_vllm_two_ranks_fsdp_sync_seeds_and_uneven_prompts(tmp_path):
    vllm_or_skip()
    torch.save(trained_tiny_weights(), tmp_path / "weights.pt")
    vllm_subprocess([str(REPO / "tests" / "sampler_ranks.py"), str(tmp_path), str(tmp_path / "weights.pt")], tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["parity_before"] == r["parity_after"] == [True] * 4  # each rank's engine = the sharded model
        assert r["changed_by_sync"] >= 1 and r["logp_diff"] < 1e-4 and r["sync_seconds"] > 0
    assert (r0["engine_seed"], r1["engine_seed"]) == (0, 1) and r0["samples"] != r1["samples"]
    assert r0["uneven"] == [4, 3] and r1["uneven"] == [0, 0] and r0["uneven_hf_parity"] == [True] * 3


def test_generate_script_vllm_two_ranks(tmp_path):
    vllm_or_skip()
    ckpt, out = tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "samples.jsonl"
    vllm_subprocess([str(REPO / "scripts" / "generate.py"), *generate_args(ckpt, out, "vllm", temperature=0)], tmp_path)
    records = check_generated(out, k=3, n_prompts=7)
    log = (tmp_path / "torchrun.log").read_text()  # vLLM's own lines only with --debug (69 lines -> 10 here)
    assert "non-default args" not in log and "Initializing a V1 LLM engine" not in log and "set_num_threads" not in log
    # greedy: two vLLM ranks loading the checkpoint generate what HF generate does with it
    tok = tokenizer()
    reference = HFSampler(AutoModelForCausalLM.from_pretrained(ckpt), tok).generate(
        [prompt_ids(tok, r["prompt"]) for r in records], replace(GREEDY, n=3, max_new_tokens=8))
    assert [[c["token_ids"] for c in r["completions"]] for r in records] == ids(reference)
