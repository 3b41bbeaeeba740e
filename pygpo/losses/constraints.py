"""Valid ranges of hyper-parameters, stated once so that checks and docs agree.

A constraint answers two questions: does a value satisfy it (``check``), and how to say the valid
range in an error message or a docs table (``describe``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Interval:
    """A real interval; ``lo``/``hi`` may be infinite, each end open or closed."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_closed: bool = True
    hi_closed: bool = True
    allow_none: bool = False

    def check(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # 0-d tensors, numpy scalars
            except (TypeError, ValueError):
                return False
        value = float(value)
        if math.isnan(value):
            return False
        lo_ok = value >= self.lo if self.lo_closed else value > self.lo
        hi_ok = value <= self.hi if self.hi_closed else value < self.hi
        return lo_ok and hi_ok

    def describe(self) -> str:
        lo = "-inf" if self.lo == -math.inf else f"{self.lo:g}"
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        left = "[" if self.lo_closed and self.lo != -math.inf else "("
        right = "]" if self.hi_closed and self.hi != math.inf else ")"
        text = f"{left}{lo}, {hi}{right}"
        return text + " or None" if self.allow_none else text


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (strings or booleans)."""

    values: Sequence[Any]

    def check(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class AnyValue:
    """No constraint (a free-form option such as a nested dict of keyword arguments)."""

    what: str = "any value"

    def check(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class FloatSequence:
    """``None`` or a sequence of finite floats (e.g. MODPO's ``w_rest``)."""

    allow_none: bool = True

    def check(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        try:
            return all(math.isfinite(float(v)) for v in value)
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return "a sequence of finite floats" + (" or None" if self.allow_none else "")


POSITIVE = Interval(0.0, math.inf, lo_closed=False)
NONNEGATIVE = Interval(0.0, math.inf)
REAL = Interval()
UNIT = Interval(0.0, 1.0)
BOOL = OneOf((True, False))


def positive_int() -> Interval:
    return Interval(1, math.inf)
