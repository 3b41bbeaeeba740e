// Entry points of pygpo._C, in plain C++ types so that bindings.cpp needs no CUDA or torch headers.
//
// Pointers are addresses (uintptr_t; 0 = absent), sizes and strides are in elements, dtype is a
// pygpo::DType code, stream is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
// The device_* functions launch CUDA kernels on `device`; the host_* twins run the same math on CPU
// pointers, one row (or pair) after another, emulating `lanes` threads of a block.
#pragma once

#include <stdint.h>

namespace pygpo {

struct EpilogueArgs {
    uintptr_t tile;     // (rows, cols) raw logits H_chunk @ W_tile^T, row stride ld
    int dtype;          // of tile and bias: float32, float16 or bfloat16
    int64_t rows, cols, ld;
    uintptr_t bias;     // (cols,) bias of the tile's columns, or 0
    uintptr_t labels;   // (rows,) int64 vocabulary ids
    int64_t v0;         // first vocabulary id of the tile
    int64_t vocab;      // full vocabulary size V
    float inv_temperature, softcap;  // softcap 0: none
};

struct FoldArgs {
    uintptr_t state;    // (rows, 6) float32 running statistics
    int first, last;    // first tile: initialise the state; last tile: write the outputs
    uintptr_t logprobs, lse, entropy, log_sum_p2, mean_logit;  // (rows,) float32 outputs, any may be 0
    uintptr_t is_top1;  // (rows,) float32: 1 where the label's logit is the row's max (ties included), or 0
};

struct GradArgs {
    uintptr_t lse;  // (rows,) float32, required; the rest (rows,) float32 or 0
    uintptr_t g_logprobs, g_lse, g_entropy, entropy, g_log_sum_p2, log_sum_p2, g_mean_logit;
};

struct HeadArgs {
    int dtype;  // float32 or float64, of every floating tensor
    uintptr_t logps, ref, weights, index;  // (T,) each; ref and weights may be 0; index int64 sorted
    int64_t tokens, pairs;
    uintptr_t ref_scores;  // (2B,) or 0
    int head;
    double beta, b, margin, eps;
    int normalize;
};

struct HeadOutputs {
    uintptr_t scores;       // (2B,) U_r
    uintptr_t counts;       // (2B,) int64 n_r
    uintptr_t per_example;  // (B,)
    uintptr_t loss;         // (1,)
};

struct HeadGrads {
    uintptr_t g_loss, g_per_example;              // upstream: (1,) and (B,), either may be 0
    uintptr_t d_logps, d_ref, d_ref_scores;       // outputs: (T,), (T,), (2B,), any may be 0
};

int device_count();  // CUDA devices visible to the runtime (0 when there is no driver or device)

void device_epilogue_fwd(int device, uintptr_t stream, const EpilogueArgs& a, const FoldArgs& f);
void device_epilogue_bwd(int device, uintptr_t stream, const EpilogueArgs& a, const GradArgs& g);
void device_head_fwd(int device, uintptr_t stream, const HeadArgs& a, const HeadOutputs& o);
void device_head_bwd(int device, uintptr_t stream, const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g);

void host_epilogue_fwd(const EpilogueArgs& a, const FoldArgs& f, int lanes);
void host_epilogue_bwd(const EpilogueArgs& a, const GradArgs& g, int lanes);
void host_head_fwd(const HeadArgs& a, const HeadOutputs& o, int lanes);
void host_head_bwd(const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g);

}  // namespace pygpo
