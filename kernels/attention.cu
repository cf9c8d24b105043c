// The KV pool on the GPU (f32 layout of server/src/engine/model/kv.rs) and attention over it.
// Offsets into the pool are 64-bit element offsets: a long-context pool exceeds 2^31 floats.

// Row r of src (`width` floats) to pool + off[r]. One block per row.
extern "C" __global__ void __launch_bounds__(256) dsk_kv_scatter_f32(
    float *__restrict__ pool, const long long *__restrict__ off, const float *__restrict__ src,
    int width) {
    dsk_pdl_entry();
    const int r = blockIdx.x;
    float *dst = pool + off[r];
    const float *s = src + (long long)r * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = s[c];
}

// pool + off[r] (`width` floats) to row r of dst. One block per row.
extern "C" __global__ void __launch_bounds__(256) dsk_kv_gather_f32(
    const float *__restrict__ pool, const long long *__restrict__ off, float *__restrict__ dst,
    int width) {
    dsk_pdl_entry();
    const int r = blockIdx.x;
    const float *s = pool + off[r];
    float *d = dst + (long long)r * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
}

#define DSK_ATT_WARPS 4
#define DSK_NEG_INF __int_as_float(0xff800000u)
// Dimensions per lane: head_dim <= 32 * DSK_ATT_DPL (512 for V4-Flash).
#define DSK_ATT_DPL 16

// Split-KV attention, pass 1. Query token t, head h, split s (grid z, y, x) attends over its
// share of the token's keys key_off[key_start[t] .. key_start[t+1]) (K = V: one latent row is
// both). Each warp takes every DSK_ATT_WARPS-th key with an online softmax; lane j holds
// dimensions j, j+32, ... so row loads are coalesced. Writes (max, sum, acc[hd]) of the split to
// part[((t * heads + h) * splits + s) * (hd + 2)]; an empty split writes sum 0.
// Key rows are `fmt` records (common.cuh; `rope` = the latent record's bf16 dims): f32 rows are
// read as before, others value by value through dsk_kv_value.
extern "C" __global__ void __launch_bounds__(DSK_ATT_WARPS * 32) dsk_attend_partial_f32(
    const float *__restrict__ pool, const float *__restrict__ q,
    const long long *__restrict__ key_off, const int *__restrict__ key_start, int heads, int hd,
    int splits, float scale, float *__restrict__ part, int fmt, int rope) {
    dsk_pdl_entry();
    const int s = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k0 = key_start[t], k1 = key_start[t + 1];
    const int per = (k1 - k0 + splits - 1) / splits;
    const int a = k0 + s * per;
    const int b = min(k1, a + per);
    const int dpl = hd >> 5;
    const float *qh = q + ((long long)t * heads + h) * hd;
    float qv[DSK_ATT_DPL], acc[DSK_ATT_DPL];
#pragma unroll
    for (int j = 0; j < DSK_ATT_DPL; ++j) {
        qv[j] = j < dpl ? qh[lane + 32 * j] : 0.f;
        acc[j] = 0.f;
    }
    float m = DSK_NEG_INF, l = 0.f;
    for (int k = a + warp; k < b; k += DSK_ATT_WARPS) {
        // A negative offset marks a slot without a key (device-built lists): masked out.
        if (key_off[k] < 0) continue;
        const float *kr = pool + key_off[k];
        float kv[DSK_ATT_DPL];
        if (fmt == DSK_KV_F32) {
#pragma unroll
            for (int j = 0; j < DSK_ATT_DPL; ++j) kv[j] = j < dpl ? kr[lane + 32 * j] : 0.f;
        } else {
#pragma unroll
            for (int j = 0; j < DSK_ATT_DPL; ++j)
                kv[j] = j < dpl ? dsk_kv_value(kr, fmt, hd, rope, lane + 32 * j) : 0.f;
        }
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < DSK_ATT_DPL; ++j) d = fmaf(qv[j], kv[j], d);
        d = dsk_warp_sum(d) * scale;
        const float mn = fmaxf(m, d);
        const float c = expf(m - mn);  // 0 on the first key (m = -inf)
        const float p = expf(d - mn);
        l = l * c + p;
#pragma unroll
        for (int j = 0; j < DSK_ATT_DPL; ++j) acc[j] = fmaf(acc[j], c, p * kv[j]);
        m = mn;
    }
    __shared__ float sm[DSK_ATT_WARPS], sl[DSK_ATT_WARPS];
    __shared__ float sacc[DSK_ATT_WARPS][32 * DSK_ATT_DPL];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < DSK_ATT_DPL; ++j)
        if (j < dpl) sacc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float mx = DSK_NEG_INF;
#pragma unroll
    for (int w = 0; w < DSK_ATT_WARPS; ++w)
        if (sl[w] > 0.f) mx = fmaxf(mx, sm[w]);
    float *out = part + (((long long)t * heads + h) * splits + s) * (hd + 2);
    float cw[DSK_ATT_WARPS];
    float lsum = 0.f;
#pragma unroll
    for (int w = 0; w < DSK_ATT_WARPS; ++w) {
        cw[w] = sl[w] > 0.f ? expf(sm[w] - mx) : 0.f;
        lsum = fmaf(sl[w], cw[w], lsum);
    }
    if (threadIdx.x == 0) {
        out[0] = mx;
        out[1] = lsum;
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < DSK_ATT_WARPS; ++w) v = fmaf(sacc[w][d], cw[w], v);
        out[2 + d] = v;
    }
}

// Split-KV attention, pass 1, head-grouped for multi-query attention (every head of a token
// attends over the same key rows): block (split s, head group g, token t) = grid (x, y, z) serves
// heads g * DSK_ATTH_G .. + DSK_ATTH_G, so a key row is read from global memory once per group
// instead of once per head. The block stages DSK_ATTH_TILE key rows at a time in dynamic shared
// memory (row stride DSK_ATTH_ROW floats whatever hd is; a masked or missing row is zeros) and
// every warp runs its DSK_ATTH_HPW heads over the tile in chunks of 8 keys:
// - logits: lane partial dots for 8 keys x its heads, summed over the warp with a transposing
//   butterfly (9 shuffles for 8 sums instead of 40), after which lane L holds key L >> 2's logit;
// - online softmax per chunk: one rescale of acc per chunk, one expf per lane per head;
// - acc += p_k * k_row with p_k broadcast from lane 4k.
// Writes the same (max, sum, acc[hd]) record per (t, h, s) as dsk_attend_partial_f32, so
// dsk_attend_combine_f32 merges it unchanged; an empty split writes sum 0. Key rows stored as
// records (fmt, rope as dsk_attend_partial_f32) are decoded into the tile as it is staged.
#define DSK_ATTH_G 16
#define DSK_ATTH_WARPS 8
#define DSK_ATTH_HPW (DSK_ATTH_G / DSK_ATTH_WARPS)
#define DSK_ATTH_TILE 16
#define DSK_ATTH_CHUNK 8
#define DSK_ATTH_ROW (32 * DSK_ATT_DPL)

// Sums v[0..8) of every lane over the warp. Each level hands half of the values still held to
// the partner lane and keeps the other half: afterwards every lane holds the warp total of
// v[lane >> 2].
__device__ __forceinline__ float dsk_warp_sum8_transposed(float v[DSK_ATTH_CHUNK]) {
    const int lane = threadIdx.x & 31;
    const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float keep = b4 ? v[i + 4] : v[i], give = b4 ? v[i] : v[i + 4];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, give, 16);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float keep = b3 ? v[i + 2] : v[i], give = b3 ? v[i] : v[i + 2];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, give, 8);
    }
    {
        const float keep = b2 ? v[1] : v[0], give = b2 ? v[0] : v[1];
        v[0] = keep + __shfl_xor_sync(0xffffffffu, give, 4);
    }
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], 2);
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
    return v[0];
}

extern "C" __global__ void __launch_bounds__(DSK_ATTH_WARPS * 32, 2) dsk_attend_partial_heads_f32(
    const float *__restrict__ pool, const float *__restrict__ q,
    const long long *__restrict__ key_off, const int *__restrict__ key_start, int heads, int hd,
    int splits, float scale, float *__restrict__ part, int fmt, int rope) {
    dsk_pdl_entry();
    // [DSK_ATTH_TILE][DSK_ATTH_ROW] key rows, then DSK_ATTH_TILE flags: row r holds a key.
    extern __shared__ float dsk_atth_smem[];
    float *const dsk_atth_tile = dsk_atth_smem;
    int *const dsk_atth_valid = reinterpret_cast<int *>(dsk_atth_smem + DSK_ATTH_TILE * DSK_ATTH_ROW);
    const int s = blockIdx.x, t = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h0 = blockIdx.y * DSK_ATTH_G + warp * DSK_ATTH_HPW;
    const int k0 = key_start[t], k1 = key_start[t + 1];
    const int per = (k1 - k0 + splits - 1) / splits;
    const int a = k0 + s * per;
    const int b = min(k1, a + per);
    const int dpl = hd >> 5;
    float qv[DSK_ATTH_HPW][DSK_ATT_DPL], acc[DSK_ATTH_HPW][DSK_ATT_DPL];
    float m[DSK_ATTH_HPW], l[DSK_ATTH_HPW];
#pragma unroll
    for (int h = 0; h < DSK_ATTH_HPW; ++h) {
        const float *qh = q + ((long long)t * heads + h0 + h) * hd;
#pragma unroll
        for (int j = 0; j < DSK_ATT_DPL; ++j) {
            qv[h][j] = j < dpl ? qh[lane + 32 * j] : 0.f;
            acc[h][j] = 0.f;
        }
        m[h] = DSK_NEG_INF;
        l[h] = 0.f;
    }
    for (int kt = a; kt < b; kt += DSK_ATTH_TILE) {
        __syncthreads();  // the previous tile's readers are done
        // Warp w stages rows w, w + 8: one coalesced row read per warp at a time.
        for (int r = warp; r < DSK_ATTH_TILE; r += DSK_ATTH_WARPS) {
            const int k = kt + r;
            // A negative offset marks a slot without a key (device-built lists): a zero row,
            // masked out of the softmax below.
            const long long off = k < b ? key_off[k] : -1;
            // All of the lane's loads first, then the stores: a row's loads are in flight at once.
            const float *kr = pool + (off >= 0 ? off : 0);
            float *row = dsk_atth_tile + r * DSK_ATTH_ROW;
            if (fmt == DSK_KV_F32 || off < 0) {
                float v[DSK_ATT_DPL];
#pragma unroll
                for (int j = 0; j < DSK_ATT_DPL; ++j) v[j] = j < dpl && off >= 0 ? kr[lane + 32 * j] : 0.f;
#pragma unroll
                for (int j = 0; j < DSK_ATT_DPL; ++j)
                    if (j < dpl) row[lane + 32 * j] = v[j];
            } else {
                // A stored record (warp-uniform branch: off is the row's): decoded into the tile.
                dsk_kv_decode_row_warp(kr, fmt, hd, rope, row);
            }
            if (lane == 0) dsk_atth_valid[r] = off >= 0;
        }
        __syncthreads();
        for (int c0 = 0; c0 < DSK_ATTH_TILE && kt + c0 < b; c0 += DSK_ATTH_CHUNK) {
            const float *tile = dsk_atth_tile + c0 * DSK_ATTH_ROW;
            float pd[DSK_ATTH_HPW][DSK_ATTH_CHUNK];
#pragma unroll
            for (int h = 0; h < DSK_ATTH_HPW; ++h)
#pragma unroll
                for (int k = 0; k < DSK_ATTH_CHUNK; ++k) pd[h][k] = 0.f;
#pragma unroll
            for (int j = 0; j < DSK_ATT_DPL; ++j) {
                if (j < dpl) {
#pragma unroll
                    for (int k = 0; k < DSK_ATTH_CHUNK; ++k) {
                        const float kv = tile[k * DSK_ATTH_ROW + lane + 32 * j];
#pragma unroll
                        for (int h = 0; h < DSK_ATTH_HPW; ++h) pd[h][k] = fmaf(qv[h][j], kv, pd[h][k]);
                    }
                }
            }
            // This lane's key within the chunk, after the transposing sum.
            const bool valid = dsk_atth_valid[c0 + (lane >> 2)] != 0;
            float p[DSK_ATTH_HPW];
            bool any = false;
#pragma unroll
            for (int h = 0; h < DSK_ATTH_HPW; ++h) {
                // Every lane takes part in the shuffles; a masked key's (zero) logit is then -inf.
                const float dot = dsk_warp_sum8_transposed(pd[h]);
                const float lg = valid ? dot * scale : DSK_NEG_INF;
                // Key lg sits in lanes 4k .. 4k + 3: lane bits 2..4 span the chunk's keys.
                float cm = fmaxf(lg, __shfl_xor_sync(0xffffffffu, lg, 4));
                cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 8));
                cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 16));
                const float mn = fmaxf(m[h], cm);
                // A chunk without a valid key leaves m = -inf: no expf(-inf - -inf).
                const float c = mn == DSK_NEG_INF ? 1.f : expf(m[h] - mn);  // 0 on the first key
                p[h] = valid ? expf(lg - mn) : 0.f;
                float ps = p[h] + __shfl_xor_sync(0xffffffffu, p[h], 4);
                ps += __shfl_xor_sync(0xffffffffu, ps, 8);
                ps += __shfl_xor_sync(0xffffffffu, ps, 16);
                l[h] = fmaf(l[h], c, ps);
#pragma unroll
                for (int j = 0; j < DSK_ATT_DPL; ++j) acc[h][j] *= c;
                m[h] = mn;
                any |= cm != DSK_NEG_INF;
            }
            if (!any) continue;  // warp-uniform: cm is a warp-wide max
#pragma unroll
            for (int k = 0; k < DSK_ATTH_CHUNK; ++k) {
                float pk[DSK_ATTH_HPW];
#pragma unroll
                for (int h = 0; h < DSK_ATTH_HPW; ++h) pk[h] = __shfl_sync(0xffffffffu, p[h], 4 * k);
#pragma unroll
                for (int j = 0; j < DSK_ATT_DPL; ++j) {
                    if (j < dpl) {
                        const float kv = tile[k * DSK_ATTH_ROW + lane + 32 * j];
#pragma unroll
                        for (int h = 0; h < DSK_ATTH_HPW; ++h) acc[h][j] = fmaf(pk[h], kv, acc[h][j]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int h = 0; h < DSK_ATTH_HPW; ++h) {
        float *out = part + (((long long)t * heads + h0 + h) * splits + s) * (hd + 2);
        if (lane == 0) {
            out[0] = m[h];
            out[1] = l[h];
        }
#pragma unroll
        for (int j = 0; j < DSK_ATT_DPL; ++j)
            if (j < dpl) out[2 + lane + 32 * j] = acc[h][j];
    }
}

// Split-KV attention, pass 1, on the TF32 tensor cores (mma.sync m16n8k8, f32 accumulate, sm_80+)
// for multi-query attention at head_dim 512: the same arguments and (max, sum, acc[hd]) records
// as dsk_attend_partial_heads_f32, so dsk_attend_combine_f32 merges them unchanged. Grid (split s,
// group of G heads, token t); two forms: dsk_attend_partial_heads_tc, G = 16 with 8 warps (78.4 KB
// of shared memory, two blocks an H200 SM, fits sm_121), and dsk_attend_partial_heads_tc32,
// G = 32 with 16 warps (115.8 KB, one block an SM), which reads each key row from L2 once per
// 32 heads instead of 16. With W = G / 2 warps, a warp covers D = 512 / W dims (64 or 32). Key
// rows come in tiles of DSK_ATTC_TILE, double buffered in dynamic shared memory: the next tile's
// rows are copied with cp.async while the block computes on this one (f32 rows; stored records
// are decoded into the buffer as it is filled, and a masked or missing row is zeros with its flag
// clear). Per tile:
// - logits S = Q K^T, heads as M (G / 16 m tiles), keys as N: warp w takes dims D w .. D w + D - 1
//   as its K slice (its Q fragments, 32 registers, stay in registers for the whole block) over
//   every key of the tile and writes its partial S; the W partials are summed in shared memory;
// - online softmax of the tile per head as the f32 kernel's (masked keys -inf, m = -inf stays
//   until a valid key, an empty split writes sum 0): warp w for heads 2 w (lanes 0..15, lane =
//   key) and 2 w + 1 (lanes 16..31); the probabilities are rounded to TF32 before they are summed
//   into l, so numerator and denominator weigh a key alike;
// - O += P V, heads as M, dims as N: warp w owns dims D w .. D w + D - 1 of all G heads (32
//   accumulators a thread), rescaled by the tile's correction first.
// A warp reads only its own D dims of the tile in both products. Key values are rounded to TF32
// as fragments are loaded (dsk_attc_tf32). In S, k index tg of a k step is dim 2 tg and tg + 4 is
// dim 2 tg + 1 (A and B alike, so the sum is the same), which makes B one float2 load. Row strides
// keep every fragment load free of bank conflicts: DSK_ATTC_LD = 520 (8 mod 32) for the tile (S:
// float2 at 8 g + 2 tg; PV: 8 tg + g), DSK_ATTC_SLD = 24 for the partial logits (float2 stores),
// DSK_ATTC_PLD = 20 for P (20 g + tg).
// TF32 operands (10-bit mantissas, rounded to nearest) put each product within ~2^-10 of its
// value; accumulation is f32.
#define DSK_ATTC_TILE 16
#define DSK_ATTC_HD 512
#define DSK_ATTC_LD 520
#define DSK_ATTC_SLD (DSK_ATTC_TILE + 8)
#define DSK_ATTC_PLD (DSK_ATTC_TILE + 4)
// Shared memory (floats) of the G-head form: tiles [2][TILE][LD] | partial logits [G/2][G][SLD] |
// P [G][PLD] | corrections [G] | row flags [2][TILE] (int). Kept in step with
// attention_heads_tc_smem_bytes.
#define DSK_ATTC_SMEM_FLOATS(G)                                                                     \
    (2 * DSK_ATTC_TILE * DSK_ATTC_LD + ((G) / 2) * (G) * DSK_ATTC_SLD + (G) * DSK_ATTC_PLD + (G) +  \
     2 * DSK_ATTC_TILE)

// Fills tile buffer `buf` (and its row flags) with keys kt .. kt + TILE of the split [.., b):
// warp w rows w, w + W, ... f32 rows by cp.async (16-byte copies where the row is 16-byte aligned);
// records decoded, masked or missing rows zeroed, with plain stores.
template <int W>
__device__ __forceinline__ void dsk_attc_stage(float *buf, int *valid, const float *__restrict__ pool,
                                               const long long *__restrict__ key_off, int kt, int b,
                                               int fmt, int hd, int rope) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < DSK_ATTC_TILE / W; ++i) {
        const int r = warp + W * i;
        const int k = kt + r;
        // A negative offset marks a slot without a key: a zero row, masked out of the softmax.
        const long long off = k < b ? key_off[k] : -1;
        const float *kr = pool + (off >= 0 ? off : 0);
        float *row = buf + r * DSK_ATTC_LD;
        if (off < 0) {
#pragma unroll
            for (int j = 0; j < DSK_ATTC_HD / 32; ++j) row[lane + 32 * j] = 0.f;
        } else if (fmt != DSK_KV_F32) {
            dsk_kv_decode_row_warp(kr, fmt, hd, rope, row);  // warp-uniform branch
        } else if ((reinterpret_cast<unsigned long long>(kr) & 15) == 0) {
#pragma unroll
            for (int j = 0; j < DSK_ATTC_HD / 128; ++j) dsk_cp_async<16>(row + 4 * (lane + 32 * j), kr + 4 * (lane + 32 * j));
        } else {
#pragma unroll
            for (int j = 0; j < DSK_ATTC_HD / 32; ++j) dsk_cp_async<4>(row + lane + 32 * j, kr + lane + 32 * j);
        }
        if (lane == 0) valid[r] = off >= 0;
    }
}

// A key value as an MMA operand, rounded to TF32: mma.sync reads only the top 19 bits of a .tf32
// operand, so adding half a TF32 ulp to the bit pattern rounds to nearest (ties away from zero,
// as cvt.rna) in one integer add where cvt.rna.tf32 takes three instructions (it also guards
// inf/NaN, which attention rows do not hold). CUTLASS's round_half_ulp_truncate.
__device__ __forceinline__ unsigned int dsk_attc_tf32(float x) { return __float_as_uint(x) + 0x1000u; }

// Max and sum over the 16 lanes of a half warp.
__device__ __forceinline__ float dsk_attc_half_max(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float dsk_attc_half_sum(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int G>
__device__ __forceinline__ void dsk_attend_partial_heads_tc_body(
    const float *__restrict__ pool, const float *__restrict__ q,
    const long long *__restrict__ key_off, const int *__restrict__ key_start, int heads, int hd,
    int splits, float scale, float *__restrict__ part, int fmt, int rope) {
    constexpr int MT = G / 16, W = G / 2, D = DSK_ATTC_HD / W, KS = D / 8;
    extern __shared__ float smem[];
    float *const tiles = smem;
    float *const slog = tiles + 2 * DSK_ATTC_TILE * DSK_ATTC_LD;
    float *const prob = slog + W * G * DSK_ATTC_SLD;
    float *const corr = prob + G * DSK_ATTC_PLD;
    int *const valid = reinterpret_cast<int *>(corr + G);
    const int s = blockIdx.x, t = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tg = lane & 3;
    const int hb = blockIdx.y * G;
    const int dw = warp * D;  // this warp's dims
    const int k0 = key_start[t], k1 = key_start[t + 1];
    const int per = (k1 - k0 + splits - 1) / splits;
    const int a = k0 + s * per;
    const int b = min(k1, a + per);
    if (a < b) dsk_attc_stage<W>(tiles, valid, pool, key_off, a, b, fmt, hd, rope);
    dsk_cp_commit();
    // A fragments of Q (m tile mt: heads 16 mt + g, + 8) over the warp's dims, k step ks: dims
    // 8 ks + 2 tg, + 1.
    unsigned int qa[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const float *q0 = q + ((long long)t * heads + hb + 16 * mt + g) * hd + dw + 2 * tg;
        const float *q1 = q0 + 8LL * hd;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qa[mt][ks][0] = dsk_f32_to_tf32(q0[8 * ks]);
            qa[mt][ks][1] = dsk_f32_to_tf32(q1[8 * ks]);
            qa[mt][ks][2] = dsk_f32_to_tf32(q0[8 * ks + 1]);
            qa[mt][ks][3] = dsk_f32_to_tf32(q1[8 * ks + 1]);
        }
    }
    // O accumulators: m tile mt, n tile j = dims dw + 8 j ..; (g, 2 tg), (g, 2 tg + 1), (g + 8, ..).
    float o[MT][KS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < KS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
    // Softmax state of head 2 warp + (lane >> 4) (the same in the 16 lanes of a half warp).
    const int hs = 2 * warp + (lane >> 4), key = lane & 15;
    float m = DSK_NEG_INF, l = 0.f;
    for (int kt = a, cur = 0; kt < b; kt += DSK_ATTC_TILE, cur ^= 1) {
        float *const tile = tiles + cur * DSK_ATTC_TILE * DSK_ATTC_LD;
        const int *const vcur = valid + cur * DSK_ATTC_TILE;
        __syncthreads();  // the other buffer's readers (the previous tile) are done
        if (kt + DSK_ATTC_TILE < b)
            dsk_attc_stage<W>(tiles + (cur ^ 1) * DSK_ATTC_TILE * DSK_ATTC_LD, valid + (cur ^ 1) * DSK_ATTC_TILE,
                              pool, key_off, kt + DSK_ATTC_TILE, b, fmt, hd, rope);
        dsk_cp_commit();  // (possibly empty: the wait below counts groups)
        dsk_cp_wait<1>();   // this tile's copies have landed (the newest group: the next tile)
        __syncthreads();
        // Partial logits over the warp's dims: key n tile j = keys 8 j .. 8 j + 7.
#pragma unroll
        for (int j = 0; j < DSK_ATTC_TILE / 8; ++j) {
            float sc[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[mt][e] = 0.f;
            const float *kr = tile + (8 * j + g) * DSK_ATTC_LD + dw + 2 * tg;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                const float2 kv = *reinterpret_cast<const float2 *>(kr + 8 * ks);
                const unsigned int b0 = dsk_attc_tf32(kv.x), b1 = dsk_attc_tf32(kv.y);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    dsk_mma_tf32_m16n8k8(sc[mt], qa[mt][ks][0], qa[mt][ks][1], qa[mt][ks][2], qa[mt][ks][3], b0, b1);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float *sl = slog + (warp * G + 16 * mt + g) * DSK_ATTC_SLD + 8 * j + 2 * tg;
                *reinterpret_cast<float2 *>(sl) = make_float2(sc[mt][0], sc[mt][1]);
                *reinterpret_cast<float2 *>(sl + 8 * DSK_ATTC_SLD) = make_float2(sc[mt][2], sc[mt][3]);
            }
        }
        __syncthreads();
        {
            const bool ok = vcur[key] != 0;
            float d = 0.f;
#pragma unroll
            for (int w = 0; w < W; ++w) d += slog[(w * G + hs) * DSK_ATTC_SLD + key];
            const float lg = ok ? d * scale : DSK_NEG_INF;
            const float cm = dsk_attc_half_max(lg);
            const float mn = fmaxf(m, cm);
            // A tile without a valid key leaves m = -inf: no expf(-inf - -inf).
            const float c = mn == DSK_NEG_INF ? 1.f : expf(m - mn);  // 0 on the first key
            const float p = ok ? __uint_as_float(dsk_f32_to_tf32(expf(lg - mn))) : 0.f;
            l = fmaf(l, c, dsk_attc_half_sum(p));
            m = mn;
            prob[hs * DSK_ATTC_PLD + key] = p;
            if (key == 0) corr[hs] = c;
        }
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float c0 = corr[16 * mt + g], c1 = corr[16 * mt + g + 8];
#pragma unroll
            for (int j = 0; j < KS; ++j) {
                o[mt][j][0] *= c0;
                o[mt][j][1] *= c0;
                o[mt][j][2] *= c1;
                o[mt][j][3] *= c1;
            }
        }
#pragma unroll
        for (int ks = 0; ks < DSK_ATTC_TILE / 8; ++ks) {
            unsigned int pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const float *pr = prob + (16 * mt + g) * DSK_ATTC_PLD + 8 * ks + tg;
                pa[mt][0] = __float_as_uint(pr[0]);
                pa[mt][1] = __float_as_uint(pr[8 * DSK_ATTC_PLD]);
                pa[mt][2] = __float_as_uint(pr[4]);
                pa[mt][3] = __float_as_uint(pr[8 * DSK_ATTC_PLD + 4]);
            }
            const float *v0 = tile + (8 * ks + tg) * DSK_ATTC_LD + dw + g;
            const float *v1 = v0 + 4 * DSK_ATTC_LD;
#pragma unroll
            for (int j = 0; j < KS; ++j) {
                const unsigned int b0 = dsk_attc_tf32(v0[8 * j]), b1 = dsk_attc_tf32(v1[8 * j]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    dsk_mma_tf32_m16n8k8(o[mt][j], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b0, b1);
            }
        }
    }
    if (key == 0) {
        float *out = part + (((long long)t * heads + hb + hs) * splits + s) * (hd + 2);
        out[0] = m;
        out[1] = l;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float *o0 = part + (((long long)t * heads + hb + 16 * mt + g) * splits + s) * (hd + 2) + 2 + dw + 2 * tg;
        float *o1 = o0 + 8LL * splits * (hd + 2);
#pragma unroll
        for (int j = 0; j < KS; ++j) {
            o0[8 * j] = o[mt][j][0];
            o0[8 * j + 1] = o[mt][j][1];
            o1[8 * j] = o[mt][j][2];
            o1[8 * j + 1] = o[mt][j][3];
        }
    }
}

// 16 heads a block, 8 warps, two blocks an SM.
extern "C" __global__ void __launch_bounds__(256, 2) dsk_attend_partial_heads_tc(
    const float *__restrict__ pool, const float *__restrict__ q,
    const long long *__restrict__ key_off, const int *__restrict__ key_start, int heads, int hd,
    int splits, float scale, float *__restrict__ part, int fmt, int rope) {
    dsk_pdl_entry();
    dsk_attend_partial_heads_tc_body<16>(pool, q, key_off, key_start, heads, hd, splits, scale, part, fmt, rope);
}

// 32 heads a block, 16 warps, one block an SM.
extern "C" __global__ void __launch_bounds__(512, 1) dsk_attend_partial_heads_tc32(
    const float *__restrict__ pool, const float *__restrict__ q,
    const long long *__restrict__ key_off, const int *__restrict__ key_start, int heads, int hd,
    int splits, float scale, float *__restrict__ part, int fmt, int rope) {
    dsk_pdl_entry();
    dsk_attend_partial_heads_tc_body<32>(pool, q, key_off, key_start, heads, hd, splits, scale, part, fmt, rope);
}

// --- Split-KV attention pass 1 on the f16 tensor cores (head_dim 512) ---
// dsk_attend_partial_heads_f16 (G = 16 heads a block) / _f16x32 (G = 32): the same inputs, split
// records and merge as the f32 and TF32 kernels, for stored records (FP8 latent, BF16) and f32
// rows. Block (split, G heads, token), 8 warps, tiles of 32 keys. Per tile:
// - its rows arrive raw (the stored bytes) by cp.async while the block computes on the previous
//   tile, and are decoded once into an f16 key tile [32][520] (zeros for slots without a key);
// - S = Q K^T on m16n8k16, Q (f16, staged once) and K from shared memory by ldmatrix: warp w
//   takes m tile w % MT, keys 16 ((w / MT) % 2) .. + 15, and dims kq KQ .. + KQ - 1 with
//   kq = w / (2 MT) (KSPLIT = 64 / G slices); the softmax sums the KSPLIT partial logits;
// - online softmax per head as the other kernels' (masked keys -inf, m = -inf until a valid key,
//   an empty split writes sum 0): a warp per G / 8 heads, 32 / (G / 8) lanes a head, each lane
//   its neighbouring keys (4 at G = 32, 2 at G = 16), so a row's max and sum take 3 or 4
//   shuffles; each probability is rounded to f16 before it is summed into l, so numerator and
//   denominator weigh a key alike;
// - O += P V: warp w owns dims 64 w .. 64 w + 63 of all G heads (MT x 8 accumulator tiles), V
//   fragments by ldmatrix.trans from the same key tile (K = V); rows whose max held skip the
//   rescale.
// Three barriers a tile of 32 keys (the TF32 kernel: four a tile of 16). f16 has TF32's 10
// mantissa bits (unit roundoff 2^-11): Q, K = V and P are rounded to them and products summed in
// f32, as the TF32 kernel (the same error bound). e4m3 and bf16 values are exact in f16 within its
// range; values past +-65504 saturate there (queries and latent rows are RMS-normed, far inside).
// Row strides: Q and key tiles 520 halves (1040 B = 65 x 16 B: the 8 rows of an ldmatrix phase
// hit 8 distinct 16-byte bank groups), probabilities 40 halves (80 B = 5 x 16 B).
#define DSK_ATTF_TILE 32
#define DSK_ATTF_HD 512
#define DSK_ATTF_WARPS 8
#define DSK_ATTF_LDH 520
#define DSK_ATTF_SLD (DSK_ATTF_TILE + 4)
#define DSK_ATTF_PLD (DSK_ATTF_TILE + 8)
#define DSK_ATTF_KSPLIT(G) (64 / (G))
// RoPE pairs the block's cos/sin table holds (rope_dim <= 2 x this).
#define DSK_ATTF_ROPE_PAIRS 64
// Shared memory (bytes) of the G-head form with raw rows `rs` bytes apart: Q [G][LDH] f16 | key
// tile [TILE][LDH] f16 | partial logits [KSPLIT][G][SLD] f32 | P [G][PLD] f16 | corrections [G] |
// row flags [2][TILE] | RoPE cos, sin [2][ROPE_PAIRS] f32 | raw rows [TILE][rs]. Kept in step
// with AttentionTcForm::smem_bytes.
#define DSK_ATTF_SMEM_BYTES(G, RS)                                                                   \
    (((G) + DSK_ATTF_TILE) * DSK_ATTF_LDH * 2 + DSK_ATTF_KSPLIT(G) * (G) * DSK_ATTF_SLD * 4 +         \
     (G) * DSK_ATTF_PLD * 2 + (G) * 4 + 2 * DSK_ATTF_TILE * 4 + 2 * DSK_ATTF_ROPE_PAIRS * 4 +          \
     DSK_ATTF_TILE * (RS))

// ldmatrix.x4 (b16): lanes 8 j .. 8 j + 7 give the 16-byte rows of matrix j; r[j] is lane
// (g, tg)'s pair (g, 2 tg .. + 1) of matrix j, or with `.trans` ((2 tg, g), (2 tg + 1, g)).
__device__ __forceinline__ void dsk_attf_ldsm4(const void *p, unsigned int (&r)[4]) {
#ifdef __CUDA_ARCH__
    const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    emu_ldsm4_b16(p, r, false);
#endif
}
__device__ __forceinline__ void dsk_attf_ldsm4_trans(const void *p, unsigned int (&r)[4]) {
#ifdef __CUDA_ARCH__
    const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    emu_ldsm4_b16(p, r, true);
#endif
}

// Two f32 as an f16x2, saturating at +-65504 (NaN stays NaN).
__device__ __forceinline__ unsigned int dsk_attf_h2(float lo, float hi) {
    return dsk_f32x2_to_f16x2(fminf(fmaxf(lo, -65504.f), 65504.f), fminf(fmaxf(hi, -65504.f), 65504.f));
}

// UE8M0 scale bytes whose e4m3 products are all exact finite f16 values: 448 x 2^(se - 127) <=
// 65504 (se <= 134), the smallest e4m3 subnormal 2^-9 x 2^(se - 127) >= 2^-24 and the scale
// itself a normal f16 (se >= 113).
#define DSK_ATTF_F16_SCALE_LO 113u
#define DSK_ATTF_F16_SCALE_HI 134u

// a * b on f16x2 pairs (round to nearest).
__device__ __forceinline__ unsigned int dsk_attf_hmul2(unsigned int a, unsigned int b) {
#ifdef __CUDA_ARCH__
    unsigned int r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
#else
    float a0, a1, b0, b1;
    dsk_f16x2_to_f32(a, a0, a1);
    dsk_f16x2_to_f32(b, b0, b1);
    return dsk_f32x2_to_f16x2(a0 * b0, a1 * b1);
#endif
}

// The pool offset of this warp's row `lane` of the tile at kt (rows w, w + 8, ...: lanes 0 ..
// TILE / WARPS - 1 hold one each; -1 past the split's end b), loaded a tile ahead of its copies
// so the load's latency hides behind a tile's work.
__device__ __forceinline__ long long dsk_attf_offset(const long long *__restrict__ key_off, int kt, int b) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k = kt + warp + DSK_ATTF_WARPS * lane;
    return lane < DSK_ATTF_TILE / DSK_ATTF_WARPS && k < b ? key_off[k] : -1;
}

// V4-Flash's FP8 record at head_dim 512 (448 e4m3, 64 bf16 RoPE, 7 scale bytes, a pad byte) and
// its raw row stride: the layout the stage and decode below take a flat path for.
#define DSK_ATTF_FP8_ROPE 64
#define DSK_ATTF_FP8_RB 584
#define DSK_ATTF_FP8_RS 592

// Whether a launch's rows take that path (uniform: launch parameters only).
__device__ __forceinline__ bool dsk_attf_fp8_flat(int fmt, int rope, int rb, int rs) {
    return fmt == DSK_KV_FP8 && rope == DSK_ATTF_FP8_ROPE && rb == DSK_ATTF_FP8_RB && rs == DSK_ATTF_FP8_RS;
}

// Issues the cp.async copies of this warp's rows (their offsets in lanes 0.. of `off`, from
// dsk_attf_offset) into `raw` (row r at r * rs, `rb` bytes of it) and sets their flags: 0 for a
// slot without a key, else 1 + the byte the record starts at in its raw row.
//
// `fp8_flat` (dsk_attf_fp8_flat): lanes 8 i .. 8 i + 7 copy the warp's row i. An 8-byte aligned
// record (every one in a pool: FP8 records are 584 bytes apart, so every other one is 16-byte
// aligned) keeps its offset within 16 bytes (0 or 8) in its raw row, so its bytes are 37 16-byte
// pieces, one of them half, each lane taking every 8th (5 copies a lane where each row's warp-wide
// loop took 73 8-byte copies); another record lands at 0 in 4-byte copies. Nothing outside the
// record is read. Else a row at a time, 16-, 8- or 4-byte copies as the row's address allows
// (warp-uniform), the record at 0.
__device__ __forceinline__ void dsk_attf_stage(unsigned char *raw, int *valid, const float *__restrict__ pool,
                                               long long off_lanes, int rb, int rs, bool fp8_flat) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int ROWS = DSK_ATTF_TILE / DSK_ATTF_WARPS;
    static_assert(ROWS * 8 == 32, "eight lanes a row");
    // Lane `from`'s offset, as two 32-bit halves (`from` may differ between lanes).
    const auto lane_offset = [&](int from) {
        const unsigned int lo = __float_as_uint(
            __shfl_sync(0xffffffffu, __uint_as_float((unsigned int)(unsigned long long)off_lanes), from));
        const unsigned int hi = __float_as_uint(
            __shfl_sync(0xffffffffu, __uint_as_float((unsigned int)((unsigned long long)off_lanes >> 32)), from));
        return (long long)(((unsigned long long)hi << 32) | lo);
    };
    if (fp8_flat) {
        const int i = lane >> 3, q = lane & 7, r = warp + DSK_ATTF_WARPS * i;
        const long long o = lane_offset(i);
        const unsigned char *src = reinterpret_cast<const unsigned char *>(pool + (o < 0 ? 0 : o));
        const unsigned long long at = reinterpret_cast<unsigned long long>(src);
        unsigned char *dst = raw + r * rs;
        const int sh = (at & 7) == 0 ? (int)(at & 15) : 0;
        if (q == 0) valid[r] = o >= 0 ? 1 + sh : 0;
        if (o < 0) return;
        if ((at & 7) != 0) {
            for (int c = 4 * q; c < DSK_ATTF_FP8_RB; c += 4 * 8) dsk_cp_async<4>(dst + c, src + c);
            return;
        }
        // Raw byte x of the row is base[x]; piece p is raw bytes 16 p .. 16 p + 15, the half one
        // at the record's start (sh = 8) or end (sh = 0).
        const unsigned char *base = src - sh;
        constexpr int PIECES = DSK_ATTF_FP8_RS / 16;
        const int half = sh ? 0 : PIECES - 1, half_at = sh ? 8 : 16 * (PIECES - 1);
#pragma unroll
        for (int k = 0; k < (PIECES + 7) / 8; ++k) {
            const int p = q + 8 * k;
            if (p >= PIECES) break;
            if (p == half)
                dsk_cp_async<8>(dst + half_at, base + half_at);
            else
                dsk_cp_async<16>(dst + 16 * p, base + 16 * p);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const int r = warp + DSK_ATTF_WARPS * i;
        const long long o = lane_offset(i);
        if (lane == 0) valid[r] = o >= 0;
        if (o < 0) continue;
        const unsigned char *src = reinterpret_cast<const unsigned char *>(pool + o);
        unsigned char *dst = raw + r * rs;
        const unsigned long long at = reinterpret_cast<unsigned long long>(src);
        if ((at & 15) == 0 && (rb & 15) == 0) {
            for (int c = 16 * lane; c < rb; c += 16 * 32) dsk_cp_async<16>(dst + c, src + c);
        } else if ((at & 7) == 0 && (rb & 7) == 0) {
            for (int c = 8 * lane; c < rb; c += 8 * 32) dsk_cp_async<8>(dst + c, src + c);
        } else {
            for (int c = 4 * lane; c < rb; c += 4 * 32) dsk_cp_async<4>(dst + c, src + c);
        }
    }
}

// Whether scale byte `se` lets f16 scale its group exactly (DSK_ATTF_F16_SCALE_LO .. _HI).
__device__ __forceinline__ bool dsk_attf_f16_scale(unsigned int se) {
    return se - DSK_ATTF_F16_SCALE_LO <= DSK_ATTF_F16_SCALE_HI - DSK_ATTF_F16_SCALE_LO;
}

// 8 e4m3 values (two words of a record) times 2^(se - 127) for a scale byte that passes
// dsk_attf_f16_scale, as four f16x2 words: every product is an exact finite f16, so one f16
// multiply a pair (by 2^(se - 127) as an f16x2 pair) gives the f32 path's bits.
__device__ __forceinline__ uint4 dsk_attf_fp8x8_f16(unsigned int w0, unsigned int w1, unsigned int se) {
    const unsigned int s1 = (se - 112u) << 10, s2 = s1 | (s1 << 16);
    unsigned int h[4];
    dsk_e4m3x4_to_f16x2(w0, h[0], h[1]);
    dsk_e4m3x4_to_f16x2(w1, h[2], h[3]);
    return make_uint4(dsk_attf_hmul2(h[0], s2), dsk_attf_hmul2(h[1], s2), dsk_attf_hmul2(h[2], s2),
                      dsk_attf_hmul2(h[3], s2));
}

// One 16-value e4m3 half-chunk's 8 values (two words of the record) times its group's scale
// byte `se` as four f16x2 words: in f16 where every product is an exact finite f16 (one multiply a
// pair), else through f32 (the same bits in that range).
__device__ __forceinline__ uint4 dsk_attf_fp8x8(unsigned int w0, unsigned int w1, unsigned int se) {
    if (dsk_attf_f16_scale(se)) return dsk_attf_fp8x8_f16(w0, w1, se);
    const unsigned int w[2] = {w0, w1};
    const float sc = __uint_as_float(se << 23);
    unsigned int h[4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        float x0, x1, x2, x3;
        dsk_e4m3x2_to_f32(w[j] & 0xffffu, x0, x1);
        dsk_e4m3x2_to_f32(w[j] >> 16, x2, x3);
        h[2 * j] = dsk_attf_h2(x0 * sc, x1 * sc);
        h[2 * j + 1] = dsk_attf_h2(x2 * sc, x3 * sc);
    }
    return make_uint4(h[0], h[1], h[2], h[3]);
}

// Decodes the landed raw rows into the f16 key tile (row r at r * LDH halves; zeros where the
// flag is clear), warp w rows w, w + 8, ...
//
// `fp8_flat` (as the stage's): lanes 8 i .. 8 i + 7 decode the warp's row i from the flag's
// byte: lane q its e4m3 chunks of 8 values q, q + 8, .., q + 48 (one in each scale group, the
// scale bytes read once as a word pair and tested once; each chunk an 8-byte read and a 16-byte
// write) and its RoPE chunk of 8 bf16 values q. Else a row at a time in 16-byte chunks of the
// record: FP8 latent (e4m3 chunks of 16 values under one scale, then bf16 RoPE chunks of 8), BF16
// (8 values) or f32 (4). Both give the same bits.
__device__ __forceinline__ void dsk_attf_decode(const unsigned char *raw, const int *valid, unsigned int *kw, int fmt,
                                                int rope, int rs, bool fp8_flat) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int RW = DSK_ATTF_LDH / 2;  // words a key row
    constexpr int ROWS = DSK_ATTF_TILE / DSK_ATTF_WARPS;
    if (fp8_flat) {
        constexpr int NOPE = DSK_ATTF_HD - DSK_ATTF_FP8_ROPE, SCALES = NOPE + 2 * DSK_ATTF_FP8_ROPE;
        static_assert(NOPE / 8 == 7 * 8 && DSK_ATTF_FP8_ROPE / 8 == 8 && DSK_KV_FP8_GROUP == 64,
                      "a lane's e4m3 chunks are one per scale group");
        const int i = lane >> 3, q = lane & 7, r = warp + DSK_ATTF_WARPS * i;
        const int flag = valid[r];
        unsigned int *const row = kw + r * RW;
        if (!flag) {
#pragma unroll
            for (int k = 0; k < DSK_ATTF_HD / 64; ++k)
                *reinterpret_cast<uint4 *>(row + 4 * (q + 8 * k)) = make_uint4(0u, 0u, 0u, 0u);
            return;
        }
        const unsigned char *const rec = raw + r * rs + (flag - 1);
        // The record's 7 scale bytes (and its pad byte); chunk q + 8 k is in group k. Where all
        // 7 let f16 scale exactly, the chunks go without a branch each.
        const uint2 scales = *reinterpret_cast<const uint2 *>(rec + SCALES);
        const auto scale_byte = [&](int k) { return ((k < 4 ? scales.x : scales.y) >> (8 * (k & 3))) & 0xffu; };
        bool f16_scales = true;
#pragma unroll
        for (int k = 0; k < NOPE / 64; ++k) f16_scales = f16_scales && dsk_attf_f16_scale(scale_byte(k));
        if (f16_scales) {
#pragma unroll
            for (int k = 0; k < NOPE / 64; ++k) {
                const int c = q + 8 * k;
                const uint2 v = *reinterpret_cast<const uint2 *>(rec + 8 * c);
                *reinterpret_cast<uint4 *>(row + 4 * c) = dsk_attf_fp8x8_f16(v.x, v.y, scale_byte(k));
            }
        } else {
#pragma unroll
            for (int k = 0; k < NOPE / 64; ++k) {
                const int c = q + 8 * k;
                const uint2 v = *reinterpret_cast<const uint2 *>(rec + 8 * c);
                *reinterpret_cast<uint4 *>(row + 4 * c) = dsk_attf_fp8x8(v.x, v.y, scale_byte(k));
            }
        }
        const uint2 lo = *reinterpret_cast<const uint2 *>(rec + NOPE + 16 * q);
        const uint2 hi = *reinterpret_cast<const uint2 *>(rec + NOPE + 16 * q + 8);
        *reinterpret_cast<uint4 *>(row + NOPE / 2 + 4 * q) = make_uint4(
            dsk_attf_h2(dsk_bf16lo(lo.x), dsk_bf16hi(lo.x)), dsk_attf_h2(dsk_bf16lo(lo.y), dsk_bf16hi(lo.y)),
            dsk_attf_h2(dsk_bf16lo(hi.x), dsk_bf16hi(hi.x)), dsk_attf_h2(dsk_bf16lo(hi.y), dsk_bf16hi(hi.y)));
        return;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const int r = warp + DSK_ATTF_WARPS * i;
        unsigned int *row = kw + r * RW;
        const unsigned char *rec = raw + r * rs;
        if (!valid[r]) {
            for (int c = lane; c < DSK_ATTF_HD / 8; c += 32)
                *reinterpret_cast<uint4 *>(row + 4 * c) = make_uint4(0u, 0u, 0u, 0u);
            continue;
        }
        if (fmt == DSK_KV_FP8) {
            const int nope = DSK_ATTF_HD - rope, n8 = nope / 16, chunks = n8 + rope / 8;
            for (int c = lane; c < chunks; c += 32) {
                const uint4 v = *reinterpret_cast<const uint4 *>(rec + 16 * c);
                if (c < n8) {
                    const unsigned int se = rec[nope + 2 * rope + (16 * c) / DSK_KV_FP8_GROUP];
                    *reinterpret_cast<uint4 *>(row + 8 * c) = dsk_attf_fp8x8(v.x, v.y, se);
                    *reinterpret_cast<uint4 *>(row + 8 * c + 4) = dsk_attf_fp8x8(v.z, v.w, se);
                } else {
                    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
                    unsigned int h[4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) h[j] = dsk_attf_h2(dsk_bf16lo(w[j]), dsk_bf16hi(w[j]));
                    *reinterpret_cast<uint4 *>(row + nope / 2 + 4 * (c - n8)) = make_uint4(h[0], h[1], h[2], h[3]);
                }
            }
        } else if (fmt == DSK_KV_BF16) {
            for (int c = lane; c < DSK_ATTF_HD / 8; c += 32) {
                const uint4 v = *reinterpret_cast<const uint4 *>(rec + 16 * c);
                *reinterpret_cast<uint4 *>(row + 4 * c) =
                    make_uint4(dsk_attf_h2(dsk_bf16lo(v.x), dsk_bf16hi(v.x)), dsk_attf_h2(dsk_bf16lo(v.y), dsk_bf16hi(v.y)),
                               dsk_attf_h2(dsk_bf16lo(v.z), dsk_bf16hi(v.z)), dsk_attf_h2(dsk_bf16lo(v.w), dsk_bf16hi(v.w)));
            }
        } else {
            for (int c = lane; c < DSK_ATTF_HD / 4; c += 32) {
                const float4 v = *reinterpret_cast<const float4 *>(rec + 16 * c);
                *reinterpret_cast<uint2 *>(row + 2 * c) = make_uint2(dsk_attf_h2(v.x, v.y), dsk_attf_h2(v.z, v.w));
            }
        }
    }
}

// Stages the block's G query heads from their raw projections (q: head 0 of the block, rows of
// DSK_ATTF_HD) as f16 rows of `qs`: each head RMS-normed without a weight, then its trailing
// rope_dim channels rotated by the block's table `rope_cs` (cos [pairs], sin at
// DSK_ATTF_ROPE_PAIRS), the bits dsk_lo_rms_norm_rope_f32 writes before the plain staging rounds
// them. A warp per head, lane l holding dims l + 32 k: dsk_lo_rms_norm_rope_f32's 256 threads sum
// dims u and u + 256 (u = 32 v + l: this lane's k = v and v + 8), warp v's butterfly is this
// warp's over the same lanes, and its second level adds the 8 warp sums as
// ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)): the same sum. A RoPE pair (d, d + 1) lies in
// lanes (l, l ^ 1) (rope0 is even).
template <int G>
__device__ __forceinline__ void dsk_attf_stage_raw_q(const float *__restrict__ q, unsigned short *qs,
                                                     const float *rope_cs, int rope_dim, float eps) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int RW = G / DSK_ATTF_WARPS, PER = DSK_ATTF_HD / 32;
    static_assert(PER == 16, "the emulated sum assumes 512 dims over 256 threads");
    const int rope0 = DSK_ATTF_HD - rope_dim;
#pragma unroll 2
    for (int i = 0; i < RW; ++i) {
        const int h = warp * RW + i;
        const float *qr = q + (long long)h * DSK_ATTF_HD;
        float x[PER];
#pragma unroll
        for (int k = 0; k < PER; ++k) x[k] = qr[lane + 32 * k];
        float s[8];
#pragma unroll
        for (int v = 0; v < 8; ++v) s[v] = dsk_warp_sum(fmaf(x[v + 8], x[v + 8], fmaf(x[v], x[v], 0.0f)));
        const float sum = __fadd_rn(__fadd_rn(__fadd_rn(s[0], s[4]), __fadd_rn(s[2], s[6])),
                                    __fadd_rn(__fadd_rn(s[1], s[5]), __fadd_rn(s[3], s[7])));
        const float ms = __fdiv_rn(sum, (float)DSK_ATTF_HD);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int d = lane + 32 * k;
            float v = __fmul_rn(x[k], inv);
            if (32 * k + 32 > rope0) {  // warp-uniform: the shuffle needs every lane
                const float other = __shfl_xor_sync(0xffffffffu, v, 1);
                if (d >= rope0) {
                    const int j = (d - rope0) >> 1;
                    const float c = rope_cs[j], sn = rope_cs[DSK_ATTF_ROPE_PAIRS + j];
                    float y0, y1;
                    if (lane & 1) {
                        dsk_rope_apply_f32(other, v, c, sn, false, y0, y1);
                        v = y1;
                    } else {
                        dsk_rope_apply_f32(v, other, c, sn, false, y0, y1);
                        v = y0;
                    }
                }
            }
            qs[h * DSK_ATTF_LDH + d] = (unsigned short)(dsk_attf_h2(v, 0.0f) & 0xffffu);
        }
    }
}

template <int G>
__device__ __forceinline__ void dsk_attend_partial_heads_f16_body(
    const float *__restrict__ pool, const float *__restrict__ q, const long long *__restrict__ key_off,
    const int *__restrict__ key_start, int heads, int hd, int splits, float scale, float *__restrict__ part, int fmt,
    int rope, int rb, int rs, const int *__restrict__ positions, const float *__restrict__ inv_freq, int rope_dim,
    float rope_factor, int q_raw, float q_eps, const float *__restrict__ sinks, float *__restrict__ out, int out_f16) {
    constexpr int MT = G / 16, KSPLIT = DSK_ATTF_KSPLIT(G), KQ = DSK_ATTF_HD / KSPLIT, RW = G / DSK_ATTF_WARPS;
    constexpr int CHAINS = G == 16 ? 2 : 1;
    extern __shared__ __align__(16) unsigned char dsk_attf_smem[];
    unsigned short *const qs = reinterpret_cast<unsigned short *>(dsk_attf_smem);
    unsigned short *const ks = qs + G * DSK_ATTF_LDH;
    float *const slog = reinterpret_cast<float *>(ks + DSK_ATTF_TILE * DSK_ATTF_LDH);
    unsigned short *const prob = reinterpret_cast<unsigned short *>(slog + KSPLIT * G * DSK_ATTF_SLD);
    float *const corr = reinterpret_cast<float *>(prob + G * DSK_ATTF_PLD);
    int *const valid = reinterpret_cast<int *>(corr + G);
    float *const rope_cs = reinterpret_cast<float *>(valid + 2 * DSK_ATTF_TILE);
    unsigned char *const raw = reinterpret_cast<unsigned char *>(rope_cs + 2 * DSK_ATTF_ROPE_PAIRS);
    const int s = blockIdx.x, t = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tg = lane & 3;
    const int hb = blockIdx.y * G;
    const int k0 = key_start[t], k1 = key_start[t + 1];
    const int per = (k1 - k0 + splits - 1) / splits;
    const int a = k0 + s * per;
    const int b = min(k1, a + per);
    const bool fp8_flat = dsk_attf_fp8_flat(fmt, rope, rb, rs);
    long long nxt = dsk_attf_offset(key_off, a, b);
    if (a < b) dsk_attf_stage(raw, valid, pool, nxt, rb, rs, fp8_flat);
    dsk_cp_commit();
    // The token's RoPE table (the raw queries' rotation and the finish's inverse one).
    if (positions != nullptr) {
        const int pos = positions[t];
        for (int j = threadIdx.x; j < (rope_dim >> 1); j += DSK_ATTF_WARPS * 32)
            dsk_rope_cos_sin_f32(inv_freq[j], pos, rope_factor, rope_cs[j], rope_cs[DSK_ATTF_ROPE_PAIRS + j]);
    }
    // Q as f16 rows (the copies above are in flight meanwhile).
    if (q_raw) {
        __syncthreads();  // the RoPE table
        dsk_attf_stage_raw_q<G>(q + ((long long)t * heads + hb) * hd, qs, rope_cs, rope_dim, q_eps);
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < G * (DSK_ATTF_HD / 4); i += DSK_ATTF_WARPS * 32) {
            const int h = i / (DSK_ATTF_HD / 4), c = i % (DSK_ATTF_HD / 4);
            const float4 v = *reinterpret_cast<const float4 *>(q + ((long long)t * heads + hb + h) * hd + 4 * c);
            *reinterpret_cast<uint2 *>(qs + h * DSK_ATTF_LDH + 4 * c) =
                make_uint2(dsk_attf_h2(v.x, v.y), dsk_attf_h2(v.z, v.w));
        }
    }
    // This warp's parts: S (m tile, key pair of n tiles, dim slice), softmax rows, PV dims.
    const int smt = warp % MT, snp = (warp / MT) & 1, skq = warp / (2 * MT);
    const unsigned short *const qa_at =
        qs + (16 * smt + (lane & 7) + 8 * ((lane >> 3) & 1)) * DSK_ATTF_LDH + skq * KQ + 8 * (lane >> 4);
    const unsigned short *const kb_at =
        ks + (16 * snp + 8 * (lane >> 4) + (lane & 7)) * DSK_ATTF_LDH + skq * KQ + 8 * ((lane >> 3) & 1);
    const int dw = 64 * warp;
    float o[MT][8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
    // The softmax's row of this lane (LPR lanes a row, KPL keys a lane) and its running max / sum.
    constexpr int LPR = 32 / RW, KPL = DSK_ATTF_TILE / LPR;
    const int srow = warp * RW + lane / LPR;
    float mrow = DSK_NEG_INF, lrow = 0.f;
    for (int kt = a, cur = 0; kt < b; kt += DSK_ATTF_TILE, cur ^= 1) {
        const int *const vcur = valid + cur * DSK_ATTF_TILE;
        nxt = dsk_attf_offset(key_off, kt + DSK_ATTF_TILE, b);  // the next tile's rows
        dsk_cp_wait<0>();
        __syncthreads();  // the raw tile has landed; the previous tile's P V is done with ks and P
        dsk_attf_decode(raw, vcur, reinterpret_cast<unsigned int *>(ks), fmt, rope, rs, fp8_flat);
        __syncthreads();  // the key tile is whole; raw is free
        if (kt + DSK_ATTF_TILE < b) dsk_attf_stage(raw, valid + (cur ^ 1) * DSK_ATTF_TILE, pool, nxt, rb, rs, fp8_flat);
        dsk_cp_commit();
        {
            // CHAINS accumulators per n tile (k steps taken in turn), so the dependent MMA chains
            // are KQ / 16 / CHAINS long; the 32-head form has no registers to spare for a second.
            float sc[2][CHAINS][4];
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int h = 0; h < CHAINS; ++h)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[n][h][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KQ / 16; ++kk) {
                unsigned int qa[4], kb[4];
                dsk_attf_ldsm4(qa_at + 16 * kk, qa);
                dsk_attf_ldsm4(kb_at + 16 * kk, kb);
                dsk_mma_f16_m16n8k16(sc[0][kk % CHAINS], qa[0], qa[1], qa[2], qa[3], kb[0], kb[1]);
                dsk_mma_f16_m16n8k16(sc[1][kk % CHAINS], qa[0], qa[1], qa[2], qa[3], kb[2], kb[3]);
            }
#pragma unroll
            for (int n = 0; n < 2; ++n) {
#pragma unroll
                for (int h = 1; h < CHAINS; ++h)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[n][0][e] += sc[n][h][e];
                float *sl = slog + (skq * G + 16 * smt + g) * DSK_ATTF_SLD + 16 * snp + 8 * n + 2 * tg;
                *reinterpret_cast<float2 *>(sl) = make_float2(sc[n][0][0], sc[n][0][1]);
                *reinterpret_cast<float2 *>(sl + 8 * DSK_ATTF_SLD) = make_float2(sc[n][0][2], sc[n][0][3]);
            }
        }
        __syncthreads();
        {
            // Lanes LPR i .. LPR i + LPR - 1 take the warp's row i, KPL neighbouring keys a lane:
            // the row's max and sum over log2(LPR) shuffles, one correction a lane.
            const int kq0 = (lane % LPR) * KPL;
            float lg[KPL];
            bool ok[KPL];
            float cm = DSK_NEG_INF;
#pragma unroll
            for (int e = 0; e < KPL; ++e) {
                float d = 0.f;
#pragma unroll
                for (int kq = 0; kq < KSPLIT; ++kq) d += slog[(kq * G + srow) * DSK_ATTF_SLD + kq0 + e];
                ok[e] = vcur[kq0 + e] != 0;
                lg[e] = ok[e] ? d * scale : DSK_NEG_INF;
                cm = fmaxf(cm, lg[e]);
            }
#pragma unroll
            for (int o = LPR / 2; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
            const float mn = fmaxf(mrow, cm);
            // A tile without a valid key leaves m = -inf: no expf(-inf - -inf).
            const float c = mn == DSK_NEG_INF ? 1.f : expf(mrow - mn);  // 0 on the first key
            unsigned short ph[KPL];
            float ps = 0.f;
#pragma unroll
            for (int e = 0; e < KPL; ++e) {
                const unsigned int h2 = ok[e] ? dsk_f32x2_to_f16x2(expf(lg[e] - mn), 0.f) : 0u;
                float p, unused;
                dsk_f16x2_to_f32(h2, p, unused);
                ph[e] = (unsigned short)(h2 & 0xffffu);
                ps += p;
            }
#pragma unroll
            for (int o = LPR / 2; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
            mrow = mn;
            lrow = fmaf(lrow, c, ps);
#pragma unroll
            for (int e = 0; e < KPL; ++e) prob[srow * DSK_ATTF_PLD + kq0 + e] = ph[e];
            if (lane % LPR == 0) corr[srow] = c;
        }
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float c0 = corr[16 * mt + g], c1 = corr[16 * mt + g + 8];
            // A row whose max held keeps its accumulators (x 1 is exact): once the first tiles
            // have set the maxima, most tiles skip the 32 multiplies.
            if (c0 == 1.f && c1 == 1.f) continue;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                o[mt][j][0] *= c0;
                o[mt][j][1] *= c0;
                o[mt][j][2] *= c1;
                o[mt][j][3] *= c1;
            }
        }
#pragma unroll
        for (int kk = 0; kk < DSK_ATTF_TILE / 16; ++kk) {
            unsigned int pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                dsk_attf_ldsm4(prob + (16 * mt + (lane & 7) + 8 * ((lane >> 3) & 1)) * DSK_ATTF_PLD + 16 * kk + 8 * (lane >> 4),
                               pa[mt]);
            const unsigned short *const vb_at =
                ks + (16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)) * DSK_ATTF_LDH + dw + 8 * (lane >> 4);
#pragma unroll
            for (int qd = 0; qd < 4; ++qd) {
                unsigned int vb[4];
                dsk_attf_ldsm4_trans(vb_at + 16 * qd, vb);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    dsk_mma_f16_m16n8k16(o[mt][2 * qd], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], vb[0], vb[1]);
                    dsk_mma_f16_m16n8k16(o[mt][2 * qd + 1], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], vb[2], vb[3]);
                }
            }
        }
    }
    if (out != nullptr) {
        // One split (the launcher's rule): the rows finished here as dsk_attend_combine_one_f32
        // finishes a one-split record (the same max, weight, denominator, fmaf, division and
        // inverse rotation: the same bits), without the record's round trip through memory.
        // slog is free: the last tile's softmax read it before the barrier ahead of its P V.
        float *const ml = slog;
        if (lane % LPR == 0) {
            ml[srow] = mrow;
            ml[G + srow] = lrow;
        }
        __syncthreads();
        const int rope0 = DSK_ATTF_HD - rope_dim;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int row = 16 * mt + g + 8 * hf;
                const float m = ml[row], l = ml[G + row], sink = sinks[hb + row];
                const float mx = l > 0.f ? fmaxf(sink, m) : sink;
                const float w = l > 0.f ? expf(m - mx) : 0.f;
                float denom = expf(sink - mx);
                if (l > 0.f) denom = fmaf(l, w, denom);
                const long long orow = ((long long)t * heads + hb + row) * hd;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int d = dw + 8 * j + 2 * tg;
                    float v0 = 0.f, v1 = 0.f;
                    if (l > 0.f) v0 = fmaf(o[mt][j][2 * hf], w, v0), v1 = fmaf(o[mt][j][2 * hf + 1], w, v1);
                    v0 = v0 / denom;
                    v1 = v1 / denom;
                    if (positions != nullptr && d >= rope0) {
                        const int jr = (d - rope0) >> 1;
                        float y0, y1;
                        dsk_rope_apply_f32(v0, v1, rope_cs[jr], rope_cs[DSK_ATTF_ROPE_PAIRS + jr], true, y0, y1);
                        v0 = y0, v1 = y1;
                    }
                    // f16 for a GEMM that rounds its input so anyway (dsk_rows_f32_to_f16's
                    // conversion), else f32.
                    if (out_f16)
                        *reinterpret_cast<unsigned int *>(reinterpret_cast<unsigned short *>(out) + orow + d) =
                            dsk_f32x2_to_f16x2(v0, v1);
                    else
                        *reinterpret_cast<float2 *>(out + orow + d) = make_float2(v0, v1);
                }
            }
        }
        return;
    }
    if (lane % LPR == 0) {
        float *rec = part + (((long long)t * heads + hb + srow) * splits + s) * (hd + 2);
        rec[0] = mrow;
        rec[1] = lrow;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float *o0 = part + (((long long)t * heads + hb + 16 * mt + g) * splits + s) * (hd + 2) + 2 + dw + 2 * tg;
        float *o1 = o0 + 8LL * splits * (hd + 2);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            *reinterpret_cast<float2 *>(o0 + 8 * j) = make_float2(o[mt][j][0], o[mt][j][1]);
            *reinterpret_cast<float2 *>(o1 + 8 * j) = make_float2(o[mt][j][2], o[mt][j][3]);
        }
    }
}

// Both forms: 8 warps, two blocks an H200 SM with FP8 or BF16 records (one with f32 rows).
extern "C" __global__ void __launch_bounds__(DSK_ATTF_WARPS * 32, 2) dsk_attend_partial_heads_f16(
    const float *__restrict__ pool, const float *__restrict__ q, const long long *__restrict__ key_off,
    const int *__restrict__ key_start, int heads, int hd, int splits, float scale, float *__restrict__ part, int fmt,
    int rope, int rb, int rs, const int *__restrict__ positions, const float *__restrict__ inv_freq, int rope_dim,
    float rope_factor, int q_raw, float q_eps, const float *__restrict__ sinks, float *__restrict__ out, int out_f16) {
    dsk_pdl_entry();
    dsk_attend_partial_heads_f16_body<16>(pool, q, key_off, key_start, heads, hd, splits, scale, part, fmt, rope, rb, rs,
                                           positions, inv_freq, rope_dim, rope_factor, q_raw, q_eps, sinks, out,
                                           out_f16);
}
extern "C" __global__ void __launch_bounds__(DSK_ATTF_WARPS * 32, 2) dsk_attend_partial_heads_f16x32(
    const float *__restrict__ pool, const float *__restrict__ q, const long long *__restrict__ key_off,
    const int *__restrict__ key_start, int heads, int hd, int splits, float scale, float *__restrict__ part, int fmt,
    int rope, int rb, int rs, const int *__restrict__ positions, const float *__restrict__ inv_freq, int rope_dim,
    float rope_factor, int q_raw, float q_eps, const float *__restrict__ sinks, float *__restrict__ out, int out_f16) {
    dsk_pdl_entry();
    dsk_attend_partial_heads_f16_body<32>(pool, q, key_off, key_start, heads, hd, splits, scale, part, fmt, rope, rb, rs,
                                           positions, inv_freq, rope_dim, rope_factor, q_raw, q_eps, sinks, out,
                                           out_f16);
}

// Split-KV attention, pass 2: merges the splits of (t, h) with the head's sink logit in the
// denominator (the sink takes probability mass but contributes no value). Block (h, t, z) writes
// dimensions z * DSK_COMBINE_DIMS .. + DSK_COMBINE_DIMS, one per thread, so a decode token's 64
// heads run on 256 blocks rather than 64 (one block per head walked each of its 512 dimensions'
// splits in turn: 25 us for a CSA layer's 40 splits). Each split's weight exp(max_s - max) is
// computed once into shared memory (up to DSK_COMBINE_SPLITS splits; more are weighed in place);
// a dimension's splits are summed in split order, as before.
//
// With `positions` the trailing `rope_dim` channels are rotated back by -angle at the token's
// position (K = V carried RoPE into the output), exactly as dsk_lo_rope_f32 with `inverse` would
// in a launch of its own: a channel pair lies in one block (hd - rope_dim is even, z-slices are
// DSK_COMBINE_DIMS-aligned).
#define DSK_COMBINE_SPLITS 1024
#define DSK_COMBINE_DIMS 128
extern "C" __global__ void __launch_bounds__(DSK_COMBINE_DIMS) dsk_attend_combine_f32(
    const float *__restrict__ part, const float *__restrict__ sinks, int heads, int hd,
    int splits, float *__restrict__ out, const int *__restrict__ positions,
    const float *__restrict__ inv_freq, int rope_dim, float attention_factor) {
    dsk_pdl_entry();
    __shared__ float weight[DSK_COMBINE_SPLITS];
    __shared__ float sums[DSK_COMBINE_SPLITS];
    __shared__ float vals[DSK_COMBINE_DIMS];
    __shared__ float red[DSK_COMBINE_DIMS / 32];
    const int h = blockIdx.x, t = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float *p = part + ((long long)t * heads + h) * splits * (hd + 2);
    const float sink = sinks[h];
    float mx = sink;
    for (int s = threadIdx.x; s < splits; s += blockDim.x)
        if (p[s * (hd + 2) + 1] > 0.f) mx = fmaxf(mx, p[s * (hd + 2)]);
    mx = dsk_warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) mx = fmaxf(mx, red[w]);
    const int cached = min(splits, DSK_COMBINE_SPLITS);
    for (int s = threadIdx.x; s < cached; s += blockDim.x) {
        const float l = p[s * (hd + 2) + 1];
        weight[s] = l > 0.f ? expf(p[s * (hd + 2)] - mx) : 0.f;
        sums[s] = l;
    }
    __syncthreads();
    // The denominator in split order (every thread the same sum), from shared memory.
    float denom = expf(sink - mx);
    for (int s = 0; s < splits; ++s) {
        const float l = s < cached ? sums[s] : p[s * (hd + 2) + 1];
        const float w = s < cached ? weight[s] : (l > 0.f ? expf(p[s * (hd + 2)] - mx) : 0.f);
        if (l > 0.f) denom = fmaf(l, w, denom);
    }
    const int d0 = blockIdx.z * DSK_COMBINE_DIMS;
    const int d = d0 + threadIdx.x;
    float v = 0.f;
    if (d < hd) {
        if (splits <= cached) {
            // Every weight is cached: a dimension's loads do not depend on each other, so
            // unrolled they are in flight together.
#pragma unroll 16
            for (int s = 0; s < splits; ++s)
                if (sums[s] > 0.f) v = fmaf(p[s * (hd + 2) + 2 + d], weight[s], v);
        } else {
            for (int s = 0; s < splits; ++s) {
                const float l = p[s * (hd + 2) + 1];
                const float w = s < cached ? weight[s] : (l > 0.f ? expf(p[s * (hd + 2)] - mx) : 0.f);
                if (l > 0.f) v = fmaf(p[s * (hd + 2) + 2 + d], w, v);
            }
        }
        v = v / denom;
    }
    float *o = out + ((long long)t * heads + h) * hd;
    const int rope0 = hd - rope_dim;
    if (positions == nullptr || d0 + DSK_COMBINE_DIMS <= rope0) {
        if (d < hd) o[d] = v;
        return;
    }
    vals[threadIdx.x] = v;
    __syncthreads();
    if (d >= hd) return;
    if (d < rope0) {
        o[d] = v;
    } else if (((d - rope0) & 1) == 0) {
        float y0, y1;
        dsk_rope_pair_f32(vals[threadIdx.x], vals[threadIdx.x + 1], inv_freq[(d - rope0) >> 1],
                          positions[t], attention_factor, true, y0, y1);
        o[d] = y0;
        o[d + 1] = y1;
    }
}

// Pass 2 where pass 1 ran one split (prefill chunks): the same values, bit for bit, as
// dsk_attend_combine_f32 computes with splits = 1 (the same max, weight, denominator, fmaf and
// division, the same inverse rotation), one warp per (token, head) row and 8 rows a block; the
// general kernel's blocks of 128 dimensions cost more to schedule than to run at this size (an
// 8K chunk's 32 heads: a million blocks). Lane l takes dimension pairs 2 l + 64 j (hd even, and
// the RoPE channels start at an even dimension, so a pair never straddles them).
extern "C" __global__ void __launch_bounds__(256) dsk_attend_combine_one_f32(
    const float *__restrict__ part, const float *__restrict__ sinks, int tokens, int heads, int hd,
    float *__restrict__ out, const int *__restrict__ positions, const float *__restrict__ inv_freq, int rope_dim,
    float attention_factor) {
    dsk_pdl_entry();
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= (long long)tokens * heads) return;
    const int lane = threadIdx.x & 31;
    const int h = (int)(row % heads), t = (int)(row / heads);
    const float *p = part + row * (hd + 2);
    const float m = p[0], l = p[1], sink = sinks[h];
    const float mx = l > 0.f ? fmaxf(sink, m) : sink;
    const float w = l > 0.f ? expf(m - mx) : 0.f;
    float denom = expf(sink - mx);
    if (l > 0.f) denom = fmaf(l, w, denom);
    const int rope0 = hd - rope_dim;
    float *o = out + row * hd;
    for (int d = 2 * lane; d < hd; d += 64) {
        const float2 a = *reinterpret_cast<const float2 *>(p + 2 + d);
        float v0 = 0.f, v1 = 0.f;
        if (l > 0.f) v0 = fmaf(a.x, w, v0), v1 = fmaf(a.y, w, v1);
        v0 = v0 / denom;
        v1 = v1 / denom;
        if (positions != nullptr && d >= rope0) {
            float y0, y1;
            dsk_rope_pair_f32(v0, v1, inv_freq[(d - rope0) >> 1], positions[t], attention_factor, true, y0, y1);
            v0 = y0, v1 = y1;
        }
        *reinterpret_cast<float2 *>(o + d) = make_float2(v0, v1);
    }
}

// Dimensions per lane of an indexer key: index_head_dim <= 32 * DSK_IDX_DPL.
#define DSK_IDX_DPL 8

// Lightning Indexer scores: for query token t (grid y) and each of its compressed rows r in
// [row_lo[t], visible[t]) (from 0 where row_lo is null: a rank of a tensor-parallel group scores
// its share of the rows, launch/attention.rs: IndexerScores::row_starts),
// score = sum_h w[t, h] * relu(q[t, h] . k_r) * scale, written to out[out_start[t] + r].
// Row r of the token's sequence sits in the pool by its block table (bt from bt_start[t]):
// position r * ratio, block bt[pos / bs], slot (pos % bs) / ratio of `stride` floats after `base`.
// One warp per row; the token's queries and weights are staged in shared memory. Rows are `fmt`
// records (DSK_KV_F32, DSK_KV_BF16 or DSK_KV_FP8_INDEXER); `stride` counts 4-byte slots.
extern "C" __global__ void __launch_bounds__(256) dsk_indexer_scores_f32(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt) {
    dsk_pdl_entry();
    extern __shared__ float sq[];  // [heads * dim] queries, then [heads] weights
    const int t = blockIdx.y;
    const float *qt = q + (long long)t * heads * dim;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) sq[i] = qt[i];
    for (int i = threadIdx.x; i < heads; i += blockDim.x) sq[heads * dim + i] = w[(long long)t * heads + i];
    __syncthreads();
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int dpl = dim >> 5;
    const int vis = visible[t], lo = row_lo ? row_lo[t] : 0;
    const unsigned int *tb = bt + bt_start[t];
    float *ot = out + out_start[t];
    for (int r = lo + blockIdx.x * warps + warp; r < vis; r += gridDim.x * warps) {
        const long long pos = (long long)r * ratio;
        const float *k = pool + (long long)tb[pos / bs] * fpb + base + (pos % bs) / ratio * stride;
        float kv[DSK_IDX_DPL];
        if (fmt == DSK_KV_F32) {
#pragma unroll
            for (int j = 0; j < DSK_IDX_DPL; ++j) kv[j] = j < dpl ? k[lane + 32 * j] : 0.f;
        } else if (fmt == DSK_KV_FP8_INDEXER) {
            // The warp's byte loads of a row are one 32-byte segment per j.
            const unsigned char *kb = reinterpret_cast<const unsigned char *>(k);
            const float sc = k[dim >> 2];
#pragma unroll
            for (int j = 0; j < DSK_IDX_DPL; ++j) kv[j] = j < dpl ? dsk_e4m3_to_f32(kb[lane + 32 * j]) * sc : 0.f;
        } else {
#pragma unroll
            for (int j = 0; j < DSK_IDX_DPL; ++j) kv[j] = j < dpl ? dsk_kv_value(k, fmt, dim, 0, lane + 32 * j) : 0.f;
        }
        float score = 0.f;
        for (int hh = 0; hh < heads; ++hh) {
            const float *qh = sq + hh * dim;
            float d = 0.f;
#pragma unroll
            for (int j = 0; j < DSK_IDX_DPL; ++j)
                if (j < dpl) d = fmaf(qh[lane + 32 * j], kv[j], d);
            d = dsk_warp_sum(d);
            score += (fmaxf(d, 0.f) * scale) * sq[heads * dim + hh];
        }
        if (lane == 0) ot[r] = score;
    }
}

// Lightning Indexer scores, tiled for V4-Flash's shape (heads <= 64, dim <= 128): a block scores
// R rows of token t (grid y) at a time, as a small GEMM [R rows x dim] x [dim x heads] out of
// shared memory. Thread (rg, hg) = (tid / 16, tid % 16) holds R / 16 rows x 4 heads of dot
// products; relu, scale and head weights are applied per head, then the 16 head groups of a row
// are summed with shuffles. Same row addressing and output as dsk_indexer_scores_f32.
// R = 64 (dsk_indexer_scores_tiled_f32) for long lists; R = 16 (dsk_indexer_scores_tiled16_f32)
// gives a short list 4x the blocks (a decode token's 2,048 rows: 128 blocks, not 32), each a
// quarter of the tile work. A (row, head) dot is the same fmaf chain over d in both, and a row's
// sum the same 4 products then the same shuffle tree, so their scores are bit-identical.
#define DSK_IDXT_ROWS 64
#define DSK_IDXT_HEADS 64
#define DSK_IDXT_DIM 128
// The 16-row tile into ks ([dim][17], transposed): the same values at the same places as the
// 64-row kernel's staging (same lane mapping with 16 rows: e4m3 word 8 co + L % 8 of row
// 4 rq + L / 8, bf16 word 16 co + L % 16 of row 2 rq + L / 16, f32 element tid + 256 j), and the
// same bank spread (row stride 17). A short list's block does one tile, so its latency chain
// matters: every row address is computed first (rows past the visible ones address the last
// visible row, branch-free; their values are zeros, as in the 64-row kernel), so the block-table
// loads go out together (a thread's e4m3 and bf16 words are all of one row), then every word.
__device__ __forceinline__ void dsk_idxt_stage16(
    float *ks, const float *__restrict__ pool, const unsigned int *__restrict__ tb, long long fpb,
    int bs, long long base, int ratio, int stride, int dim, int vis, int r0, int fmt) {
    constexpr int R = 16, TPT = R * DSK_IDXT_DIM / 256;  // 8 values a thread
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    auto row = [&](int r) {
        const int pos = min(r, vis - 1) * ratio;
        return pool + (long long)tb[pos / bs] * fpb + base + (long long)((pos % bs) / ratio) * stride;
    };
    if (fmt == DSK_KV_FP8_INDEXER) {
        const int wpr = dim >> 2;
        const float *k[TPT / 4];
        unsigned int v[TPT / 4];
        float sc[TPT / 4];
#pragma unroll
        for (int j = 0; j < TPT / 4; ++j) {
            const int u = warp + 8 * j;
            k[j] = row(r0 + 4 * (u & 3) + (lane >> 3));
        }
#pragma unroll
        for (int j = 0; j < TPT / 4; ++j) {
            const int u = warp + 8 * j, r = r0 + 4 * (u & 3) + (lane >> 3), c = 8 * (u >> 2) + (lane & 7);
            const bool on = c < wpr && r < vis;
            v[j] = on ? reinterpret_cast<const unsigned int *>(k[j])[c] : 0u;
            sc[j] = on ? k[j][wpr] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < TPT / 4; ++j) {
            const int u = warp + 8 * j, rr = 4 * (u & 3) + (lane >> 3), c = 8 * (u >> 2) + (lane & 7);
            if (c < wpr) {
                float x0, x1, x2, x3;
                dsk_e4m3x2_to_f32(v[j] & 0xffffu, x0, x1);
                dsk_e4m3x2_to_f32(v[j] >> 16, x2, x3);
                float *col = ks + 4 * c * (R + 1) + rr;
                col[0] = x0 * sc[j];
                col[R + 1] = x1 * sc[j];
                col[2 * (R + 1)] = x2 * sc[j];
                col[3 * (R + 1)] = x3 * sc[j];
            }
        }
    } else if (fmt == DSK_KV_BF16) {
        const int wpr = dim >> 1;
        const float *k[TPT / 2];
        unsigned int v[TPT / 2];
#pragma unroll
        for (int j = 0; j < TPT / 2; ++j) {
            const int u = warp + 8 * j;
            k[j] = row(r0 + 2 * (u & 7) + (lane >> 4));
        }
#pragma unroll
        for (int j = 0; j < TPT / 2; ++j) {
            const int u = warp + 8 * j, r = r0 + 2 * (u & 7) + (lane >> 4), c = 16 * (u >> 3) + (lane & 15);
            v[j] = c < wpr && r < vis ? reinterpret_cast<const unsigned int *>(k[j])[c] : 0u;
        }
#pragma unroll
        for (int j = 0; j < TPT / 2; ++j) {
            const int u = warp + 8 * j, rr = 2 * (u & 7) + (lane >> 4), c = 16 * (u >> 3) + (lane & 15);
            if (c < wpr) {
                float *col = ks + 2 * c * (R + 1) + rr;
                col[0] = dsk_bf16lo(v[j]);
                col[R + 1] = dsk_bf16hi(v[j]);
            }
        }
    } else {
        const float *k[TPT];
        float v[TPT];
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            const int i = tid + 256 * j, rr = i / dim;
            k[j] = row(r0 + rr);
        }
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            const int i = tid + 256 * j, rr = i / dim, d = i - rr * dim;
            v[j] = rr < R && r0 + rr < vis ? k[j][d] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            const int i = tid + 256 * j, rr = i / dim, d = i - rr * dim;
            if (rr < R) ks[d * (R + 1) + rr] = v[j];
        }
    }
}

template <int R>
__device__ __forceinline__ void dsk_indexer_scores_tiled(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt) {
    static_assert(R == 64 || R == 16, "tile rows");
    constexpr int TILE_PER_THREAD = R * DSK_IDXT_DIM / 256;  // tile values a thread stages
    constexpr int RPT = R / 16;                              // rows a thread scores
    // Query row stride: R = 16 stores the queries conflict-free with a stride of 68 (see below).
    constexpr int QLD = R == 64 ? DSK_IDXT_HEADS : DSK_IDXT_HEADS + 4;
    dsk_pdl_entry();
    extern __shared__ float smem[];
    float *qs = smem;                        // [dim][QLD] queries, transposed
    float *ks = smem + DSK_IDXT_DIM * QLD;   // [dim][R + 1] key rows, transposed
    const int t = blockIdx.y;
    const int tid = threadIdx.x, rg = tid >> 4, hg = tid & 15;
    const float *qt = q + (long long)t * heads * dim;
    if constexpr (R == 64) {
        for (int i = tid; i < DSK_IDXT_HEADS * dim; i += 256) {
            const int h = i / dim, d = i % dim;
            qs[d * DSK_IDXT_HEADS + h] = h < heads ? qt[h * dim + d] : 0.f;
        }
    } else {
        // A short list's block is short, so its query staging must be too: a warp's pass loads
        // 8 consecutive dims of 4 heads (four 32-byte segments; lane L: head 4 (u % 16) + L / 8,
        // dim 8 (u / 16) + L % 8) and stores them at (4 d + h) mod 32 = 32 different banks
        // (a stride of 64 would put a pass's 32 dims of one head in one bank). Sixteen loads
        // in flight per thread: two L2 round trips at dim 128.
        const int warp = tid >> 5, lane = tid & 31;
        for (int j0 = 0; j0 < (dim >> 2); j0 += 16) {
            float v[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int u = warp + 8 * (j0 + j), h = 4 * (u & 15) + (lane >> 3), d = 8 * (u >> 4) + (lane & 7);
                v[j] = h < heads && j0 + j < (dim >> 2) ? qt[h * dim + d] : 0.f;
            }
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                const int u = warp + 8 * (j0 + j), h = 4 * (u & 15) + (lane >> 3), d = 8 * (u >> 4) + (lane & 7);
                if (j0 + j < (dim >> 2)) qs[d * QLD + h] = v[j];
            }
        }
    }
    float wh[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int h = 4 * hg + j;
        wh[j] = h < heads ? w[(long long)t * heads + h] : 0.f;
    }
    const int vis = visible[t], lo = row_lo ? row_lo[t] : 0;
    const unsigned int *tb = bt + bt_start[t];
    float *ot = out + out_start[t];
    for (int r0 = lo + blockIdx.x * R; r0 < vis; r0 += gridDim.x * R) {
        __syncthreads();  // the previous tile's readers are done (and qs is written)
        // The tile's R x dim values, element i = tid + 256 j (row i / dim, column i % dim):
        // every thread issues all its loads before storing any, so a tile costs about one load
        // latency, not one per pass (a decoding token at 1M context scores 4,096 tiles a layer).
        // Stored records load a word (4 e4m3 or 2 bf16 values) at a time and decode into the
        // same transposed tile. A warp's pass takes 32 contiguous bytes of 4 rows (e4m3: lane
        // L reads word 8 * co + L % 8 of row 4 * rq + L / 8) or 64 bytes of 2 rows (bf16: word
        // 16 * co + L % 16 of row 2 * rq + L / 16), so its transposed stores (row stride R + 1
        // floats: 65 or 17, both 4 or 2 banks apart per word) land in 32 different banks.
        // dim % 32 == 0: whole passes.
        if constexpr (R == 16) {
            dsk_idxt_stage16(ks, pool, tb, fpb, bs, base, ratio, stride, dim, vis, r0, fmt);
        } else if (fmt == DSK_KV_FP8_INDEXER) {
            constexpr int QUADS = R / 4, QSH = R == 64 ? 4 : 2;  // row quads of the tile, log2
            const int wpr = dim >> 2;  // words of a row; its scale is the word after them
            const int warp = tid >> 5, lane = tid & 31;
            unsigned int v[TILE_PER_THREAD / 4];
            float sc[TILE_PER_THREAD / 4];
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD / 4; ++j) {
                const int u = warp + 8 * j, rr = 4 * (u & (QUADS - 1)) + (lane >> 3), c = 8 * (u >> QSH) + (lane & 7);
                const int r = r0 + rr;
                v[j] = 0u;
                sc[j] = 0.f;
                if (c < wpr && r < vis) {
                    const int pos = r * ratio;
                    const float *k = pool + (long long)tb[pos / bs] * fpb + base +
                                     (long long)((pos % bs) / ratio) * stride;
                    v[j] = reinterpret_cast<const unsigned int *>(k)[c];
                    sc[j] = k[wpr];
                }
            }
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD / 4; ++j) {
                const int u = warp + 8 * j, rr = 4 * (u & (QUADS - 1)) + (lane >> 3), c = 8 * (u >> QSH) + (lane & 7);
                if (c < wpr) {
                    float x0, x1, x2, x3;
                    dsk_e4m3x2_to_f32(v[j] & 0xffffu, x0, x1);
                    dsk_e4m3x2_to_f32(v[j] >> 16, x2, x3);
                    float *col = ks + 4 * c * (R + 1) + rr;
                    col[0] = x0 * sc[j];
                    col[R + 1] = x1 * sc[j];
                    col[2 * (R + 1)] = x2 * sc[j];
                    col[3 * (R + 1)] = x3 * sc[j];
                }
            }
        } else if (fmt == DSK_KV_BF16) {
            constexpr int PAIRS = R / 2, PSH = R == 64 ? 5 : 3;  // row pairs of the tile, log2
            const int wpr = dim >> 1;
            const int warp = tid >> 5, lane = tid & 31;
            unsigned int v[TILE_PER_THREAD / 2];
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD / 2; ++j) {
                const int u = warp + 8 * j, rr = 2 * (u & (PAIRS - 1)) + (lane >> 4), c = 16 * (u >> PSH) + (lane & 15);
                const int r = r0 + rr;
                v[j] = 0u;
                if (c < wpr && r < vis) {
                    const int pos = r * ratio;
                    const float *k = pool + (long long)tb[pos / bs] * fpb + base +
                                     (long long)((pos % bs) / ratio) * stride;
                    v[j] = reinterpret_cast<const unsigned int *>(k)[c];
                }
            }
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD / 2; ++j) {
                const int u = warp + 8 * j, rr = 2 * (u & (PAIRS - 1)) + (lane >> 4), c = 16 * (u >> PSH) + (lane & 15);
                if (c < wpr) {
                    float *col = ks + 2 * c * (R + 1) + rr;
                    col[0] = dsk_bf16lo(v[j]);
                    col[R + 1] = dsk_bf16hi(v[j]);
                }
            }
        } else {
            float v[TILE_PER_THREAD];
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD; ++j) {
                const int i = tid + 256 * j, rr = i / dim, d = i - rr * dim;
                const int r = r0 + rr;
                v[j] = 0.f;
                if (rr < R && r < vis) {
                    const int pos = r * ratio;
                    v[j] = pool[(long long)tb[pos / bs] * fpb + base +
                                (long long)((pos % bs) / ratio) * stride + d];
                }
            }
#pragma unroll
            for (int j = 0; j < TILE_PER_THREAD; ++j) {
                const int i = tid + 256 * j, rr = i / dim, d = i - rr * dim;
                if (rr < R) ks[d * (R + 1) + rr] = v[j];
            }
        }
        __syncthreads();
        float acc[RPT][4];
#pragma unroll
        for (int a = 0; a < RPT; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
        for (int d = 0; d < dim; ++d) {
            const float4 qv = *reinterpret_cast<const float4 *>(qs + d * QLD + 4 * hg);
            const float *kr = ks + d * (R + 1) + RPT * rg;
            float kv[RPT];
#pragma unroll
            for (int a = 0; a < RPT; ++a) kv[a] = kr[a];
#pragma unroll
            for (int a = 0; a < RPT; ++a) {
                acc[a][0] = fmaf(kv[a], qv.x, acc[a][0]);
                acc[a][1] = fmaf(kv[a], qv.y, acc[a][1]);
                acc[a][2] = fmaf(kv[a], qv.z, acc[a][2]);
                acc[a][3] = fmaf(kv[a], qv.w, acc[a][3]);
            }
        }
#pragma unroll
        for (int a = 0; a < RPT; ++a) {
            float s = 0.f;
#pragma unroll
            for (int b = 0; b < 4; ++b) s += (fmaxf(acc[a][b], 0.f) * scale) * wh[b];
            // The 16 head groups of this row are lanes hg = 0..15 of one half-warp.
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            const int r = r0 + RPT * rg + a;
            if (hg == 0 && r < vis) ot[r] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_indexer_scores_tiled_f32(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt) {
    dsk_indexer_scores_tiled<DSK_IDXT_ROWS>(pool, q, w, bt, bt_start, visible, row_lo, out_start, fpb, bs, base,
                                            ratio, stride, heads, dim, scale, out, fmt);
}

extern "C" __global__ void __launch_bounds__(256) dsk_indexer_scores_tiled16_f32(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt) {
    dsk_indexer_scores_tiled<16>(pool, q, w, bt, bt_start, visible, row_lo, out_start, fpb, bs, base, ratio,
                                 stride, heads, dim, scale, out, fmt);
}

// Lightning Indexer scores on the TF32 tensor cores (mma.sync m16n8k8, sm_80+), for heads <= 64
// and dim <= 128 (dim % 8 == 0): the same scores, arguments, row addressing and output as
// dsk_indexer_scores_tiled_f32, with the products rounded to TF32 (bf16 and e4m3 keys are exact
// in TF32; f32 keys and the queries round to nearest, ties away: 2^-11 relative per value).
// A block scores 64 rows of token t (grid y) per tile. Shared memory holds the token's queries
// qs[h][d] (TF32, heads padded to 8 with zeros) and the decoded tile ks[row][d] (TF32), both with
// a row stride of 132 words, so a fragment load (lane (g, tg) reads row g, word tg) hits 32
// different banks. Warp w computes rows 16 (w & 3) .. +16 against the n-tiles (8 heads) w >> 2,
// + 2, + 4, + 6: the A fragment of a k-step is loaded once for its (up to) four MMAs. The next
// tile's record words are loaded into registers before this tile's MMAs (a block keeps one load
// latency in flight behind its tensor-core work) and decoded into ks after them. relu, scale and
// head weights are applied on the accumulators; a row's heads are summed over the 4 lanes of its
// quad, then over the two warps of its rows through shared memory.
#define DSK_IDXM_ROWS 64
#define DSK_IDXM_LD 132
// Most words of a row a lane loads: FP8 rows of 128 values are 32 words (plus the scale), bf16
// 64, f32 128; a warp loads whole rows, 32 words at a time.
template <int FMT> struct DskIdxmWords { static constexpr int n = FMT == DSK_KV_F32 ? 4 : FMT == DSK_KV_BF16 ? 2 : 1; };

// Rows r0 + warp + 8 j (j < 8) of the tile: lane L takes words L + 32 i of each. Rows past the
// visible ones load the last visible row instead (their scores are not written), so the code is
// branch-free: the eight block-table loads go out together, then every record word.
template <int FMT>
__device__ __forceinline__ void dsk_idxm_load(
    unsigned int (&v)[8][DskIdxmWords<FMT>::n], float (&sc)[8], const float *__restrict__ pool,
    const unsigned int *__restrict__ tb, long long fpb, int bs, long long base, int ratio, int stride,
    int dim, int vis, int r0) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wpr = FMT == DSK_KV_F32 ? dim : FMT == DSK_KV_BF16 ? dim >> 1 : dim >> 2;
    // Lane j < 8 finds row warp + 8 j's record and the warp takes the eight by shuffles: one
    // integer division a lane, where every lane finding every row took eight (about a third of
    // the f16 kernel's instructions). block_size is a multiple of ratio (checked at launch), so
    // row r lies in table entry r / (bs / ratio) at slot r % (bs / ratio).
    long long at = 0;
    if (lane < 8) {
        const int r = min(r0 + warp + 8 * lane, vis - 1), rows_per_block = bs / ratio;
        const int blk = r / rows_per_block;
        at = (long long)tb[blk] * fpb + base + (long long)(r - blk * rows_per_block) * stride;
    }
    const float *k[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) k[j] = pool + __shfl_sync(0xffffffffu, at, j);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const unsigned int *kw = reinterpret_cast<const unsigned int *>(k[j]);
#pragma unroll
        for (int i = 0; i < DskIdxmWords<FMT>::n; ++i) v[j][i] = lane + 32 * i < wpr ? kw[lane + 32 * i] : 0u;
        sc[j] = FMT == DSK_KV_FP8_INDEXER ? k[j][wpr] : 0.f;
    }
}

// Row warp + 8 j of the tile into ks as TF32.
template <int FMT>
__device__ __forceinline__ void dsk_idxm_store(
    const unsigned int (&v)[8][DskIdxmWords<FMT>::n], const float (&sc)[8], float *ks, int dim) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wpr = FMT == DSK_KV_F32 ? dim : FMT == DSK_KV_BF16 ? dim >> 1 : dim >> 2;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        float *row = ks + (warp + 8 * j) * DSK_IDXM_LD;
#pragma unroll
        for (int i = 0; i < DskIdxmWords<FMT>::n; ++i) {
            const int c = lane + 32 * i;
            if (c < wpr) {
                const unsigned int x = v[j][i];
                if (FMT == DSK_KV_FP8_INDEXER) {
                    // e4m3 times a power of two: exact in f32 and in TF32.
                    float x0, x1, x2, x3;
                    dsk_e4m3x2_to_f32(x & 0xffffu, x0, x1);
                    dsk_e4m3x2_to_f32(x >> 16, x2, x3);
                    *reinterpret_cast<float4 *>(row + 4 * c) = make_float4(x0 * sc[j], x1 * sc[j], x2 * sc[j], x3 * sc[j]);
                } else if (FMT == DSK_KV_BF16) {
                    *reinterpret_cast<float2 *>(row + 2 * c) = make_float2(dsk_bf16lo(x), dsk_bf16hi(x));
                } else {
                    row[c] = __uint_as_float(dsk_f32_to_tf32(__uint_as_float(x)));
                }
            }
        }
    }
}

// The end of a tile of both tensor-core indexer forms: relu(acc * f) x scale x w[h] (f the row's
// factor, rows g and g + 8: only with ROW_FACTOR), summed over the heads of the lane's quad, then
// over the two warps of its rows through `red`, into the tile's 64 scores.
// C: rows g (e = 0, 1) and g + 8 (e = 2, 3); heads 8 nt + 2 tg + (e & 1).
// The lane's two heads of one n-tile (C: rows g, e = 0, 1, and g + 8, e = 2, 3; heads 8 nt + 2 tg
// + (e & 1)), their accumulators already scaled: relu x scale x w[h] summed per row, then over
// the quad's 8 heads with shuffles. Returns (row g, row g + 8).
__device__ __forceinline__ float2 dsk_idxm_quad_heads(float a0, float a1, float a2, float a3, float w0, float w1,
                                                      float scale) {
    return make_float2((fmaxf(a0, 0.f) * scale) * w0 + (fmaxf(a1, 0.f) * scale) * w1,
                       (fmaxf(a2, 0.f) * scale) * w0 + (fmaxf(a3, 0.f) * scale) * w1);
}
__device__ __forceinline__ void dsk_quad_sum2(float &x, float &y) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, o);
        y += __shfl_xor_sync(0xffffffffu, y, o);
    }
}

template <bool ROW_FACTOR>
__device__ __forceinline__ void dsk_idxm_scores_out(const float (&acc)[4][4], float fg, float f8,
                                                    const float *ws, float scale, int heads, float *red,
                                                    float *__restrict__ ot, int r0, int vis) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tg = lane & 3;
    const int mt = warp & 3, half = warp >> 2, ntiles = (heads + 7) >> 3;
    float sg = 0.f, sg8 = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int nt = half + 2 * i;
        if (nt < ntiles) {
            const float w0 = ws[8 * nt + 2 * tg], w1 = ws[8 * nt + 2 * tg + 1];
            const float a0 = ROW_FACTOR ? acc[i][0] * fg : acc[i][0], a1 = ROW_FACTOR ? acc[i][1] * fg : acc[i][1];
            const float a2 = ROW_FACTOR ? acc[i][2] * f8 : acc[i][2], a3 = ROW_FACTOR ? acc[i][3] * f8 : acc[i][3];
            const float2 two = dsk_idxm_quad_heads(a0, a1, a2, a3, w0, w1, scale);
            sg += two.x;
            sg8 += two.y;
        }
    }
    dsk_quad_sum2(sg, sg8);
    if (tg == 0) {
        red[half * DSK_IDXM_ROWS + 16 * mt + g] = sg;
        red[half * DSK_IDXM_ROWS + 16 * mt + g + 8] = sg8;
    }
    __syncthreads();
    if (tid < DSK_IDXM_ROWS && r0 + tid < vis) ot[r0 + tid] = red[tid] + red[DSK_IDXM_ROWS + tid];
}

template <int FMT>
__device__ __forceinline__ void dsk_idxm_tiles(
    const float *__restrict__ pool, const unsigned int *__restrict__ tb, long long fpb, int bs,
    long long base, int ratio, int stride, int heads, int dim, float scale, float *__restrict__ ot,
    int lo, int vis, float *ks, float *red, const float *ws, const float *qs) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tg = lane & 3;
    const int mt = warp & 3, half = warp >> 2, ntiles = (heads + 7) >> 3;
    const unsigned int *ka = reinterpret_cast<const unsigned int *>(ks) + (16 * mt + g) * DSK_IDXM_LD + tg;
    const unsigned int *qb = reinterpret_cast<const unsigned int *>(qs) + g * DSK_IDXM_LD + tg;
    unsigned int v[8][DskIdxmWords<FMT>::n];
    float sc[8];
    const int step = gridDim.x * DSK_IDXM_ROWS;
    int r0 = lo + blockIdx.x * DSK_IDXM_ROWS;
    if (r0 < vis) dsk_idxm_load<FMT>(v, sc, pool, tb, fpb, bs, base, ratio, stride, dim, vis, r0);
    for (; r0 < vis; r0 += step) {
        __syncthreads();  // the previous tile's readers of ks and red are done (and qs is written)
        dsk_idxm_store<FMT>(v, sc, ks, dim);
        __syncthreads();
        if (r0 + step < vis) dsk_idxm_load<FMT>(v, sc, pool, tb, fpb, bs, base, ratio, stride, dim, vis, r0 + step);
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
        for (int k0 = 0; k0 < dim; k0 += 8) {
            // A (16 rows x 8 dims, row-major): rows g, g + 8; dims tg, tg + 4.
            const unsigned int a0 = ka[k0], a1 = ka[8 * DSK_IDXM_LD + k0];
            const unsigned int a2 = ka[k0 + 4], a3 = ka[8 * DSK_IDXM_LD + k0 + 4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int nt = half + 2 * i;
                if (nt < ntiles) {
                    // B (8 dims x 8 heads, column-major = qs rows): head 8 nt + g; dims tg, tg + 4.
                    const unsigned int *qn = qb + 8 * nt * DSK_IDXM_LD + k0;
                    dsk_mma_tf32_m16n8k8(acc[i], a0, a1, a2, a3, qn[0], qn[4]);
                }
            }
        }
        dsk_idxm_scores_out<false>(acc, 1.f, 1.f, ws, scale, heads, red, ot, r0, vis);
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_indexer_scores_mma(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt) {
    dsk_pdl_entry();
    extern __shared__ float smem[];
    // ks [64][132] | red [2][64] | ws [64] | qs [heads rounded up to 8][132]
    float *ks = smem;
    float *red = ks + DSK_IDXM_ROWS * DSK_IDXM_LD;
    float *ws = red + 2 * DSK_IDXM_ROWS;
    float *qs = ws + 64;
    const int t = blockIdx.y, tid = threadIdx.x;
    const int vis = visible[t], lo = row_lo ? row_lo[t] : 0;
    if (lo + (int)blockIdx.x * DSK_IDXM_ROWS >= vis) return;  // the whole block: no tile of its own
    const int hp = (heads + 7) & ~7;
    const float *qt = q + (long long)t * heads * dim;
    for (int i = tid; i < hp * dim; i += 256) {
        const int h = i / dim, d = i - h * dim;
        qs[h * DSK_IDXM_LD + d] = h < heads ? __uint_as_float(dsk_f32_to_tf32(qt[i])) : 0.f;
    }
    for (int i = tid; i < 64; i += 256) ws[i] = i < heads ? w[(long long)t * heads + i] : 0.f;
    const unsigned int *tb = bt + bt_start[t];
    float *ot = out + out_start[t];
    if (fmt == DSK_KV_FP8_INDEXER)
        dsk_idxm_tiles<DSK_KV_FP8_INDEXER>(pool, tb, fpb, bs, base, ratio, stride, heads, dim, scale, ot, lo, vis, ks, red, ws, qs);
    else if (fmt == DSK_KV_BF16)
        dsk_idxm_tiles<DSK_KV_BF16>(pool, tb, fpb, bs, base, ratio, stride, heads, dim, scale, ot, lo, vis, ks, red, ws, qs);
    else
        dsk_idxm_tiles<DSK_KV_F32>(pool, tb, fpb, bs, base, ratio, stride, heads, dim, scale, ot, lo, vis, ks, red, ws, qs);
}

// dsk_indexer_scores_mma for FP8_INDEXER rows on the f16 tensor cores (mma.sync m16n8k16: twice
// the TF32 rate over half the operand bytes) at the same precision, for prefill-sized launches:
// - The tile holds the raw e4m3 values as f16 (exact; one cvt per two values) and each row's
//   power-of-two scale is applied to its dot products afterwards (relu commutes with a positive
//   factor).
// - Each token's queries are multiplied by 2^e, e chosen per token so that their largest
//   magnitude lands in [2^14, 2^15), and rounded to f16: 11 significant bits, as TF32 rounds
//   them, with f16's range safe for any query size (only values below 2^-28 of that largest one,
//   f16 subnormals, keep fewer bits). 2^-e comes off with the row scale.
// - A block scores a group of consecutive tokens (grid y), DSK_IDXT_COLS / hp of them (hp: the
//   heads rounded up to a power of two, at least 8; 4 tokens at V4-Flash's 64 heads, 8 at 32):
//   neighbouring prefill tokens see the same rows through
//   the same block table, so a key tile is loaded and decoded once for the whole group and its
//   A fragments feed every token's MMAs (scoring one token a block, every token re-read and
//   re-decoded all its rows: L2-bound at a tenth of the tensor cores' rate). Tokens of a group
//   with different tables (another sequence, a decode row) are scored in runs of equal tables,
//   one after the other.
// - Warp w computes a 32 x 64 tile: rows 32 (w & 1) .. +32 against the 64 query columns 64 (w >> 1)
//   .. (8 n-tiles of 8 columns), two m-tiles by eight n-tiles, A and B fragments by ldmatrix (6
//   per 16 MMAs). hp being a power of two, a token's columns lie in one warp: its head weights
//   times relu of the accumulators are summed over its n-tiles in registers, then over the quad
//   with shuffles, and the score (times the row and token factors and scale) is written straight
//   from the warp. The summation order is a token's own (its n-tiles in order, then the quad):
//   its score does not depend on the tokens grouped with it.
//   (Session 13's layout gave each warp 16 rows by 16 n-tiles with fragments loaded word by word
//   and a shuffle reduction and shared partial per n-tile: about 1,000 issue slots a tile for
//   128 MMAs, where this one takes about 400.)
// Rows of DSK_IDXH_LD halves (272 bytes: the 8 rows of an ldmatrix phase hit 8 distinct groups of
// 4 banks). Needs dim % 16 == 0 and heads <= 64.
#define DSK_IDXH_LD 136
#define DSK_IDXT_COLS 256
#define DSK_IDXT_MAX_TOKENS 32

// Heads of a token in the f16 indexer's columns: a power of two, at least 8 (one n-tile), so
// that a token's n-tiles never straddle two warps (launch/attention.rs: indexer_f16_heads).
__device__ __forceinline__ int dsk_idxh_heads(int heads) {
    int hp = 8;
    while (hp < heads) hp <<= 1;
    return hp;
}

// The rows [rlo, rvis) of the run's tokens [lo, hi) (group-relative; their table tb) in steps of
// gridDim.x tiles; a token's scores are written for its own rows [lo_s, vis_s) only. DIM is dim
// where it is known at compile time (the model's 128: the dimension loop unrolled, ldmatrix at
// immediate offsets), 0 for any other.
template <int DIM>
__device__ __forceinline__ void dsk_idxh_run(
    const float *__restrict__ pool, const unsigned int *__restrict__ tb, long long fpb, int bs,
    long long base, int ratio, int stride, int hp, int dim, float scale, float *__restrict__ out,
    int rlo, int rvis, int lo, int hi, unsigned short *ks, float *ksc, const float *ws,
    const float *unscale, const unsigned short *qs, const int *lo_s, const int *vis_s, const long long *os_s) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tg = lane & 3;
    const int wr = warp & 1, nt0 = 8 * (warp >> 1), tpt = hp >> 3, wpr = dim >> 2;
    // Whether any of the warp's n-tiles belongs to the run (warp-uniform); its other columns are
    // computed against the run's rows too and dropped.
    const bool active = nt0 < hi * tpt && nt0 + 8 > lo * tpt;
    // ldmatrix rows: A, this lane's key row of the warp's m-tile 0 at dims + 8 (lane >> 4); B,
    // query row (column) 8 nt + (lane & 7) of n-tile pair p's tile (lane >> 4), dims + 8 ((lane
    // >> 3) & 1).
    const unsigned short *a_row = ks + (32 * wr + (lane & 15)) * DSK_IDXH_LD + 8 * (lane >> 4);
    const unsigned short *b_row = qs + (8 * (nt0 + (lane >> 4)) + (lane & 7)) * DSK_IDXH_LD + 8 * ((lane >> 3) & 1);
    unsigned int v[8][1];
    float sc[8];
    const int step = gridDim.x * DSK_IDXM_ROWS;
    int r0 = rlo + blockIdx.x * DSK_IDXM_ROWS;
    if (r0 < rvis) dsk_idxm_load<DSK_KV_FP8_INDEXER>(v, sc, pool, tb, fpb, bs, base, ratio, stride, dim, rvis, r0);
    for (; r0 < rvis; r0 += step) {
        __syncthreads();  // the previous tile's (or run's) readers of ks and ksc are done
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = warp + 8 * j;
            if (lane < wpr) {
                unsigned int lo, hi;
                dsk_e4m3x4_to_f16x2(v[j][0], lo, hi);
                *reinterpret_cast<uint2 *>(ks + r * DSK_IDXH_LD + 4 * lane) = make_uint2(lo, hi);
            }
            if (lane == 0) ksc[r] = sc[j];
        }
        __syncthreads();
        if (r0 + step < rvis) dsk_idxm_load<DSK_KV_FP8_INDEXER>(v, sc, pool, tb, fpb, bs, base, ratio, stride, dim, rvis, r0 + step);
        if (!active) continue;
        // The first 16 dimensions start the accumulators (C = 0), the rest add to them.
        float acc[2][8][4];
        const int dims = DIM ? DIM : dim;
#pragma unroll
        for (int k0 = 0; k0 < dims; k0 += 16) {
            unsigned int a[2][4];
            dsk_attf_ldsm4(a_row + k0, a[0]);
            dsk_attf_ldsm4(a_row + 16 * DSK_IDXH_LD + k0, a[1]);
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                unsigned int b[4];
                dsk_attf_ldsm4(b_row + 16 * p * DSK_IDXH_LD + k0, b);
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    if (k0 == 0) {
                        dsk_mma_f16_m16n8k16_first(acc[m][2 * p], a[m][0], a[m][1], a[m][2], a[m][3], b[0], b[1]);
                        dsk_mma_f16_m16n8k16_first(acc[m][2 * p + 1], a[m][0], a[m][1], a[m][2], a[m][3], b[2], b[3]);
                    } else {
                        dsk_mma_f16_m16n8k16(acc[m][2 * p], a[m][0], a[m][1], a[m][2], a[m][3], b[0], b[1]);
                        dsk_mma_f16_m16n8k16(acc[m][2 * p + 1], a[m][0], a[m][1], a[m][2], a[m][3], b[2], b[3]);
                    }
                }
            }
        }
        // C of n-tile i: rows g (e = 0, 1) and g + 8 (e = 2, 3) of each m-tile; heads 8 (nt0 + i) +
        // 2 tg + (e & 1). A token's n-tiles (tpt of them, hp a power of two) all lie in one warp:
        // w[h] relu(acc) summed over the lane's heads of them in order, then over the quad, then
        // times the row's and token's factors and scale.
        float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 w2 = *reinterpret_cast<const float2 *>(ws + 8 * (nt0 + i) + 2 * tg);
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                s[m][0] = fmaf(fmaxf(acc[m][i][1], 0.f), w2.y, fmaf(fmaxf(acc[m][i][0], 0.f), w2.x, s[m][0]));
                s[m][1] = fmaf(fmaxf(acc[m][i][3], 0.f), w2.y, fmaf(fmaxf(acc[m][i][2], 0.f), w2.x, s[m][1]));
            }
            if (((i + 1) & (tpt - 1)) == 0) {
                const int tk = (nt0 + i) >> (__ffs(tpt) - 1);  // tpt a power of two: no division
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    dsk_quad_sum2(s[m][0], s[m][1]);
                    // Lane tg 0 writes row g, lane tg 1 row g + 8.
                    const int row = 32 * wr + 16 * m + g + 8 * tg;
                    if (tg < 2 && tk >= lo && tk < hi && r0 + row >= lo_s[tk] && r0 + row < vis_s[tk])
                        out[os_s[tk] + r0 + row] = (tg ? s[m][1] : s[m][0]) * (ksc[row] * unscale[tk]) * scale;
                    s[m][0] = 0.f;
                    s[m][1] = 0.f;
                }
            }
        }
    }
}

// Arguments as dsk_indexer_scores_mma (fmt must be DSK_KV_FP8_INDEXER) plus the token count; grid
// y = token groups (launch/attention.rs: indexer_f16_group_tokens). Shared memory: ks [64][136]
// f16 | ksc [64] | ws [DSK_IDXT_COLS] | unscale, then i64 out starts, i32 visible counts, table
// starts, query exponents and first rows [DSK_IDXT_MAX_TOKENS] | qs [DSK_IDXT_COLS][136] f16
// (launch/attention.rs: indexer_mma_f16_smem_bytes). Two blocks an SM (128 registers).
extern "C" __global__ void __launch_bounds__(256, 2) dsk_indexer_scores_mma_f16(
    const float *__restrict__ pool, const float *__restrict__ q, const float *__restrict__ w,
    const unsigned int *__restrict__ bt, const int *__restrict__ bt_start,
    const int *__restrict__ visible, const int *__restrict__ row_lo,
    const long long *__restrict__ out_start, long long fpb,
    int bs, long long base, int ratio, int stride, int heads, int dim, float scale,
    float *__restrict__ out, int fmt, int tokens) {
    dsk_pdl_entry();
    // All of it dynamic: a kernel with static shared memory cannot opt in to the device's whole
    // per-block maximum.
    extern __shared__ float smem[];
    unsigned short *ks = reinterpret_cast<unsigned short *>(smem);
    float *ksc = smem + DSK_IDXM_ROWS * DSK_IDXH_LD / 2;
    float *ws = ksc + DSK_IDXM_ROWS;
    float *unscale = ws + DSK_IDXT_COLS;
    long long *os_s = reinterpret_cast<long long *>(unscale + DSK_IDXT_MAX_TOKENS);  // 8-byte aligned offset
    int *vis_s = reinterpret_cast<int *>(os_s + DSK_IDXT_MAX_TOKENS);
    int *bts_s = vis_s + DSK_IDXT_MAX_TOKENS;
    int *exp_s = bts_s + DSK_IDXT_MAX_TOKENS;
    int *lo_s = exp_s + DSK_IDXT_MAX_TOKENS;
    unsigned short *qs = reinterpret_cast<unsigned short *>(lo_s + DSK_IDXT_MAX_TOKENS);
    (void)fmt;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int hp = dsk_idxh_heads(heads), group = DSK_IDXT_COLS / hp;
    const int t0 = blockIdx.y * group, count = min(group, tokens - t0);
    if (count <= 0) return;
    if (tid < count) {
        vis_s[tid] = visible[t0 + tid];
        lo_s[tid] = row_lo ? row_lo[t0 + tid] : 0;
        bts_s[tid] = bt_start[t0 + tid];
        os_s[tid] = out_start[t0 + tid];
    }
    __syncthreads();
    // Every run's rows lie in [first, most): a block past that span has no tile of its own.
    int first = lo_s[0], most = 0;
    for (int k = 0; k < count; ++k) {
        first = min(first, lo_s[k]);
        most = max(most, vis_s[k]);
    }
    if (first + (int)blockIdx.x * DSK_IDXM_ROWS >= most) return;
    // Per token (a warp each): 2^e with max|q| 2^e in [2^14, 2^15), e = 14 - floor(log2 max|q|),
    // kept where f32 powers of two exist.
    for (int k = warp; k < count; k += 8) {
        const float *qt = q + (long long)(t0 + k) * heads * dim;
        float m = 0.f;
        for (int i = lane; i < heads * dim; i += 32) m = fmaxf(m, fabsf(qt[i]));
        m = dsk_warp_max(m);
        int e = 0;
        if (m > 0.f && m < __uint_as_float(0x7f800000u)) e = 14 - (((int)(__float_as_uint(m) >> 23) & 255) - 127);
        e = min(max(e, -126), 126);
        if (lane == 0) {
            exp_s[k] = e;
            unscale[k] = dsk_pow2(-e);
        }
    }
    __syncthreads();
    const int pairs = hp * (dim >> 1);
    for (int i = tid; i < count * pairs; i += 256) {
        const int k = i / pairs, c = i - k * pairs, h = c / (dim >> 1), d = 2 * (c - h * (dim >> 1));
        const float up = dsk_pow2(exp_s[k]);
        const float *qt = q + ((long long)(t0 + k) * heads + h) * dim + d;
        const unsigned int pair = h < heads ? dsk_f32x2_to_f16x2(qt[0] * up, qt[1] * up) : 0u;
        *reinterpret_cast<unsigned int *>(qs + (k * hp + h) * DSK_IDXH_LD + d) = pair;
    }
    for (int i = tid; i < count * hp; i += 256) {
        const int k = i / hp, h = i - k * hp;
        ws[i] = h < heads ? w[(long long)(t0 + k) * heads + h] : 0.f;
    }
    // Runs of tokens sharing a block table, one after another (each tile starts with a
    // __syncthreads, which orders the stores above before its readers).
    for (int lo = 0; lo < count;) {
        int hi = lo + 1, rlo = lo_s[lo], rvis = vis_s[lo];
        while (hi < count && bts_s[hi] == bts_s[lo]) {
            rlo = min(rlo, lo_s[hi]);
            rvis = max(rvis, vis_s[hi++]);
        }
        if (dim == 128)
            dsk_idxh_run<128>(pool, bt + bts_s[lo], fpb, bs, base, ratio, stride, hp, dim, scale, out, rlo, rvis,
                              lo, hi, ks, ksc, ws, unscale, qs, lo_s, vis_s, os_s);
        else
            dsk_idxh_run<0>(pool, bt + bts_s[lo], fpb, bs, base, ratio, stride, hp, dim, scale, out, rlo, rvis, lo,
                            hi, ks, ksc, ws, unscale, qs, lo_s, vis_s, os_s);
        lo = hi;
    }
}

// Order-preserving u32 key of an f32: a larger float (in IEEE total order, as Rust's
// f32::total_cmp) gets a larger key.
__device__ __forceinline__ unsigned int dsk_f32_order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define DSK_TOPK_UNROLL 8
// Scores per stage-1 block of the two-stage select (`DSK_TOPK_SEG` in launch/attention.rs).
#define DSK_TOPK_SEG 4096

// Top-k of one list of n scores v[0 .. n), run by one whole block of 1024 threads: an exact
// radix select of the k-th largest key (four 8-bit passes over the scores), then every position
// above it and the lowest-positioned ties at it, written with their values to oi / ov
// [min(k, n)]: the rows above the k-th value in position order, then its ties in position order
// (the selects' output), or with index_order all of them in position order (the two-stage
// select's candidates, so its second stage sees them in index order). The index written for
// position i is map[i] with a map, index_base + i without one. Rows past min(k, n) are left
// untouched. Every thread of the block must call it with the same arguments (it synchronises
// the block). The list is read through `src` (DskTopkList: one array; DskTopkRanks: the
// candidates of a tensor-parallel group's ranks as gathered), which gives position i's value
// and the index written for it.
struct DskTopkList {
    const float *__restrict__ v;
    const int *__restrict__ map;
    int index_base;
    __device__ __forceinline__ float value(int i) const { return v[i]; }
    __device__ __forceinline__ int index(int i) const { return map ? map[i] : index_base + i; }
};

template <class Src>
__device__ __forceinline__ void dsk_topk_block_of(const Src &src, int n, int k, int *__restrict__ oi,
                                                  float *__restrict__ ov, bool index_order) {
    // One histogram per warp, filled with warp-aggregated increments: the first passes see
    // nearly every score in a handful of bins, which a shared histogram would serialise.
    __shared__ unsigned int warp_hist[32][256];
    __shared__ unsigned int hist[256];
    __shared__ unsigned int prefix, mask;
    __shared__ int remaining;
    __shared__ int warp_gt[32], warp_eq[32];
    __shared__ int base_gt, base_eq;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kk = min(k, n);
    if (kk <= 0) return;
    if (tid == 0) {
        prefix = 0u;
        mask = 0u;
        remaining = kk;
    }
    const int warps = blockDim.x >> 5;
    // A list of up to one unrolled slice (a segment, a round's block, a decode token's scores,
    // the ranks' candidates) is read once into registers and kept for every pass: each pass
    // re-reading it cost a global load latency, and the chained selects of a long list are
    // latency-bound.
    const bool resident = n <= (int)blockDim.x * DSK_TOPK_UNROLL;
    float kept[DSK_TOPK_UNROLL];
    if (resident) {
#pragma unroll
        for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
            const int i = u * blockDim.x + tid;
            kept[u] = i < n ? src.value(i) : 0.f;
        }
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256 * warps; b += blockDim.x) warp_hist[b >> 8][b & 255] = 0u;
        __syncthreads();
        const unsigned int p = prefix, m = mask;
        // One block reads all of a token's scores: keep DSK_TOPK_UNROLL loads in flight per
        // thread, or the pass is bound by the latency of one load at a time.
        for (int i0 = 0; i0 < n; i0 += blockDim.x * DSK_TOPK_UNROLL) {
            // Slices past the end are skipped (block-uniform): a decode token's 2,048 scores fill
            // two of the eight, and each empty one still cost a __match_any_sync.
            const int live = min(DSK_TOPK_UNROLL, (n - i0 + (int)blockDim.x - 1) / (int)blockDim.x);
            float x[DSK_TOPK_UNROLL];
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                const int i = i0 + u * blockDim.x + tid;
                x[u] = resident ? kept[u] : i < n ? src.value(i) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                if (u >= live) break;
                const int i = i0 + u * blockDim.x + tid;
                unsigned int bin = 256u;  // no bin: out of range or outside the current prefix
                if (i < n) {
                    const unsigned int key = dsk_f32_order_key(x[u]);
                    if ((key & m) == p) bin = (key >> shift) & 255u;
                }
                const unsigned int peers = __match_any_sync(0xffffffffu, bin);
                if (bin != 256u && lane == __ffs(peers) - 1) warp_hist[warp][bin] += __popc(peers);
            }
        }
        __syncthreads();
        for (int b = tid; b < 256; b += blockDim.x) {
            unsigned int c = 0u;
            for (int w = 0; w < warps; ++w) c += warp_hist[w][b];
            hist[b] = c;
        }
        __syncthreads();
        // The bin holding the remaining-th largest key, scanning from bin 255 down: warp 0,
        // lane L owning bins 255 - 8L .. 248 - 8L, a prefix sum over lanes finds the lane, which
        // walks its eight bins (one thread walking all 256 was most of a decode step's select).
        if (warp == 0) {
            // Every lane reads `remaining` before the __syncwarp below, after which the lane that
            // finds the bin rewrites it.
            const int rem = remaining;
            int c[8];
            int own = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = (int)hist[255 - 8 * lane - j];
                own += c[j];
            }
            int incl = own;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            __syncwarp();
            int cum = incl - own;
            if (cum < rem && rem <= incl) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (cum + c[j] >= rem) {
                        prefix |= (unsigned int)(255 - 8 * lane - j) << shift;
                        mask |= 255u << shift;
                        remaining = rem - cum;
                        break;
                    }
                    cum += c[j];
                }
            }
        }
        __syncthreads();
    }
    const unsigned int kth = prefix;
    const int ties = remaining;      // how many rows equal to the k-th value are taken
    const int above = kk - ties;     // rows strictly above it
    if (tid == 0) {
        base_gt = 0;
        base_eq = 0;
    }
    __syncthreads();
    for (int c0 = 0; c0 < n; c0 += blockDim.x * DSK_TOPK_UNROLL) {
        // As above: empty slices (no row, so no ballot bit and no offset) are skipped, with their
        // two block barriers each.
        const int live = min(DSK_TOPK_UNROLL, (n - c0 + (int)blockDim.x - 1) / (int)blockDim.x);
        float xs[DSK_TOPK_UNROLL];
#pragma unroll
        for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
            const int i = c0 + u * blockDim.x + tid;
            xs[u] = resident ? kept[u] : i < n ? src.value(i) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
            if (u >= live) break;
            const int i = c0 + u * blockDim.x + tid;
            const float x = xs[u];
            const unsigned int key = i < n ? dsk_f32_order_key(x) : 0u;
            const bool gt = i < n && key > kth, eq = i < n && key == kth;
            const unsigned int bg = __ballot_sync(0xffffffffu, gt);
            const unsigned int be = __ballot_sync(0xffffffffu, eq);
            if (lane == 0) {
                warp_gt[warp] = __popc(bg);
                warp_eq[warp] = __popc(be);
            }
            __syncthreads();
            int off_gt = base_gt, off_eq = base_eq;
            for (int w = 0; w < warp; ++w) {
                off_gt += warp_gt[w];
                off_eq += warp_eq[w];
            }
            const unsigned int below = (1u << lane) - 1u;
            // Rows before this one above the k-th value, and at it.
            const int gt_before = off_gt + __popc(bg & below);
            const int eq_before = off_eq + __popc(be & below);
            if (gt) {
                const int at = index_order ? gt_before + min(eq_before, ties) : gt_before;
                oi[at] = src.index(i);
                ov[at] = x;
            }
            if (eq && eq_before < ties) {
                const int at = (index_order ? gt_before : above) + eq_before;
                oi[at] = src.index(i);
                ov[at] = x;
            }
            __syncthreads();
            if (tid == 0) {
                for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
                    base_gt += warp_gt[w];
                    base_eq += warp_eq[w];
                }
            }
            __syncthreads();
        }
    }
}

__device__ __forceinline__ void dsk_topk_block(const float *__restrict__ v, int n, int k,
                                               int *__restrict__ oi, float *__restrict__ ov,
                                               const int *__restrict__ map, int index_base,
                                               bool index_order) {
    dsk_topk_block_of(DskTopkList{v, map, index_base}, n, k, oi, ov, index_order);
}

// Top-k of each token's scores (scores[starts[t] .. + counts[t]]), one block of 1024 threads per
// token (dsk_topk_block), written to out_idx / out_val [tokens, k]: the indices above the k-th
// value in index order, then its lowest-indexed ties in index order; with index_order, all of
// them in index order (a rank's share, merged by dsk_topk_merge_ranks_f32). Position i of a
// token's list is row index_base[t] + i (i where index_base is null).
extern "C" __global__ void __launch_bounds__(1024) dsk_topk_select_f32(
    const float *__restrict__ scores, const long long *__restrict__ starts,
    const int *__restrict__ counts, int k, int *__restrict__ out_idx,
    float *__restrict__ out_val, const int *__restrict__ index_base, int index_order) {
    dsk_pdl_entry();
    const int t = blockIdx.x;
    dsk_topk_block(scores + starts[t], counts[t], k, out_idx + (long long)t * k,
                   out_val + (long long)t * k, nullptr, index_base ? index_base[t] : 0, index_order != 0);
}

// Two-stage select for long lists, stage 1: block (s, t) keeps the top kseg = min(k, SEG) of
// segment s (scores [s * SEG, min((s + 1) * SEG, n))) of token t, values and GLOBAL indices
// (index_base[t] + position, as dsk_topk_select_f32) all
// in index order (ties not last) at candidates (t * max_segs + s) * kseg of cand_val / cand_idx. Every segment but
// a token's last is full, so it keeps exactly kseg and a token's candidates are contiguous:
// (segs - 1) * kseg + min(kseg, last segment's length), in global index order. A row of the
// token's top k is in its segment's top k (fewer than k rows of the segment beat it), so the
// candidates hold the whole answer. counts are clamped to max_segs * SEG (the workspace).
extern "C" __global__ void __launch_bounds__(1024) dsk_topk_select_segments_f32(
    const float *__restrict__ scores, const long long *__restrict__ starts,
    const int *__restrict__ counts, int k, int max_segs, int *__restrict__ cand_idx,
    float *__restrict__ cand_val, const int *__restrict__ index_base) {
    dsk_pdl_entry();
    const int s = blockIdx.x, t = blockIdx.y;
    const int n = min(counts[t], max_segs * DSK_TOPK_SEG);
    const int lo = s * DSK_TOPK_SEG;
    if (lo >= n) return;  // the whole block: past the token's scores
    const int kseg = min(k, DSK_TOPK_SEG);
    const long long at = ((long long)t * max_segs + s) * kseg;
    dsk_topk_block(scores + starts[t] + lo, min(DSK_TOPK_SEG, n - lo), kseg, cand_idx + at,
                   cand_val + at, nullptr, (index_base ? index_base[t] : 0) + lo, true);
}

// Candidates a token with n scores has after `level` rounds of keeping the top kseg of every
// DSK_TOPK_SEG-long segment (every segment but the last is full, so it keeps exactly kseg).
__device__ __forceinline__ int dsk_topk_level_count(int n, int kseg, int level) {
    for (int l = 0; l < level && n > 0; ++l) {
        const int segs = (n + DSK_TOPK_SEG - 1) / DSK_TOPK_SEG;
        n = (segs - 1) * kseg + min(kseg, n - (segs - 1) * DSK_TOPK_SEG);
    }
    return n;
}

// A further round for very long lists (a 1M-context decode leaves 64 x 512 candidates, which one
// block took ~115 us to select from): block (s, t) keeps the top kseg of candidates
// [s * SEG, min((s + 1) * SEG, m)) of token t's m = dsk_topk_level_count(n, kseg, level)
// candidates at in_* + t * in_stride, writing them (global indices, index order) at
// out_* + t * out_stride + s * kseg. Candidates stay in global index order through every round,
// so position order is index order and ties go to the lower row as in one select.
extern "C" __global__ void __launch_bounds__(1024) dsk_topk_select_reduce_f32(
    const int *__restrict__ counts, int k, int max_segs, int level,
    const int *__restrict__ in_idx, const float *__restrict__ in_val, long long in_stride,
    int *__restrict__ out_idx, float *__restrict__ out_val, long long out_stride) {
    dsk_pdl_entry();
    const int s = blockIdx.x, t = blockIdx.y;
    const int kseg = min(k, DSK_TOPK_SEG);
    const int m = dsk_topk_level_count(min(counts[t], max_segs * DSK_TOPK_SEG), kseg, level);
    const int lo = s * DSK_TOPK_SEG;
    if (lo >= m) return;  // the whole block: past the token's candidates
    const long long in = (long long)t * in_stride, out = (long long)t * out_stride + (long long)s * kseg;
    dsk_topk_block(in_val + in + lo, min(DSK_TOPK_SEG, m - lo), kseg, out_idx + out, out_val + out,
                   in_idx + in + lo, 0, true);
}

// The last round: one block per token selects the top k of its m = dsk_topk_level_count(n, k,
// level) candidates (at t * stride, at most a segment of them). They are in global index order,
// so "ties to the lower position" is "ties to the lower row" and position order is index order:
// the rows written are the candidates' global indices, in dsk_topk_select_f32's order (all in
// index order with index_order).
extern "C" __global__ void __launch_bounds__(1024) dsk_topk_select_merge_f32(
    const int *__restrict__ counts, int k, int max_segs, int level, long long stride,
    const int *__restrict__ cand_idx, const float *__restrict__ cand_val,
    int *__restrict__ out_idx, float *__restrict__ out_val, int index_order) {
    dsk_pdl_entry();
    const int t = blockIdx.x;
    const int kseg = min(k, DSK_TOPK_SEG);
    const int m = dsk_topk_level_count(min(counts[t], max_segs * DSK_TOPK_SEG), kseg, level);
    if (m <= 0) return;
    const long long at = (long long)t * stride;
    dsk_topk_block(cand_val + at, m, k, out_idx + (long long)t * k, out_val + (long long)t * k,
                   cand_idx + at, 0, index_order != 0);
}

// The candidates of the ranks of a tensor-parallel group, each having kept (in index order) a
// superset of the top k of its share of a token's rows (its top k, or the last round's
// candidates of its two-stage select), as an all-gather leaves them: rank r's block of
// 2 * tokens * stride words holds its values [tokens][stride] then its indices [tokens][stride]
// (i32 bits). Shares are contiguous, rank after rank, and every rank before the last with rows
// has the same number of rows, so the same number `per` of candidates (launch/attention.rs:
// indexer_row_share): a token's candidates are rank 0's per, rank 1's per, .. in global index
// order, and position i is slot i % per of rank i / per.
struct DskTopkRanks {
    const float *__restrict__ g;
    long long rank_words, index_words, token;
    int per;
    __device__ __forceinline__ long long at(int i) const {
        const int r = i / per;
        return r * rank_words + token + (i - r * per);
    }
    __device__ __forceinline__ float value(int i) const { return g[at(i)]; }
    __device__ __forceinline__ int index(int i) const { return __float_as_int(g[at(i) + index_words]); }
};

// The top k of each token's gathered candidates (counts[t] of them, per[t] from each rank
// before the last with rows), one block per token, written as dsk_topk_select_f32 writes the
// top k of the whole list: ties at the k-th value go to the lower row, as in one select over all
// rows.
extern "C" __global__ void __launch_bounds__(1024) dsk_topk_merge_ranks_f32(
    const float *__restrict__ gathered, const int *__restrict__ counts, const int *__restrict__ per,
    long long stride, int tokens, int k, int *__restrict__ out_idx, float *__restrict__ out_val) {
    dsk_pdl_entry();
    const int t = blockIdx.x;
    const long long ts = (long long)tokens * stride;
    const DskTopkRanks src{gathered, 2 * ts, ts, (long long)t * stride, max(per[t], 1)};
    dsk_topk_block_of(src, counts[t], k, out_idx + (long long)t * k, out_val + (long long)t * k, false);
}

// ---- The shared-memory select: many tokens' lists at once (prefill chunks) ----
//
// dsk_topk_block_of runs one list per 1,024-thread block: at most one block fits an SM (its
// registers), so every one of its block barriers and one-thread scans idles the SM, and a
// prefill chunk's 8,192 lists ran one after another on each SM. This form selects the same rows
// in the same order with 256 threads and the list's keys in dynamic shared memory (read from
// global memory once), so several blocks share an SM and overlap each other's barriers:
// - four 8-bit radix passes over the keys as before (one histogram per warp, increments
//   aggregated by __match_any_sync), where a warp with no key inside the current prefix skips
//   the match; a pass whose chosen bin holds one key ends the search (that key is the k-th);
// - the write pass gives each warp a contiguous run of positions: one ballot pass counts its
//   rows above and at the k-th key, one barrier, then a second pass writes them at their
//   offsets (the old form took three barriers per 1,024 positions).
// Lists longer than `cap` keys are read from global memory in every pass instead.
#define DSK_TOPK_SMEM_THREADS 256
#define DSK_TOPK_SMEM_WARPS (DSK_TOPK_SMEM_THREADS / 32)
#ifndef DSK_TOPK_DYN_KEYS
#define DSK_TOPK_DYN_KEYS(name) extern __shared__ unsigned int name[]
#endif

// The f32 whose dsk_f32_order_key is `key` (its exact bits).
__device__ __forceinline__ float dsk_f32_of_order_key(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <class Src>
__device__ __forceinline__ void dsk_topk_block_smem(const Src &src, int n, int k, int *__restrict__ oi,
                                                    float *__restrict__ ov, bool index_order,
                                                    unsigned int *__restrict__ keys, int cap) {
    __shared__ unsigned int warp_hist[DSK_TOPK_SMEM_WARPS][256];
    __shared__ int warp_sum[DSK_TOPK_SMEM_WARPS], warp_sum_eq[DSK_TOPK_SMEM_WARPS];
    __shared__ unsigned int found_prefix, found_mask;
    __shared__ int found_rem, found_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kk = min(k, n);
    if (kk <= 0) return;
    const bool resident = n <= cap;
    // Keys of a resident list: thread tid writes positions tid + 256 j, the positions it reads in
    // the first pass, so that pass needs no barrier after the load.
    if (resident) {
        for (int i0 = 0; i0 < n; i0 += DSK_TOPK_SMEM_THREADS * DSK_TOPK_UNROLL) {
            float x[DSK_TOPK_UNROLL];
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                const int i = i0 + u * DSK_TOPK_SMEM_THREADS + tid;
                x[u] = i < n ? src.value(i) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                const int i = i0 + u * DSK_TOPK_SMEM_THREADS + tid;
                if (i < n) keys[i] = dsk_f32_order_key(x[u]);
            }
        }
    }
    // Position i's key (i < n): from the buffer, or from the list where it did not fit.
    auto key_at = [&](int i) { return resident ? keys[i] : dsk_f32_order_key(src.value(i)); };
    unsigned int prefix = 0u, mask = 0u;
    int rem = kk;  // the k-th key is the rem-th largest of those inside the prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
        // A warp clears and fills only its own histogram; the last pass's readers of it finished
        // before that pass's second barrier.
        for (int b = lane; b < 256; b += 32) warp_hist[warp][b] = 0u;
        __syncwarp();
        for (int i0 = 0; i0 < n; i0 += DSK_TOPK_SMEM_THREADS * DSK_TOPK_UNROLL) {
            unsigned int key[DSK_TOPK_UNROLL];
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                const int i = i0 + u * DSK_TOPK_SMEM_THREADS + tid;
                key[u] = i < n ? key_at(i) : 0u;
            }
#pragma unroll
            for (int u = 0; u < DSK_TOPK_UNROLL; ++u) {
                if (i0 + u * DSK_TOPK_SMEM_THREADS >= n) break;  // block-uniform
                const int i = i0 + u * DSK_TOPK_SMEM_THREADS + tid;
                const bool in = i < n && (key[u] & mask) == prefix;
                // Past the first pass most warps hold no key inside the prefix.
                if (__ballot_sync(0xffffffffu, in) == 0u) continue;
                const unsigned int bin = in ? (key[u] >> shift) & 255u : 256u;
                const unsigned int peers = __match_any_sync(0xffffffffu, bin);
                if (in && lane == __ffs(peers) - 1) warp_hist[warp][bin] += __popc(peers);
            }
        }
        __syncthreads();
        // Thread t owns bin 255 - t: an inclusive scan over the threads counts the keys in that
        // bin and above, and the thread whose span holds the rem-th names the next prefix.
        const unsigned int bin = 255u - (unsigned int)tid;
        int count = 0;
#pragma unroll
        for (int w = 0; w < DSK_TOPK_SMEM_WARPS; ++w) count += (int)warp_hist[w][bin];
        int incl = count;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) warp_sum[warp] = incl;
        __syncthreads();
        for (int w = 0; w < warp; ++w) incl += warp_sum[w];
        const int excl = incl - count;
        if (excl < rem && rem <= incl) {
            found_prefix = prefix | (bin << shift);
            found_mask = mask | (255u << shift);
            found_rem = rem - excl;
            found_last = count == 1;
        }
        __syncthreads();
        prefix = found_prefix;
        mask = found_mask;
        rem = found_rem;
        if (found_last) break;  // block-uniform; the bin's one key is the k-th
    }
    // The k-th key is the one key matching `prefix` under `mask` (all 32 bits once four passes
    // ran); rows compare by their masked keys.
    const int ties = rem;         // rows equal to the k-th value that are taken
    const int above = kk - ties;  // rows strictly above it
    const int span = (n + DSK_TOPK_SMEM_THREADS - 1) / DSK_TOPK_SMEM_THREADS * 32;
    const int lo = min(n, warp * span), hi = min(n, lo + span);
    int count_gt = 0, count_eq = 0;
    for (int i0 = lo; i0 < hi; i0 += 32) {
        const int i = i0 + lane;
        const unsigned int key = i < hi ? key_at(i) : 0u;
        const unsigned int mk = key & mask;
        count_gt += __popc(__ballot_sync(0xffffffffu, i < hi && mk > prefix));
        count_eq += __popc(__ballot_sync(0xffffffffu, i < hi && mk == prefix));
    }
    if (lane == 0) {
        warp_sum[warp] = count_gt;
        warp_sum_eq[warp] = count_eq;
    }
    __syncthreads();
    int base_gt = 0, base_eq = 0;
    for (int w = 0; w < warp; ++w) {
        base_gt += warp_sum[w];
        base_eq += warp_sum_eq[w];
    }
    const unsigned int below = (1u << lane) - 1u;
    for (int i0 = lo; i0 < hi; i0 += 32) {
        const int i = i0 + lane;
        const unsigned int key = i < hi ? key_at(i) : 0u;
        const unsigned int mk = key & mask;
        const bool gt = i < hi && mk > prefix, eq = i < hi && mk == prefix;
        const unsigned int bg = __ballot_sync(0xffffffffu, gt);
        const unsigned int be = __ballot_sync(0xffffffffu, eq);
        const int gt_before = base_gt + __popc(bg & below);
        const int eq_before = base_eq + __popc(be & below);
        if (gt) {
            const int at = index_order ? gt_before + min(eq_before, ties) : gt_before;
            oi[at] = src.index(i);
            ov[at] = dsk_f32_of_order_key(key);
        }
        if (eq && eq_before < ties) {
            const int at = (index_order ? gt_before : above) + eq_before;
            oi[at] = src.index(i);
            ov[at] = dsk_f32_of_order_key(key);
        }
        base_gt += __popc(bg);
        base_eq += __popc(be);
    }
}

// dsk_topk_select_f32's select, one 256-thread block per token with `cap` keys of dynamic shared
// memory (dsk_topk_block_smem): the same rows in the same order.
extern "C" __global__ void __launch_bounds__(DSK_TOPK_SMEM_THREADS) dsk_topk_select_smem_f32(
    const float *__restrict__ scores, const long long *__restrict__ starts,
    const int *__restrict__ counts, int k, int *__restrict__ out_idx,
    float *__restrict__ out_val, const int *__restrict__ index_base, int index_order, int cap) {
    DSK_TOPK_DYN_KEYS(dsk_topk_keys);
    dsk_pdl_entry();
    const int t = blockIdx.x;
    const DskTopkList src{scores + starts[t], nullptr, index_base ? index_base[t] : 0};
    dsk_topk_block_smem(src, counts[t], k, out_idx + (long long)t * k, out_val + (long long)t * k,
                        index_order != 0, dsk_topk_keys, cap);
}

// dsk_topk_merge_ranks_f32's merge, one 256-thread block per token (dsk_topk_block_smem).
extern "C" __global__ void __launch_bounds__(DSK_TOPK_SMEM_THREADS) dsk_topk_merge_ranks_smem_f32(
    const float *__restrict__ gathered, const int *__restrict__ counts, const int *__restrict__ per,
    long long stride, int tokens, int k, int *__restrict__ out_idx, float *__restrict__ out_val,
    int cap) {
    DSK_TOPK_DYN_KEYS(dsk_topk_keys);
    dsk_pdl_entry();
    const int t = blockIdx.x;
    const long long ts = (long long)tokens * stride;
    const DskTopkRanks src{gathered, 2 * ts, ts, (long long)t * stride, max(per[t], 1)};
    dsk_topk_block_smem(src, counts[t], k, out_idx + (long long)t * k, out_val + (long long)t * k, false,
                        dsk_topk_keys, cap);
}
