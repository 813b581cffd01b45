// The scenario model's primitives (protocol "scenario primitives"), float32 only: add,
// rms_norm, matmul and the in-place merge of two attention partials.  Own kernels rather than
// cupy's elementwise/cuBLAS paths: no temporaries (safe inside a CUDA graph capture) and no
// dependency on CUDA headers or cuBLAS at run time.
#include "common.cuh"

#define MATMUL_TILE 16

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int n_warps = (blockDim.x + 31) / 32;
    v = lane < n_warps ? scratch[lane] : 0.0f;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;  // every thread holds the block's sum
}

// One block per row of x [rows, d]; blockDim a multiple of 32.
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d,
                                        float eps) {
    __shared__ float scratch[32];
    const float* row = x + (long long)blockIdx.x * d;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) sq += row[i] * row[i];
    const float inv = rsqrtf(block_sum(sq, scratch) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[(long long)blockIdx.x * d + i] = row[i] * inv * weight[i];
}

// out [m, n] = a [m, k] @ b [k, n]; 16x16 output tile per block through shared-memory tiles.
extern "C" __global__ void matmul_f32(const float* a, const float* b, float* out, int m, int n,
                                      int k) {
    __shared__ float as[MATMUL_TILE][MATMUL_TILE];
    __shared__ float bs[MATMUL_TILE][MATMUL_TILE + 1];
    const int row = blockIdx.y * MATMUL_TILE + threadIdx.y;
    const int col = blockIdx.x * MATMUL_TILE + threadIdx.x;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += MATMUL_TILE) {
        const int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;
        as[threadIdx.y][threadIdx.x] = row < m && ka < k ? a[(long long)row * k + ka] : 0.0f;
        bs[threadIdx.y][threadIdx.x] = kb < k && col < n ? b[(long long)kb * n + col] : 0.0f;
        __syncthreads();
        for (int i = 0; i < MATMUL_TILE; ++i) acc += as[threadIdx.y][i] * bs[i][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n) out[(long long)row * n + col] = acc;
}

// (out, lse) <- merge of (out, lse) and (part_out, part_lse), one block per (query, head) row.
// A side with lse -inf contributes nothing, and its out is never read (it may be poison).
extern "C" __global__ void merge_partial_f32(float* out, float* lse, const float* part_out,
                                             const float* part_lse, int dv) {
    const long long row = blockIdx.x;
    const float l1 = lse[row], l2 = part_lse[row];
    const float big = fmaxf(l1, l2);
    const float base = big == -OPB_INF ? 0.0f : big;
    const float w1 = l1 == -OPB_INF ? 0.0f : expf(l1 - base);
    const float w2 = l2 == -OPB_INF ? 0.0f : expf(l2 - base);
    const float den = w1 + w2;
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {
        const float o1 = w1 > 0.0f ? w1 * out[row * dv + d] : 0.0f;
        const float o2 = w2 > 0.0f ? w2 * part_out[row * dv + d] : 0.0f;
        out[row * dv + d] = den > 0.0f ? (o1 + o2) / den : 0.0f;
    }
    __syncthreads();  // every thread read the old lse before it is replaced
    if (threadIdx.x == 0) lse[row] = den > 0.0f ? base + logf(den) : -OPB_INF;
}
