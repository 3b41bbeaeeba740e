"""``FusedPreferenceLoss``: final hidden states -> any registry loss and its metrics, in one pass.

    loss_fn = pygpo.FusedPreferenceLoss("dpo", beta=0.1)
    out = loss_fn(hidden, lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref_head.weight)
    out.loss.backward(); out.metrics["rewards/accuracies"]

The step: (1) describe which scored token belongs to which response (:mod:`.layout`); (2) one fused
pass per model over the valid rows gives per-token log-probs, the reference's, the token KL and the
metric terms without ``N x V`` logits (:mod:`.scores`); (3) a section-1 reducer turns tokens into
sequence scores, for policy and reference alike; (4) the registry head computes the loss from the
scores and the inputs the batch supplies (:mod:`.inputs`) or the caller gives.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..losses import get as get_spec
from ..losses.api import _components, preference_loss
from ..losses.errors import MissingInputError
from ..losses.reducers import reduce, reduce_pair
from ..losses.registry import LossSpec
from ..losses.validation import resolve_hparams
from ..prefix.batch import PrefixBatch
from ..ops.token_rows import check_options
from ..ops.token_stats import StatRequest
from ..ops.transfer import to_device
from ..ops.validation import check_flags, check_linear_inputs
from .eager import eager_loss, reference_logps, without_gradient
from .inputs import AUTO_INPUTS, fill_inputs, reducer_conflict, takes_token_scores
from .layout import (ResponseIndexError, ResponseLayout, layout_from_prefix_batch, layout_from_rows,
                     layout_from_tokens)
from .output import FusedPreferenceOutput, with_token_metrics
from .reference_inputs import cached_sequence, per_token, reference_tokens, resolve_reference
from .scores import ProjectionOptions, token_scores
from .segments_forward import segments_forward

LossName = Union[str, Sequence[str], Mapping[str, float]]
REDUCERS = ("sum", "mean", "ld", "sampled", "weighted", "segments")


def _keys_of(spec: LossSpec) -> tuple[str, ...]:
    return (spec.key,) + tuple(spec.aliases)


def _responses_per_example(specs: list[LossSpec]) -> Optional[int]:
    kinds = {s.kind for s in specs}
    if kinds == {"unpaired"}:
        return 1
    if "multi_response" in kinds:
        return None  # K comes from the data (response_index / prefix batch) or the caller
    return 2


class FusedPreferenceLoss(nn.Module):
    """A registry loss computed from final hidden states and the lm_head, never holding logits.

    Args:
        loss: registry key or alias (``pygpo.losses.names()``), several keys (``"dpo+sft"``, a list,
            or a dict key -> weight) for a combined loss, as in :func:`pygpo.preference_loss`.
        loss_weights: weights of a combined loss's components.
        reducer: section-1 reducer from per-token log-probs to sequence scores, applied to policy and
            reference alike: ``"sum"`` (default), ``"mean"``, ``"ld"`` (LD-DPO), ``"sampled"`` (SamPO),
            ``"weighted"`` (per-token ``token_weights`` given to forward), ``"segments"`` (per-token
            ``segment_ids`` given to forward: every segment ``i`` that all responses of an example have
            tokens in is one row of the head, its score the segment's token sum, its length the
            segment's token count; ``per_example`` is the mean over the example's rows). The reducer
            shapes the scores of the preference terms only: NLL / SFT terms and WPO's weight read the
            raw token sums, and ``lengths`` are the true token counts (:mod:`pygpo.fused.inputs`).
            Heads without a meaning on a reducer's scores are refused here (``simpo`` etc. with
            ``mean``, which would divide by the lengths twice; ``orpo``, ``asft``, ``omni_dpo`` with
            anything but ``sum``).
        reducer_args: the reducer's hyper-parameters: ``{"alpha": 0.5}`` for ``ld``; for ``sampled``,
            ``{"seed": 0}`` seeds this module's generator once (each call draws a new subset, the
            sequence of subsets is reproducible) or ``{"generator": g}`` uses ``g``; ``{"num_segments":
            n}`` for ``segments``.
        ignore_index: label value of prompt and padding positions.
        temperature, softcap: logit transform ``softcap * tanh(z / softcap) / temperature``, as in
            :func:`pygpo.fused_linear_logprobs` (both models).
        backend, memory_budget, deterministic: passed to the fused ops.
        compute_metrics: also compute the entropy and mean logit per token (same pass) for the
            ``entropy`` and ``logits/*`` metrics.
        stateful: for a single stateful key (``beta_dpo``, ``bco_pair``, ``bco``, ``group_robust``),
            keep its running statistics in this module (``state_dict()``); ``False`` uses the
            stateless head with statistics given as inputs.
        check_finite: raise on non-finite scores, naming the example.
        eager_gradients: compute the gradients w.r.t. hidden states and lm_head during the forward, a
            chunk of whole examples at a time from a kept logit tile (:mod:`pygpo.fused.eager`): three
            matmuls per policy row instead of four, for losses whose value is the mean of per-example
            losses that depend on their own example's scores (checked on every call). Needs the
            ``sum`` or ``mean`` reducer and a sequence-level head (no token KL, no ``log sum p^2``, not
            stateful). A batch-token-mean NLL term (``sft``, ``cpo``, ``orpo``, ``tpo_triple``) runs with its
            denominator fixed at the call's mean length (or the caller's ``nll_mean_length``), which makes it
            separable. Only ``loss`` carries gradients: ``policy_logps`` and ``per_example`` raise if a
            backward reaches them.
        **hparams: the loss's hyper-parameters (``pygpo.losses.get(name).defaults``); for a combined
            loss, ``"<key>.<name>"`` targets one component.
    """

    def __init__(
        self,
        loss: LossName = "dpo",
        *,
        loss_weights: Optional[Sequence[float]] = None,
        reducer: str = "sum",
        reducer_args: Optional[Mapping[str, Any]] = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
        memory_budget: Optional[int] = None,
        deterministic: Optional[bool] = None,
        compute_metrics: bool = True,
        stateful: bool = True,
        check_finite: bool = True,
        eager_gradients: bool = False,
        **hparams: Any,
    ):
        super().__init__()
        check_flags(compute_metrics=compute_metrics, stateful=stateful, check_finite=check_finite,
                    eager_gradients=eager_gradients)
        parts = _components(loss, loss_weights)
        self.components = [(get_spec(k), w) for k, w in parts]
        for spec, _ in self.components:
            if spec.kind == "reducer":
                raise ValueError(
                    f"{spec.key!r} is a reducer, not a loss: pass it as reducer={spec.key!r} with a loss head"
                )
        self.loss = loss if isinstance(loss, str) else (dict(loss) if isinstance(loss, Mapping) else list(loss))
        self.loss_weights = None if loss_weights is None else list(loss_weights)
        if reducer not in REDUCERS:
            raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")
        self.reducer = reducer
        self.reducer_args = dict(reducer_args or {})
        resolve_hparams(get_spec(reducer), {k: v for k, v in self.reducer_args.items() if k != "generator"})
        self._generators: dict[str, torch.Generator] = {}
        self.options = ProjectionOptions.checked(ignore_index, temperature, softcap, backend, memory_budget, deterministic)
        self.compute_metrics = compute_metrics
        self.check_finite = check_finite
        self.hparams = dict(hparams)
        self._check_reducer_conflicts()
        token_heads = [s.key for s, _ in self.components if takes_token_scores(s)]
        if token_heads and len(self.components) > 1:
            raise ValueError(f"per-token heads ({', '.join(token_heads)}) cannot be combined with other losses")
        self.state_loss: Optional[nn.Module] = None
        state_cls = self.components[0][0].stateful if len(self.components) == 1 else None
        if stateful and state_cls is not None:
            self.state_loss = self._new_state(state_cls, self.hparams)
        else:
            self._check_hparams()
        self.eager_gradients = eager_gradients
        if self.eager_gradients:
            self._check_eager()

    def _new_state(self, state_cls: type, hparams: Mapping[str, Any]) -> nn.Module:
        """The stateful head's module built from ``hparams`` (missing and unknown names refused here, values
        checked by the class)."""
        key = self.components[0][0].key
        params = inspect.signature(state_cls).parameters
        missing = [n for n, prm in params.items() if prm.default is inspect.Parameter.empty and n not in hparams
                   and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)]
        if missing:
            raise ValueError(f"{key}: missing hyper-parameter(s) {', '.join(map(repr, missing))}, "
                             f"needed to keep its statistics in the module (e.g. FusedPreferenceLoss("
                             f"{key!r}, {missing[0]}=...)); stateful=False takes them as inputs")
        unknown = sorted(set(hparams) - set(params))
        if unknown:
            raise ValueError(f"unexpected option(s) {', '.join(map(repr, unknown))} for {state_cls.__name__}; "
                             f"valid: {', '.join(sorted(params))}")
        return state_cls(**hparams)

    def set_hparams(self, **values: Any) -> None:
        """Change hyper-parameters between calls, e.g. along a schedule (DPO-Shift's ``lam``).

        ``values`` use the constructor's names (``"<key>.<name>"`` for one component of a combined loss)
        and are checked as there; on a bad value nothing changes. A stateful head's module (``beta_dpo``,
        ``bco``, ``group_robust``, ...) takes the new values and keeps its running statistics, so a
        scheduled ``beta`` reaches the loss it computes.
        """
        merged = {**self.hparams, **values}
        if self.state_loss is not None:
            fresh = self._new_state(type(self.state_loss), merged)
            shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
            if shapes(fresh) != shapes(self.state_loss):  # e.g. group_robust's num_groups sizes its weights
                raise ValueError(f"set_hparams({', '.join(map(repr, values))}): the new values change the shape of "
                                 f"{type(self.state_loss).__name__}'s statistics; build a new FusedPreferenceLoss")
            for name in values:
                value = getattr(fresh, name)
                old = getattr(self.state_loss, name)
                setattr(self.state_loss, name, value.to(old.device) if isinstance(value, Tensor) else value)
            self.hparams = merged
            return
        previous, self.hparams = self.hparams, merged
        try:
            self._check_reducer_conflicts()
            self._check_hparams()
        except Exception:
            self.hparams = previous
            raise

    def _check_reducer_conflicts(self) -> None:
        for spec, _ in self.components:
            why = reducer_conflict(spec, self.reducer, self._component_hparams(spec))
            if why is not None:
                raise ValueError(f"reducer={self.reducer!r} cannot run loss {self.loss!r}: {why}")

    def eager_unsupported(self) -> Optional[str]:
        """Why ``eager_gradients=True`` cannot run this configuration, or ``None`` if it can (whether the
        loss is separable per example is checked on each call, not here)."""
        if self.reducer not in ("sum", "mean"):
            return f"reducer={self.reducer!r} (it takes 'sum' or 'mean')"
        if self.state_loss is not None:
            return f"the stateful {self.specs[0].key!r} head (its statistics span the batch)"
        for spec in self.specs:
            if takes_token_scores(spec) or "kl" in spec.input_names or "log_sum_p2" in spec.input_names:
                return f"{spec.key!r}, which needs per-token scores, the token KL or log sum p^2"
            if self.reducer != "sum" and "sum_logps" in spec.input_names:
                return f"{spec.key!r} with reducer={self.reducer!r} (its SFT term reads raw token sums)"
        return None

    def _with_nll_mean_length(self, inputs: dict[str, Any], layout: ResponseLayout) -> dict[str, Any]:
        """``inputs`` with ``nll_mean_length`` for the eager pass. LOSSES.md's ``NLL_mean`` is a token mean over
        the whole batch's chosen tokens, so a chunk's share would depend on the other chunks' lengths; fixing
        the denominator at the call's own mean (chosen lengths, or ``tpo_triple``'s gold lengths) makes the
        chunks' losses the ordinary pass's. A caller's value (a whole optimizer step's mean) is kept."""
        takers = [spec.key for spec in self.specs if "nll_mean_length" in spec.input_names]
        if not takers or "nll_mean_length" in inputs:
            return inputs
        if "tpo_triple" not in takers:
            chosen = layout.host_lengths[::layout.responses_per_example]  # host ints: no device read
            return {**inputs, "nll_mean_length": sum(chosen) / max(len(chosen), 1)}
        if len(takers) > 1:
            raise ValueError(f"eager_gradients=True: {', '.join(map(repr, takers))} take token means over different "
                             "responses (gold and chosen); give nll_mean_length= or use eager_gradients=False")
        gold = inputs.get("gold_lengths")
        if gold is None:
            return inputs  # the head names the missing input
        return {**inputs, "nll_mean_length": torch.as_tensor(gold, dtype=torch.float64).mean()}

    def _check_eager(self) -> None:
        """What the eager-gradient pass cannot run, refused at construction."""
        why = self.eager_unsupported()
        if why is not None:
            raise ValueError(f"eager_gradients=True cannot run {why}; use eager_gradients=False")

    def _component_hparams(self, spec: LossSpec) -> dict[str, Any]:
        """The hyper-parameters given for one component (``"<key>.<name>"`` or a plain name it declares)."""
        mine = {}
        for name, value in self.hparams.items():
            target, dot, param = name.partition(".")
            if dot and target in _keys_of(spec) and param in spec.defaults:
                mine[param] = value
            elif not dot and name in spec.defaults:
                mine[name] = value
        return mine

    def _check_hparams(self) -> None:
        """Unknown or out-of-range hyper-parameters fail here, at construction."""
        for spec, _ in self.components:
            resolve_hparams(spec, self._component_hparams(spec))
        names = {n: s for s, _ in self.components for n in (s.key,) + tuple(s.aliases)}
        for name in self.hparams:
            target, dot, param = name.partition(".")
            if dot:
                ok = target in names and param in names[target].defaults
            else:
                ok = any(name in s.defaults for s, _ in self.components)
            if not ok:
                valid = sorted({d for s, _ in self.components for d in s.defaults})
                raise ValueError(
                    f"unexpected hyper-parameter {name!r} for loss {self.loss!r}; valid: {', '.join(valid) or '(none)'} "
                    "(per-example inputs go to forward)"
                )

    @property
    def specs(self) -> list[LossSpec]:
        return [s for s, _ in self.components]

    def _needs(self, name: str) -> bool:
        return any(name in s.input_names for s in self.specs)

    def _reference_use(self) -> str:
        refs = {s.reference for s in self.specs}
        return "required" if "required" in refs else ("optional" if "optional" in refs else "none")

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, reducer={self.reducer!r}, hparams={self.hparams}"

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Optional[Tensor] = None,
        response_index: Optional[Tensor] = None,
        *,
        bias: Optional[Tensor] = None,
        batch: Optional[PrefixBatch] = None,
        responses_per_example: Optional[int] = None,
        num_examples: Optional[int] = None,
        ref_hidden: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        ref_token_logps: Optional[Tensor] = None,
        token_weights: Optional[Tensor] = None,
        preference_labels: Optional[Tensor] = None,
        **inputs: Any,
    ) -> FusedPreferenceOutput:
        """Loss and metrics of one batch.

        Args:
            hidden: final hidden states of the policy: ``(R, T, D)`` rows (one response per row),
                ``(N, D)`` token rows, or, with ``batch``, the prefix batch's ``(B, S, D)`` or its target
                rows ``(N, D)``.
            weight: ``(V, D)`` lm_head weight (``bias`` ``(V,)`` optional).
            labels: next-token labels of ``hidden``'s leading shape, ``ignore_index`` on prompt and
                padding; with ``batch`` optional (its ``target_labels``).
            response_index: rows form: ``(R,)`` response id ``example * K + rank`` of each row (default
                rank-major: all chosen rows, then all rejected); token form: ``(N,)`` per row.
            batch: a :class:`pygpo.prefix.PrefixBatch` (responses and examples come from it).
            responses_per_example: ``K``; default 2 (1 for unpaired losses; from the data for a batch).
            num_examples: ``B``, the number of examples. Token rows: without it ``B`` is inferred from
                the largest response id at a scored row, and an id held only by rows without a target
                token raises (that response has nothing to score); with it every one of the ``B * K``
                responses must have a target token. Other forms: checked against the data.
            ref_hidden, ref_weight, ref_bias: the reference as final hidden states (same leading
                shape as ``hidden``) and its lm_head; scored under ``no_grad`` in the fused pass.
            ref_logps: cached ``(B, K)`` per-response sums of reference token log-probs.
            ref_token_logps: cached per-token reference log-probs, of exactly the labels' shape or
                exactly ``(B, K, T)`` in completion-token order, ``T`` the longest response (as
                :mod:`pygpo.ref_cache` returns them).
            token_weights: per-token weights for ``reducer="weighted"`` (labels' shape or ``(B, K, T)``).
            preference_labels: ``(B,)`` bool, desirable responses, for the unpaired heads (KTO, BCO, ...)
                whose registry input is named ``labels`` (taken here by the token labels).
            **inputs: the loss's per-example inputs (``pygpo.losses.get(name).inputs``) beyond those the
                batch supplies (lengths, masks, token KL, ``log_sum_p2``, raw token sums); per-token ones
                may have the labels' shape. With ``reducer="segments"``: ``segment_ids``, the segment of
                each token (labels' shape or ``(B, K, T)``, integer, ``-1`` = in no segment).

        Returns:
            :class:`FusedPreferenceOutput`; with ``reducer="segments"`` ``policy_logps`` / ``ref_logps``
            are the ``(B, K, n_seg)`` segment sums.
        """
        if preference_labels is not None:
            inputs["labels"] = preference_labels
        segment_ids = inputs.pop("segment_ids", None) if self.reducer == "segments" else None
        self._check_inputs(inputs)
        hidden, labels, layout, ref_h = self._layout(hidden, labels, response_index, batch, responses_per_example,
                                                     ref_hidden, num_examples, _vocab_of(weight))
        self._check_responses(layout.responses_per_example, "the PrefixBatch has" if batch is not None
                              else "responses_per_example is")
        ref = resolve_reference(ref_h, ref_weight, ref_bias, ref_logps, ref_token_logps, layout=layout, hidden=hidden,
                                weight=weight, labels_shape=labels.shape, loss=self.loss, use=self._reference_use(),
                                needs_kl=self._needs("kl"), reducer=self.reducer)
        self._check_reducer_inputs(token_weights, segment_ids, layout, labels.shape)
        if self.eager_gradients:
            return self._eager_forward(hidden, weight, bias, labels, layout, ref, self._with_nll_mean_length(inputs, layout))
        need_kl = self._needs("kl") and "kl" not in inputs
        scores = token_scores(
            hidden, weight, labels, layout, bias=bias, need_kl=need_kl,
            ref=(ref.hidden, ref.weight, ref.bias) if ref is not None and ref.kind == "hidden" else None,
            need_log_sum_p2=self._needs("log_sum_p2") and "log_sum_p2" not in inputs,
            metrics=self.compute_metrics, opts=self.options,
        )
        mask = layout.mask
        policy_tok = layout.dense(scores.logps)
        ref_tok = reference_tokens(ref, scores.ref_logps, layout, labels.shape)
        dense = {
            "kl": None if scores.kl is None else layout.dense(scores.kl),
            "log_sum_p2": None if scores.log_sum_p2 is None else layout.dense(scores.log_sum_p2),
        }
        if self.reducer == "segments":
            return segments_forward(self, policy_tok, ref_tok, layout, labels.shape, segment_ids, dense, inputs, scores)
        policy_seq, ref_seq = self._reduce(policy_tok, ref_tok, ref, mask, layout, token_weights, labels.shape)

        token_level = takes_token_scores(self.specs[0])
        policy_in, ref_in = (policy_tok, ref_tok) if token_level else (policy_seq, ref_seq)
        k = layout.responses_per_example
        if k == 1:
            policy_in = policy_in[:, 0]
            ref_in = None if ref_in is None else ref_in[:, 0]
        # the raw token sums, for the NLL / WPO-weight terms when the reducer shaped the scores
        sums = reduce("sum", policy_tok, mask) if self.reducer != "sum" and self._needs("sum_logps") else None
        head_inputs = self._head_inputs(inputs, layout, labels.shape, token_level, sum_logps=sums, **dense)
        if self._reference_use() == "none":
            ref_in = None
        out = self._head(policy_in, ref_in, head_inputs)
        return FusedPreferenceOutput(out.loss, out.per_example, with_token_metrics(out.metrics, scores, layout),
                                     policy_seq, None if ref_seq is None else ref_seq.detach(), layout.lengths)

    def _eager_forward(self, hidden, weight, bias, labels, layout: ResponseLayout, ref, inputs):
        """The forward of ``eager_gradients=True`` (:mod:`pygpo.fused.eager`)."""
        opts = self.options
        checked = layout.labels_vocab is not None  # range-checked with the layout: no second device read
        check_linear_inputs(hidden, weight, labels, bias, ignore_index=opts.ignore_index, label_range=not checked)
        check_options(opts.temperature, opts.softcap, opts.memory_budget)
        rows = layout.token_index.to(hidden.device)
        h_valid = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        y_valid = labels.reshape(-1).to(hidden.device).index_select(0, rows).long()
        layout = layout.to(hidden.device)
        req = StatRequest(entropy=self.compute_metrics, mean_logit=self.compute_metrics, top1=self.compute_metrics,
                          temperature=opts.temperature, softcap=opts.softcap)
        ref_seq = None
        if ref is not None and self._reference_use() != "none":
            ref_lp = None
            if ref.kind == "hidden":
                check_linear_inputs(ref.hidden, ref.weight, labels, ref.bias, ignore_index=opts.ignore_index,
                                    label_range=not checked)
                ref_rows = ref.hidden.detach().reshape(-1, ref.hidden.shape[-1]).index_select(0, rows)
                ref_lp = reference_logps(ref_rows, ref.weight.detach(), None if ref.bias is None else ref.bias.detach(),
                                         y_valid, req=req, backend=opts.backend, memory_budget=opts.memory_budget)
            ref_tok = reference_tokens(ref, ref_lp, layout, labels.shape)
            ref_seq = (reduce(self.reducer, ref_tok, layout.mask) if ref_tok is not None
                       else cached_sequence(ref, layout, self.reducer).to(hidden.device)).detach()
        result = eager_loss(h_valid, weight, bias, y_valid, layout, ref_seq, self._head,
                            self._head_inputs(inputs, layout, labels.shape, False),
                            reducer=self.reducer, req=req, backend=opts.backend, memory_budget=opts.memory_budget)
        anchor = h_valid if h_valid.requires_grad else weight
        return FusedPreferenceOutput(result.loss, without_gradient(result.head.per_example, anchor, "per_example"),
                                     with_token_metrics(result.head.metrics, result.scores, layout),
                                     without_gradient(result.policy_seq, anchor, "policy_logps"), ref_seq,
                                     layout.lengths)

    # ------------------------------------------------------------------------------------ pieces

    def _head_inputs(self, inputs, layout: ResponseLayout, labels_shape, token_level: bool, *,
                     kl: Optional[Tensor] = None, log_sum_p2: Optional[Tensor] = None,
                     sum_logps: Optional[Tensor] = None) -> dict[str, Any]:
        """The heads' inputs: the batch's (lengths, masks, KL, raw token sums, ...) and the caller's (which win)."""
        head_inputs: dict[str, Any] = {}
        for spec in self.specs:
            given = {n: v for n, v in inputs.items() if n in spec.input_names}
            for name, value in fill_inputs(spec, given, layout, token_scores=token_level, kl=kl,
                                           log_sum_p2=log_sum_p2, labels_shape=labels_shape,
                                           sum_logps=sum_logps).items():
                head_inputs.setdefault(name, value)
        return head_inputs

    def _check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Unknown and missing per-example inputs, before any kernel runs."""
        unknown = [n for n in inputs if not self._needs(n)]
        if unknown:
            raise ValueError(
                f"unexpected input(s) {', '.join(map(repr, unknown))} for loss {self.loss!r}; its inputs: "
                f"{', '.join(sorted({n for s in self.specs for n in s.input_names if n not in AUTO_INPUTS})) or '(none)'}"
            )
        for spec in self.specs:
            missing = [n for n in spec.required_inputs if n not in AUTO_INPUTS and n not in inputs]
            if missing:
                shown = ["preference_labels" if n == "labels" else n for n in missing]
                raise MissingInputError(
                    f"{spec.key}: missing required input(s) {', '.join(map(repr, shown))}: "
                    + "; ".join(f"{n}: {spec.input(n).doc}" for n in missing)
                )

    def _layout(self, hidden, labels, response_index, batch, k, ref_hidden, num_examples=None, vocab=None):
        """The scored tokens' layout; the labels are range-checked against ``vocab`` in the same device read
        that sizes the layout (the fused passes then read nothing back)."""
        ignore = self.options.ignore_index
        if not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if num_examples is not None and (not isinstance(num_examples, int) or isinstance(num_examples, bool)
                                         or num_examples < 1):
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if batch is not None:
            if response_index is not None:
                raise ResponseIndexError("give either batch= (a PrefixBatch) or response_index, not both")
            if hidden.dim() == 3:
                hidden = batch.gather(hidden)
                if ref_hidden is not None:
                    ref_hidden = batch.gather(ref_hidden, name="ref_hidden")
            if labels is None:
                labels = to_device(batch.target_labels, hidden.device)
            layout = layout_from_prefix_batch(batch, labels, ignore_index=ignore, vocab=vocab)
            if k is not None and k < layout.responses_per_example:
                raise ResponseIndexError(f"responses_per_example={k}, but the batch has {layout.responses_per_example}")
            _check_num_examples(num_examples, layout.batch_size, "the PrefixBatch has")
            return hidden, labels, layout, ref_hidden
        if labels is None:
            raise ValueError("labels are required (or pass batch= for a PrefixBatch)")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
            )
        if k is None:
            k = _responses_per_example(self.specs)
        if k is None:
            raise ValueError("multi-response losses need responses_per_example=K (or a PrefixBatch)")
        if hidden.dim() == 3:
            layout = layout_from_rows(labels, response_index, responses_per_example=k, ignore_index=ignore,
                                      vocab=vocab)
            _check_num_examples(num_examples, layout.batch_size, f"{labels.shape[0]} rows of {k} responses make")
        elif hidden.dim() == 2:
            layout = layout_from_tokens(labels, response_index, responses_per_example=k, ignore_index=ignore,
                                        num_examples=num_examples, vocab=vocab)
        else:
            raise ValueError(f"hidden must be (R, T, D) rows or (N, D) token rows, got shape {tuple(hidden.shape)}")
        return hidden, labels, layout, ref_hidden

    def _check_responses(self, k: int, source: str) -> None:
        """Each head takes the layout's ``K`` responses per example (its registry score shapes), refused
        before any kernel runs; ``source`` says where ``K`` came from."""
        for spec in self.specs:
            accepted = _responses_accepted(spec)
            if accepted is not None and k not in accepted:
                raise ResponseIndexError(
                    f"loss {spec.key!r} takes {' or '.join(map(str, sorted(accepted)))} response(s) per example, "
                    f"but {source} {k}"
                )

    def _check_reducer_inputs(self, token_weights, segment_ids, layout: ResponseLayout, labels_shape) -> None:
        """The reducer's per-token inputs: present where needed, absent elsewhere, of an exact shape."""
        needed = {"weighted": ("token_weights", token_weights), "segments": ("segment_ids", segment_ids)}
        if token_weights is not None and self.reducer != "weighted":
            raise ValueError(f"token_weights are used by reducer='weighted' only (reducer is {self.reducer!r})")
        if self.reducer in needed:
            name, value = needed[self.reducer]
            if value is None:
                raise ValueError(f"reducer={self.reducer!r} needs {name} (labels' shape or (B, K, T))")
            per_token(name, value, layout, labels_shape, check_only=True)

    def _reduce(self, policy_tok, ref_tok, ref, mask, layout: ResponseLayout, token_weights, labels_shape):
        args = dict(self.reducer_args)
        if self.reducer == "weighted":
            args["weights"] = per_token("token_weights", token_weights, layout, labels_shape)
        if self.reducer == "sampled" and args.get("generator") is None and args.get("seed") is not None:
            args["generator"] = self._seeded_generator(mask.device)
            args.pop("seed")
        if ref_tok is not None:
            return reduce_pair(self.reducer, policy_tok, ref_tok, mask, **args)
        policy_seq = reduce(self.reducer, policy_tok, mask, **args)
        if ref is None:
            return policy_seq, None
        return policy_seq, cached_sequence(ref, layout, self.reducer).to(policy_seq.device)

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        """The ``sampled`` reducer's generator on ``device``, seeded once from ``reducer_args["seed"]``: every
        call draws a new subset, and the sequence of subsets is the same in every run."""
        gen = self._generators.get(str(device))
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(self.reducer_args["seed"]))
            self._generators[str(device)] = gen
        return gen

    def _head(self, policy: Tensor, ref: Optional[Tensor], head_inputs: dict[str, Any], *, check_finite: bool = True):
        """The registry head; ``check_finite=False`` skips its finite check even when the module makes it."""
        check_finite = check_finite and self.check_finite
        if self.state_loss is not None:
            spec = self.specs[0]
            kwargs = {n: v for n, v in head_inputs.items() if n in spec.input_names and n not in AUTO_INPUTS}
            return self.state_loss(policy, ref, **kwargs, check_finite=check_finite)
        return preference_loss(self.loss, policy, ref, loss_weights=self.loss_weights, check_finite=check_finite,
                               **self.hparams, **head_inputs)


def _responses_accepted(spec: LossSpec) -> Optional[set[int]]:
    """The numbers of responses per example ``spec``'s scores take: 1 for ``(B,)``, ``n`` for ``(B, n, ...)``;
    ``None`` when a shape leaves ``K`` free (``(B, K)``)."""
    accepted = set()
    for shape in spec.scores:
        if len(shape) == 1:
            accepted.add(1)
        elif isinstance(shape[1], int):
            accepted.add(shape[1])
        else:
            return None
    return accepted


def _vocab_of(weight: Any) -> Optional[int]:
    """``V`` of a ``(V, D)`` lm_head weight, ``None`` for anything else (its checks raise later, clearly)."""
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def _check_num_examples(num_examples: Optional[int], actual: int, what: str) -> None:
    if num_examples is not None and num_examples != actual:
        raise ResponseIndexError(f"num_examples={num_examples}, but {what} {actual} examples")
