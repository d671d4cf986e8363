"""The shipped multi-turn tasks (data/toy_env.py): their environments' rules, played out by hand
here, and what their warm starts and splits promise."""

import pytest

from data.toy_env import (Calculator, GuessNumber, calc_prompt_rows, calc_sft_rows, guess_budget, guess_games,
                          guess_prompt_rows, guess_sft_rows)


def test_the_calculator_answers_tool_calls_and_scores_the_final_answer():
    env = Calculator()
    env.reset("37*48=", answer="1776")
    step = env.step(" calc 37*48 ")
    assert (step.messages, step.done, step.info) == ([{"role": "tool", "content": "1776"}], False, {"tool_calls": 1})
    assert env.step("calc 37 times 48").messages == [{"role": "tool", "content": "error"}]
    step = env.step("1776")
    assert (step.reward, step.done, step.info) == (1.0, True, {"tool_calls": 2, "solved": 1.0})
    env.reset("37*48=", answer="1776")
    step = env.step("1777")
    assert (step.reward, step.done, step.info) == (0.0, True, {"tool_calls": 0, "solved": 0.0})


def test_the_calculator_warm_start_calls_the_tool_on_some_first_turns_and_copies_its_output():
    rows = calc_sft_rows("train")
    first = [r for r in rows if len(r["prompt"]) == 1]
    after_tool = [r for r in rows if len(r["prompt"]) == 3]
    calls = sum(r["response"].startswith("calc ") for r in first)
    assert 0.2 < calls / len(first) < 0.3
    assert all(r["response"] == r["prompt"][2]["content"] == str(eval(r["prompt"][0]["content"].rstrip("=")))
               for r in after_tool)
    test = {r["prompt"][0]["content"] for r in calc_prompt_rows("test")}
    assert test and not test & {r["prompt"][0]["content"] for r in first}


def play(env, row, guesser):
    """Plays one game; ``guesser(low, high)`` picks a guess within what the hints allow."""
    env.reset(row["prompt"], **{k: v for k, v in row.items() if k != "prompt"})
    low, high = row["low"], row["high"]
    for _ in range(10):
        guess = guesser(low, high)
        step = env.step(str(guess))
        if step.done:
            return step.reward
        assert step.messages[0]["content"] == ("higher" if guess < row["secret"] else "lower")
        low, high = (guess + 1, high) if guess < row["secret"] else (low, guess - 1)
    raise AssertionError("the game did not end")


@pytest.mark.parametrize("split", ["train", "test"])
def test_bisection_wins_every_guessing_game_within_its_budget_and_guessing_low_does_not(split):
    rows = guess_prompt_rows(split)
    assert [play(GuessNumber(), r, lambda lo, hi: (lo + hi) // 2) for r in rows] == [1.0] * len(rows)
    assert sum(play(GuessNumber(), r, lambda lo, hi: lo) for r in rows) < 0.6 * len(rows)


def test_a_guessing_game_ends_after_its_budget_and_any_reply_is_a_turn():
    env = GuessNumber()
    env.reset("guess 3-10", low=3, high=10, secret=7)
    assert guess_budget(3, 10) == 4
    # str.strip() takes the control character that int() refused (a reply seen in training), and
    # str.isdigit() holds for superscripts, which int() refuses too.
    assert env.step("1\x1f").messages == [{"role": "user", "content": "higher"}]
    for reply in ["seven", "\u00b2"]:
        assert env.step(reply).messages == [{"role": "user", "content": "say a number"}]
    step = env.step("8")
    assert (step.reward, step.done, step.info) == (0.0, True, {"solved": 0.0})
    env.reset("guess 3-10", low=3, high=10, secret=7)
    assert env.step(" 7\n").info == {"solved": 1.0}


def test_the_guessing_warm_start_guesses_within_the_hints_and_the_splits_are_disjoint():
    for row in guess_sft_rows("train")[:2000]:
        low, high = map(int, row["prompt"][0]["content"].split()[1].split("-"))
        for said, hint in zip(row["prompt"][1::2], row["prompt"][2::2]):
            guess = int(said["content"])
            low, high = (guess + 1, high) if hint["content"] == "higher" else (low, guess - 1)
        assert low <= int(row["response"]) <= high
    train, test = set(guess_games("train")), set(guess_games("test"))
    assert len(test) > 300 and not train & test
