// KV_ROTATE: re-rotate cached keys in place after eviction, by the LUT row of each token's delta.
#include "common.cuh"

// One block per (rotated block r, token t); threads stride over (kv head, pair).  Each pair is
// read and written by the same thread, so in-place is safe.  per_token: deltas is [R, block_size]
// instead of [R, 1].  interleaved: pairs (2j, 2j+1) instead of rotate_half's (j, j + D/2).
template <typename T>
__global__ void kv_rotate_kernel(T* key_cache, const int* __restrict__ block_indices,
                                 const int* __restrict__ deltas, const float* __restrict__ lut,
                                 int* err, int num_blocks, int block_size, int Hkv, int D,
                                 int lut_rows, int per_token, int interleaved,
                                 long long block_stride) {
    const int r = blockIdx.x / block_size, t = blockIdx.x % block_size;
    const int blk = block_indices[r];
    const int delta = deltas[per_token ? (long long)r * block_size + t : r];
    if (blk < 0 || blk >= num_blocks || delta < 0 || delta >= lut_rows) {
        if (threadIdx.x == 0) raise_error(err, blk < 0 || blk >= num_blocks ? OPB_ERR_BLOCK
                                                                             : OPB_ERR_DELTA);
        return;
    }
    const int half = D / 2;
    const float* row = lut + (long long)delta * D;  // cos half, then (negated) sin half
    // block_stride: elements between blocks (a view of a bigger cache may have a gap)
    T* base = key_cache + (long long)blk * block_stride + (long long)t * Hkv * D;
    for (int idx = threadIdx.x; idx < Hkv * half; idx += blockDim.x) {
        const int head = idx / half, j = idx % half;
        T* x = base + (long long)head * D;
        const int i0 = interleaved ? 2 * j : j;
        const int i1 = interleaved ? 2 * j + 1 : j + half;
        const float a = to_f32(x[i0]), b = to_f32(x[i1]);
        const float c = row[j], s = row[half + j];
        x[i0] = from_f32<T>(a * c - b * s);
        x[i1] = from_f32<T>(b * c + a * s);
    }
}
