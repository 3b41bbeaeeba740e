"""The loss registry: one :class:`LossSpec` per key of LOSSES.md, looked up by name.

Heads register themselves with :func:`register`; :func:`names` and :func:`get` read the registry.
A spec carries everything the validation layer, the metrics and the docs table need: the formula as
written in LOSSES.md, the paper, the per-example inputs with their shapes, the hyper-parameters with
defaults and valid ranges.

Shapes are written with symbols: ``B`` (batch) and ``K`` (responses per prompt) come from the policy
scores; ``T`` (tokens), ``M``, ``N``, ``D``, ``G`` are bound on first use and must then agree.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from torch import Tensor

from .errors import UnknownLossError

Shape = tuple[Union[int, str], ...]

#: Order of the kinds in listings (matches the sections of LOSSES.md).
KINDS = (
    "reducer",
    "pairwise",
    "token_kl",
    "reference_free",
    "regularizer",
    "unpaired",
    "multi_response",
    "batch",
)

#: Kinds whose heads report the TRL pair metrics (rewards/*, logps/*).
PAIR_METRIC_KINDS = frozenset({"pairwise", "token_kl", "reference_free", "batch"})


@dataclass(frozen=True)
class LossInput:
    """A per-example input a loss needs beyond the policy/reference scores.

    ``shapes`` lists the accepted shapes (alternatives); ``dtype`` is ``"float"``, ``"bool"``,
    ``"int"`` or ``"object"`` (passed through unchecked, e.g. a ``torch.Generator``).
    ``differentiable`` marks float inputs that may carry gradients (e.g. a value prediction).
    """

    name: str
    shapes: tuple[Shape, ...]
    doc: str
    required: bool = True
    dtype: str = "float"
    differentiable: bool = False

    def shape_text(self) -> str:
        def one(shape: Shape) -> str:
            inner = ", ".join(str(s) for s in shape)
            return f"({inner},)" if len(shape) == 1 else f"({inner})"

        return " or ".join(one(s) for s in self.shapes) if self.shapes else "-"


class HeadResult(NamedTuple):
    """What a head function returns.

    ``per_example``: ``(B,)`` values; ``loss``: the scalar, or ``None`` for ``per_example.mean()``;
    ``rewards``: ``(chosen, rejected)`` implicit rewards for the pair metrics, or ``None`` for the
    default (``beta * (lp - rp)``, or ``beta * lp`` without a reference); ``logps``: ``(chosen,
    rejected)`` policy scores for ``logps/*``, or ``None`` for the given columns; ``metrics``: extra
    loss-specific metrics.
    """

    per_example: Tensor
    loss: Optional[Tensor] = None
    rewards: Optional[tuple[Tensor, Tensor]] = None
    logps: Optional[tuple[Tensor, Tensor]] = None
    metrics: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class LossSpec:
    """Registry metadata of one key.

    Attributes:
        key: registry name.
        section: section number in LOSSES.md.
        kind: one of :data:`KINDS`.
        paper: the paper (title, authors, year) the entry comes from.
        formula: the formula as written in LOSSES.md.
        inputs: per-example inputs beyond the scores (see :class:`LossInput`).
        defaults: hyper-parameters and their defaults.
        ranges: valid range of each hyper-parameter (see :mod:`pygpo.losses.constraints`).
        fn: the head (or reducer) function.
        aliases: other names that resolve to this key.
        reference: ``"required"``, ``"none"`` (reference-free) or ``"optional"``.
        scores: accepted shapes of ``policy_logps`` (and ``ref_logps``).
        gradcheck: whether finite differences must match autograd (``False`` where a stop-gradient
            acts on a policy-dependent term, so the two differ by design).
        stateful: the class that keeps the state across steps, if any.
        trl_name: the name TRL uses for this loss, if TRL has it.
        notes: readings of ambiguous points, stated once.
    """

    key: str
    section: int
    kind: str
    paper: str
    formula: str
    inputs: tuple[LossInput, ...]
    defaults: Mapping[str, Any]
    ranges: Mapping[str, Any]
    fn: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    reference: str = "required"
    scores: tuple[Shape, ...] = (("B", 2),)
    gradcheck: bool = True
    stateful: Optional[type] = None
    trl_name: Optional[str] = None
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs if i.required)

    def input(self, name: str) -> LossInput:
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(f"{self.key}: no input {name!r}; its inputs: {', '.join(i.name for i in self.inputs) or 'none'}")


_REGISTRY: dict[str, LossSpec] = {}
_ALIASES: dict[str, str] = {}
_ORDER: list[str] = []


def register(
    key: str,
    *,
    section: int,
    kind: str,
    paper: str,
    formula: str,
    inputs: Sequence[LossInput] = (),
    defaults: Optional[Mapping[str, Any]] = None,
    ranges: Optional[Mapping[str, Any]] = None,
    aliases: Sequence[str] = (),
    reference: str = "required",
    scores: Sequence[Shape] = (("B", 2),),
    gradcheck: bool = True,
    trl_name: Optional[str] = None,
    notes: str = "",
    extra: Optional[Mapping[str, Any]] = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a head or reducer function under ``key``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if reference not in ("required", "none", "optional"):
        raise ValueError(f"reference must be 'required', 'none' or 'optional', got {reference!r}")
    defaults = dict(defaults or {})
    ranges = dict(ranges or {})
    missing = set(defaults) - set(ranges)
    if missing:
        raise ValueError(f"{key}: hyper-parameters without a valid range: {sorted(missing)}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"loss key {key!r} registered twice")
        # checked before anything is registered: a refused head leaves no half-registered entry behind
        seen = {key}
        for alias in aliases:
            if alias in seen or alias in _REGISTRY or alias in _ALIASES:
                raise ValueError(f"{key}: alias {alias!r} registered twice")
            seen.add(alias)
        spec = LossSpec(
            key=key,
            section=section,
            kind=kind,
            paper=paper,
            formula=formula,
            inputs=tuple(inputs),
            defaults=defaults,
            ranges=ranges,
            fn=fn,
            aliases=tuple(aliases),
            reference=reference,
            scores=tuple(tuple(s) for s in scores),
            gradcheck=gradcheck,
            trl_name=trl_name,
            notes=notes,
            extra=dict(extra or {}),
        )
        _REGISTRY[key] = spec
        _ORDER.append(key)
        for alias in aliases:
            _ALIASES[alias] = key
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return deco


def attach_stateful(key: str, cls: type) -> None:
    """Record the class that keeps the state of ``key`` (set by :mod:`pygpo.losses.stateful`)."""
    spec = _REGISTRY[key]
    object.__setattr__(spec, "stateful", cls)


def _ensure_loaded() -> None:
    # Heads register on import of their modules; the package __init__ imports them all.
    from . import _all_heads  # noqa: F401


def names(kind: Optional[str] = None, *, include_aliases: bool = False) -> list[str]:
    """All registry keys in LOSSES.md order (sections 1-8), optionally of one ``kind``.

    ``kind`` is one of ``reducer, pairwise, token_kl, reference_free, regularizer, unpaired,
    multi_response, batch``. Reducers (section 1) are keys too; :func:`pygpo.losses.reduce` applies
    them, :func:`pygpo.losses.preference_loss` takes every other kind.
    """
    _ensure_loaded()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    keys = sorted(_ORDER, key=lambda k: (_REGISTRY[k].section, _ORDER.index(k)))
    if kind is not None:
        keys = [k for k in keys if _REGISTRY[k].kind == kind]
    if include_aliases:
        keys = keys + sorted(a for a, k in _ALIASES.items() if k in keys)
    return keys


def get(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name`` (a key or an alias).

    Raises :class:`~pygpo.losses.errors.UnknownLossError` listing the closest names.
    """
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"a loss name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name, name)
    spec = _REGISTRY.get(key)
    if spec is None:
        candidates = list(_REGISTRY) + list(_ALIASES)
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(name.lower(), candidates, n=5, cutoff=0.3)
        raise UnknownLossError(name, close)
    return spec
