"""The health monitors (monitors.py): each driven over its threshold by crafted step records, its
warning said once with the step and the numbers, ``stop_on`` turning it into a stop; and through
a trainer, a stop with a checkpoint that a resumed run goes on from."""

import logging

import pytest
from omegaconf import OmegaConf

import checkpointing
import monitors
from conftest import REPO, make_cfg, run_ranks
from helpers import assert_same_run, metrics, rl_overrides, rl_run

DEFAULTS = OmegaConf.load(REPO / "config" / "config.yaml").monitors


def cfg(**changes):
    return OmegaConf.merge(DEFAULTS, changes)


def run(records, **changes):
    """Feed ``records`` (one per step, from 1) to fresh monitors; returns them and what stopped."""
    m, stops = monitors.Monitors(cfg(**changes)), []
    for step, record in enumerate(records, start=1):
        stops += m.check(dict(record), step)  # (check adds to the record: the cases stay as written)
    return m, stops


# each monitor: records that stay inside its threshold, then one that crosses it, and the warning
CASES = {
    "entropy_collapse": ([{"policy/entropy/train": 2.0}, {"policy/entropy/train": 0.5}], {"policy/entropy/train": 0.3},
                         "step 3: monitor entropy_collapse: policy entropy at 0.15 of its first value "
                         "(< monitors.entropy_collapse=0.2)"),
    "kl_growth": ([{"rollout/kl": 0.1 * k} for k in range(5)], {"rollout/kl": 3.0},
                  "step 6: monitor kl_growth: rollout/kl rose 0.6 per step over the last 5 steps, to 3 "
                  "(> monitors.kl_growth=0.5)"),
    "length_drift": ([{"rollout/response_length": 10.0}, {"rollout/response_length": 19.0}],
                     {"rollout/response_length": 4.0},
                     "step 3: monitor length_drift: mean response length 4 tokens, 0.4x its first value "
                     "(monitors.length_drift=2.0 either way)"),
    "clip_fraction": ([{"policy/clipfrac/train": 0.1}], {"policy/clipfrac/train": 0.45},
                      "step 2: monitor clip_fraction: policy/clipfrac 0.45 (> monitors.clip_fraction=0.3): "
                      "the updates leave the trust region"),
    "zero_advantage": ([{"rollout/zero_advantage_fraction": 0.5}],
                       {"rollout/zero_advantage_fraction": 0.0, "rollout/kept_fraction": 0.05},
                       "step 2: monitor zero_advantage: 0.95 of the samples have zero advantage "
                       "(> monitors.zero_advantage=0.9): their groups all scored the same, no signal"),
    "sampler_mismatch": ([{"rollout/logp_mismatch": 0.001}], {"rollout/logp_mismatch": 0.2},
                         "step 2: monitor sampler_mismatch: sampler and trainer log-probs differ by 0.2 per token "
                         "(> monitors.sampler_mismatch=0.05)"),
    "reward_vs_verifier": ([{"rollout/score_mean": 0.3}, {"eval/task_accuracy": 0.6}, {"rollout/score_mean": 0.5}],
                           {"eval/task_accuracy": 0.5},
                           "step 4: monitor reward_vs_verifier: eval/task_accuracy fell 0.6 -> 0.5 while the mean "
                           "sampled reward rose +0.2: reward hacking? (monitors.reward_vs_verifier=0.05)"),
}


def test_every_monitor_has_a_case():
    assert set(CASES) == set(monitors.NAMES)


@pytest.mark.parametrize("name", monitors.NAMES)
def test_a_monitor_warns_once_when_it_crosses(name, caplog):
    inside, crossing, warning = CASES[name]
    with caplog.at_level(logging.WARNING, logger="train"):
        m, stops = run(inside)
        assert not caplog.messages and not stops  # inside the threshold: nothing
        record = dict(crossing)
        assert m.check(record, len(inside) + 1) == []
        assert f"monitor/{name}" in record  # the monitor's value is logged with the step
        m.check(dict(crossing), len(inside) + 2)  # crossing again: no second warning
    assert caplog.messages == [warning]


@pytest.mark.parametrize("name", monitors.NAMES)
def test_stop_on_turns_the_warning_into_a_stop(name, caplog):
    inside, crossing, warning = CASES[name]
    with caplog.at_level(logging.WARNING, logger="train"):
        _, stops = run([*inside, crossing], stop_on=[name])
    assert stops == [warning] and not caplog.messages


def test_off_means_no_metric_and_no_warning(caplog):
    inside, crossing, _ = CASES["clip_fraction"]
    with caplog.at_level(logging.WARNING, logger="train"):
        m, stops = run(inside, enabled=False)
        record = dict(crossing)
        assert m.check(record, 2) == [] and "monitor/clip_fraction" not in record
    assert not caplog.messages


def test_the_state_resumes_the_monitors_where_they_were():
    """A resumed run's monitors continue from the checkpoint's (first values, KL window, warned)."""
    records = [{"rollout/kl": 0.1 * k, "policy/entropy/train": 2.0 - 0.1 * k} for k in range(8)]
    whole, _ = run(records)
    half, _ = run(records[:4])
    resumed = monitors.Monitors(cfg())
    resumed.restore(OmegaConf.to_container(OmegaConf.create(half.state())))  # as a checkpoint stores it
    for step, record in enumerate(records[4:], start=5):
        resumed.check(record, step)
    assert resumed.state() == whole.state()


def test_an_unknown_monitor_in_stop_on_is_refused():
    with pytest.raises(ValueError, match=r"^monitors\.stop_on=\['kl_grow'\]: kl_grow is not a monitor; they are "):
        monitors.check_config(cfg(stop_on=["kl_grow"]))


def stopped_run(rank, world, overrides):
    """rl_run's exit code (None: it ended) and what rank 0 logged at WARNING and above."""
    lines, handler = [], logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("train").addHandler(handler)
    try:
        rl_run(rank, world, overrides)
    except SystemExit as exc:
        return exc.code, lines
    return None, lines


def test_a_run_stops_with_a_checkpoint_and_resumes_from_it(tmp_path, caplog):
    """The fixed completions' made-up sampler log-probs differ from the policy's: with
    sampler_mismatch in stop_on and a threshold below that, the run stops after its first
    iteration with exit code 3 and a checkpoint; resumed without the stop, it ends as a run that
    only warned."""
    run_dir, whole = tmp_path / "stopped", tmp_path / "whole"
    stop = ["monitors.sampler_mismatch=0.01"]
    stopped = run_ranks(stopped_run, 2, tmp_path, rl_overrides(run_dir, "grpo", *stop, "monitors.stop_on=[sampler_mismatch]"))
    assert [code for code, _ in stopped] == [3, 3]  # every rank stops, at the same step
    assert [p.name for p in checkpointing.complete(run_dir)] == ["step-1"]
    said = [[line for line in lines if "monitor" in line] for _, lines in stopped]
    assert len(said[0]) == 1 and not said[1]  # once, rank 0 alone
    line = said[0][0]
    assert line.startswith("step 1: monitor sampler_mismatch: sampler and trainer log-probs differ by ")
    assert line.endswith(f"(> monitors.sampler_mismatch=0.01): stopped (monitors.stop_on); checkpoint "
                         f"{run_dir / 'step-1'}; resume=true goes on from it")
    resumed = run_ranks(stopped_run, 2, tmp_path, rl_overrides(run_dir, "grpo", *stop, "resume=true"))
    warned = run_ranks(stopped_run, 2, tmp_path, rl_overrides(whole, "grpo", *stop))
    assert [code for code, _ in resumed + warned] == [None] * 4
    warnings = [line for line in warned[0][1] if "monitor" in line]  # without stop_on: one warning, it goes on
    assert len(warnings) == 1 and warnings[0].startswith("step 1: monitor sampler_mismatch: ")
    strip = [[{k: v for k, v in r.items() if not k.startswith(("timing/", "samples_per_s"))} for r in metrics(d)]
             for d in (run_dir, whole)]
    assert_same_run(*strip)
    assert all("monitor/sampler_mismatch" in r for r in metrics(whole) if "rollout/score_mean" in r)
    assert make_cfg().monitors.stop_on == []  # off by default: the monitors only warn
