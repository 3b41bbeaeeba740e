"""Section 7 (K responses per prompt): float64 references from LOSSES.md, loop-based (one prompt at a
time) so that they share nothing with the vectorised implementation; plackett_luce K=2 == dpo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from loss_cases import all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss


def ls(x):
    return torch.log1p(torch.exp(-x))


def rows(c):
    B, K = c.policy.shape
    valid = c.kwargs.get("valid", torch.ones(B, K, dtype=torch.bool))
    for b in range(B):
        ks = [k for k in range(K) if valid[b, k]]
        yield b, ks


def stack(vals):
    return torch.stack(vals)


def ref_mpo(c):
    beta, alpha = c.kwargs.get("beta", 0.1), c.kwargs.get("alpha", 1.0)
    R = c.kwargs["rewards"]
    out = []
    for b, ks in rows(c):
        mean_r = sum(float(R[b, k]) for k in ks) / len(ks)
        pos = [k for k in ks if float(R[b, k]) > mean_r]
        if not pos:
            out.append(torch.zeros((), dtype=torch.float64))
            continue

        def term(k):
            w = math.exp(alpha * abs(float(R[b, k]) - mean_r))
            return w * torch.exp(beta * (c.policy[b, k] - c.ref[b, k]))

        out.append(-torch.log(sum(term(k) for k in pos) / sum(term(k) for k in ks)))
    per = stack(out)
    return per, per.mean()


def ref_exo_k(c):
    beta, br = c.kwargs.get("beta", 0.1), c.kwargs.get("beta_r", 1.0)
    R = c.kwargs["rewards"]
    out = []
    for b, ks in rows(c):
        s = stack([beta * (c.policy[b, k] - c.ref[b, k]) for k in ks])
        r = stack([R[b, k] / br for k in ks])
        pf = torch.exp(s) / torch.exp(s).sum()
        pr = torch.exp(r) / torch.exp(r).sum()
        out.append((pf * torch.log(pf / pr)).sum())
    per = stack(out)
    return per, per.mean()


def ref_plackett_luce(c):
    beta = c.kwargs.get("beta", 0.1)
    out = []
    for b, ks in rows(c):
        if "ranks" in c.kwargs:
            order = sorted(ks, key=lambda k: int(c.kwargs["ranks"][b, k]))
        elif "rewards" in c.kwargs:
            order = sorted(ks, key=lambda k: -float(c.kwargs["rewards"][b, k]))
        else:
            order = list(ks)
        z = [beta * (c.policy[b, k] - c.ref[b, k]) for k in order]
        total = torch.zeros((), dtype=torch.float64)
        for i in range(len(z)):
            total = total - torch.log(torch.exp(z[i]) / sum(torch.exp(z[j]) for j in range(i, len(z))))
        out.append(total)
    per = stack(out)
    return per, per.mean()


def ref_tpo_tree(c):
    R = c.kwargs["rewards"]
    n = c.kwargs.get("lengths")
    out = []
    for b, ks in rows(c):
        s = {k: (c.policy[b, k] - c.ref[b, k]) / (n[b, k] if n is not None else 1.0) for k in ks}
        K = len(ks)
        total = torch.zeros((), dtype=torch.float64)
        for i, j in itertools.permutations(ks, 2):
            sign = float(torch.sign(R[b, i] - R[b, j]))
            total = total + ls((s[i] - s[j]) * sign)
        out.append(total / (K * (K - 1)))
    per = stack(out)
    return per, per.mean()


def ref_sppo_k(c):
    beta = c.kwargs.get("beta", 0.1)
    eta = 1 / beta
    P = c.kwargs["win_probs"]
    out = [stack([(c.policy[b, k] - c.ref[b, k] - eta * (P[b, k] - 0.5)) ** 2 for k in ks]).mean() for b, ks in rows(c)]
    per = stack(out)
    return per, per.mean()


def ref_gpo(c):
    beta = c.kwargs.get("beta", 0.1)
    eta = 1 / beta
    S = c.kwargs["scores"]
    out = [stack([(c.policy[b, k] - c.ref[b, k] - eta * S[b, k]) ** 2 for k in ks]).mean() for b, ks in rows(c)]
    per = stack(out)
    return per, per.mean()


def ref_egpo(c):
    beta = c.kwargs.get("beta", 0.1)
    P = c.kwargs["win_probs"]
    u = c.policy - c.ref
    per = ((u[:, 0] - u[:, 1]) - (P[:, 0] - P[:, 1]) / beta) ** 2
    return per, per.mean()


def ref_curriculum(c):
    beta = c.kwargs.get("beta", 0.1)
    R = c.kwargs["rewards"]
    rank_gap = c.kwargs.get("weighting", "none") == "rank_gap"
    out = []
    for b, ks in rows(c):
        rank = {k: sum(1 for j in ks if float(R[b, j]) > float(R[b, k])) for k in ks}
        num = torch.zeros((), dtype=torch.float64)
        den = 0.0
        for i, j in itertools.permutations(ks, 2):
            if float(R[b, i]) > float(R[b, j]):
                w = float(rank[j] - rank[i]) if rank_gap else 1.0
                num = num + w * ls(beta * ((c.policy[b, i] - c.ref[b, i]) - (c.policy[b, j] - c.ref[b, j])))
                den += w
        out.append(num / den if den > 0 else num * 0)
    per = stack(out)
    return per, per.mean()


REFERENCES = {
    "mpo": ref_mpo,
    "exo_k": ref_exo_k,
    "plackett_luce": ref_plackett_luce,
    "tpo_tree": ref_tpo_tree,
    "sppo_k": ref_sppo_k,
    "gpo": ref_gpo,
    "egpo": ref_egpo,
    "curriculum": ref_curriculum,
}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_plackett_luce_k2_is_dpo():
    c = cases("dpo")[0]
    pl = preference_loss("plackett_luce", c.policy, c.ref, beta=0.3)
    dpo = preference_loss("dpo", c.policy, c.ref, beta=0.3)
    torch.testing.assert_close(pl.per_example, dpo.per_example, rtol=1e-12, atol=1e-14)


def test_plackett_luce_ranks_and_rewards_orders_agree():
    c = cases("plackett_luce")[0]
    ranks = c.kwargs["ranks"]
    rewards = -ranks.double()
    a = preference_loss("plackett_luce", c.policy, c.ref, beta=0.3, ranks=ranks)
    b = preference_loss("plackett_luce", c.policy, c.ref, beta=0.3, rewards=rewards)
    torch.testing.assert_close(a.per_example, b.per_example)


def test_curriculum_k2_is_dpo():
    c = cases("dpo")[0]
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64).expand(c.policy.shape[0], 2)
    cur = preference_loss("curriculum", c.policy, c.ref, beta=0.3, rewards=r)
    dpo = preference_loss("dpo", c.policy, c.ref, beta=0.3)
    torch.testing.assert_close(cur.per_example, dpo.per_example)


def test_sppo_k_k2_is_sppo():
    c = cases("sppo")[0]
    a = preference_loss("sppo_k", c.policy, c.ref, beta=0.5, win_probs=c.kwargs["win_probs"])
    b = preference_loss("sppo", c.policy, c.ref, beta=0.5, win_probs=c.kwargs["win_probs"])
    torch.testing.assert_close(a.per_example, b.per_example)


def test_invalid_responses_do_not_matter():
    c = cases("exo_k")[1]
    valid = c.kwargs["valid"]
    garbage = torch.where(valid, c.policy, torch.full_like(c.policy, -1e4))
    a = preference_loss("exo_k", garbage, c.ref, **c.kwargs)
    b = preference_loss("exo_k", c.policy, c.ref, **c.kwargs)
    torch.testing.assert_close(a.per_example, b.per_example)


def test_mpo_split_is_strictly_above_mean():
    # rewards [2, 1, 0]: mean 1, so only the first response is positive
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    rp = torch.zeros_like(lp)
    R = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    out = preference_loss("mpo", lp, rp, beta=0.5, alpha=0.3, rewards=R)
    w = torch.exp(0.3 * (R - 1.0).abs())
    e = w * torch.exp(0.5 * lp)
    torch.testing.assert_close(out.per_example, -torch.log(e[:, 0] / e.sum(1)))
    tie = preference_loss("mpo", lp, rp, rewards=torch.ones_like(R))
    assert float(tie.loss) == 0.0
