"""The rules config values are checked by: each takes a value and says what would be allowed.

    integer(1)(0)          -> 'must be an integer >= 1'
    one_of("a", "b")("c")  -> "must be one of 'a', 'b'"
    integer(1)(3)          -> None (allowed)

`config_checks` applies them to every field; a method's file declares the rules of its own config
section with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections

Rule = Callable[[Any], str | None]
"""rule(value) -> None when the value is allowed, else what is allowed ('must be ...')."""


# --- Rules ------------------------------------------------------------------------------------

def integer(low: int | None = None, *, also: tuple = ()) -> Rule:
    """An int (not a bool) >= low; values in `also` (e.g. -1 for 'all') are allowed too."""

    def rule(value):
        if value in also and not isinstance(value, bool):
            return None
        too_low = low is not None and isinstance(value, int) and value < low
        if isinstance(value, bool) or not isinstance(value, int) or too_low:
            extra = "".join(f" or {a}" for a in also)
            return f"must be an integer >= {low}{extra}" if low is not None else "must be an integer"
        return None

    return rule


def number(low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Rule:
    """A finite real number in the interval [low, high] (ends open as flagged)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"must be a finite number in {left}{low}, {high}{right}"

    def rule(value):
        if value is None and optional:
            return None
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not real or not math.isfinite(value):
            return allowed + (" or None" if optional else "")
        if (value < low or (low_open and value == low) or value > high
                or (high_open and value == high)):
            return allowed + (" or None" if optional else "")
        return None

    return rule


def one_of(*names: Any) -> Rule:
    def rule(value):
        return None if value in names else "must be one of " + ", ".join(map(repr, names))

    return rule


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def text(optional: bool = False) -> Rule:
    def rule(value):
        if isinstance(value, str) or (optional and value is None):
            return None
        return "must be a string" + (" or None" if optional else "")

    return rule


def _regex_error(pattern: Any) -> str | None:
    if not isinstance(pattern, str):
        return f"{pattern!r} is not a string"
    try:
        re.compile(pattern)
    except re.error as error:
        return f"{pattern!r} is not a valid regular expression ({error})"
    return None


def regexes(value) -> str | None:
    """A tuple of regular expressions that compile."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        return "must be a tuple of regular expressions"
    errors = [e for e in map(_regex_error, value) if e]
    return "; ".join(errors) or None


def pattern_table(value_rule: Rule) -> Rule:
    """{regular expression: value} with every key compiling and every value allowed."""

    def rule(value):
        if not isinstance(value, (dict, ml_collections.ConfigDict)):
            return "must be a mapping of regular expression -> value"
        errors = []
        for pattern, item in dict(value).items():
            errors.append(_regex_error(pattern))
            problem = value_rule(item)
            errors.append(problem and f"[{pattern!r}] = {item!r}: {problem}")
        return "; ".join(e for e in errors if e) or None

    return rule


def output_parts(value) -> str | None:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, bool) for v in value):
        return "must be a tuple of True/False, one per part of the fused output"
    return None if any(value) else "must adapt at least one part (a True)"


def buckets(value) -> str | None:
    ok = (isinstance(value, (tuple, list)) and value
          and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value)
          and list(value) == sorted(set(value)))
    return None if ok else "must be a non-empty, strictly increasing tuple of integers >= 1"


def int_tuple(low: int) -> Rule:
    """A tuple of integers >= low."""

    def rule(value):
        ok = (isinstance(value, (tuple, list))
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value))
        return None if ok else f"must be a tuple of integers >= {low}"

    return rule
