// Math of the fused segment-reduce + pairwise loss head (LOSSES.md sections 1 and 2).
//
// Tokens t carry a policy log-prob lp_t, optionally a reference log-prob rp_t and a weight w_t, and a
// response index r(t) = 2 i + k (pair i, k = 0 chosen, k = 1 rejected), non-decreasing in t.
// Per response:  U_r = sum_{t: r(t) = r} w_t (lp_t - rp_t)  [/ n_r when length-normalised]  - R_r,
// with n_r the response's token count and R_r an optional per-response reference score. Per pair:
//     z_i = beta * (U_w - b * U_l) - m,      loss_i = f(z_i),   loss = mean_i loss_i,
// and the heads f (ls(z) = softplus(-z) = -log sigmoid(z)):
//     logistic  ls(z)                                   (DPO, Rafailov et al., 2023; b = lam: DPO-Shift)
//     smoothed  (1 - eps) ls(z) + eps ls(-z)             (conservative DPO, Mitchell, 2023; SimPO with m = gamma)
//     robust    [(1 - eps) ls(z) - eps ls(-z)] / (1 - 2 eps)   (rDPO, Chowdhury et al., 2024)
//     hinge     relu(1 - z)                              (SLiC-HF, Zhao et al., 2023; RSO, Liu et al., 2023)
//     ipo       (z - 1/2)^2 / beta^2  = (h - 1/(2 beta))^2 for b = 1, m = 0   (IPO, Azar et al., 2023)
// Backward: dL/dU_w = G_i beta f'(z), dL/dU_l = -G_i beta b f'(z), G_i = g_loss / B + g_i, and
// dL/dlp_t = w_t dL/dU_r(t) [/ n_r], dL/drp_t = -dL/dlp_t, dL/dR_r = -dL/dU_r.
#pragma once

#include "common.cuh"

namespace pygpo {

enum Head : int { kLogistic = 0, kSmoothed = 1, kRobust = 2, kHinge = 3, kIpo = 4 };

template <typename S>
struct HeadParams {
    int head;
    S beta, b, margin, eps;
    int normalize;  // 1: U is the token mean, not the sum
};

PYGPO_HD float x_exp(float x) { return expf(x); }
PYGPO_HD double x_exp(double x) { return exp(x); }
PYGPO_HD float x_log1p(float x) { return log1pf(x); }
PYGPO_HD double x_log1p(double x) { return log1p(x); }

// softplus(x) = log(1 + e^x), without overflow.
template <typename S>
PYGPO_HD S softplus(S x) {
    S ax = x < S(0) ? -x : x;
    return (x > S(0) ? x : S(0)) + x_log1p(x_exp(-ax));
}

template <typename S>
PYGPO_HD S sigmoid(S x) {
    if (x >= S(0)) return S(1) / (S(1) + x_exp(-x));
    S e = x_exp(x);
    return e / (S(1) + e);
}

// f(z) of the head.
template <typename S>
PYGPO_HD S head_loss(S z, const HeadParams<S>& hp) {
    switch (hp.head) {
        case kLogistic: return softplus(-z);
        case kSmoothed: return (S(1) - hp.eps) * softplus(-z) + hp.eps * softplus(z);
        case kRobust: return ((S(1) - hp.eps) * softplus(-z) - hp.eps * softplus(z)) / (S(1) - S(2) * hp.eps);
        case kHinge: return S(1) - z > S(0) ? S(1) - z : S(0);
        default: { S d = (z - S(0.5)) / hp.beta; return d * d; }  // kIpo
    }
}

// f'(z); d ls(z)/dz = -sigmoid(-z). The hinge's derivative at its kink is 0, as relu's.
template <typename S>
PYGPO_HD S head_grad(S z, const HeadParams<S>& hp) {
    switch (hp.head) {
        case kLogistic: return -sigmoid(-z);
        case kSmoothed: return -(S(1) - hp.eps) * sigmoid(-z) + hp.eps * sigmoid(z);
        case kRobust: return (-(S(1) - hp.eps) * sigmoid(-z) - hp.eps * sigmoid(z)) / (S(1) - S(2) * hp.eps);
        case kHinge: return S(1) - z > S(0) ? S(-1) : S(0);
        default: return S(2) * (z - S(0.5)) / (hp.beta * hp.beta);  // kIpo
    }
}

template <typename S>
PYGPO_HD S pair_logit(S u_w, S u_l, const HeadParams<S>& hp) {
    return hp.beta * (u_w - hp.b * u_l) - hp.margin;
}

// First t in [0, n) with idx[t] >= r (idx non-decreasing).
PYGPO_HD int64_t lower_bound(const int64_t* idx, int64_t n, int64_t r) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (idx[mid] < r) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Per-token inputs of the head; ref and weights may be null.
template <typename S>
struct TokenInputs {
    const S* logps;
    const S* ref;
    const S* weights;
    const int64_t* index;
    int64_t n;
};

// One lane's partial sum of w_t (lp_t - rp_t) over tokens [lo, hi), lanes striding by nlanes.
template <typename S>
PYGPO_HD S segment_partial(const TokenInputs<S>& in, int64_t lo, int64_t hi, int64_t lane, int64_t nlanes) {
    S acc = S(0);
    for (int64_t t = lo + lane; t < hi; t += nlanes) {
        S u = in.logps[t] - (in.ref ? in.ref[t] : S(0));
        acc += in.weights ? in.weights[t] * u : u;
    }
    return acc;
}

// U_r from its token sum and count (an empty response scores 0 before the reference score).
template <typename S>
PYGPO_HD S response_score(S sum, int64_t count, const S* ref_scores, int64_t r, const HeadParams<S>& hp) {
    S u = (hp.normalize && count > 0) ? sum / S(count) : sum;
    return ref_scores ? u - ref_scores[r] : u;
}

// dL/dU for response r (side k = r & 1) of pair i = r >> 1, before the 1/n_r of length normalisation.
template <typename S>
PYGPO_HD S score_grad(const S* scores, int64_t r, S g_pair, const HeadParams<S>& hp) {
    int64_t i = r >> 1;
    S z = pair_logit(scores[2 * i], scores[2 * i + 1], hp);
    S d = g_pair * hp.beta * head_grad(z, hp);
    return (r & 1) ? -hp.b * d : d;
}

// d loss / d per_example[i] in total: g_loss / B + g_per_example[i] (either pointer may be null).
template <typename S>
PYGPO_HD S pair_upstream(const S* g_loss, const S* g_per_example, int64_t i, int64_t pairs) {
    S g = g_loss ? g_loss[0] / S(pairs) : S(0);
    return g_per_example ? g + g_per_example[i] : g;
}

// Per-token gradient of lp_t given dL/dU of its response and its count.
template <typename S>
PYGPO_HD S token_grad(const TokenInputs<S>& in, int64_t t, S du, int64_t count, const HeadParams<S>& hp) {
    S g = in.weights ? du * in.weights[t] : du;
    return (hp.normalize && count > 0) ? g / S(count) : g;
}

}  // namespace pygpo
