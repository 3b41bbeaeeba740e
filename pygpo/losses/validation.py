"""Input checks run before any loss is computed.

Order: keyword routing (hyper-parameter vs input, unknown keywords), hyper-parameter types and
ranges (each handed to the head as the Python number it stands for), required inputs, shapes
(``B``/``K`` from the policy scores, other symbols bound on first use), devices (every tensor on
``policy_logps``' device; a 0-d CPU tensor is moved there, as torch treats CPU scalars), dtypes (the
scores set the compute dtype: fp64 if policy or reference scores are fp64, else fp32, so bf16/fp16
are upcast; float inputs follow it), domain checks, and finally finiteness of every float
tensor, naming the first bad example (``check_finite=False`` skips it and its host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from .errors import (
    HyperParameterError,
    HyperParameterTypeError,
    InputShapeError,
    InputValueError,
    MissingInputError,
    NonFiniteError,
    UnexpectedArgumentError,
)
from .registry import LossInput, LossSpec, Shape

#: Keyword names every loss accepts besides its own (handled by the API layer).
COMMON_KEYWORDS = frozenset({"lengths"})


@dataclass
class Prepared:
    """Validated, upcast tensors and resolved hyper-parameters of one call."""

    policy: Tensor
    ref: Optional[Tensor]
    inputs: dict[str, Any]
    hparams: dict[str, Any]
    dtype: torch.dtype


def split_kwargs(spec: LossSpec, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route keywords to hyper-parameters and inputs; reject unknown ones."""
    hparams: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    names = spec.input_names
    for k, v in kwargs.items():
        if k in spec.defaults:
            hparams[k] = v
        elif k in names:
            inputs[k] = v
        else:
            valid = sorted(set(spec.defaults) | set(names))
            raise UnexpectedArgumentError(
                f"{spec.key}: unexpected keyword {k!r}; hyper-parameters and inputs of this loss: "
                f"{', '.join(valid) if valid else '(none)'}"
            )
    return hparams, inputs


def convert_value(constraint: Any, value: Any, what: str) -> Any:
    """``value`` converted by ``constraint`` (:mod:`pygpo.losses.constraints`); ``what`` names it in
    errors (``"dpo: hyper-parameter beta"``), which also state the valid range.

    Raises :class:`HyperParameterTypeError` for a value of the wrong type, :class:`HyperParameterError`
    for one outside the range (NaN and +-inf included).
    """
    try:
        return constraint.convert(value)
    except TypeError as exc:
        raise HyperParameterTypeError(f"{what}={value!r} {exc}; valid range: {constraint.describe()}") from None
    except ValueError as exc:
        raise HyperParameterError(f"{what}={value!r} {exc}; valid range: {constraint.describe()}") from None


def resolve_hparams(spec: LossSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``given``; every value checked against its range and converted (a 0-d
    tensor or numpy scalar becomes a Python ``float``, or ``int`` for an integral range)."""
    out = dict(spec.defaults)
    out.update(given)
    return {name: convert_value(spec.ranges[name], value, f"{spec.key}: hyper-parameter {name}")
            for name, value in out.items()}


def _shape_str(shape: Shape | torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _match(shape: torch.Size, pattern: Shape, bound: dict[str, int]) -> Optional[dict[str, int]]:
    if len(shape) != len(pattern):
        return None
    trial = dict(bound)
    for actual, want in zip(shape, pattern):
        if isinstance(want, int):
            if actual != want:
                return None
        elif want in trial:
            if trial[want] != actual:
                return None
        else:
            trial[want] = int(actual)
    return trial


def _bind(what: str, key: str, shape: torch.Size, patterns: tuple[Shape, ...], bound: dict[str, int]) -> None:
    for pattern in patterns:
        trial = _match(shape, pattern, bound)
        if trial is not None:
            bound.update(trial)
            return
    want = " or ".join(_shape_str(p) for p in patterns)
    known = ", ".join(f"{k}={v}" for k, v in bound.items())
    raise InputShapeError(
        f"{key}: {what} has shape {_shape_str(shape)}, expected {want}" + (f" with {known}" if known else "")
    )


def _compute_dtype(tensors: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_tensor(spec: LossSpec, name: str, value: Any, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputShapeError(f"{spec.key}: input {name!r} must be a tensor, got {type(value).__name__}") from exc


def _convert(spec: LossSpec, item: LossInput, value: Tensor, dtype: torch.dtype) -> Tensor:
    if item.dtype == "float":
        if value.is_complex():
            raise InputShapeError(f"{spec.key}: input {item.name!r} must be a float tensor, got {value.dtype}")
        return value.to(dtype)
    if item.dtype == "bool":
        if value.dtype == torch.bool:
            return value
        if bool(((value != 0) & (value != 1)).any()):
            raise InputValueError(f"{spec.key}: input {item.name!r} must be boolean (0/1)")
        return value != 0
    if item.dtype == "int":
        if value.is_floating_point() or value.dtype == torch.bool:
            raise InputShapeError(f"{spec.key}: input {item.name!r} must be an integer tensor, got {value.dtype}")
        return value.long()
    return value


def check_finite(spec: LossSpec, named: list[tuple[str, Tensor, Optional[Tensor]]]) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite example of the first bad tensor.

    ``named`` holds ``(name, tensor, valid_mask)``; positions outside ``valid_mask`` are ignored.
    One host sync for the common (all finite) case.
    """
    flags = []
    for _, t, mask in named:
        ok = torch.isfinite(t)
        if mask is not None:
            ok = ok | ~mask
        flags.append(ok.all())
    if bool(torch.stack(flags).all()):
        return
    for name, t, mask in named:
        bad = ~torch.isfinite(t)
        if mask is not None:
            bad = bad & mask
        if bool(bad.any()):
            if t.dim() == 0:
                raise NonFiniteError(f"{spec.key}: {name} is not finite ({float(t)})")
            rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
            i = int(rows[0])
            raise NonFiniteError(
                f"{spec.key}: non-finite value in {name} at example {i} "
                f"({rows.numel()} bad example(s)); pass check_finite=False to skip this check"
            )


def _on_policy_device(
    spec: LossSpec, policy: Tensor, ref: Optional[Tensor], tensors: dict[str, Any]
) -> tuple[dict[str, Any], Optional[Tensor]]:
    """Refuse a tensor on another device than ``policy_logps``, naming it and both devices.

    A 0-d CPU tensor (a scalar such as KTO's ``z0``) is moved to the policy's device instead, as torch
    accepts CPU scalars beside tensors of any device and as Python numbers are placed there.
    """
    def placed(name: str, t: Tensor) -> Tensor:
        if t.device == policy.device:
            return t
        if t.dim() == 0 and t.device.type == "cpu":
            return t.to(policy.device)
        raise InputShapeError(
            f"{spec.key}: {name} is on device {t.device}, policy_logps on {policy.device}; every tensor input "
            f"must be on policy_logps' device (move it with .to({str(policy.device)!r}))"
        )

    ref = placed("ref_logps", ref) if ref is not None else None
    moved = {n: placed(f"input {n!r}", t) if isinstance(t, Tensor) else t for n, t in tensors.items()}
    return moved, ref


def prepare(
    spec: LossSpec,
    policy: Any,
    ref: Any,
    *,
    lengths: Any,
    hparams: Mapping[str, Any],
    inputs: Mapping[str, Any],
    check_finite_values: bool,
) -> Prepared:
    """Validate everything for one call of ``spec``; return upcast tensors and resolved options."""
    resolved = resolve_hparams(spec, hparams)

    if not isinstance(policy, Tensor):
        raise InputShapeError(f"{spec.key}: policy_logps must be a tensor, got {type(policy).__name__}")
    if not policy.is_floating_point():
        raise InputShapeError(f"{spec.key}: policy_logps must be a float tensor, got {policy.dtype}")
    if spec.reference == "required" and ref is None:
        raise MissingInputError(f"{spec.key}: missing required input 'ref_logps' (reference scores)")
    if spec.reference == "none" and ref is not None:
        raise InputShapeError(
            f"{spec.key}: is reference-free; ref_logps must be None (drop it, or combine with a "
            "reference-based loss)"
        )

    given = dict(inputs)
    if lengths is not None and "lengths" in spec.input_names:
        given["lengths"] = lengths
    missing = [n for n in spec.required_inputs if given.get(n) is None]
    if missing:
        docs = "; ".join(f"{n}: {spec.input(n).doc}" for n in missing)
        raise MissingInputError(f"{spec.key}: missing required input(s) {', '.join(map(repr, missing))} ({docs})")

    bound: dict[str, int] = {}
    _bind("policy_logps", spec.key, policy.shape, spec.scores, bound)
    if ref is not None:
        if not isinstance(ref, Tensor) or not ref.is_floating_point():
            raise InputShapeError(f"{spec.key}: ref_logps must be a float tensor of policy_logps' shape, got "
                                  f"{ref.dtype if isinstance(ref, Tensor) else type(ref).__name__}")
        if ref.shape != policy.shape:
            raise InputShapeError(
                f"{spec.key}: ref_logps has shape {_shape_str(ref.shape)}, policy_logps has "
                f"{_shape_str(policy.shape)}; they must match"
            )
    if policy.shape[0] == 0:
        raise InputShapeError(f"{spec.key}: policy_logps has shape {_shape_str(policy.shape)}, an empty batch (B=0); "
                              "give at least one example")

    tensors: dict[str, Any] = {}
    for item in spec.inputs:
        value = given.get(item.name)
        if value is None:
            continue
        if item.dtype == "object":
            tensors[item.name] = value
            continue
        t = _as_tensor(spec, item.name, value, policy.device)
        _bind(f"input {item.name!r}", spec.key, t.shape, item.shapes, bound)
        tensors[item.name] = t

    tensors, ref = _on_policy_device(spec, policy, ref, tensors)

    # The scores set the compute dtype (fp64 if either is fp64, else fp32); inputs follow it.
    dtype = _compute_dtype([policy] + ([ref] if ref is not None else []))
    policy_c = policy.to(dtype)
    ref_c = ref.to(dtype) if ref is not None else None
    converted = {}
    for name, value in tensors.items():
        item = spec.input(name)
        converted[name] = _convert(spec, item, value, dtype) if isinstance(value, Tensor) else value

    if "lengths" in converted:
        lens = converted["lengths"]
        bad = ~(lens > 0)
        if bool(bad.any()):
            i = int(bad.reshape(lens.shape[0], -1).any(1).nonzero()[0])
            raise InputValueError(f"{spec.key}: lengths must be positive token counts (|y| >= 1); bad at example {i}")
    if "nll_mean_length" in converted:
        raw = given["nll_mean_length"]  # a Python number is read without a device sync
        mean_length = float(converted["nll_mean_length"] if isinstance(raw, Tensor) else raw)
        if not 0.0 < mean_length < float("inf"):
            raise InputValueError(f"{spec.key}: nll_mean_length must be a positive finite mean token count, got "
                                  f"{mean_length}")

    if check_finite_values:
        mask = converted.get("mask")
        named: list[tuple[str, Tensor, Optional[Tensor]]] = []

        def add(name: str, t: Tensor) -> None:
            m = mask if isinstance(mask, Tensor) and mask.shape == t.shape else None
            named.append((name, t, m))

        add("policy_logps", policy_c)
        if ref_c is not None:
            add("ref_logps", ref_c)
        for name, t in converted.items():
            if isinstance(t, Tensor) and t.is_floating_point():
                add(f"input {name!r}", t)
        check_finite(spec, named)

    domain_check = spec.extra.get("check")
    if domain_check is not None:
        domain_check(spec, converted, resolved, policy_c)

    return Prepared(policy=policy_c, ref=ref_c, inputs=converted, hparams=resolved, dtype=dtype)


def require(spec: LossSpec, ok: Tensor, what: str) -> None:
    """Raise :class:`InputValueError` naming the first example where ``ok`` is False.

    ``ok`` has the batch on its first dimension (or is 0-d).
    """
    bad = ~ok
    if not bool(bad.any()):
        return
    if bad.dim() == 0:
        raise InputValueError(f"{spec.key}: {what}")
    i = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0])
    raise InputValueError(f"{spec.key}: {what}; violated at example {i}")


def in_unit_interval(*names: str, where: Optional[str] = None, also: Optional[Callable[..., None]] = None):
    """A head's input check (``extra={"check": ...}``): the inputs ``names``, where given, lie in
    ``[0, 1]`` (probabilities, normalised rewards, soft masks); ``where`` names a bool input (``valid``,
    a token ``mask``) outside of which entries are padding and not checked; ``also`` runs first."""

    def check(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
        if also is not None:
            also(spec, inputs, hp, policy)
        keep = inputs.get(where) if where is not None else None
        for name in names:
            x = inputs.get(name)
            if x is None:
                continue
            ok = (x >= 0) & (x <= 1)
            if keep is not None:
                ok = ok | ~keep.bool()
            require(spec, ok, f"{name} must lie in [0, 1]")

    return check
