// Shared by every pygpo._C source: the host/device qualifier, dtype codes, and 16-bit float storage.
//
// The math headers mark their functions PYGPO_HD. Under nvcc that is `__host__ __device__`; under a
// plain C++ compiler it is empty, so the host twins (host_twin.cpp) run the very same arithmetic on
// the CPU and the tests can check it against float64.
//
// fp16 and bf16 values are handled as raw 16-bit storage with explicit, round-to-nearest-even
// conversions written here, identical on host and device (no dependence on cuda_fp16.h host support).
#pragma once

#include <stdint.h>
#include <string.h>

#include <math.h>

#include <cmath>
#include <stdexcept>

#if defined(__CUDACC__)
#define PYGPO_HD __host__ __device__ __forceinline__
#define PYGPO_UNROLL _Pragma("unroll")
#else
#define PYGPO_HD inline
#define PYGPO_UNROLL
#endif

namespace pygpo {

// Dtype codes passed from Python (pygpo/_cuda.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

PYGPO_HD uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
PYGPO_HD float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// bfloat16 is the top half of a float32.
PYGPO_HD float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

PYGPO_HD BFloat16 bf16_from_float(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return BFloat16{uint16_t(u >> 16)};
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
PYGPO_HD float to_float(Half x) {
    uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
    uint32_t exp = (x.bits >> 10) & 0x1fu;
    uint32_t man = x.bits & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
        float v = float(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
    return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

PYGPO_HD Half half_from_float(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};  // NaN
    if (x >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
    uint32_t e = x >> 23;
    if (e < 113) {  // below 2^-14: subnormal result round(value / 2^-24)
        uint32_t shift = 126u - e;  // value / 2^-24 = mant * 2^-(126 - e)
        if (shift > 24) return Half{sign};
        uint32_t mant = (x & 0x7fffffu) | 0x800000u;
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return Half{uint16_t(sign | q)};
    }
    uint32_t h = ((e - 112u) << 10) | ((x >> 13) & 0x3ffu);
    uint32_t rem = x & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent correctly
    return Half{uint16_t(sign | h)};
}

PYGPO_HD float to_float(float x) { return x; }
PYGPO_HD float to_float(double x) { return float(x); }

template <typename T> struct Store;
template <> struct Store<float> { PYGPO_HD static float from(float v) { return v; } };
template <> struct Store<Half> { PYGPO_HD static Half from(float v) { return half_from_float(v); } };
template <> struct Store<BFloat16> { PYGPO_HD static BFloat16 from(float v) { return bf16_from_float(v); } };

// Elements per 16-byte vector load of storage type T.
template <typename T> struct Vec { static constexpr int kWidth = 16 / int(sizeof(T)); };

// Load / store kWidth elements at p (16-byte aligned when called from the vector path).
template <typename T>
PYGPO_HD void load_pack(const T* p, float* out) {
    alignas(16) T buf[Vec<T>::kWidth];  // 16-byte aligned: reinterpreted as one uint4 on the GPU
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(buf) = *reinterpret_cast<const uint4*>(p);  // one 128-bit load
#else
    memcpy(buf, p, sizeof(buf));
#endif
PYGPO_UNROLL
    for (int k = 0; k < Vec<T>::kWidth; ++k) out[k] = to_float(buf[k]);
}

template <typename T>
PYGPO_HD void store_pack(T* p, const float* in) {
    alignas(16) T buf[Vec<T>::kWidth];  // 16-byte aligned: reinterpreted as one uint4 on the GPU
PYGPO_UNROLL
    for (int k = 0; k < Vec<T>::kWidth; ++k) buf[k] = Store<T>::from(in[k]);
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(buf);
#else
    memcpy(p, buf, sizeof(buf));
#endif
}

// Host-side: F<T>::run(args...) with T the storage type of a tile dtype code (float32, float16, bfloat16).
template <template <typename> class F, typename... A>
void with_tile_type(int dtype, A&&... args) {
    switch (dtype) {
        case kFloat32: F<float>::run(args...); break;
        case kFloat16: F<Half>::run(args...); break;
        case kBFloat16: F<BFloat16>::run(args...); break;
        default: throw std::invalid_argument("pygpo._C: tile dtype must be float32, float16 or bfloat16");
    }
}

}  // namespace pygpo
