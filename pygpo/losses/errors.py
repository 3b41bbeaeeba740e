"""Exceptions raised by the loss registry. All derive from ``ValueError``."""

from __future__ import annotations

from typing import Sequence


class PreferenceLossError(ValueError):
    """Base class of every error the registry raises on bad input."""


class UnknownLossError(PreferenceLossError, KeyError):
    """An unknown loss name; the message lists the closest registered names."""

    def __init__(self, name: str, close: Sequence[str]):
        self.name = name
        self.close = list(close)
        hint = ", ".join(repr(c) for c in self.close) if self.close else "none close"
        self.message = (
            f"unknown loss {name!r}; closest names: {hint} "
            "(pygpo.losses.names() lists every key)"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class MissingInputError(PreferenceLossError):
    """A required per-example input was not given."""


class UnexpectedArgumentError(PreferenceLossError, TypeError):
    """A keyword that is neither a hyper-parameter nor an input of the loss."""


class InputShapeError(PreferenceLossError):
    """Scores or inputs with shapes that do not match ``(B, K)`` and the spec."""


class HyperParameterError(PreferenceLossError):
    """A hyper-parameter outside its valid range."""


class HyperParameterTypeError(HyperParameterError, TypeError):
    """A hyper-parameter (or loss weight) of the wrong type: a ``str``, a ``bool`` for a number, ..."""


class NonFiniteError(PreferenceLossError):
    """A NaN or infinite score; the message names the first bad example."""


class InputValueError(PreferenceLossError):
    """An input value outside its domain (e.g. ODPO ratio scores <= 0)."""
