"""Float64 references for the fused preference loss: materialised logits, loops over rows (test-only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DT = torch.float64


@dataclass
class RowsProblem:
    """``K * B`` response rows (rank-major: row ``k * B + b``), ``T`` positions, prompt and padding ignored."""

    hidden: torch.Tensor  # (R, T, D)
    weight: torch.Tensor  # (V, D)
    labels: torch.Tensor  # (R, T)
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    b: int
    k: int


def rows_problem(b: int, k: int, *, t: int = 9, d: int = 12, v: int = 37, seed: int = 0, bias: bool = False) -> RowsProblem:
    g = torch.Generator().manual_seed(seed)
    r = b * k
    hidden = torch.randn(r, t, d, generator=g, dtype=DT)
    weight = torch.randn(v, d, generator=g, dtype=DT) / d**0.5 * 2
    labels = torch.randint(0, v, (r, t), generator=g)
    for row in range(r):  # a prompt of 1..3 ignored positions, then 1+ completion tokens, then padding
        p = int(torch.randint(1, 4, (), generator=g))
        end = int(torch.randint(p + 1, t + 1, (), generator=g))
        labels[row, :p] = -100
        labels[row, end:] = -100
    ref_hidden = hidden + 0.3 * torch.randn(r, t, d, generator=g, dtype=DT)
    ref_weight = weight + 0.1 * torch.randn(v, d, generator=g, dtype=DT)
    return RowsProblem(hidden, weight, labels, ref_hidden, ref_weight, b, k)


def token_logp_rows(hidden, weight, labels, *, bias=None, temperature=1.0, softcap=None):
    """``(R, T)`` log-probs with materialised float64 logits, plus the full log-softmax ``(R, T, V)``."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    safe = labels.clamp(min=0)
    return logp.gather(-1, safe[..., None])[..., 0], logp


def per_response_tokens(values: torch.Tensor, labels: torch.Tensor, b: int, k: int, fill=0.0) -> torch.Tensor:
    """``(B, K, Tmax)`` completion-token values from rank-major rows ``values (R, T)``, in row order (loops)."""
    r = values.shape[0]
    seqs = [[values[row, t] for t in range(values.shape[1]) if int(labels[row, t]) != -100] for row in range(r)]
    tmax = max(len(s) for s in seqs)
    rows = []
    for kk in range(k):
        for bb in range(b):
            s = seqs[kk * b + bb]
            row = torch.stack(s + [torch.tensor(fill, dtype=values.dtype)] * (tmax - len(s)))
            rows.append(row)
    return torch.stack(rows).view(k, b, tmax).transpose(0, 1)


def completion_mask(labels: torch.Tensor, b: int, k: int) -> torch.Tensor:
    counts = (labels != -100).sum(1)
    tmax = int(counts.max())
    mask = torch.zeros(b, k, tmax, dtype=torch.bool)
    for kk in range(k):
        for bb in range(b):
            mask[bb, kk, : int(counts[kk * b + bb])] = True
    return mask


def reference_scores(p: RowsProblem, *, temperature: float = 1.0, softcap: Optional[float] = None):
    """Policy/reference per-token log-probs, token KL(p_ref||p), log sum p^2, entropy, mean logit: each (B, K, Tmax)."""
    lp, logp = token_logp_rows(p.hidden, p.weight, p.labels, temperature=temperature, softcap=softcap)
    rlp, rlogp = token_logp_rows(p.ref_hidden, p.ref_weight, p.labels, temperature=temperature, softcap=softcap)
    kl = (rlogp.exp() * (rlogp - logp)).sum(-1)
    lsp2 = torch.logsumexp(2 * logp, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    z = p.hidden @ p.weight.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    mean_logit = (z / temperature).mean(-1)
    top1 = (logp.argmax(-1) == p.labels).double()
    conv = lambda x: per_response_tokens(x, p.labels, p.b, p.k)  # noqa: E731
    return dict(lp=conv(lp), rlp=conv(rlp.detach()), kl=conv(kl), lsp2=conv(lsp2.detach()), entropy=conv(entropy.detach()),
                mean_logit=conv(mean_logit.detach()), top1=conv(top1), mask=completion_mask(p.labels, p.b, p.k))
