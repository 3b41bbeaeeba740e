// CUDA kernels of the fused segment-reduce + pairwise loss head, one launch each way.
//
// Forward: a single block (small batches are launch-bound: one launch beats a chain of torch ops).
// Each warp takes responses r = warp, warp + warps, ...: finds the response's token range by binary
// search in the sorted response index, sums w_t (lp_t - rp_t) across its lanes, and writes U_r; then
// the threads take the pairs, write loss_i, and the block sums them in a fixed order (deterministic).
// Backward: one thread per token writes w_t dL/dU_r(t) (and the reference gradients). The math is in
// pairwise_head.cuh.
#include "args.cuh"
#include "device_util.cuh"

namespace pygpo {

constexpr int kHeadThreads = 1024;
constexpr int kTokenThreads = 256;

template <typename S>
__global__ void __launch_bounds__(kHeadThreads) head_fwd_kernel(HeadArgs a, HeadOutputs o) {
    TokenInputs<S> in = token_inputs<S>(a);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int64_t r = warp; r < 2 * a.pairs; r += warps) {
        int64_t lo = lower_bound(in.index, in.n, r), hi = lower_bound(in.index, in.n, r + 1);
        S sum = warp_sum(segment_partial(in, lo, hi, lane, 32));
        if (lane == 0) head_response(a, o, r, sum, hi - lo);
    }
    __syncthreads();  // scores are visible to the whole block from here
    S acc = S(0);
    for (int64_t i = threadIdx.x; i < a.pairs; i += blockDim.x) acc += head_pair<S>(a, o, i);
    acc = block_sum(acc);
    if (threadIdx.x == 0) reinterpret_cast<S*>(o.loss)[0] = acc / S(a.pairs);
}

template <typename S>
__global__ void __launch_bounds__(kTokenThreads) head_bwd_kernel(HeadArgs a, HeadOutputs saved, HeadGrads g) {
    int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k < head_grad_items(a)) head_grad_item<S>(a, saved, g, k);
}

namespace {

void check_head_dtype(int dtype) {
    if (dtype != kFloat32 && dtype != kFloat64) throw std::runtime_error("pygpo._C: loss head dtype must be float32 or float64");
}

}  // namespace

void device_head_fwd(int device, uintptr_t stream, const HeadArgs& a, const HeadOutputs& o) {
    DeviceGuard guard(device);
    check_head_dtype(a.dtype);
    if (a.pairs == 0) return;
    if (a.dtype == kFloat32) head_fwd_kernel<float><<<1, kHeadThreads, 0, as_stream(stream)>>>(a, o);
    else head_fwd_kernel<double><<<1, kHeadThreads, 0, as_stream(stream)>>>(a, o);
    check_cuda(cudaGetLastError(), "head_fwd launch");
}

void device_head_bwd(int device, uintptr_t stream, const HeadArgs& a, const HeadOutputs& saved, const HeadGrads& g) {
    DeviceGuard guard(device);
    check_head_dtype(a.dtype);
    int64_t n = head_grad_items(a);
    if (n == 0) return;
    int64_t blocks = (n + kTokenThreads - 1) / kTokenThreads;
    if (blocks > 0x7fffffffLL) throw std::runtime_error("pygpo._C: too many tokens for one launch");
    if (a.dtype == kFloat32) head_bwd_kernel<float><<<unsigned(blocks), kTokenThreads, 0, as_stream(stream)>>>(a, saved, g);
    else head_bwd_kernel<double><<<unsigned(blocks), kTokenThreads, 0, as_stream(stream)>>>(a, saved, g);
    check_cuda(cudaGetLastError(), "head_bwd launch");
}

}  // namespace pygpo
