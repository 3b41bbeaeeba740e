// CUDA-only helpers: error checks, device selection, and deterministic warp / block reductions.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "softmax_stats.cuh"

namespace pygpo {

void check_cuda(cudaError_t err, const char* what);

// Makes `device` the calling thread's current device for the guard's lifetime and restores the caller's
// device after: torch keeps its notion of the current device in the same runtime state, and a launch on
// cuda:1 must not leave later `device="cuda"` allocations of the caller on cuda:1. Throws "no CUDA device"
// when the runtime sees none, and for an index out of range.
class DeviceGuard {
public:
    explicit DeviceGuard(int device);
    ~DeviceGuard();
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = -1;  // -1: nothing to restore
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

__device__ __forceinline__ RowState shfl_down_state(const RowState& s, int offset) {
    const unsigned all = 0xffffffffu;
    return RowState{__shfl_down_sync(all, s.m, offset), __shfl_down_sync(all, s.s, offset),
                    __shfl_down_sync(all, s.t, offset), __shfl_down_sync(all, s.s2, offset),
                    __shfl_down_sync(all, s.sz, offset), __shfl_down_sync(all, s.zy, offset)};
}

// Merge the states of a block's threads; the result is valid in thread 0. blockDim.x % 32 == 0.
__device__ __forceinline__ RowState block_merge(RowState st) {
    __shared__ RowState warp_states[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int off = 16; off > 0; off >>= 1) merge_state(st, shfl_down_state(st, off));
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < warps ? warp_states[lane] : empty_state();
        for (int off = 16; off > 0; off >>= 1) merge_state(st, shfl_down_state(st, off));
    }
    return st;
}

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

// Sum over the block, valid in thread 0, in a fixed order (deterministic). blockDim.x % 32 == 0.
template <typename S>
__device__ __forceinline__ S block_sum(S v) {
    __shared__ S partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) v = warp_sum(lane < warps ? partial[lane] : S(0));
    return v;
}

}  // namespace pygpo
