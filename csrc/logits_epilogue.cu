// CUDA kernels of the logits-tile epilogue (the `cuda` backend of fused_linear_logprobs).
//
// The tile of raw logits comes from cuBLAS (torch.mm on a chunk of rows against a vocabulary slice).
// Forward: one block per row folds the row into its running softmax statistics in fp32, each thread
// reading 16-byte vectors; the last tile writes logprob / lse / entropy / log sum p^2 / mean logit.
// Backward: one block per row overwrites the recomputed tile with d loss / d raw in the tile's dtype,
// ready for the dH = dRaw W and dW = dRaw^T H matmuls. The math is in softmax_stats.cuh.
#include "args.cuh"
#include "device_util.cuh"

namespace pygpo {

constexpr int kRowThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRowThreads) epilogue_fwd_kernel(EpilogueArgs a, FoldArgs f) {
    int64_t r = blockIdx.x;
    const T* row = row_ptr<T>(a, r);
    RowState st = fold_lane(row, bias_ptr<T>(a), a.cols, transform_of(a), threadIdx.x, blockDim.x, vector_ok(row));
    st = block_merge(st);
    if (threadIdx.x == 0) commit_row<T>(a, f, r, st);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) epilogue_bwd_kernel(EpilogueArgs a, GradArgs g) {
    grad_row_lane<T>(a, g, blockIdx.x, threadIdx.x, blockDim.x);
}

namespace {

template <typename T>
struct FwdLaunch {
    static void run(dim3 grid, cudaStream_t s, const EpilogueArgs& a, const FoldArgs& f) {
        epilogue_fwd_kernel<T><<<grid, kRowThreads, 0, s>>>(a, f);
    }
};

template <typename T>
struct BwdLaunch {
    static void run(dim3 grid, cudaStream_t s, const EpilogueArgs& a, const GradArgs& g) {
        epilogue_bwd_kernel<T><<<grid, kRowThreads, 0, s>>>(a, g);
    }
};

// One block per row of the tile, on `device` and `stream`.
template <template <typename> class L, typename Extra>
void launch_rows(int device, uintptr_t stream, const EpilogueArgs& a, const Extra& extra, const char* what) {
    if (a.rows > 0x7fffffffLL) throw std::runtime_error("pygpo._C: more than 2^31 - 1 rows in one tile");
    DeviceGuard guard(device);
    if (a.rows == 0) return;
    with_tile_type<L>(a.dtype, dim3(unsigned(a.rows)), as_stream(stream), a, extra);
    check_cuda(cudaGetLastError(), what);
}

}  // namespace

void device_epilogue_fwd(int device, uintptr_t stream, const EpilogueArgs& a, const FoldArgs& f) {
    launch_rows<FwdLaunch>(device, stream, a, f, "epilogue_fwd launch");
}

void device_epilogue_bwd(int device, uintptr_t stream, const EpilogueArgs& a, const GradArgs& g) {
    launch_rows<BwdLaunch>(device, stream, a, g, "epilogue_bwd launch");
}

}  // namespace pygpo
