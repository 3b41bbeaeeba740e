"""Random float64 inputs for every loss key (test infrastructure only, no loss math here).

``cases(key)`` returns a list of :class:`Case`: the arguments of one ``preference_loss`` call. Values
are drawn away from kinks (relu/hinge corners, sort ties) so finite differences are meaningful.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

DT = torch.float64
B = 5


@dataclass
class Case:
    key: str
    policy: torch.Tensor
    ref: Optional[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.key}-{self.label}" if self.label else self.key


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def u(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=DT)


def n(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def pair_scores(g, b=B, k=2):
    lp = -u(g, b, k, lo=5.0, hi=40.0)
    rp = lp + n(g, b, k, scale=2.0)
    return lp, rp


def lengths(g, b=B, k=2):
    return torch.randint(1, 30, (b, k), generator=g).to(DT)


def tokens(g, b=B, k=2, t=7):
    """Per-token policy/reference log-probs, a mask with >= 1 token per response, per-token KL."""
    lp = -u(g, b, k, t, lo=0.05, hi=3.0)
    rp = lp + n(g, b, k, t, scale=0.3)
    mask = torch.rand(b, k, t, generator=g) < 0.75
    mask[..., 0] = True
    kl = u(g, b, k, t, lo=0.0, hi=0.5)
    return lp, rp, mask, kl


def _pair(key, seed, label="", ref=True, **kwargs):
    g = gen(seed)
    lp, rp = pair_scores(g)
    return Case(key, lp, rp if ref else None, kwargs, label)


def cases(key: str) -> list[Case]:
    """Every case of ``key`` (several where options change the formula)."""
    g = gen(zlib.crc32(key.encode()) % 10_000)
    lp, rp = pair_scores(g)
    ln = lengths(g)
    simple = {
        "dpo": dict(beta=0.3),
        "cdpo": dict(beta=0.2, eps=0.15),
        "robust": dict(beta=0.2, eps=0.2),
        "hinge": dict(beta=0.2),
        "exo": dict(beta=0.3, eps=0.01),
        "nca": dict(beta=0.3),
        "sppo_hard": dict(beta=0.5),
        "aot": dict(beta=0.3, eps=0.1),
        "aot_unpaired": dict(beta=0.3, eps=0.1),
        "apo_zero": dict(beta=0.3),
        "apo_down": dict(beta=0.3),
        "discopop": dict(beta=0.3, tau=0.5),
        "hdpo": dict(beta=0.3, alpha=0.7),
        "dpo_shift": dict(beta=0.3, lam=0.8),
        "dr_dpo": dict(beta=0.3, beta_prime=0.5),
        "inpo": dict(eta=0.1, tau=0.02),
        "anchor": dict(beta=0.3, delta=0.1),
        "rpo_sum": dict(beta=0.3, eta=0.5),
    }
    ref_free = {"rpo_sum"}
    if key in simple:
        out = [Case(key, lp, None if key in ref_free else rp, simple[key], "custom")]
        out.append(Case(key, lp, None if key in ref_free else rp, {}, "defaults"))
        if key == "inpo":
            out = [Case(key, lp, rp, dict(simple[key], prev_ref_logps=rp + n(g, B, 2)), "custom"),
                   Case(key, lp, rp, dict(eta=0.05, prev_ref_logps=rp + n(g, B, 2)), "tau_none")]
        return out
    if key == "ipo":
        return [Case(key, lp, rp, dict(beta=0.5, lengths=ln), "norm"),
                Case(key, lp, rp, dict(beta=0.5, length_normalize=False), "sum")]
    if key == "bco_pair":
        return [Case(key, lp, rp, dict(beta=0.2, delta=torch.tensor(0.05, dtype=DT)), "delta"),
                Case(key, lp, rp, dict(beta=0.2), "no_delta")]
    if key == "sppo":
        wp = u(g, B, 2)
        return [Case(key, lp, rp, dict(beta=0.5, win_probs=wp), "beta"), Case(key, lp, rp, dict(eta=3.0, win_probs=wp), "eta")]
    if key == "sigmoid_norm":
        return [Case(key, lp, rp, dict(beta=2.0, lengths=ln))]
    if key == "fdpo":
        return [Case(key, lp, rp, dict(beta=0.3, divergence=d, alpha=0.3), d) for d in ("reverse_kl", "forward_kl", "js", "alpha")]
    if key == "mappo":
        return [Case(key, lp, rp, dict(beta=0.3, rewards=u(g, B, 2)))]
    if key == "odpo":
        s_l = u(g, B, lo=0.1, hi=1.0)
        s = torch.stack([s_l + u(g, B, lo=0.1, hi=2.0), s_l], dim=1)
        return [Case(key, lp, rp, dict(beta=0.3, alpha=0.7, offset=o, scores=s), o) for o in ("diff", "ratio")]
    if key == "rdpo_length":
        return [Case(key, lp, rp, dict(beta=0.3, alpha=0.02, lengths=ln))]
    if key == "dpop":
        return [Case(key, lp, rp, dict(beta=0.3, lam=5.0), "custom"), Case(key, lp, rp, {}, "defaults")]
    if key == "modpo":
        return [Case(key, lp, rp, dict(beta=0.3, w0=0.4, w_rest=(0.3, 0.2, 0.1), margin_rewards=n(g, B, 2, 3)), "three"),
                Case(key, lp, rp, dict(margin_rewards=n(g, B, 2)), "one_default")]
    if key == "todo":
        ties = torch.tensor([True, False, True, False, False])
        return [Case(key, lp, rp, dict(beta=0.05, theta=-0.4, ties=ties))]
    if key == "wpo":
        lsp2 = -ln * u(g, B, 2, lo=0.02, hi=0.6)
        return [Case(key, lp, rp, dict(beta=0.3, clamp=c, lengths=ln, log_sum_p2=lsp2), f"clamp{c}") for c in (True, False)]
    if key == "omni_dpo":
        q = u(g, B, 2, lo=0.0, hi=5.0)
        q[:3, 0] = 4.0
        rp2 = rp.clone()
        rp2[:2, 0] = lp[:2, 0] + 1.0  # gate on for some pairs
        return [Case(key, lp, rp2, dict(lengths=ln, quality=q), "defaults"),
                Case(key, lp, rp2, dict(beta=1.0, eta=0.5, gamma=2.0, tau_ref=0.3, lam=0.1, tau_good=3.0, lengths=ln, quality=q), "custom")]
    if key == "reward_aware":
        r = n(g, B, 2)
        return [Case(key, lp, rp, dict(beta=0.3, eta=0.7, mode=m, rewards=r), m) for m in ("sq", "bwd_kl", "fwd_kl", "scale")]
    if key == "mrpo":
        rs = rp + n(g, B, 2, scale=3.0)
        return [Case(key, lp, rp, dict(beta=0.3, eps=0.1, ref2_logps=rs), "adaptive"),
                Case(key, lp, rp, dict(beta=0.3, eps=0.2, a=0.3, ref2_logps=rs), "fixed")]
    if key == "diffusion_dpo":
        e = u(g, B, 2, lo=0.1, hi=0.5)
        return [Case(key, e, e + n(g, B, 2, scale=0.01), dict(beta=1.0, T=10.0), "custom")]
    if key in ("tdpo1", "tdpo2"):
        tl, tr, mask, kl = tokens(g)
        seq_kl = u(g, B, 2, lo=0.0, hi=3.0)
        extra = dict(a=0.7) if key == "tdpo2" else {}
        return [Case(key, tl, tr, dict(beta=0.3, kl=kl, mask=mask, **extra), "tokens"),
                Case(key, lp, rp, dict(beta=0.3, kl=seq_kl, **extra), "sequence")]
    if key == "sparsepo":
        tl, tr, mask, kl = tokens(g)
        return [Case(key, tl, tr, dict(beta=0.3, lam_u=0.01, lam_d=0.02, kl=kl, mask=mask, mu=u(g, B, 2, 7), md=u(g, B, 2, 7)), "masks"),
                Case(key, tl, tr, dict(beta=0.3, kl=kl, mask=mask), "ones")]
    if key == "rrpo":
        tl, tr, mask, kl = tokens(g)
        seg = torch.randint(-1, 3, (B, 2, 7), generator=g)
        return [Case(key, tl, tr, dict(beta=0.3, alpha=0.05, kl=kl, mask=mask, segment_ids=seg))]
    if key == "simpo":
        return [Case(key, lp, None, dict(beta=2.5, gamma=0.3, eps=0.1, lengths=ln), "custom"), Case(key, lp, None, dict(lengths=ln), "defaults")]
    if key == "cpo":
        return [Case(key, lp, None, dict(beta=0.2, eps=0.1, alpha=0.5, lengths=ln), "custom"), Case(key, lp, None, dict(lengths=ln), "defaults")]
    if key == "orpo":
        return [Case(key, lp, None, dict(lam=0.2, lengths=ln))]
    if key == "alphapo":
        return [Case(key, lp, None, dict(a=0.3, beta=2.0, gamma=0.4, lengths=ln), "custom"), Case(key, lp, None, dict(a=-0.2, lengths=ln), "negative_a")]
    if key == "repo":
        return [Case(key, lp, None, dict(gamma=0.6, lengths=ln))]
    if key == "asft":
        return [Case(key, lp, None, dict(lam=0.5, lengths=ln))]
    if key == "tpo_triple":
        return [Case(key, lp, None, dict(beta=0.2, alpha=0.5, gold_logps=-u(g, B, lo=5, hi=30), gold_lengths=torch.randint(1, 20, (B,), generator=g).to(DT)))]
    if key == "simpo_gamma_dynamic":
        return [Case(key, lp, None, dict(beta=2.0, gamma_0=0.5, tau=2.0, lengths=ln), "custom"), Case(key, lp, None, dict(lengths=ln), "defaults")]
    if key == "sft":
        return [Case(key, lp, None, dict(alpha=0.7, lengths=ln))]
    if key == "xpo":
        return [Case(key, lp, None, dict(alpha=0.1, sample_logps=-u(g, B, lo=5, hi=30)))]
    if key == "selm":
        s = -u(g, B, lo=5, hi=30)
        return [Case(key, lp, None, dict(beta=0.3, alpha=0.2, sample_logps=s, sample_ref_logps=s + n(g, B)))]
    if key == "vpo":
        c = -u(g, B, 3, lo=5, hi=30)
        return [Case(key, lp, None, dict(beta=0.3, alpha=0.5, mode=m, calib_logps=c, calib_ref_logps=c + n(g, B, 3)), m) for m in ("online", "offline")]
    if key == "rationale":
        return [Case(key, lp, None, dict(gamma=0.1, rationale_logps=-u(g, B, lo=5, hi=30)))]
    if key == "conditional":
        return [Case(key, lp, rp, dict(beta=0.3, cond_logps=lp[:, 0] + n(g, B), cond_ref_logps=rp[:, 0] + n(g, B)))]
    # ---- unpaired (B,)
    lp1, rp1 = lp[:, 0], rp[:, 0]
    labels = torch.tensor([True, False, True, True, False])
    if key == "kto":
        kl_lp = -u(g, 7, lo=5, hi=30)
        return [Case(key, lp1, rp1, dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.8, labels=labels, kl_logps=kl_lp, kl_ref_logps=kl_lp - u(g, 7, lo=0.0, hi=2.0)), "kl_pos"),
                Case(key, lp1, rp1, dict(beta=0.3, labels=labels, kl_logps=kl_lp, kl_ref_logps=kl_lp + 5.0), "kl_clamped"),
                Case(key, lp1, rp1, dict(labels=labels, z0=torch.tensor(0.4, dtype=DT)), "z0")]
    if key == "apo_zero_unpaired":
        return [Case(key, lp1, rp1, dict(beta=0.3, labels=labels))]
    if key == "bco":
        return [Case(key, lp1, rp1, dict(beta=0.3, labels=labels, delta=torch.tensor(0.1, dtype=DT)))]
    if key == "pmpo":
        return [Case(key, lp1, None, dict(alpha=0.3, beta=0.2, labels=labels, kl=u(g, B, lo=0, hi=3)))]
    if key == "dro":
        r, v = n(g, B), n(g, B)
        return [Case(key, lp1, rp1, dict(tau=0.5, rewards=r, values=v), "normalised"),
                Case(key, lp1, rp1, dict(tau=0.5, normalize_rewards=False, rewards=r, values=v), "raw")]
    # ---- multi-response (B, K)
    K = 4
    lpk, rpk = pair_scores(g, k=K)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[1, 3] = False
    valid[3, 0] = False
    rk = n(g, B, K)
    if key == "mpo":
        return [Case(key, lpk, rpk, dict(beta=0.3, alpha=0.5, rewards=rk), "all"), Case(key, lpk, rpk, dict(beta=0.3, alpha=0.5, rewards=rk, valid=valid), "valid")]
    if key == "exo_k":
        return [Case(key, lpk, rpk, dict(beta=0.3, beta_r=0.5, rewards=rk), "all"), Case(key, lpk, rpk, dict(beta=0.3, beta_r=0.5, rewards=rk, valid=valid), "valid")]
    if key == "plackett_luce":
        ranks = torch.stack([torch.randperm(K, generator=g) for _ in range(B)])
        return [Case(key, lpk, rpk, dict(beta=0.3, ranks=ranks), "ranks"), Case(key, lpk, rpk, dict(beta=0.3, rewards=rk, valid=valid), "rewards_valid"),
                Case(key, lpk, rpk, dict(beta=0.3), "columns")]
    if key == "tpo_tree":
        rt = rk.clone()
        rt[0, 1] = rt[0, 2]  # a tie
        return [Case(key, lpk, rpk, dict(rewards=rt, lengths=lengths(g, k=K)), "lengths"), Case(key, lpk, rpk, dict(rewards=rt, valid=valid), "valid")]
    if key == "sppo_k":
        return [Case(key, lpk, rpk, dict(beta=0.5, win_probs=u(g, B, K), valid=valid))]
    if key == "gpo":
        return [Case(key, lpk, rpk, dict(beta=0.5, scores=n(g, B, K), valid=valid))]
    if key == "egpo":
        return [Case(key, lp, rp, dict(beta=0.5, win_probs=u(g, B, 2)))]
    if key == "curriculum":
        rt = rk.clone()
        rt[2, 0] = rt[2, 1]
        return [Case(key, lpk, rpk, dict(beta=0.3, weighting=w, rewards=rt, valid=valid), w) for w in ("none", "rank_gap")]
    # ---- batch-level
    if key == "beta_dpo":
        return [Case(key, lp, rp, dict(beta=0.2, rho=0.4, a=0.5, m0=torch.tensor(0.3, dtype=DT), sm=torch.tensor(1.5, dtype=DT)), "stats"),
                Case(key, lp, rp, dict(beta=0.2), "batch_stats")]
    if key == "group_robust":
        groups = torch.tensor([0, 2, 0, 1, 2])
        return [Case(key, lp, rp, dict(beta=0.3, groups=groups, group_weights=torch.tensor([0.5, 0.2, 0.3], dtype=DT)), "weights"),
                Case(key, lp, rp, dict(beta=0.3, groups=groups), "uniform")]
    if key == "relative":
        return [Case(key, lp, rp, dict(beta=0.3, tau=0.7, embeddings=n(g, B, 3)))]
    raise KeyError(f"no test case for {key!r}")


def clone_case(case: Case, *, requires_grad: bool = True) -> Case:
    """A copy with fresh leaf tensors; float tensors listed in ``GRAD_INPUTS`` require grad too."""
    kw = {}
    for k, v in case.kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone().requires_grad_(requires_grad and k in GRAD_INPUTS)
        kw[k] = v
    pol = case.policy.detach().clone().requires_grad_(requires_grad)
    ref = None if case.ref is None else case.ref.detach().clone()
    return Case(case.key, pol, ref, kw, case.label)


#: Inputs that may carry gradients (compared against the reference's gradients too).
GRAD_INPUTS = {"kl", "mu", "md", "values", "embeddings", "sample_logps", "calib_logps", "rationale_logps", "gold_logps", "cond_logps"}


def compare_with_reference(case: Case, reference, *, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    """Values and gradients of ``preference_loss`` against an independent reference.

    ``reference(case) -> (per_example, loss)``, computed from the case's tensors with autograd.
    """
    from pygpo.losses import preference_loss

    a = clone_case(case)
    out = preference_loss(a.key, a.policy, a.ref, **a.kwargs)
    b = clone_case(case)
    per_ref, loss_ref = reference(b)
    torch.testing.assert_close(out.per_example.detach(), per_ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.loss.detach(), loss_ref.detach(), rtol=rtol, atol=atol)
    if not loss_ref.requires_grad:  # the reference does not depend on anything differentiable
        assert not out.loss.requires_grad
        return
    out.loss.backward()
    loss_ref.backward()
    ga = a.policy.grad if a.policy.grad is not None else torch.zeros_like(a.policy)
    gb = b.policy.grad if b.policy.grad is not None else torch.zeros_like(b.policy)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)
    for k in GRAD_INPUTS & set(a.kwargs):
        ga, gb = a.kwargs[k].grad, b.kwargs[k].grad
        if gb is None:
            assert ga is None or torch.count_nonzero(ga) == 0, k
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


def ids(items: list[Case]) -> list[str]:
    return [c.id for c in items]


def all_cases(keys) -> list[Case]:
    return [c for k in keys for c in cases(k)]
