"""One micro-batch of preference pairs through the model and the fused loss.

With prefix sharing each example is one document ``[prompt | chosen | rejected]`` (:func:`pygpo.prefix.pack`)
and the prompt is computed once; without it the batch is ``2B`` right-padded rows, all chosen rows
then all rejected rows. Either way only the final hidden states leave the model (no logits), and
:class:`pygpo.FusedPreferenceLoss` scores the completion tokens.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..fused import FusedPreferenceLoss, FusedPreferenceOutput
from ..integrations.hidden_states import final_hidden_states, lm_head_of
from ..prefix import pack
from .loss_inputs import batch_inputs

Example = Mapping[str, Any]


def _projection(model: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    return lm_head_of(model).projection()


def padded_rows(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` ``(2B, L)`` and shifted ``labels`` ``(2B, L-1)`` (-100 off the responses)."""
    seqs, prompt_lens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(list(ex["prompt_ids"]) + list(ex[key]))
            prompt_lens.append(len(ex["prompt_ids"]))
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, p: len(s)] = ids[i, p: len(s)]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels[:, 1:].to(device)}


def score_batch(
    loss_fn: FusedPreferenceLoss,
    model: nn.Module,
    ref_model: Optional[nn.Module],
    examples: Sequence[Example],
    *,
    prefix_sharing: bool,
    pad_id: int,
    device: torch.device,
    ref_logps: Optional[Tensor] = None,
) -> FusedPreferenceOutput:
    """Loss, metrics and sequence scores of ``examples`` (``ref_logps (B, 2)``: cached reference sums)."""
    ref_kw: dict[str, Any] = {} if ref_logps is None else {"ref_logps": ref_logps.to(device)}
    ref_kw.update(batch_inputs(examples, device))  # per-example loss inputs read from the data
    weight, bias = _projection(model)
    if prefix_sharing:
        batch = pack([ex["prompt_ids"] for ex in examples], [[ex["chosen_ids"], ex["rejected_ids"]] for ex in examples],
                     pad_token_id=pad_id).to(device)
        body = {"input_ids": batch.input_ids, "prefix_layout": batch.layout}
        hidden = final_hidden_states(model, **body)
        if ref_model is not None:
            with torch.no_grad():
                ref_kw["ref_hidden"] = final_hidden_states(ref_model, **body)
            ref_kw["ref_weight"], ref_kw["ref_bias"] = _projection(ref_model)
        return loss_fn(hidden, weight, bias=bias, batch=batch, **ref_kw)
    rows = padded_rows(examples, pad_id, device)
    body = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
    hidden = final_hidden_states(model, **body)[:, :-1]
    if ref_model is not None:
        with torch.no_grad():
            ref_kw["ref_hidden"] = final_hidden_states(ref_model, **body)[:, :-1]
        ref_kw["ref_weight"], ref_kw["ref_bias"] = _projection(ref_model)
    return loss_fn(hidden, weight, rows["labels"], bias=bias, **ref_kw)
