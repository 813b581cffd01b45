// ROPE (ggml rope_ext semantics, f32 math) and the fill kernel of its per-device sin/cos cache.
#include "common.cuh"

// Everything that changes an angle.  Built on the host by plan.rope_angle_scalars(); YaRN's
// corr dims and mscale are computed there once in float64, as the oracle does.
struct RopeAngleArgs {
    int n_dims;
    double log2_base;   // log2(freq_base): omega_i = 2^(-2i/n_dims * log2_base)
    double freq_scale;
    double ext_factor;
    double corr_low;
    double corr_high;
    double mscale;      // attn_factor, times YaRN's 1 + 0.1 ln(1/freq_scale) when ext_factor != 0
};

// (cos, sin) of pair i at position p, mscale folded in, sin not yet signed for inverse.
// The angle is formed in double: p * omega reaches 1e5 rad at long contexts, where float's
// ulp is already 0.008 rad.  Only the table fill and uncached positions pay for it.
__device__ __forceinline__ float2 rope_angle(int i, double p, const float* freq_factors,
                                             const RopeAngleArgs& a) {
    double omega = exp2(-2.0 * (double)i / (double)a.n_dims * a.log2_base);
    if (freq_factors != nullptr) omega /= (double)freq_factors[i];
    const double theta_extrap = p * omega;
    double theta = a.freq_scale * theta_extrap;
    if (a.ext_factor != 0.0) {
        double y = ((double)i - a.corr_low) / fmax(0.001, a.corr_high - a.corr_low);
        double ramp_mix = (1.0 - fmin(1.0, fmax(0.0, y))) * a.ext_factor;
        theta = theta * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
    }
    double s, c;
    sincos(theta, &s, &c);
    return make_float2((float)(c * a.mscale), (float)(s * a.mscale));
}

// Which position stream (0..3) drives pair i in mrope: ggml's sector rule.
__device__ __forceinline__ int mrope_section(int i, int s0, int s1, int s2, int s3) {
    int sector = i % (s0 + s1 + s2 + s3);
    if (sector < s0) return 0;
    if (sector < s0 + s1) return 1;
    if (sector < s0 + s1 + s2) return 2;
    return 3;
}

// cache[row * half + i] = angle of pair i at position row.  Keyed on the host by every
// parameter above (plan.rope_cache_key), never by layer: a layer only chooses its parameters.
extern "C" __global__ void rope_cache_fill(float2* cache, int rows, const float* freq_factors,
                                           int n_dims, double log2_base, double freq_scale,
                                           double ext_factor, double corr_low, double corr_high,
                                           double mscale) {
    RopeAngleArgs a{n_dims, log2_base, freq_scale, ext_factor, corr_low, corr_high, mscale};
    int half = n_dims / 2;
    long long total = (long long)rows * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        int row = (int)(idx / half);
        int i = (int)(idx % half);
        cache[idx] = rope_angle(i, (double)row, freq_factors, a);
    }
}

// One block per (token, head); threads stride over the rotated pairs, then over the
// pass-through dims past n_dims.  Positions are read from device memory, so a captured CUDA
// graph replays correctly after the host writes the next step's positions into the same buffer.
// mode: 0 normal (pairs 2i, 2i+1), 1 neox (pairs i, i + n_dims/2), 2 mrope (neox pairing).
template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ out,
                            const int* __restrict__ pos, const float* __restrict__ freq_factors,
                            const float2* __restrict__ cache, int cache_rows,
                            int n_tokens, int n_heads, int head_dim, int n_dims, int mode,
                            int s0, int s1, int s2, int s3, double log2_base,
                            double freq_scale, double ext_factor, double corr_low,
                            double corr_high, double mscale, float sin_sign) {
    RopeAngleArgs a{n_dims, log2_base, freq_scale, ext_factor, corr_low, corr_high, mscale};
    int token = blockIdx.x / n_heads;
    long long base = (long long)blockIdx.x * head_dim;
    int half = n_dims / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        int stream = mode == 2 ? mrope_section(i, s0, s1, s2, s3) : 0;
        int p = pos[stream * n_tokens + token];
        // Positions outside the cache are computed directly: the cache can be stale-free
        // and still bounded in size.
        float2 cs = (cache != nullptr && p >= 0 && p < cache_rows)
                        ? cache[(long long)p * half + i]
                        : rope_angle(i, (double)p, freq_factors, a);
        float s = cs.y * sin_sign;
        int i0 = mode == 0 ? 2 * i : i;
        int i1 = mode == 0 ? 2 * i + 1 : i + half;
        float x0 = to_f32(x[base + i0]);
        float x1 = to_f32(x[base + i1]);
        out[base + i0] = from_f32<T>(x0 * cs.x - x1 * s);
        out[base + i1] = from_f32<T>(x0 * s + x1 * cs.x);
    }
    for (int d = n_dims + threadIdx.x; d < head_dim; d += blockDim.x) out[base + d] = x[base + d];
}
