// ATTN: flash-style attention.  One block of ATTN_THREADS threads owns ATTN_BQ query rows of
// one sequence and one split of the key range: ATTN_BQ rows of one head, or in decode one row
// of each of up to ATTN_BQ heads that share a KV head (hpb); key/value tiles of `bk` keys are
// staged in shared memory and folded into the output with an online softmax, so the score
// matrix is never materialised.  With n_splits > 1 (decode: few query rows, long context) each
// split writes a normalised partial (out, lse) and attn_merge combines them, sinks added once.
//
// Everything that varies per decode step (query start rows, sequence lengths, block tables) is
// read from device memory; the grid depends only on shapes, so a captured CUDA graph stays valid.
#include "common.cuh"

#define ATTN_THREADS 128
#define ATTN_BQ 16
#define ATTN_GROUP 8  // threads sharing one query row (ATTN_THREADS / ATTN_BQ)

// Sum / max over the ATTN_GROUP lanes of one query row; the group is aligned inside a warp.
__device__ __forceinline__ float group_max(float v) {
    for (int off = ATTN_GROUP / 2; off > 0; off /= 2)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ float group_sum(float v) {
    for (int off = ATTN_GROUP / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Where key t lives: its leading index in k/v (the cache block through the block table, or t
// itself) and its token within that block; lead -1 when the block table points outside the
// cache (raised as an error, the key is treated as absent).
struct KeySlot {
    long long lead;
    int sub;
};

__device__ __forceinline__ KeySlot key_slot(int t, int seq, const int* block_table,
                                            int max_blocks, int block_size, int num_blocks,
                                            int* err) {
    if (block_table == nullptr) return KeySlot{t, 0};
    int blk = block_table[(long long)seq * max_blocks + t / block_size];
    if (blk < 0 || blk >= num_blocks) {
        raise_error(err, OPB_ERR_BLOCK);
        return KeySlot{-1, 0};
    }
    return KeySlot{blk, t % block_size};
}

// ggml's ALiBi slope m0^(h+1) or m1^(2(h - n_head_log2) + 1), as exp2 of log2(m) multiples
// (powf's slow path spills registers); alibi_n_head_log2 == 0 means no ALiBi.
__device__ __forceinline__ float alibi_slope(int h, float log2_m0, float log2_m1,
                                             int n_head_log2) {
    if (n_head_log2 == 0) return 0.0f;
    return h < n_head_log2 ? exp2f(log2_m0 * (float)(h + 1))
                           : exp2f(log2_m1 * (float)(2 * (h - n_head_log2) + 1));
}

// Staging a tile is most of a decode block's work (one query row of its 16 is busy), and its
// loads once waited one memory latency each: the compiled loop stored every loaded element
// to shared memory before it issued the next load (an H200 ran decode at ~40 GB/s whatever
// the grid).  So each thread now issues several independent loads before it stores any, of
// 16 bytes each where every key's row starts on a 16-byte boundary (8 halves or 4 floats a
// load), else of one element each.
#define STAGE_CHUNKS 4     // 16-byte loads in flight per thread
#define STAGE_ELEMENTS 8   // one-element loads in flight per thread (the unaligned fallback)

struct alignas(16) Bytes16 {
    unsigned int w[4];
};

template <typename T>
union Chunk16 {  // one 16-byte load, read as elements
    Bytes16 raw;
    T elems[sizeof(Bytes16) / sizeof(T)];
};

// Where key j's D values start in src: Slead[j] leading indices in, token Ssub[j], head kvh.
__device__ __forceinline__ long long row_start(const int* Slead, const int* Ssub, int j,
                                               long long lead_stride, int Hkv, int kvh, int D) {
    return Slead[j] * lead_stride + ((long long)Ssub[j] * Hkv + kvh) * D;
}

template <typename T>
__device__ __forceinline__ void stage_chunks(const T* src, float* dst, const int* Slead,
                                             const int* Ssub, int bk, int D, int dst_stride,
                                             long long lead_stride, int Hkv, int kvh) {
    constexpr int VEC = sizeof(Bytes16) / sizeof(T);
    const int per_key = D / VEC, n = bk * per_key;
    for (int base = threadIdx.x; base < n; base += ATTN_THREADS * STAGE_CHUNKS) {
        Chunk16<T> got[STAGE_CHUNKS];
#pragma unroll
        for (int u = 0; u < STAGE_CHUNKS; ++u) {
            const int idx = base + u * ATTN_THREADS, j = idx / per_key;
            got[u].raw = Bytes16{{0u, 0u, 0u, 0u}};  // zero bits: 0.0 in every type
            if (idx < n && Slead[j] >= 0) {
                const T* at = src + row_start(Slead, Ssub, j, lead_stride, Hkv, kvh, D);
                got[u].raw = *reinterpret_cast<const Bytes16*>(at + (idx % per_key) * VEC);
            }
        }
#pragma unroll
        for (int u = 0; u < STAGE_CHUNKS; ++u) {
            const int idx = base + u * ATTN_THREADS;
            if (idx >= n) continue;
            float* row = dst + (idx / per_key) * dst_stride + (idx % per_key) * VEC;
#pragma unroll
            for (int e = 0; e < VEC; ++e) row[e] = to_f32(got[u].elems[e]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void stage_elements(const T* src, float* dst, const int* Slead,
                                               const int* Ssub, int bk, int D, int dst_stride,
                                               long long lead_stride, int Hkv, int kvh) {
    const int n = bk * D;
    for (int base = threadIdx.x; base < n; base += ATTN_THREADS * STAGE_ELEMENTS) {
        float got[STAGE_ELEMENTS];
#pragma unroll
        for (int u = 0; u < STAGE_ELEMENTS; ++u) {
            const int idx = base + u * ATTN_THREADS, j = idx / D;
            got[u] = 0.0f;
            if (idx < n && Slead[j] >= 0)
                got[u] = to_f32(src[row_start(Slead, Ssub, j, lead_stride, Hkv, kvh, D) + idx % D]);
        }
#pragma unroll
        for (int u = 0; u < STAGE_ELEMENTS; ++u) {
            const int idx = base + u * ATTN_THREADS;
            if (idx < n) dst[(idx / D) * dst_stride + idx % D] = got[u];
        }
    }
}

// Stages D values of each of bk keys into dst ([bk][dst_stride]) as floats; a key with Slead
// -1 reads zeros.  The 16-byte path needs every row start aligned: src itself, D and
// lead_stride multiples of a chunk's elements (the same answer in every thread).
template <typename T>
__device__ __forceinline__ void stage_rows(const T* src, float* dst, const int* Slead,
                                           const int* Ssub, int bk, int D, int dst_stride,
                                           long long lead_stride, int Hkv, int kvh) {
    constexpr int VEC = sizeof(Bytes16) / sizeof(T);
    if ((unsigned long long)src % sizeof(Bytes16) == 0 && D % VEC == 0 && lead_stride % VEC == 0)
        stage_chunks(src, dst, Slead, Ssub, bk, D, dst_stride, lead_stride, Hkv, kvh);
    else
        stage_elements(src, dst, Slead, Ssub, bk, D, dst_stride, lead_stride, Hkv, kvh);
}

// Stages keys [kt, kt + bk) of kv head kvh into Ks ([bk][dk_pad]) and Vs ([bk][dv_pad]); keys
// past k_hi and unresolvable slots read as zeros.  k_stride / v_stride: elements between leading
// indices (tokens, or cache blocks when paged); inside a block tokens are Hkv*D apart.  Each
// key's slot is resolved once into Slead / Ssub ([bk] ints each), not once per element: a
// paged slot is a block-table read and a division.
template <typename T>
__device__ __forceinline__ void load_kv_tile(const T* k, const T* v, float* Ks, float* Vs,
                                             int* Slead, int* Ssub, int kt, int k_hi, int bk,
                                             int seq, int kvh, int Hkv, int Dk, int Dv,
                                             int dk_pad, int dv_pad, const int* block_table,
                                             int max_blocks, int block_size, int num_blocks,
                                             long long k_stride, long long v_stride,
                                             int* err) {
    for (int j = threadIdx.x; j < bk; j += ATTN_THREADS) {
        const int t = kt + j;
        KeySlot at = t < k_hi ? key_slot(t, seq, block_table, max_blocks, block_size,
                                         num_blocks, err) : KeySlot{-1, 0};
        Slead[j] = (int)at.lead;  // a token or a block index: both below 2**31
        Ssub[j] = at.sub;  // (the last tile read its slots before its own second barrier)
    }
    __syncthreads();  // previous tile fully consumed (and Q staged, on the first pass)
    stage_rows(k, Ks, Slead, Ssub, bk, Dk, dk_pad, k_stride, Hkv, kvh);
    stage_rows(v, Vs, Slead, Ssub, bk, Dv, dv_pad, v_stride, Hkv, kvh);
}

// The key groups of a head (block rows r .. r + groups - 1, r the first's) each hold an
// online-softmax state (m, l, acc) over their share of the keys: the first group's becomes
// the merge of all, as attn_merge merges splits.  Reuses the tiles' shared memory, which
// needs ATTN_BQ * (Dv + 2) floats (plan.attn_key_split_fits).  Every thread calls it.
template <int ACC>
__device__ __forceinline__ void merge_key_groups(float* smem, float& m, float& l,
                                                 float (&acc)[ACC], int r, int g, int kg,
                                                 int groups, int Dv, bool head_valid) {
    float* Gm = smem;                  // [ATTN_BQ] each row group's running max
    float* Gl = Gm + ATTN_BQ;          // [ATTN_BQ] its denominator
    float* Gacc = Gl + ATTN_BQ;        // [ATTN_BQ][Dv] its accumulator
    __syncthreads();  // every group is done with the last tile
    if (g == 0) {
        Gm[r] = m;
        Gl[r] = l;
    }
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
        const int d = g + ATTN_GROUP * a;
        if (d < Dv) Gacc[r * Dv + d] = acc[a];
    }
    __syncthreads();
    if (kg != 0 || !head_valid) return;
    float top = -OPB_INF;
    for (int k = 0; k < groups; ++k) top = fmaxf(top, Gm[r + k]);
    const float base = top == -OPB_INF ? 0.0f : top;
    float sum = 0.0f;
    for (int k = 0; k < groups; ++k) sum += Gl[r + k] * expf(Gm[r + k] - base);
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
        const int d = g + ATTN_GROUP * a;
        if (d < Dv) {
            float o = 0.0f;
            for (int k = 0; k < groups; ++k) o += Gacc[(r + k) * Dv + d] * expf(Gm[r + k] - base);
            acc[a] = o;
        }
    }
    m = top;
    l = sum;
}

// ACC: output dims each thread accumulates in registers (Dv <= ACC * ATTN_GROUP); one
// instantiation per head-size class keeps small heads from paying for the 512-wide ones.
// Launch bounds with a minimum of 4 blocks per SM: without the second argument ptxas capped
// the small instantiations at 64 registers and spilled (seen with NVRTC 12.9, sm_80).
template <typename T, int ACC>
__global__ void __launch_bounds__(ATTN_THREADS, 4)
attn_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
         T* __restrict__ out, const float* __restrict__ mask, const float* __restrict__ sinks,
         float* __restrict__ lse,
         float* __restrict__ part_out, float* __restrict__ part_lse,
         const int* __restrict__ block_table, const int* __restrict__ seq_lens,
         const int* __restrict__ q_start, int* err, int n_q_total, int H, int Hkv, int Dk, int Dv,
         int n_kv, int max_blocks, int block_size, int num_blocks, float scale, float softcap,
         float alibi_log2_m0, float alibi_log2_m1, int alibi_n_head_log2, int causal,
         int window, int bk, int hpb, int key_split, int n_splits, int split_len,
         long long k_stride, long long v_stride) {
    // hpb query heads of one KV head's group share the block (decode: each stages a K/V tile
    // once for all of them), qpb query rows each: block row r is head h0 + r / qpb, query
    // row q0 + r % qpb (a block row past hpb * qpb has neither)
    const int qpb = ATTN_BQ / hpb;
    const int split = blockIdx.x % n_splits, q_tile = blockIdx.x / n_splits;
    const int h0 = blockIdx.y * hpb, seq = blockIdx.z;
    const bool paged = block_table != nullptr;
    const int q_begin = paged ? q_start[seq] : 0;
    const int q_len = paged ? q_start[seq + 1] - q_begin : n_q_total;
    int seq_len = paged ? seq_lens[seq] : n_kv;
    const int q0 = q_tile * qpb;
    if (q0 >= q_len) return;  // uniform over the block, before any barrier
    if (q_begin < 0 || q_begin + q_len > n_q_total || seq_len < 0 ||
        (paged && seq_len > max_blocks * block_size)) {
        raise_error(err, OPB_ERR_SEQ);
        return;
    }
    const int rows = min(qpb, q_len - q0);  // query rows of each head
    const int kvh = h0 / (H / Hkv);
    const int r = threadIdx.x / ATTN_GROUP, g = threadIdx.x % ATTN_GROUP;
    // One query row a head (decode): its qpb row groups share its keys instead, each taking
    // every qpb-th chunk of ATTN_GROUP keys of a tile, and merge at the end.  Otherwise one
    // row group of eight lanes does all of a head's dot products while the other three of
    // its warp idle: the fifth H200 run's decode, 439 us at 32k keys (torch 100).
    // (not for the 512-wide heads: ACC 64 already fills the registers; it would spill)
    const int key_groups = ACC <= 32 && key_split && rows == 1 ? qpb : 1;  // block-uniform
    const int hl = r / qpb, h = h0 + hl;
    const int rq = key_groups > 1 ? 0 : r % qpb;  // the query row among the head's rows
    const int kg = key_groups > 1 ? r % qpb : 0;  // the key group
    const int r_q = hl * qpb + rq;               // the block row holding that query
    bool row_valid = hl < hpb && rq < rows;
    const int qpos_first = seq_len - q_len + q0, qpos = qpos_first + rq;
    const long long qrow = q_begin + q0 + rq;

    // Keys this block must visit: its split, cut by causality and the window of its rows.
    int k_lo = split * split_len, k_hi = min(seq_len, k_lo + split_len);
    if (causal) k_hi = min(k_hi, qpos_first + rows);
    if (window > 0) k_lo = max(k_lo, qpos_first - window + 1);

    extern __shared__ float smem[];
    const int dk_pad = Dk + 1;  // odd row stride: lanes reading different keys hit different banks
    float* Qs = smem;
    float* Ks = Qs + ATTN_BQ * dk_pad;
    const int dv_pad = Dv + 1;  // odd as well: key groups of a warp read different keys
    float* Vs = Ks + bk * dk_pad;
    float* Ps = Vs + bk * dv_pad;
    int* Slead = (int*)(Ps + ATTN_BQ * bk);
    int* Ssub = Slead + bk;
    for (int idx = threadIdx.x; idx < ATTN_BQ * Dk; idx += ATTN_THREADS) {
        const int rr = idx / Dk, d = idx % Dk, hr = rr / qpb, qr = rr % qpb;
        Qs[rr * dk_pad + d] = hr < hpb && qr < rows
            ? to_f32(q[((q_begin + q0 + qr) * (long long)H + h0 + hr) * Dk + d]) : 0.0f;
    }
    const float slope = alibi_slope(h, alibi_log2_m0, alibi_log2_m1, alibi_n_head_log2);
    float m = -OPB_INF, l = 0.0f, acc[ACC];
#pragma unroll
    for (int a = 0; a < ACC; ++a) acc[a] = 0.0f;

    for (int kt = k_lo; kt < k_hi; kt += bk) {
        load_kv_tile(k, v, Ks, Vs, Slead, Ssub, kt, k_hi, bk, seq, kvh, Hkv, Dk, Dv, dk_pad,
                     dv_pad, block_table, max_blocks, block_size, num_blocks, k_stride,
                     v_stride, err);
        __syncthreads();
        float tile_max = -OPB_INF;
        const int first = g + ATTN_GROUP * kg, step = ATTN_GROUP * key_groups;
        for (int j = first; j < bk; j += step) {
            const int t = kt + j;
            float sc = -OPB_INF;
            if (row_valid && t < k_hi) {
                float dot = 0.0f;
                for (int d = 0; d < Dk; ++d) dot += Qs[r_q * dk_pad + d] * Ks[j * dk_pad + d];
                sc = dot * scale;
                if (softcap > 0.0f) sc = softcap * tanhf(sc / softcap);
                if (mask != nullptr) sc += mask[(long long)(q0 + rq) * n_kv + t];
                sc += slope * (float)(t - qpos);
                if ((causal && t > qpos) || (window > 0 && qpos - t >= window)) sc = -OPB_INF;
            }
            Ps[r * bk + j] = sc;
            tile_max = fmaxf(tile_max, sc);
        }
        const float m_new = fmaxf(m, group_max(tile_max));
        const float base = m_new == -OPB_INF ? 0.0f : m_new;  // all masked so far: no NaN
        const float alpha = expf(m - base);
        float psum = 0.0f;
        for (int j = first; j < bk; j += step) {
            float p = expf(Ps[r * bk + j] - base);
            Ps[r * bk + j] = p;
            psum += p;
        }
        l = l * alpha + group_sum(psum);
        m = m_new;
        __syncwarp();  // every lane of the row group reads all of its row's probabilities
        if (!row_valid) continue;  // its output is never written: a decode block has 15 such
#pragma unroll
        for (int a = 0; a < ACC; ++a) {
            const int d = g + ATTN_GROUP * a;
            if (d < Dv) {
                float o = acc[a] * alpha;
                for (int c = ATTN_GROUP * kg; c < bk; c += step)  // the group's key chunks
                    for (int j = c; j < min(c + ATTN_GROUP, bk); ++j)
                        o += Ps[r * bk + j] * Vs[j * dv_pad + d];
                acc[a] = o;
            }
        }
    }
    if (key_groups > 1) {  // the head's key groups merge into its first (uniform branch)
        merge_key_groups<ACC>(smem, m, l, acc, r, g, kg, key_groups, Dv, hl < hpb);
        row_valid = row_valid && kg == 0;
    }
    if (!row_valid) return;
    if (n_splits > 1) {  // normalised partial without sinks; attn_merge adds them once
        const long long prow = ((long long)split * n_q_total + qrow) * H + h;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int a = 0; a < ACC; ++a) {
            const int d = g + ATTN_GROUP * a;
            if (d < Dv) part_out[prow * Dv + d] = acc[a] * inv;
        }
        if (g == 0) part_lse[prow] = l > 0.0f ? m + logf(l) : -OPB_INF;
        return;
    }
    float m_f = m, l_f = l;
    if (sinks != nullptr) {  // the sink is one more logit in the denominator, with no value
        m_f = fmaxf(m, sinks[h]);
        l_f = l * expf(m - m_f) + expf(sinks[h] - m_f);
    }
    const float factor = l_f > 0.0f ? expf(m - m_f) / l_f : 0.0f;
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
        const int d = g + ATTN_GROUP * a;
        if (d < Dv) out[(qrow * H + h) * Dv + d] = from_f32<T>(acc[a] * factor);
    }
    if (lse != nullptr && g == 0) lse[qrow * H + h] = l_f > 0.0f ? m_f + logf(l_f) : -OPB_INF;
}

// Online-softmax merge of the n_splits partials of one (query row, head); sinks added here.
template <typename T>
__global__ void attn_merge(const float* __restrict__ part_out,
                           const float* __restrict__ part_lse, const float* __restrict__ sinks,
                           T* __restrict__ out, float* __restrict__ lse, int n_q_total, int H,
                           int Dv, int n_splits) {
    const long long row = blockIdx.x;  // q row * H + h
    const int h = (int)(row % H);
    const long long stride = (long long)n_q_total * H;
    float big = sinks != nullptr ? sinks[h] : -OPB_INF;
    for (int sp = 0; sp < n_splits; ++sp) big = fmaxf(big, part_lse[sp * stride + row]);
    const float base = big == -OPB_INF ? 0.0f : big;
    float den = sinks != nullptr ? expf(sinks[h] - base) : 0.0f;
    for (int sp = 0; sp < n_splits; ++sp) den += expf(part_lse[sp * stride + row] - base);
    const float inv = den > 0.0f ? 1.0f / den : 0.0f;
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        float o = 0.0f;
        for (int sp = 0; sp < n_splits; ++sp)
            o += expf(part_lse[sp * stride + row] - base) * part_out[(sp * stride + row) * Dv + d];
        out[row * Dv + d] = from_f32<T>(o * inv);
    }
    if (lse != nullptr && threadIdx.x == 0) lse[row] = den > 0.0f ? base + logf(den) : -OPB_INF;
}
