// Math of the logits-tile epilogue (see pygpo/ops/token_stats.py for the contract).
//
// A row of logits z_v = softcap * tanh((raw_v + b_v) / softcap) / temperature is folded, one vocabulary
// tile at a time, into the online statistics (Milakov & Gimelshein, "Online normalizer calculation for
// softmax", 2018), kept relative to the running max m:
//     s = sum exp(z - m),  t = sum exp(z - m) (z - m),  s2 = sum exp(2 (z - m)),  sz = sum z,  zy = z_y.
// When the max grows from m to m', shift = m - m' <= 0 and s *= e^shift, t = (t + shift s) e^shift,
// s2 *= e^(2 shift). At the end lse = m + log s, entropy = log s - t / s, log sum p^2 = log s2 - 2 log s,
// mean_logit = sz / V, logprob = zy - lse.
//
// Masked vocabulary (logits of -inf, e.g. from a -inf bias) has p = 0 exactly and, by the convention
// 0 log 0 = 0, adds nothing to the entropy nor to its gradient. So that no inf - inf or 0 * inf is ever
// formed: the running max is floored at the lowest finite float (a tile of -inf logits leaves it finite),
// and z - m and log p are floored at kLogFloor, far below where exp underflows to exactly 0 (fp32 at
// about -104), so the floor changes no value, only turns 0 * (-inf) into 0 * kLogFloor = 0.
//
// Backward, per element with p = exp(z - lse):
//     dz = p (a + b p - g_ent log p) + g_mz / V + g_lp 1[v = y],
//     a = g_lse - g_lp - g_ent * entropy - 2 g_l2,  b = 2 g_l2 / exp(log_sum_p2),
//     draw = dz / temperature * (1 - tanh^2(raw / softcap)).
// Every function here is PYGPO_HD: the CUDA kernels and the host twins call the same code.
#pragma once

#include "common.cuh"

namespace pygpo {

// Per-row running statistics; an empty state has s == 0 (m is then meaningless).
struct RowState {
    float m, s, t, s2, sz, zy;
};

constexpr int kStateFields = 6;  // floats per row in the state buffer, in RowState's order

// Floor of z - m and of log p (see the header comment): exp(kLogFloor) == 0 exactly in fp32 and fp64.
constexpr float kLogFloor = -1.0e4f;
// Lowest finite float: the floor of the running max.
constexpr float kLowestFloat = -3.402823466e38f;

// max(x, kLogFloor), written as a comparison so that a nan (from nan inputs) stays nan.
PYGPO_HD float floor_log(float x) { return x < kLogFloor ? kLogFloor : x; }

PYGPO_HD RowState empty_state() { return RowState{-INFINITY, 0.f, 0.f, 0.f, 0.f, 0.f}; }

// Logit transform of the epilogue: bias, softcap (0 = none), then 1 / temperature.
struct Transform {
    float inv_temperature;
    float softcap;
};

// z from raw (bias already added); *tanh_out gets tanh(raw / softcap) when softcap > 0.
PYGPO_HD float transform_logit(float raw, Transform tr, float* tanh_out) {
    float c = raw;
    if (tr.softcap > 0.f) {
        float th = tanhf(raw / tr.softcap);
        *tanh_out = th;
        c = tr.softcap * th;
    }
    return c * tr.inv_temperature;
}

// Move state to max m_new >= st.m (no-op for an empty state). t' = (t + shift s) r is formed as
// t r + shift (s r): shift s overflows to -inf once the old max is near the lowest float (a vocabulary
// masked with finfo.min rather than -inf) and r = 0 then turned it into nan, where s r is 0 and exact.
PYGPO_HD void rescale(RowState& st, float m_new) {
    if (st.s == 0.f) { st.m = m_new; return; }
    float shift = st.m - m_new;
    float r = expf(shift);
    st.s *= r;
    st.t = st.t * r + shift * st.s;
    st.s2 *= r * r;
    st.m = m_new;
}

// Fold n transformed logits (n small: one vector pack) into st.
PYGPO_HD void fold_values(RowState& st, const float* z, int n) {
    float pm = z[0];
    for (int k = 1; k < n; ++k) pm = fmaxf(pm, z[k]);
    if (pm == -INFINITY) pm = kLowestFloat;  // every z is -inf: a finite max keeps z - m at -inf, not nan
    if (st.s == 0.f || pm > st.m) rescale(st, pm);
    for (int k = 0; k < n; ++k) {
        float d = floor_log(z[k] - st.m);  // e = 0 below the floor either way; e * d stays 0
        float e = expf(d);
        st.s += e;
        st.t += e * d;
        st.s2 += e * e;
        st.sz += z[k];
    }
}

// a <- a (+) b: the statistics of the union of two disjoint sets of columns.
PYGPO_HD void merge_state(RowState& a, const RowState& b) {
    if (b.s != 0.f) {
        if (a.s == 0.f) {
            float sz = a.sz, zy = a.zy;
            a = b;
            a.sz += sz;
            a.zy += zy;
            return;
        }
        float m = fmaxf(a.m, b.m);
        RowState bb = b;
        rescale(a, m);
        rescale(bb, m);
        a.s += bb.s;
        a.t += bb.t;
        a.s2 += bb.s2;
    }
    a.sz += b.sz;
    a.zy += b.zy;
}

// Visit the columns lane `lane` of a team of `nlanes` owns in a row of `cols` values: 16-byte packs
// p = lane, lane + nlanes, ... when `vectorised`, then the scalar tail; or a plain strided loop.
// f(j0, v, n) gets the n values of columns j0 .. j0 + n - 1 as floats; with Write they are stored back
// (rounded to T) after f changed them.
template <bool Write, typename T, typename F>
PYGPO_HD void for_lane_columns(const T* row, int64_t cols, int64_t lane, int64_t nlanes, bool vectorised, F&& f) {
    constexpr int W = Vec<T>::kWidth;
    int64_t start = 0;
    if (vectorised) {
        int64_t packs = cols / W;
        for (int64_t p = lane; p < packs; p += nlanes) {
            float v[W];
            load_pack(row + p * W, v);
            f(p * W, v, W);
            if constexpr (Write) store_pack(const_cast<T*>(row) + p * W, v);
        }
        start = packs * W;
    }
    for (int64_t j = start + lane; j < cols; j += nlanes) {
        float v = to_float(row[j]);
        f(j, &v, 1);
        if constexpr (Write) const_cast<T*>(row)[j] = Store<T>::from(v);
    }
}

template <typename T>
PYGPO_HD float with_bias(float raw, const T* bias, int64_t j) {
    return bias ? raw + to_float(bias[j]) : raw;
}

// One lane's statistics of its columns of a row of raw logits; bias points at the bias of the row's
// first column (nullptr: no bias).
template <typename T>
PYGPO_HD RowState fold_lane(const T* row, const T* bias, int64_t cols, Transform tr, int64_t lane, int64_t nlanes,
                            bool vectorised) {
    RowState st = empty_state();
    for_lane_columns<false>(row, cols, lane, nlanes, vectorised, [&](int64_t j0, float* v, int n) {
        float th;
        for (int k = 0; k < n; ++k) v[k] = transform_logit(with_bias(v[k], bias, j0 + k), tr, &th);
        fold_values(st, v, n);
    });
    return st;
}

// The label's logit if it falls in this tile (label_local in [0, cols)), else 0.
template <typename T>
PYGPO_HD float label_logit(const T* row, const T* bias, int64_t cols, int64_t label_local, Transform tr) {
    if (label_local < 0 || label_local >= cols) return 0.f;
    float th;
    return transform_logit(with_bias(to_float(row[label_local]), bias, label_local), tr, &th);
}

// Per-row outputs of the finished statistics; any output pointer may be null.
struct RowOutputs {
    float* logprobs;
    float* lse;
    float* entropy;
    float* log_sum_p2;
    float* mean_logit;
    float* is_top1;
};

PYGPO_HD void finish_row(const RowState& st, int64_t vocab, RowOutputs out, int64_t r) {
    float log_s = logf(st.s);
    float lse = st.m + log_s;
    if (out.logprobs) out.logprobs[r] = st.zy - lse;
    if (out.lse) out.lse[r] = lse;
    if (out.entropy) out.entropy[r] = log_s - st.t / st.s;
    if (out.log_sum_p2) out.log_sum_p2[r] = logf(st.s2) - 2.f * log_s;
    if (out.mean_logit) out.mean_logit[r] = st.sz / float(vocab);
    // the label's logit went through the same transform as every folded logit, so the max equals it exactly
    // when the label is (one of) the row's largest
    if (out.is_top1) out.is_top1[r] = st.zy >= st.m ? 1.f : 0.f;
}

PYGPO_HD void load_state(const float* buf, int64_t r, RowState& st) {
    const float* p = buf + r * kStateFields;
    st = RowState{p[0], p[1], p[2], p[3], p[4], p[5]};
}

PYGPO_HD void save_state(float* buf, int64_t r, const RowState& st) {
    float* p = buf + r * kStateFields;
    p[0] = st.m; p[1] = st.s; p[2] = st.t; p[3] = st.s2; p[4] = st.sz; p[5] = st.zy;
}

// ---------------------------------------------------------------------------------------------------
// Backward.

// Per-row upstream gradients and saved statistics; any pointer may be null (that term is absent).
struct RowGradInputs {
    const float* lse;  // required
    const float* g_logprobs;
    const float* g_lse;
    const float* g_entropy;
    const float* entropy;
    const float* g_log_sum_p2;
    const float* log_sum_p2;
    const float* g_mean_logit;
};

// Coefficients of one row's dz (see the header comment).
struct RowGrad {
    float lse, a, b, g_ent, g_lp, g_mz_over_v;
};

PYGPO_HD RowGrad row_grad(const RowGradInputs& in, int64_t r, int64_t vocab) {
    RowGrad g{in.lse[r], 0.f, 0.f, 0.f, 0.f, 0.f};
    if (in.g_lse) g.a += in.g_lse[r];
    if (in.g_logprobs) { g.g_lp = in.g_logprobs[r]; g.a -= g.g_lp; }
    if (in.g_entropy) { g.g_ent = in.g_entropy[r]; g.a -= g.g_ent * in.entropy[r]; }
    if (in.g_log_sum_p2) {
        float g2 = in.g_log_sum_p2[r];
        g.a -= 2.f * g2;
        g.b = 2.f * g2 / expf(in.log_sum_p2[r]);
    }
    if (in.g_mean_logit) g.g_mz_over_v = in.g_mean_logit[r] / float(vocab);
    return g;
}

// d loss / d raw of one element (raw = tile value + bias); is_label: this column is the row's label.
PYGPO_HD float dlogit(float raw, const RowGrad& g, Transform tr, bool is_label) {
    float th = 0.f;
    float z = transform_logit(raw, tr, &th);
    float log_p = floor_log(z - g.lse);  // p = 0 either way; g_ent * log_p stays finite
    float p = expf(log_p);
    float dz = p * (g.a + g.b * p - g.g_ent * log_p) + g.g_mz_over_v;
    if (is_label) dz += g.g_lp;
    float draw = dz * tr.inv_temperature;
    if (tr.softcap > 0.f) draw *= 1.f - th * th;
    return draw;
}

// One lane's share of turning a row of recomputed raw logits into d loss / d raw, in place.
template <typename T>
PYGPO_HD void dlogits_lane(T* row, const T* bias, int64_t cols, int64_t label_local, const RowGrad& g, Transform tr,
                           int64_t lane, int64_t nlanes, bool vectorised) {
    for_lane_columns<true>(row, cols, lane, nlanes, vectorised, [&](int64_t j0, float* v, int n) {
        for (int k = 0; k < n; ++k) v[k] = dlogit(with_bias(v[k], bias, j0 + k), g, tr, j0 + k == label_local);
    });
}

// Whether a row can take the 16-byte vector path.
template <typename T>
PYGPO_HD bool vector_ok(const T* row) {
    return (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
}

}  // namespace pygpo
