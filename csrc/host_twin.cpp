// Host twins of the kernels: the same PYGPO_HD math on CPU pointers, compiled by the host compiler.
//
// A twin walks rows (or responses) one after another and emulates the `lanes` threads of a block: each
// lane folds its strided share of the row, then the lanes' partial results are merged. CI runs the
// twins against float64 references, so every kernel's arithmetic is tested without a GPU.
#include <stdexcept>
#include <vector>

#include "args.cuh"
#include "launchers.h"

namespace pygpo {

namespace {

void check_lanes(int lanes) {
    if (lanes < 1) throw std::invalid_argument("pygpo._C: lanes must be >= 1");
}

template <typename T>
struct FwdRows {
    static void run(const EpilogueArgs& a, const FoldArgs& f, int lanes) {
        for (int64_t r = 0; r < a.rows; ++r) {
            const T* row = row_ptr<T>(a, r);
            RowState st = empty_state();
            for (int lane = 0; lane < lanes; ++lane) {
                merge_state(st, fold_lane(row, bias_ptr<T>(a), a.cols, transform_of(a), lane, lanes, vector_ok(row)));
            }
            commit_row<T>(a, f, r, st);
        }
    }
};

template <typename T>
struct BwdRows {
    static void run(const EpilogueArgs& a, const GradArgs& g, int lanes) {
        for (int64_t r = 0; r < a.rows; ++r) {
            for (int lane = 0; lane < lanes; ++lane) grad_row_lane<T>(a, g, r, lane, lanes);
        }
    }
};

template <typename S>
void head_fwd(const HeadArgs& a, const HeadOutputs& o, int lanes) {
    TokenInputs<S> in = token_inputs<S>(a);
    for (int64_t r = 0; r < 2 * a.pairs; ++r) {
        int64_t lo = lower_bound(in.index, in.n, r), hi = lower_bound(in.index, in.n, r + 1);
        S sum = S(0);
        for (int lane = 0; lane < lanes; ++lane) sum += segment_partial(in, lo, hi, lane, lanes);
        head_response(a, o, r, sum, hi - lo);
    }
    S acc = S(0);
    for (int64_t i = 0; i < a.pairs; ++i) acc += head_pair<S>(a, o, i);
    if (a.pairs > 0) reinterpret_cast<S*>(o.loss)[0] = acc / S(a.pairs);
}

template <typename S>
void head_bwd(const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g) {
    for (int64_t k = 0; k < head_grad_items(a); ++k) head_grad_item<S>(a, saved, g, k);
}

}  // namespace

void host_epilogue_fwd(const EpilogueArgs& a, const FoldArgs& f, int lanes) {
    check_lanes(lanes);
    with_tile_type<FwdRows>(a.dtype, a, f, lanes);
}

void host_epilogue_bwd(const EpilogueArgs& a, const GradArgs& g, int lanes) {
    check_lanes(lanes);
    with_tile_type<BwdRows>(a.dtype, a, g, lanes);
}

void host_head_fwd(const HeadArgs& a, const HeadOutputs& o, int lanes) {
    check_lanes(lanes);
    if (a.dtype == kFloat32) head_fwd<float>(a, o, lanes);
    else if (a.dtype == kFloat64) head_fwd<double>(a, o, lanes);
    else throw std::invalid_argument("pygpo._C: loss head dtype must be float32 or float64");
}

void host_head_bwd(const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g) {
    if (a.dtype == kFloat32) head_bwd<float>(a, saved, g);
    else if (a.dtype == kFloat64) head_bwd<double>(a, saved, g);
    else throw std::invalid_argument("pygpo._C: loss head dtype must be float32 or float64");
}

}  // namespace pygpo
