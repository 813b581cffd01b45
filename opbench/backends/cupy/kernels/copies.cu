// SET_ROWS, GET_ROWS and CPY: data movement with dtype conversion (one rounding, nearest even).
#include "common.cuh"

// dst row slots[i] = convert(src row i); slot -1 skips.  Rows are row_len contiguous elements,
// row r of a tensor starting at r * its row stride (views such as cache[:, 0] have strided
// rows); grid.x walks the source rows, threads (and grid.y) stride along a row.
template <typename S, typename D>
__global__ void set_rows_kernel(D* dst, const S* __restrict__ src, const int* __restrict__ slots,
                                int* err, int n_rows, int n_dst_rows, long long row_len,
                                long long dst_stride, long long src_stride) {
    const int i = blockIdx.x;
    const int slot = slots[i];
    if (slot == -1) return;
    if (slot < 0 || slot >= n_dst_rows) {
        if (threadIdx.x == 0 && blockIdx.y == 0) raise_error(err, OPB_ERR_SLOT);
        return;
    }
    for (long long e = blockIdx.y * (long long)blockDim.x + threadIdx.x; e < row_len;
         e += (long long)gridDim.y * blockDim.x)
        dst[slot * dst_stride + e] = convert<S, D>(src[i * src_stride + e]);
}

// out row i = convert(src row rows[i]).
template <typename S, typename D>
__global__ void get_rows_kernel(const S* __restrict__ src, D* out, const int* __restrict__ rows,
                                int* err, int n_rows, int n_src_rows, long long row_len,
                                long long src_stride, long long out_stride) {
    const int i = blockIdx.x;
    const int row = rows[i];
    if (row < 0 || row >= n_src_rows) {
        if (threadIdx.x == 0 && blockIdx.y == 0) raise_error(err, OPB_ERR_ROW);
        return;
    }
    for (long long e = blockIdx.y * (long long)blockDim.x + threadIdx.x; e < row_len;
         e += (long long)gridDim.y * blockDim.x)
        out[i * out_stride + e] = convert<S, D>(src[row * src_stride + e]);
}

// out (contiguous, up to 4 dims, shape n0..n3) = convert(src at element strides st0..st3).
// The host folds the permutation and the step of the first permuted dim into the strides
// (plan.cpy_geometry), so one kernel covers permuted and strided copies.  Index math in I:
// 64-bit division is a long software sequence on a GPU, so copies whose every index and
// offset fits 32 bits use cpy_kernel_i32 (plan.cpy_fits_int32); the rest cpy_kernel.
template <typename S, typename D, typename I>
__device__ __forceinline__ void cpy_strided(const S* __restrict__ src, D* __restrict__ out,
                                            I total, I n1, I n2, I n3, I st0, I st1, I st2,
                                            I st3) {
    for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < total;
         i += (I)gridDim.x * blockDim.x) {
        I rest = i;
        const I i3 = rest % n3;
        rest /= n3;
        const I i2 = rest % n2;
        rest /= n2;
        const I i1 = rest % n1;
        const I i0 = rest / n1;
        out[i] = convert<S, D>(src[i0 * st0 + i1 * st1 + i2 * st2 + i3 * st3]);
    }
}

template <typename S, typename D>
__global__ void cpy_kernel(const S* __restrict__ src, D* __restrict__ out, long long total,
                           long long n1, long long n2, long long n3, long long st0, long long st1,
                           long long st2, long long st3) {
    cpy_strided<S, D, long long>(src, out, total, n1, n2, n3, st0, st1, st2, st3);
}

template <typename S, typename D>
__global__ void cpy_kernel_i32(const S* __restrict__ src, D* __restrict__ out, long long total,
                               long long n1, long long n2, long long n3, long long st0,
                               long long st1, long long st2, long long st3) {
    cpy_strided<S, D, int>(src, out, (int)total, (int)n1, (int)n2, (int)n3, (int)st0, (int)st1,
                           (int)st2, (int)st3);
}

// out = convert(src), both contiguous in the same order: no index math at all (a same-type
// copy of this kind is a device-to-device memcpy instead).
template <typename S, typename D>
__global__ void cpy_contiguous(const S* __restrict__ src, D* __restrict__ out, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = convert<S, D>(src[i]);
}
