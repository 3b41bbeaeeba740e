"""Per-example loss inputs read from dataset columns (TODO's ``ties``, ODPO's ``scores``, MaPPO's
``rewards``, Omni-DPO's ``quality``, ...).

A loss input is taken from the data when the registry declares it per example, ``(B,)`` or
``(B, 2, ...)``: a row carries it as a column of the same name (a number or bool, or a list
``[chosen, rejected]``). Inputs the fused pass supplies itself (lengths, masks, token KL,
``log sum p^2``), batch-level ones (scalars, generators) and the desirable flags of unpaired heads
(a pair's chosen response is desirable, its rejected one is not) are not read from rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..fused.inputs import AUTO_INPUTS


def example_input_fields(loss_keys: Sequence[str]) -> dict[str, bool]:
    """``{column: required}`` of the per-example inputs of the loss components ``loss_keys``."""
    from ..losses import get

    fields: dict[str, bool] = {}
    for key in loss_keys:
        spec = get(key)
        for item in spec.inputs:
            if spec.kind == "unpaired" and item.name == "labels":
                continue  # desirable / undesirable comes from chosen / rejected
            per_example = item.shapes and all(len(s) >= 1 and s[0] == "B" and "T" not in s for s in item.shapes)
            if item.name in AUTO_INPUTS or item.dtype == "object" or not per_example:
                continue
            fields[item.name] = fields.get(item.name, False) or item.required
    return fields


def batch_inputs(examples: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Tensor]:
    """The examples' loss inputs stacked into tensors ``(B, ...)`` (bools stay bool)."""
    names = examples[0].get("inputs", {}).keys() if examples else ()
    out: dict[str, Tensor] = {}
    for name in names:
        values = [ex["inputs"][name] for ex in examples]
        out[name] = torch.tensor(values, device=device)
        if out[name].dtype == torch.float64:
            out[name] = out[name].float()
    return out
