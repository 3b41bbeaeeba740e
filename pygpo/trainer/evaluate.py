"""Held-out evaluation: reward accuracy and loss on preference pairs, and a greedy-decoding task metric.

Reward accuracy is the fraction of held-out pairs whose implicit reward margin is positive, ties
counting one half (at step 0 the policy is its own reference, every margin is 0 up to float32 rounding
of the scores, e.g. against cached reference scores, and the accuracy reads 0.5, not 0; under ``dtype:
bf16`` a cache is filled by a bf16 copy, whose step-0 margins are bf16 rounding rather than ties). The margin
``h`` is ``(lp_w - rp_w) - (lp_l - rp_l)`` with a reference, and the length-normalised
``lp_w / |y_w| - lp_l / |y_l|`` for reference-free losses; ``eval/margin`` is its mean. The training
log's ``rewards/accuracies`` is the same accuracy over a step's pairs (:func:`output_margins`), so the
two curves of ``reward_accuracy.png`` compare like with like; ``eval/rewards/margins`` is the loss's own
``rewards/margins`` metric (``beta * h`` for DPO) over the held-out pairs, the quantity the training log
shows under that name.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..integrations.transformers import disable_prefix_sharing, enable_prefix_sharing
from .data import iter_batches


#: Margins within this many float32 units in the last place of their scores' magnitude count as ties: a
#: policy scored by one pass and its own reference cached by another agree only to rounding.
TIE_ULPS = 16


def pair_margins(policy: Tensor, ref: Optional[Tensor], lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``(B,)`` implicit reward margins of ``(B, 2)`` sequence scores (see the module docstring), and
    ``(B,)`` the float32 rounding scale under which a margin is a tie."""
    if ref is None:
        s = policy / lengths.clamp(min=1).to(policy.dtype)
        size = s.abs().sum(-1)
    else:
        s = policy - ref
        size = policy.abs().sum(-1) + ref.abs().sum(-1)
    return s[:, 0] - s[:, 1], TIE_ULPS * torch.finfo(torch.float32).eps * size


def output_margins(out: Any) -> tuple[Tensor, Tensor]:
    """:func:`pair_margins` of a scored batch (a :class:`pygpo.FusedPreferenceOutput` of ``(B, 2)`` scores),
    in float64, detached."""
    ref = None if out.ref_logps is None else out.ref_logps.detach().double()
    return pair_margins(out.policy_logps.detach().double(), ref, out.lengths)


def reward_accuracy(margins: Tensor, tie_scale: Optional[Tensor] = None) -> float:
    """Fraction of positive margins, ties (``|margin| <= tie_scale``, default exactly 0) counting one half."""
    tie = margins.abs() <= (0 if tie_scale is None else tie_scale)
    return float(((margins > 0) & ~tie).double().add(0.5 * tie.double()).mean())


@torch.no_grad()
def evaluate_pairs(score: Callable[[Sequence[Any]], Any], examples: Sequence[Any], batch_size: int) -> dict[str, float]:
    """``eval/loss``, ``eval/reward_accuracy``, ``eval/margin`` and (where the loss reports the metric)
    ``eval/rewards/margins`` over ``examples`` (``score`` runs one batch); the batch means are weighted by
    the batches' pair counts."""
    if not examples:
        raise ValueError("examples: evaluation needs at least one held-out pair, got none")
    margins, ties, counts = [], [], []
    sums: dict[str, float] = defaultdict(float)
    for batch in iter_batches(examples, batch_size):
        out = score(batch)
        m, tie = output_margins(out)
        margins.append(m)
        ties.append(tie)
        counts.append(len(batch))
        sums["eval/loss"] += float(out.loss) * len(batch)
        if "rewards/margins" in out.metrics:
            sums["eval/rewards/margins"] += float(out.metrics["rewards/margins"]) * len(batch)
    m = torch.cat(margins)
    metrics = {k: v / sum(counts) for k, v in sums.items()}
    return {**metrics, "eval/reward_accuracy": reward_accuracy(m, torch.cat(ties)), "eval/margin": float(m.mean())}


@contextlib.contextmanager
def plain_attention(model: nn.Module):
    """Generation runs with the model's ordinary attention (prefix sharing is for training forwards)."""
    shared = getattr(model, "_pygpo_prefix_sharing", None) is not None
    if shared:
        disable_prefix_sharing(model)
    try:
        yield
    finally:
        if shared:
            enable_prefix_sharing(model)


@torch.no_grad()
def greedy_accuracy(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    check: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    device: torch.device,
) -> float:
    """Fraction of ``prompts`` whose greedy completion (decoded up to EOS) passes ``check(prompt, text)``.

    Prompts are decoded in groups of equal length, so no padding enters the generation.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompt_ids):
        groups[len(ids)].append(i)
    was_training = model.training
    model.eval()
    correct = 0
    eos = tokenizer.eos_token_id
    with plain_attention(model):
        for _, idx in sorted(groups.items()):
            for start in range(0, len(idx), 64):
                chunk = idx[start: start + 64]
                ids = torch.tensor([list(prompt_ids[i]) for i in chunk], device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                     use_cache=True)
                for row, i in zip(out[:, ids.shape[1]:].tolist(), chunk):
                    row = row[: row.index(eos)] if eos in row else row
                    correct += int(check(prompts[i], tokenizer.decode(row, skip_special_tokens=True)))
    model.train(was_training)
    return correct / max(len(prompts), 1)
