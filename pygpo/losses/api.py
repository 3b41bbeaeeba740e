"""``preference_loss``: one entry point for every loss head in the registry.

    preference_loss(name, policy_logps, ref_logps=None, *, lengths=None, check_finite=True,
                    loss_weights=None, **hparams_and_inputs) -> PreferenceLossOutput

``name`` is a key or alias, or several (a list, or a dict name -> weight, or ``"dpo+sft"``) for a
combined loss ``sum_k weight_k * mean_B(loss_k)`` (TRL's ``loss_weights``). Keywords go to every
component that declares them; ``"<key>.<name>"`` targets one component (e.g.
``**{"sft.alpha": 0.5}``).

Weights are finite reals ``>= 0``; a zero weight is allowed (the component is still validated and
computed, and its ``loss/<key>`` metric logged, which is how one watches a loss without training on
it), but not every weight zero (nothing would be trained). A key may appear once per combination
(aliases count as their key): ``"dpo+dpo"`` would be ``{"dpo": 2.0}`` said ambiguously, and
``"dpo.beta"`` could not tell the two apart.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .constraints import NONNEGATIVE
from .errors import HyperParameterError, InputValueError, UnexpectedArgumentError
from .metrics import detach_metrics, pair_metrics
from .registry import PAIR_METRIC_KINDS, HeadResult, LossSpec, get
from .validation import convert_value, prepare, split_kwargs

LossName = Union[str, Sequence[str], Mapping[str, float]]


class PreferenceLossOutput(NamedTuple):
    """``loss``: scalar tensor; ``per_example``: ``(B,)``; ``metrics``: name -> detached tensor.

    ``loss == per_example.mean()`` except for the batch-level heads whose loss is not a batch mean
    (``dr_dpo``: soft-min; ``beta_dpo``: mean over the selected pairs).
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Any]


def _components(name: LossName, loss_weights: Optional[Sequence[float]]) -> list[tuple[str, float]]:
    """``[(name, weight)]`` of a loss name, each name known, each key once, each weight finite ``>= 0``
    and not all of them 0."""
    if isinstance(name, Mapping):
        if loss_weights is not None:
            raise HyperParameterError("give weights either in the name mapping or in loss_weights, not both")
        parts = [(str(k), w) for k, w in name.items()]
    else:
        if isinstance(name, str):
            keys = [k.strip() for k in name.split("+")] if "+" in name else [name]
        else:
            try:
                keys = list(name)
            except TypeError:
                raise TypeError(f"name must be a loss key (str), a sequence of keys or a {{key: weight}} mapping, "
                                f"got {type(name).__name__}") from None
        weights = [1.0] * len(keys) if loss_weights is None else list(loss_weights)
        if len(weights) != len(keys):
            raise HyperParameterError(
                f"loss_weights has {len(weights)} entries for {len(keys)} loss(es); valid: one weight per loss"
            )
        parts = list(zip(keys, weights))
    if not parts:
        raise InputValueError("name is empty: give a loss key (pygpo.losses.names()), a list of keys or a "
                              "{key: weight} mapping")
    parts = [(k, convert_value(NONNEGATIVE, w, f"loss weight {k}")) for k, w in parts]
    if all(w == 0 for _, w in parts):
        raise HyperParameterError(
            f"every loss weight is 0 ({', '.join(f'{k}=0' for k, _ in parts)}): the loss would be 0 and train "
            "nothing; give at least one component a weight > 0"
        )
    _refuse_repeated_keys(parts)
    return parts


def _refuse_repeated_keys(parts: list[tuple[str, float]]) -> None:
    """A key (or an alias of it) given twice is refused, pointing at the one weight it stands for."""
    given: dict[str, list[tuple[str, float]]] = {}
    for k, w in parts:
        given.setdefault(get(k).key, []).append((k, w))
    for key, spelled in given.items():
        if len(spelled) > 1:
            raise InputValueError(
                f"loss {key!r} appears {len(spelled)} times in the combination "
                f"({', '.join(repr(k) for k, _ in spelled)}); give each loss once and scale it with a weight: "
                f"{{{key!r}: {sum(w for _, w in spelled):g}}}"
            )


def _default_rewards(spec: LossSpec, policy: Tensor, ref: Optional[Tensor], hparams: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """``beta * (lp - rp)``, or ``beta * lp`` without a reference (beta = 1 for heads without one)."""
    beta = float(hparams.get("beta", 1.0))
    with torch.no_grad():
        score = policy.detach() if ref is None else policy.detach() - ref
        score = beta * score
        return score[:, 0], score[:, 1]


def _single(
    spec: LossSpec,
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    lengths: Any,
    kwargs: Mapping[str, Any],
    check_finite: bool,
) -> PreferenceLossOutput:
    if spec.kind == "reducer":
        raise InputValueError(
            f"{spec.key!r} is a reducer (section 1), not a loss head; apply it with pygpo.losses.reduce"
        )
    hparams, inputs = split_kwargs(spec, kwargs)
    prep = prepare(
        spec, policy_logps, ref_logps, lengths=lengths, hparams=hparams, inputs=inputs, check_finite_values=check_finite
    )
    result: HeadResult = spec.fn(prep.policy, prep.ref, **prep.hparams, **prep.inputs)
    loss = result.per_example.mean() if result.loss is None else result.loss
    metrics: dict[str, Any] = {}
    if spec.kind in PAIR_METRIC_KINDS and (prep.policy.dim() >= 2 and prep.policy.shape[1] == 2):
        rewards = result.rewards or _default_rewards(spec, prep.policy, prep.ref, prep.hparams)
        logps = result.logps or (prep.policy[:, 0], prep.policy[:, 1])
        metrics.update(pair_metrics(rewards, logps))
    if result.metrics:
        metrics.update(detach_metrics(result.metrics))
    return PreferenceLossOutput(loss, result.per_example, metrics)


def preference_loss(
    name: LossName,
    policy_logps: Tensor,
    ref_logps: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    check_finite: bool = True,
    loss_weights: Optional[Sequence[float]] = None,
    **hparams_and_inputs: Any,
) -> PreferenceLossOutput:
    """Compute a registered preference loss (LOSSES.md) from sequence scores.

    Args:
        name: registry key or alias (``pygpo.losses.names()``), or several for a combined loss.
        policy_logps: policy scores, ``(B, 2)`` [chosen, rejected] for pairs, ``(B, K)`` for
            multi-response losses, ``(B,)`` for unpaired ones, ``(B, 2, T)`` for per-token heads.
        ref_logps: reference scores of the same shape (``None`` for reference-free losses).
        lengths: completion token counts, for the losses that length-normalise.
        check_finite: raise on NaN/inf scores naming the example (one host sync); ``False`` skips it.
        loss_weights: weights of the components of a combined loss (default 1 each).
        **hparams_and_inputs: hyper-parameters (``pygpo.losses.get(name).defaults``) and per-example
            inputs (``.inputs``).

    Returns:
        ``PreferenceLossOutput(loss, per_example, metrics)``. Inputs are validated before anything
        is computed; bf16/fp16 scores are computed in fp32.
    """
    parts = _components(name, loss_weights)
    if len(parts) == 1 and not any("." in k for k in hparams_and_inputs):
        key, weight = parts[0]
        out = _single(get(key), policy_logps, ref_logps, lengths, hparams_and_inputs, check_finite)
        if weight == 1.0:
            return out
        return PreferenceLossOutput(weight * out.loss, weight * out.per_example, out.metrics)
    return _combined(parts, policy_logps, ref_logps, lengths, hparams_and_inputs, check_finite)


def _combined(
    parts: list[tuple[str, float]],
    policy_logps: Tensor,
    ref_logps: Optional[Tensor],
    lengths: Any,
    kwargs: Mapping[str, Any],
    check_finite: bool,
) -> PreferenceLossOutput:
    specs = [(get(k), w) for k, w in parts]
    keys = {s.key for s, _ in specs} | {k for k, _ in parts}
    used: set[str] = set()
    routed: list[dict[str, Any]] = []
    for spec, _ in specs:
        accepts = set(spec.defaults) | set(spec.input_names)
        mine: dict[str, Any] = {}
        for k, v in kwargs.items():
            if "." in k:
                target, _, param = k.partition(".")
                if target not in keys:
                    raise UnexpectedArgumentError(f"keyword {k!r} targets {target!r}, which is not part of this combination")
                if get(target).key == spec.key:
                    mine[param] = v
                    used.add(k)
            elif k in accepts and k not in mine:
                mine[k] = v
                used.add(k)
        routed.append(mine)
    unused = [k for k in kwargs if k not in used]
    if unused:
        raise UnexpectedArgumentError(
            f"keyword(s) {', '.join(map(repr, unused))} are accepted by none of {', '.join(s.key for s, _ in specs)}"
        )

    total: Optional[Tensor] = None
    per_total: Optional[Tensor] = None
    metrics: dict[str, Any] = {}
    for (spec, weight), mine in zip(specs, routed):
        ref = None if spec.reference == "none" else ref_logps
        out = _single(spec, policy_logps, ref, lengths, mine, check_finite)
        total = weight * out.loss if total is None else total + weight * out.loss
        per_total = weight * out.per_example if per_total is None else per_total + weight * out.per_example
        for k, v in out.metrics.items():
            metrics.setdefault(k, v)
        metrics[f"loss/{spec.key}"] = out.loss.detach()
    assert total is not None and per_total is not None  # parts is never empty
    return PreferenceLossOutput(total, per_total, metrics)


def validate(
    name: str,
    policy_logps: Tensor,
    ref_logps: Optional[Tensor] = None,
    *,
    lengths: Optional[Tensor] = None,
    check_finite: bool = True,
    **hparams_and_inputs: Any,
) -> None:
    """Run every check :func:`preference_loss` runs for ``name``, without computing the loss.

    Stateful losses call it before touching their state, so a bad batch never updates it.
    """
    spec = get(name)
    hparams, inputs = split_kwargs(spec, hparams_and_inputs)
    prepare(spec, policy_logps, ref_logps, lengths=lengths, hparams=hparams, inputs=inputs, check_finite_values=check_finite)
