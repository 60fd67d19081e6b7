"""Reward functions: answer extraction on tricky strings, built-ins, user functions, weighting."""

from __future__ import annotations

import sys
from decimal import Decimal

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.objectives.rewards import (
    RewardFunction, answers_match, build_rewards, exact_match, extract_answer, format_reward,
    length_penalty, load_reward_function, parse_number,
)


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("5 apples plus 7 apples make 12 apples", "12"),          # several numbers: the last
    ("It costs $1,234.50 in total", "1,234.50"),              # $ sign, thousands comma, decimals
    ("She owes -17 dollars", "-17"),                          # a negative number
    ("10-5=5", "5"),                                          # a hyphen is not a minus sign
    ("10 - 5 = -5, wait no: 5", "5"),
    ("x=-3", "-3"),
    ("Numbers: 1, 2, 3", "3"),                                # commas between numbers
    ("3,45", "45"),                                           # not a thousands group
    ("version 1.2.3", "1.2"),
    ("The result is 7.", "7"),                                # a full stop is not a decimal point
    ("No number here", None),
    ("", None),
    ("So #### 72\nand then 5 more", "72"),                    # #### answer beats the last number
    ("#### $1,000", "1,000"),
    ("#### -0.5", "-0.5"),
    ("first \\boxed{3} then \\boxed{\\frac{1}{2} = 0.5}", "1"),  # last box, first number in it
    ("\\boxed{12} #### 13", "12"),                            # boxed beats ####
    ("\\boxed{yes}", "yes"),                                  # no number: the box content
    ("\\boxed{4", "4"),                                       # unclosed box: fall back to last number
    ("#### ", None),
])
def test_extract_answer_tricky(text, expected):
    assert extract_answer(text) == expected


def test_parse_number_and_matching():
    assert parse_number("$1,200.50") == Decimal("1200.50")
    assert parse_number("-3") == Decimal(-3) and parse_number("none") is None
    assert answers_match("3.50", "3.5") and answers_match("1,000", "1000")
    assert answers_match("12.0", "12") and not answers_match("12.01", "12")
    assert answers_match("-4", "-4") and not answers_match("4", "-4")
    assert answers_match("Yes", "yes") and not answers_match(None, "1")


def test_exact_match_reward():
    completions = [" 85", "I think 8 + 5 = 13, so 85", "#### 1,200", "no idea", "-7", "\\boxed{0.50}"]
    answers = ["85", "85", "1200", "3", "7", "#### 0.5"]
    assert exact_match(completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_format_reward():
    c = ["so #### 5", "\\boxed{5}", "5", "####"]
    assert format_reward(c) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(["  42 ", "42 apples"], pattern=r"-?\d+", full=True) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="not a regular expression"):
        format_reward(c, pattern="(")


def test_length_penalty():
    assert length_penalty([0, 80, 90, 100, 120], max_length=100) == pytest.approx(
        [0.0, 0.0, -0.5, -1.0, -2.0])
    assert length_penalty([5], max_length=10, soft_length=0) == [-0.5]
    with pytest.raises(ConfigError, match="soft_length < max_length"):
        length_penalty([1], max_length=10, soft_length=10)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def short(completions):\n    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n"
        "def everything(**kw):\n    return torch.full((len(kw['completions']),), 0.5)\n"
        "def needs_secret(completions, secret):\n    return [0.0] * len(completions)\n"
        "def with_option(completions, bonus=0.0):\n    return [bonus] * len(completions)\n"
        "def too_few(completions):\n    return [1.0]\n"
        "def not_a_list(completions):\n    return 1.0\n"
        "def a_string(completions):\n    return 'yes'\n"
        "def matrix(completions):\n    return torch.zeros(len(completions), 2)\n"
        "def nan(completions):\n    return [float('nan')] * len(completions)\n"
        "NOT_CALLABLE = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for m in ("my_rewards", "broken_rewards"):
        sys.modules.pop(m, None)


def test_weighted_combination_with_user_functions(user_module):
    rewards = build_rewards(["exact_match", {"name": "my_rewards:short", "weight": 0.5},
                             {"name": "my_rewards:everything", "weight": -2.0},
                             {"name": "length_penalty", "weight": 1.0, "max_length": 10},
                             {"name": "my_rewards:with_option", "bonus": 3.0}])
    total, per = rewards(["p1", "p2"], ["12", "about 13"], ["12", "12"], completion_lengths=[4, 9])
    assert per["exact_match"].tolist() == [1.0, 0.0]
    assert per["my_rewards:short"].tolist() == [1.0, 0.0]
    assert per["my_rewards:everything"].tolist() == [0.5, 0.5]
    assert per["length_penalty"].tolist() == pytest.approx([0.0, -0.5])
    assert per["my_rewards:with_option"].tolist() == [3.0, 3.0]
    expect = [1 + 0.5 - 1 + 0 + 3, 0 + 0 - 1 - 0.5 + 3]
    assert total.tolist() == pytest.approx(expect)
    assert isinstance(total, torch.Tensor) and total.shape == (2,)


@pytest.mark.parametrize("path,message", [
    ("no_colon", "neither a built-in reward"),
    ("a:b:c", "neither a built-in reward"),
    ("surely_not_a_module_xyz:f", "cannot import module 'surely_not_a_module_xyz'"),
    ("broken_rewards:f", "ModuleNotFoundError"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:NOT_CALLABLE", "not a function"),
])
def test_loading_errors(user_module, path, message):
    with pytest.raises(ConfigError, match=message):
        load_reward_function(path)


@pytest.mark.parametrize("name,message", [
    ("too_few", "returned 1 values for 2 completions"),
    ("not_a_list", "returned float"),
    ("a_string", "returned str"),
    ("matrix", r"shape \(2, 2\); expected shape \(2,\)"),
    ("nan", "expected finite numbers"),
])
def test_wrong_shapes_are_clear_errors(user_module, name, message):
    rewards = build_rewards([f"my_rewards:{name}"])
    with pytest.raises(ConfigError, match=message):
        rewards(["p", "q"], ["a", "b"], ["1", "2"])


def test_signature_and_config_errors(user_module):
    with pytest.raises(ConfigError, match="requires argument 'secret'"):
        build_rewards(["my_rewards:needs_secret"])
    with pytest.raises(ConfigError, match="has no option 'bogus'"):
        build_rewards([{"name": "exact_match", "bogus": 1}])
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        build_rewards([{"name": "exact_match", "weight": "high"}])
    with pytest.raises(ConfigError, match="at least one"):
        build_rewards([])
    with pytest.raises(ConfigError, match="may appear once"):
        build_rewards(["exact_match", "exact_match"])
    with pytest.raises(ConfigError, match="expected a name or a mapping"):
        build_rewards([3])
    fn = RewardFunction("f", lambda completions, answers: [1.0] * len(completions))
    assert fn.args == ("completions", "answers")
