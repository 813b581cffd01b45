// Shared by every opbench CUDA kernel.  Inlined textually by plan.load_source() so the kernels
// need no include path and no CUDA toolkit headers: NVRTC from the nvidia-cuda-nvrtc wheel alone
// compiles them (cuda_fp16.h is not shipped there), in CI without a GPU as on a real device.
#pragma once

// Storage types.  Half and bfloat16 are raw 16-bit patterns; all math is done in float.
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

// Error bits a kernel raises in the per-device error word instead of reading out of bounds.
// synchronize() on the host decodes them (plan.ERROR_BITS keeps the same numbers).
#define OPB_ERR_POSITION 1
#define OPB_ERR_SLOT 2
#define OPB_ERR_ROW 4
#define OPB_ERR_DELTA 8
#define OPB_ERR_BLOCK 16
#define OPB_ERR_SEQ 32

#define OPB_INF __int_as_float(0x7f800000)

__device__ __forceinline__ void raise_error(int* err, int bit) {
    if (err != nullptr) atomicOr(err, bit);
}

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(f16_t x) {
#ifdef OPB_EMULATE  // host compiler (emulator/cuda_emulation.h): IEEE half in software
    _Float16 h;
    memcpy(&h, &x.bits, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

__device__ __forceinline__ float to_f32(bf16_t x) {
    // bf16 is the upper half of a float: widening is exact.
    return __uint_as_float(((unsigned int)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);

template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }

template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t h;
#ifdef OPB_EMULATE
    _Float16 r = (_Float16)x;  // round to nearest even, like cvt.rn
    memcpy(&h.bits, &r, 2);
#else
    // cvt.rn: round to nearest even, the rule the oracles use (ml_dtypes / NumPy).
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#endif
    return h;
}

template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    bf16_t b;
#ifdef OPB_EMULATE
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) b.bits = 0x7fff;  // NaN: cvt's canonical NaN
    else b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b.bits) : "f"(x));
#endif
    return b;
}

// Converts between storage types through float: widening to float is exact for all three,
// so this rounds exactly once (nearest even), as NumPy's astype does.  A move (same type)
// copies the bits: going through float would rewrite NaN payloads (README "The NaN rule").
template <typename S, typename D> struct Converter {
    static __device__ __forceinline__ D run(S x) { return from_f32<D>(to_f32(x)); }
};
template <typename T> struct Converter<T, T> {
    static __device__ __forceinline__ T run(T x) { return x; }
};
template <typename S, typename D> __device__ __forceinline__ D convert(S x) {
    return Converter<S, D>::run(x);
}
