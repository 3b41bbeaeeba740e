"""``reducer="segments"``: the loss head on one row per aligned (example, segment), LOSSES.md section 1.

Every segment ``i`` that all responses of an example have tokens in becomes one row of the head: its
score is the segment's token sum, its length the segment's token count, and the example's loss is the
mean over its rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..losses.reducers import reduce
from .inputs import per_response, segment_rows
from .layout import ResponseLayout
from .output import FusedPreferenceOutput, with_token_metrics
from .reference_inputs import per_token
from .scores import TokenScores


def segments_forward(module: Any, policy_tok: Tensor, ref_tok: Tensor | None, layout: ResponseLayout, labels_shape,
                     segment_ids: Tensor, dense: dict[str, Tensor | None], inputs: dict[str, Any],
                     scores: TokenScores) -> FusedPreferenceOutput:
    """The forward of a :class:`pygpo.FusedPreferenceLoss` ``module`` with ``reducer="segments"``, from the
    per-token ``(B, K, T)`` policy (and reference) log-probs and ``segment_ids`` (labels' shape or
    ``(B, K, T)``, integer, ``-1`` = in no segment)."""
    ids = per_token("segment_ids", segment_ids, layout, labels_shape)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {ids.dtype}")
    ids = torch.where(layout.mask, ids.long(), torch.full_like(ids, -1, dtype=torch.long))
    n = module.reducer_args.get("num_segments")
    if n is None:
        n = max(int(ids.max()) + 1, 1)

    def seg(x: Tensor) -> Tensor:
        return reduce("segments", x, segment_ids=ids, num_segments=n)

    policy_seg = seg(policy_tok)
    rows = segment_rows(seg(layout.mask.to(policy_seg.dtype)), layout.present.to(policy_seg.device))
    ref_seg = None if ref_tok is None else seg(ref_tok)
    k, b = layout.responses_per_example, layout.batch_size
    head_inputs = rows.expand(module._head_inputs(inputs, layout, labels_shape, False), b)
    if module._needs("lengths") and "lengths" not in inputs:
        head_inputs["lengths"] = per_response(rows.lengths, k)
    for name, value in dense.items():  # token KL, log sum p^2: summed per segment
        if value is not None and module._needs(name) and name not in inputs:
            head_inputs[name] = per_response(rows.gather(seg(value)), k)
    use_ref = ref_seg is not None and module._reference_use() != "none"
    out = module._head(per_response(rows.gather(policy_seg), k),
                       per_response(rows.gather(ref_seg), k) if use_ref else None, head_inputs)
    count = torch.bincount(rows.example, minlength=b).to(out.per_example.dtype)
    per_example = out.per_example.new_zeros(b).index_add(0, rows.example, out.per_example) / count
    return FusedPreferenceOutput(out.loss, per_example, with_token_metrics(out.metrics, scores, layout), policy_seg,
                                 None if ref_seg is None else ref_seg.detach(), layout.lengths)
