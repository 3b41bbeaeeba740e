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
from ..ops import fused_linear_logprobs
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


def _unpaired_view(out: FusedPreferenceOutput, b: int, rank_major: bool) -> FusedPreferenceOutput:
    """``(2B, 1)`` scores of an unpaired head laid back out as ``(B, 2)`` [chosen, rejected] pairs."""
    def pairs(x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None:
            return None
        return x.reshape(2, b).T if rank_major else x.reshape(b, 2)

    return out._replace(policy_logps=pairs(out.policy_logps), ref_logps=pairs(out.ref_logps), lengths=pairs(out.lengths))


@torch.no_grad()
def mismatched_logps(model: nn.Module, ref_model: nn.Module, examples: Sequence[Example], *, pad_id: int,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """KTO's reference-point pairs: policy and reference sums of ``(x_i, y_{i+1})`` (each prompt with the
    next example's chosen response), ``(B,)`` each."""
    shifted = [dict(ex, chosen_ids=examples[(i + 1) % len(examples)]["chosen_ids"]) for i, ex in enumerate(examples)]
    rows = padded_rows(shifted, pad_id, device)
    b = len(examples)
    body = {"input_ids": rows["input_ids"][:b], "attention_mask": rows["attention_mask"][:b]}
    labels = rows["labels"][:b]
    sums = []
    for m in (model, ref_model):
        weight, bias = _projection(m)
        logps = fused_linear_logprobs(final_hidden_states(m, **body)[:, :-1], weight.detach(), labels,
                                      bias=None if bias is None else bias.detach())
        sums.append(logps.sum(-1))
    return sums[0], sums[1]


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
    loss_inputs: Optional[dict[str, Any]] = None,
) -> FusedPreferenceOutput:
    """Loss, metrics and sequence scores of ``examples`` (``ref_logps (B, 2)``: cached reference sums;
    ``loss_inputs``: inputs for the loss beyond the data's, such as ``nll_mean_length``).

    Unpaired heads (KTO, BCO, ...) see every pair as two examples, the chosen response desirable and
    the rejected one not (as KTO is run on preference data); their scores come back as ``(B, 2)`` pairs.
    KTO's reference point comes from mismatched pairs of the batch (:func:`mismatched_logps`).
    """
    b = len(examples)
    unpaired = all(s.kind == "unpaired" for s in loss_fn.specs)
    ref_kw: dict[str, Any] = {} if ref_logps is None else {"ref_logps": ref_logps.to(device)}
    ref_kw.update(batch_inputs(examples, device))  # per-example loss inputs read from the data
    ref_kw.update(loss_inputs or {})
    if unpaired and "kl_logps" in {n for s in loss_fn.specs for n in s.input_names} and ref_model is not None:
        ref_kw["kl_logps"], ref_kw["kl_ref_logps"] = mismatched_logps(model, ref_model, examples, pad_id=pad_id, device=device)
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
        if not unpaired:
            return loss_fn(hidden, weight, bias=bias, batch=batch, **ref_kw)
        # one unpaired example per response, id = 2 * example + rank (chosen first)
        flat = batch.gather(hidden)
        if "ref_hidden" in ref_kw:
            ref_kw["ref_hidden"] = batch.gather(ref_kw["ref_hidden"], name="ref_hidden")
        ids = (batch._example_slot() * 2 + batch.response_rank)[batch.target_response]
        desirable = torch.tensor([True, False], device=device).repeat(b)
        out = loss_fn(flat, weight, batch.target_labels, ids, bias=bias, responses_per_example=1,
                      preference_labels=desirable, **_unpaired_ref(ref_kw, rank_major=False, b=b))
        return _unpaired_view(out, b, rank_major=False)
    rows = padded_rows(examples, pad_id, device)
    body = {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}
    hidden = final_hidden_states(model, **body)[:, :-1]
    if ref_model is not None:
        with torch.no_grad():
            ref_kw["ref_hidden"] = final_hidden_states(ref_model, **body)[:, :-1]
        ref_kw["ref_weight"], ref_kw["ref_bias"] = _projection(ref_model)
    if not unpaired:  # rows: the chosen rows, then the rejected rows (K = 2, multi-response heads included)
        return loss_fn(hidden, weight, rows["labels"], bias=bias, responses_per_example=2, **ref_kw)
    desirable = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(device)
    out = loss_fn(hidden, weight, rows["labels"], bias=bias, responses_per_example=1, preference_labels=desirable,
                  **_unpaired_ref(ref_kw, rank_major=True, b=b))
    return _unpaired_view(out, b, rank_major=True)


def _unpaired_ref(ref_kw: dict[str, Any], *, rank_major: bool, b: int) -> dict[str, Any]:
    """Cached ``(B, 2)`` reference sums in the unpaired examples' order."""
    if "ref_logps" in ref_kw:
        pairs = ref_kw["ref_logps"]
        ref_kw = dict(ref_kw, ref_logps=pairs.T.reshape(-1) if rank_major else pairs.reshape(-1))
    return ref_kw
