"""Valid ranges of hyper-parameters, stated once so that checks and docs agree.

A constraint answers three questions: what value a given one stands for (``convert``: the Python
``float``/``int`` the head receives, raising ``TypeError`` for a value of the wrong type and
``ValueError`` for one outside the range, each with a short reason), whether a value satisfies it
(``check``), and how to say the valid range in an error message or a docs table (``describe``).

Numbers are real and finite: ``str`` (``"0.1"``), ``bool`` (``True`` would be a silent 1) and complex
values are refused by type; NaN always, and +-inf unless an :class:`Interval` opts in with
``allow_inf``. 0-d tensors, numpy scalars and numpy 0-d arrays of integer or float dtype count as
numbers and are handed on as Python numbers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


def _type_name(value: Any) -> str:
    return type(value).__name__


def real_number(value: Any, *, integral: bool = False) -> float | int:
    """``value`` as a Python ``float`` (``int`` when ``integral``).

    Raises ``TypeError`` (reason text) for ``str``, ``bool``, complex, multi-element, meta or
    grad-requiring tensors (a hyper-parameter is a constant: its gradient would be dropped silently),
    and ``ValueError`` when ``integral`` and the value is not finite or has a fractional part.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"is a {value.dtype} tensor of shape {tuple(value.shape)}; expected a real number")
        if value.requires_grad:
            raise TypeError("is a tensor that requires grad; expected a constant real number (a hyper-parameter "
                            "gets no gradient: pass a float, or .detach() it)")
        if value.device.type == "meta":
            raise TypeError("is a tensor on the meta device, which holds no value; expected a real number")
        value = value.item()
    elif not isinstance(value, numbers.Number) and hasattr(value, "dtype") and hasattr(value, "item"):
        # numpy 0-d arrays; numpy scalars are numbers.Number (np.bool_ is not, and is refused below)
        if getattr(value.dtype, "kind", "") not in ("i", "u", "f") or getattr(value, "size", 1) != 1:
            raise TypeError(f"has type {_type_name(value)} (dtype {value.dtype}); expected a real number")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"has type {_type_name(value)}; expected " + ("an integer" if integral else "a real number"))
    if not integral:
        return float(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError("is not finite")
    if not as_float.is_integer():
        raise ValueError("is not an integer")
    return int(as_float)


@dataclass(frozen=True)
class Interval:
    """A real interval; ``lo``/``hi`` may be infinite, each end open or closed.

    Values must be finite unless ``allow_inf`` (then an infinite end is part of the interval where it
    is closed). ``integral`` restricts to integers and hands the head an ``int``.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_closed: bool = True
    hi_closed: bool = True
    allow_none: bool = False
    allow_inf: bool = False
    integral: bool = False

    def convert(self, value: Any) -> Any:
        if value is None:
            if self.allow_none:
                return None
            raise TypeError("is None; expected " + ("an integer" if self.integral else "a real number"))
        number = real_number(value, integral=self.integral)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            raise ValueError("is not finite")
        lo_ok = number >= self.lo if self.lo_closed else number > self.lo
        hi_ok = number <= self.hi if self.hi_closed else number < self.hi
        if not (lo_ok and hi_ok):
            raise ValueError("is out of range")
        return number

    def check(self, value: Any) -> bool:
        return _accepts(self, value)

    def describe(self) -> str:
        lo = "-inf" if self.lo == -math.inf else f"{self.lo:g}"
        hi = "inf" if self.hi == math.inf else f"{self.hi:g}"
        left = "[" if self.lo_closed and (self.lo != -math.inf or self.allow_inf) else "("
        right = "]" if self.hi_closed and (self.hi != math.inf or self.allow_inf) else ")"
        text = ("an integer in " if self.integral else "") + f"{left}{lo}, {hi}{right}"
        return text + " or None" if self.allow_none else text


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (strings or booleans), compared with their type (``1`` is not ``True``)."""

    values: Sequence[Any]

    def convert(self, value: Any) -> Any:
        if any(value == v and type(value) is type(v) for v in self.values):
            return value
        types = {type(v) for v in self.values}
        if type(value) not in types:
            names = " or ".join(sorted(t.__name__ for t in types))
            raise TypeError(f"has type {_type_name(value)}; expected {names}")
        raise ValueError("is not one of the accepted values")

    def check(self, value: Any) -> bool:
        return _accepts(self, value)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class AnyValue:
    """No constraint (a free-form option such as a nested dict of keyword arguments)."""

    what: str = "any value"

    def convert(self, value: Any) -> Any:
        return value

    def check(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class FloatSequence:
    """``None`` or a sequence of finite real numbers (e.g. MODPO's ``w_rest``), handed on as a tuple of floats."""

    allow_none: bool = True

    def convert(self, value: Any) -> Any:
        if value is None:
            if self.allow_none:
                return None
            raise TypeError("is None; expected a sequence of finite floats")
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"has type {_type_name(value)}; expected a sequence of finite floats")
        if isinstance(value, Tensor) and value.dim() != 1:
            raise TypeError(f"is a tensor of shape {tuple(value.shape)}; expected a 1-D sequence of finite floats")
        out = tuple(real_number(v) for v in value)
        if not all(math.isfinite(v) for v in out):
            raise ValueError("has a non-finite entry")
        return out

    def check(self, value: Any) -> bool:
        return _accepts(self, value)

    def describe(self) -> str:
        return "a sequence of finite floats" + (" or None" if self.allow_none else "")


def _accepts(constraint: Any, value: Any) -> bool:
    try:
        constraint.convert(value)
    except (TypeError, ValueError):
        return False
    return True


POSITIVE = Interval(0.0, math.inf, lo_closed=False)
NONNEGATIVE = Interval(0.0, math.inf)
REAL = Interval()
UNIT = Interval(0.0, 1.0)
BOOL = OneOf((True, False))


def positive_int() -> Interval:
    """Integers ``>= 1``, handed on as ``int`` (``20.0`` is accepted as 20, ``20.5`` refused)."""
    return Interval(1, math.inf, integral=True)
