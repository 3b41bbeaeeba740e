// Launcher arguments unpacked into the math's inputs, and one row of the logits-tile epilogue as a CUDA block
// (or a host twin) runs it; shared by the .cu files and host_twin.cpp so both read arguments the same way.
#pragma once

#include "launchers.h"
#include "pairwise_head.cuh"
#include "softmax_stats.cuh"

namespace pygpo {

PYGPO_HD Transform transform_of(const EpilogueArgs& a) { return Transform{a.inv_temperature, a.softcap}; }

template <typename T>
PYGPO_HD const T* row_ptr(const EpilogueArgs& a, int64_t r) {
    return reinterpret_cast<const T*>(a.tile) + r * a.ld;
}

template <typename T>
PYGPO_HD const T* bias_ptr(const EpilogueArgs& a) {
    return a.bias ? reinterpret_cast<const T*>(a.bias) : nullptr;
}

PYGPO_HD int64_t label_local(const EpilogueArgs& a, int64_t r) {
    return reinterpret_cast<const int64_t*>(a.labels)[r] - a.v0;
}

// Row r's tile statistics `st` (all columns folded) joined to the running state: initialise or merge,
// then save, or write the outputs on the last tile.
template <typename T>
PYGPO_HD void commit_row(const EpilogueArgs& a, const FoldArgs& f, int64_t r, RowState st) {
    st.zy = label_logit(row_ptr<T>(a, r), bias_ptr<T>(a), a.cols, label_local(a, r), transform_of(a));
    float* state = reinterpret_cast<float*>(f.state);
    if (!f.first) {
        RowState old;
        load_state(state, r, old);
        merge_state(old, st);
        st = old;
    }
    if (f.last) {
        RowOutputs out{reinterpret_cast<float*>(f.logprobs), reinterpret_cast<float*>(f.lse),
                       reinterpret_cast<float*>(f.entropy), reinterpret_cast<float*>(f.log_sum_p2),
                       reinterpret_cast<float*>(f.mean_logit), reinterpret_cast<float*>(f.is_top1)};
        finish_row(st, a.vocab, out, r);
    } else {
        save_state(state, r, st);
    }
}

PYGPO_HD RowGradInputs grad_inputs(const GradArgs& g) {
    auto p = [](uintptr_t x) { return reinterpret_cast<const float*>(x); };
    return RowGradInputs{p(g.lse), p(g.g_logprobs), p(g.g_lse), p(g.g_entropy), p(g.entropy),
                         p(g.g_log_sum_p2), p(g.log_sum_p2), p(g.g_mean_logit)};
}

// Lane `lane` of `nlanes` turns its share of row r into d loss / d raw, in place.
template <typename T>
PYGPO_HD void grad_row_lane(const EpilogueArgs& a, const GradArgs& g, int64_t r, int64_t lane, int64_t nlanes) {
    T* row = reinterpret_cast<T*>(a.tile) + r * a.ld;
    RowGrad rg = row_grad(grad_inputs(g), r, a.vocab);
    dlogits_lane(row, bias_ptr<T>(a), a.cols, label_local(a, r), rg, transform_of(a), lane, nlanes, vector_ok(row));
}

template <typename S>
PYGPO_HD HeadParams<S> head_params(const HeadArgs& a) {
    return HeadParams<S>{a.head, S(a.beta), S(a.b), S(a.margin), S(a.eps), a.normalize};
}

template <typename S>
PYGPO_HD TokenInputs<S> token_inputs(const HeadArgs& a) {
    auto p = [](uintptr_t x) { return reinterpret_cast<const S*>(x); };
    return TokenInputs<S>{p(a.logps), p(a.ref), p(a.weights), reinterpret_cast<const int64_t*>(a.index), a.tokens};
}

// Response r's score and token count from its lanes' summed partial (the forward's first phase).
template <typename S>
PYGPO_HD void head_response(const HeadArgs& a, const HeadOutputs& o, int64_t r, S sum, int64_t count) {
    reinterpret_cast<S*>(o.scores)[r] =
        response_score(sum, count, reinterpret_cast<const S*>(a.ref_scores), r, head_params<S>(a));
    reinterpret_cast<int64_t*>(o.counts)[r] = count;
}

// Pair i's loss, written to per_example and returned (the forward's second phase; scores complete).
template <typename S>
PYGPO_HD S head_pair(const HeadArgs& a, const HeadOutputs& o, int64_t i) {
    HeadParams<S> hp = head_params<S>(a);
    const S* scores = reinterpret_cast<const S*>(o.scores);
    S l = head_loss(pair_logit(scores[2 * i], scores[2 * i + 1], hp), hp);
    reinterpret_cast<S*>(o.per_example)[i] = l;
    return l;
}

// Backward item k: the gradients of token k (k < T) and of reference score k (k < 2B).
template <typename S>
PYGPO_HD void head_grad_item(const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g, int64_t k) {
    HeadParams<S> hp = head_params<S>(a);
    const S* scores = reinterpret_cast<const S*>(saved.scores);
    const S* g_loss = reinterpret_cast<const S*>(g.g_loss);
    const S* g_pe = reinterpret_cast<const S*>(g.g_per_example);
    if (k < a.tokens) {
        TokenInputs<S> in = token_inputs<S>(a);
        int64_t r = in.index[k];
        S du = score_grad(scores, r, pair_upstream(g_loss, g_pe, r >> 1, a.pairs), hp);
        S d = token_grad(in, k, du, reinterpret_cast<const int64_t*>(saved.counts)[r], hp);
        if (g.d_logps) reinterpret_cast<S*>(g.d_logps)[k] = d;
        if (g.d_ref) reinterpret_cast<S*>(g.d_ref)[k] = -d;
    }
    if (g.d_ref_scores && k < 2 * a.pairs) {
        reinterpret_cast<S*>(g.d_ref_scores)[k] = -score_grad(scores, k, pair_upstream(g_loss, g_pe, k >> 1, a.pairs), hp);
    }
}

// Items the backward covers: every token and every reference score.
PYGPO_HD int64_t head_grad_items(const HeadArgs& a) { return a.tokens > 2 * a.pairs ? a.tokens : 2 * a.pairs; }

}  // namespace pygpo
