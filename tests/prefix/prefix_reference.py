"""Independent references for the prefix-sharing tests: the mask from its definition, float64 attention.

Written from the definition in the issue (causal AND same document AND a response never sees another
response), using only the compact description ``layout.rows()``: not from ``token_bounds`` or the
block maps that the code under test uses.
"""

from __future__ import annotations

import random

import pytest

import torch

from pygpo.prefix import PrefixLayout


def allowed_mask(layout: PrefixLayout, sliding_window: int | None = None) -> torch.Tensor:
    """``(B, S, S)`` bool by brute force. Padding tokens see only themselves. With ``sliding_window = W``
    a query also needs ``pos(q) - pos(k) < W``, positions counted as in the query's own unshared
    ``prompt + response`` sequence (prompt ``0..P-1``, every response from ``P``)."""
    B, S = layout.shape
    doc = torch.full((B, S), -1, dtype=torch.long)
    seg = torch.full((B, S), -1, dtype=torch.long)  # 0 = prompt, i >= 1 = response i
    pos = torch.zeros((B, S), dtype=torch.long)
    for b, docs in enumerate(layout.rows()):
        for d, info in enumerate(docs):
            s, p = info["start"], info["prompt_len"]
            doc[b, s:s + p] = d
            seg[b, s:s + p] = 0
            pos[b, s:s + p] = torch.arange(p)
            for i, (rs, rl) in enumerate(zip(info["resp_starts"], info["resp_lens"]), start=1):
                doc[b, rs:rs + rl] = d
                seg[b, rs:rs + rl] = i
                pos[b, rs:rs + rl] = p + torch.arange(rl)
    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for q in range(S):
            if doc[b, q] < 0:
                allowed[b, q, q] = True
                continue
            for k in range(q + 1):
                same_doc = doc[b, k] == doc[b, q]
                cross = seg[b, q] > 0 and seg[b, k] > 0 and seg[b, k] != seg[b, q]
                in_window = sliding_window is None or int(pos[b, q] - pos[b, k]) < sliding_window
                allowed[b, q, k] = bool(same_doc and not cross and in_window)
    return allowed


def reference_attention(q, k, v, allowed, scale=None, sinks=None):
    """Float64 masked softmax attention; ``q (B, Hq, S, d)``, ``k/v (B, Hkv, S, d)``, ``allowed (B, S, S)``.

    ``sinks (Hq,)``: per head, ``exp(sinks[h])`` joins every row's softmax denominator (a virtual key
    with logit ``sinks[h]`` and a zero value), written as the explicit sum."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None].to(q.device), float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1) @ v
    sink = sinks.double()[None, :, None]
    top = torch.maximum(scores.amax(-1), sink)  # (B, H, S), for a stable exp
    weights = torch.exp(scores - top[..., None])
    return (weights @ v) / (weights.sum(-1) + torch.exp(sink - top))[..., None]


def random_layout(seed: int, batch_size: int, seq_len: int, max_docs: int = 3, max_k: int = 4) -> PrefixLayout:
    """Rows of random documents (prompt 1..8, K in 2..max_k, responses 1..9), padding at the end of rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch_size):
        docs, used = [], 0
        for _ in range(rng.randint(1, max_docs)):
            p = rng.randint(1, 8)
            lens = [rng.randint(1, 9) for _ in range(rng.randint(2, max_k))]
            if used + p + sum(lens) > seq_len:
                break
            docs.append((p, lens))
            used += p + sum(lens)
        if not docs:
            docs = [(1, [1, 1])]
        rows.append(docs)
    return PrefixLayout.from_lengths(rows, seq_len=seq_len)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the spinning
    OpenMP workers make these tests 10x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
