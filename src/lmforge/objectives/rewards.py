"""Reward functions for reinforcement learning on checkable answers (GRPO).

A reward function scores a batch of completions. lmforge calls it with keyword arguments and
passes only those its signature names (or all of them if it takes ``**kwargs``)::

    prompts: list[str]             the prompt each completion answers
    completions: list[str]         the generated text (prompt not included)
    answers: list[str]             the reference answer of each prompt
    completion_lengths: list[int]  completion lengths in tokens

and expects one finite number per completion back. Built-in functions:

- ``exact_match``: 1 if the completion's final answer equals the reference numerically, else 0.
  The final answer is the content of the last ``\\boxed{...}``, else what follows the last
  ``####``, else the last number in the text (``$`` signs and thousands commas ignored, so
  ``$1,200.00`` equals ``1200``).
- ``format``: 1 if the completion matches a regular expression (by default: it states a final
  answer as ``#### <number>`` or ``\\boxed{...}``), else 0.
- ``length_penalty``: 0 up to a soft limit, then falling linearly to -1 at the maximum length
  (DAPO's "soft overlong punishment"), so rambling is discouraged before it is cut off.

User functions are named ``module:function`` (the module must be importable, e.g. a file on the
Python path). Several functions combine as a weighted sum (:class:`RewardSet`); each one's
rewards are kept for logging.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import torch

from lmforge.errors import ConfigError

__all__ = [
    "REWARD_ARGS",
    "extract_answer",
    "parse_number",
    "answers_match",
    "exact_match",
    "format_reward",
    "length_penalty",
    "BUILTIN_REWARDS",
    "load_reward_function",
    "RewardFunction",
    "RewardSet",
    "build_rewards",
]

REWARD_ARGS = ("prompts", "completions", "answers", "completion_lengths")

# --------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------

# A number: an optional minus sign that is not a hyphen inside a word or expression ("10-5" is
# 10 and 5), digits with optional thousands groups ("1,234,567") and an optional decimal part.
# Digits glued to a preceding digit or dot are never the start of a new number.
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?<![\d.])\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text.replace("$", ""))


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, out = 1, []
    while i < len(text):
        ch = text[i]
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return "".join(out).strip()
        out.append(ch)
        i += 1
    return None  # unclosed: no answer


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, as a string; None if it states none.

    In order: the content of the last ``\\boxed{...}``; the rest of the line after the last
    ``####``; the last number anywhere. A boxed or ``####`` answer that contains a number gives
    that (first) number.
    """
    region = _last_boxed(text)
    if region is None and "####" in text:
        region = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    if region is not None:
        found = _numbers(region)
        return found[0] if found else (region or None)
    found = _numbers(text)
    return found[-1] if found else None


def parse_number(text: str) -> Decimal | None:
    """The first number in ``text`` as an exact Decimal (``"$1,200.50"`` -> 1200.50), or None."""
    found = _numbers(text)
    if not found:
        return None
    return Decimal(found[0].replace(",", ""))  # the pattern only matches valid numbers


def answers_match(predicted: str | None, reference: str) -> bool:
    """Numeric equality when both parse as numbers (``"3.50"`` == ``"3.5"``), else equal text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted.strip().lower() == reference.strip().lower()


# --------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------

def exact_match(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the completion's final answer equals the reference answer, else 0.0."""
    refs = [extract_answer(a) or a for a in answers]  # "#### 72" references work too
    return [float(answers_match(extract_answer(c), r)) for c, r in zip(completions, refs)]


FINAL_ANSWER_PATTERN = r"####\s*-?\$?\d[\d,]*(?:\.\d+)?|\\boxed\{[^{}]*\}"


def format_reward(completions: Sequence[str], pattern: str = FINAL_ANSWER_PATTERN,
                  full: bool = False) -> list[float]:
    """1.0 where ``pattern`` is found in the completion (``full``: matches the whole stripped
    completion), else 0.0."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"rewards.format.pattern: {pattern!r} is not a regular expression ({e})")
    match = rx.fullmatch if full else rx.search
    return [float(match(c.strip() if full else c) is not None) for c in completions]


def length_penalty(completion_lengths: Sequence[int], max_length: int,
                   soft_length: int | None = None) -> list[float]:
    """0 up to ``soft_length`` tokens, then linear down to -1 at ``max_length`` (and below beyond).

    ``soft_length`` defaults to 80% of ``max_length``.
    """
    soft = int(0.8 * max_length) if soft_length is None else soft_length
    if not 0 <= soft < max_length:
        raise ConfigError(f"rewards.length_penalty: need 0 <= soft_length < max_length, got "
                          f"soft_length={soft}, max_length={max_length}")
    return [-max(0, n - soft) / (max_length - soft) for n in completion_lengths]


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match,
    "format": format_reward,
    "length_penalty": length_penalty,
}


# --------------------------------------------------------------------------------------------
# User functions and combinations
# --------------------------------------------------------------------------------------------

def load_reward_function(path: str) -> Callable[..., Sequence[float]]:
    """Import ``module:function`` and return the function; one clear error if that fails."""
    if not isinstance(path, str) or path.count(":") != 1 or not all(path.split(":")):
        raise ConfigError(f"rewards: {path!r} is neither a built-in reward "
                          f"({', '.join(BUILTIN_REWARDS)}) nor a 'module:function' path")
    module_name, func_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while importing
        raise ConfigError(f"rewards: cannot import module {module_name!r} for reward function "
                          f"{path!r} ({type(e).__name__}: {e})") from None
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"rewards: module {module_name!r} has no attribute {func_name!r} "
                          f"(reward function {path!r})")
    if not callable(func):
        raise ConfigError(f"rewards: {path!r} is a {type(func).__name__}, not a function")
    return func


def _accepted_args(func: Callable, name: str, options: dict) -> tuple[str, ...]:
    """The reward arguments ``func`` takes; an error if it requires one lmforge does not pass."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return REWARD_ARGS
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return REWARD_ARGS
    for p in params.values():
        required = p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if required and p.name not in REWARD_ARGS and p.name not in options:
            raise ConfigError(f"rewards: {name} requires argument {p.name!r}, which is not given; "
                              f"reward functions receive {', '.join(REWARD_ARGS)} (plus options)")
    unknown = [k for k in options if k not in params]
    if unknown:
        raise ConfigError(f"rewards: {name} has no option {unknown[0]!r}; its parameters are "
                          f"{', '.join(params)}")
    return tuple(a for a in REWARD_ARGS if a in params)


@dataclass
class RewardFunction:
    """One reward function with its weight and fixed options, called with checked output."""

    name: str
    func: Callable[..., Sequence[float]]
    weight: float = 1.0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ConfigError(f"rewards: {self.name}: weight must be a finite number, got "
                              f"{self.weight!r}")
        self.args = _accepted_args(self.func, self.name, self.options)

    def __call__(self, **batch) -> torch.Tensor:
        n = len(batch["completions"])
        out = self.func(**{a: batch[a] for a in self.args}, **self.options)
        if hasattr(out, "ndim") and out.ndim != 1:  # a tensor or array of the wrong rank
            raise ConfigError(f"rewards: {self.name} returned an array of shape {tuple(out.shape)}; "
                              f"expected shape ({n},), one number per completion")
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
            raise ConfigError(f"rewards: {self.name} returned {type(out).__name__}; expected a list "
                              f"of {n} numbers, one per completion")
        values = out.tolist() if hasattr(out, "tolist") else list(out)
        if len(values) != n:
            raise ConfigError(f"rewards: {self.name} returned {len(values)} values for {n} "
                              f"completions; expected one number per completion")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ConfigError(f"rewards: {self.name} returned {v!r}; expected finite numbers "
                                  f"(one per completion)")
        return torch.tensor(values, dtype=torch.float32)  # (N,)


class RewardSet:
    """Several reward functions, combined as a weighted sum."""

    def __init__(self, functions: Sequence[RewardFunction]):
        if not functions:
            raise ConfigError("rewards: no reward function given; expected at least one")
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards: each reward function may appear once, got {names}")
        self.functions = list(functions)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
                 completion_lengths: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total (N,), {name: rewards (N,)})`` with ``total = sum_i weight_i * rewards_i``."""
        if completion_lengths is None:
            completion_lengths = [len(c) for c in completions]
        batch = dict(prompts=list(prompts), completions=list(completions), answers=list(answers),
                     completion_lengths=list(completion_lengths))
        lengths = {k: len(v) for k, v in batch.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"rewards: batch lists differ in length: {lengths}")
        per = {f.name: f(**batch) for f in self.functions}
        total = sum(f.weight * per[f.name] for f in self.functions)
        return total, per


def build_rewards(specs: Sequence[str | dict]) -> RewardSet:
    """A :class:`RewardSet` from config entries.

    Each entry is a name (``"exact_match"``, ``"my_module:my_reward"``) or a dict
    ``{"name": ..., "weight": 1.0, **options}``; options are passed to the function.
    """
    if isinstance(specs, (str, dict)):
        specs = [specs]
    functions = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"rewards[{i}]: expected a name or a mapping with a 'name', got {spec!r}")
        options = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        name = spec["name"]
        func = BUILTIN_REWARDS.get(name) or load_reward_function(name)
        functions.append(RewardFunction(name, func, spec.get("weight", 1.0), options))
    return RewardSet(functions)
