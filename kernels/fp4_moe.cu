// FP4 (e2m1) routed experts for decode: only the experts each token selected are touched; and,
// at the end of the file, the grouped GEMMs of prefill chunks (dsk_fp4_grouped_*).
//
// Weights (the checkpoint's layout): W [E, rows, K/2] bytes, element 2j in the LOW nibble of byte j;
// S [E, rows, K/32] E8M0 bytes, one per 32 values along K. A 16-byte chunk is exactly 32 values,
// so one scale covers one chunk.
//
// Three launches (p = t * topk + j is a (token, slot) pair, e_p = ids[p]):
//   dsk_fp4_moe_gate_up: h[p, i] = silu(min(g, limit)) * clamp(u, -limit, limit),
//                        g = W1[e_p][i, :] . x[t], u = W3[e_p][i, :] . x[t]
//   dsk_fp4_moe_down:    y[p, n] = weight[p] * (W2[e_p][n, :] . h[p, :])
//   dsk_fp4_moe_combine: out[t, n] = sum_j y[t * topk + j, n]   (fixed order: deterministic)
// x, h, y, weights f32; out f32 or bf16. Expert ids outside [0, E) contribute 0 and are never read.
//
// Work split: grid = (pair, tile of MOE_ROWS rows). The block first copies the pair's activation
// row (x[t] or h[p]) into shared memory, padded by 4 floats every 32 so that lanes reading
// consecutive 32-value chunks hit distinct banks; then each warp streams MOE_RW rows (gate_up:
// MOE_RW rows of W1 and of W3), every lane one 16-byte chunk per row per step, reusing the 32
// activations it holds in registers for all of them. Pairs are the grid's fastest axis, so tokens
// that chose the same expert read its rows at about the same time (served by L2).
//
// Two generations of the CUDA-core kernels share that structure (MoePath::CudaCore is v2,
// MoePath::CudaCoreV1 the first; DSPARK_FP4_KERNEL=v1 makes Auto pick v1 for an A/B): v2 decodes
// the same f16x2 pairs with fewer integer instructions (fp4_word_pairs) and builds the block
// scale without branches (fp4_scale_v2). Products and summation order are the same, so v2's
// results are bit-identical to v1's (kernels/tools/fp4_moe_emu.cpp checks it on the CPU).


#define MOE_WARPS 8
#define MOE_RW 4
#define MOE_ROWS (MOE_WARPS * MOE_RW)

// Padded shared-memory index of activation j.
__device__ __forceinline__ int moe_pad(int j) { return j + ((j >> 5) << 2); }

__device__ __forceinline__ void moe_stage(float *sm, const float *__restrict__ src, int K) {
    const float4 *s4 = reinterpret_cast<const float4 *>(src);
    for (int v = threadIdx.x; v < (K >> 2); v += blockDim.x)
        *reinterpret_cast<float4 *>(sm + moe_pad(v << 2)) = __ldg(s4 + v);
    __syncthreads();
}

// The 32 activations of chunk c into registers (8 conflict-free 16-byte shared loads).
__device__ __forceinline__ void moe_load_x(const float *sm, int c, float (&xs)[32]) {
    const float4 *p = reinterpret_cast<const float4 *>(sm + c * 36);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const float4 v = p[q];
        xs[4 * q] = v.x; xs[4 * q + 1] = v.y; xs[4 * q + 2] = v.z; xs[4 * q + 3] = v.w;
    }
}

// Dot of one 16-byte FP4 chunk with its 32 activations, times 2^-14 (see common.cuh).
// Word q holds elements 8q..8q+7, nibble p = element 8q+p; nibbles (p, p+4) become one f16x2:
// the magnitude bits are shifted to bits 9-11 / 25-27 and the sign to bits 15 / 31.
__device__ __forceinline__ float fp4_chunk_dot(uint4 w, const float (&xs)[32]) {
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const unsigned int v = words[q];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const unsigned int mag = (p < 3 ? (v << (9 - 4 * p)) : (v >> 3)) & 0x0E000E00u;
            const unsigned int sgn = (p < 3 ? (v << (12 - 4 * p)) : v) & 0x80008000u;
            float lo, hi;
            dsk_f16x2_to_f32(mag | sgn, lo, hi);
            acc = fmaf(lo, xs[8 * q + p], acc);
            acc = fmaf(hi, xs[8 * q + p + 4], acc);
        }
    }
    return acc;
}

// 2^(s-127) * 2^14: the block scale with the decoder's 2^-14 folded back in.
__device__ __forceinline__ float fp4_scale(unsigned int s) { return dsk_e8m0_to_f32(s) * 16384.0f; }

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_gate_up(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *sm = reinterpret_cast<float *>(moe_smem4);
    const int p = blockIdx.x, t = p / topk;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i0 = blockIdx.y * MOE_ROWS + warp * MOE_RW;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (lane < MOE_RW && i0 + lane < I) h[(long)p * I + i0 + lane] = 0.f;
        return;
    }
    moe_stage(sm, x + (long)t * K, K);
    const int C = K >> 5;
    const unsigned char *w1[MOE_RW], *w3[MOE_RW], *s1[MOE_RW], *s3[MOE_RW];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) {
        const long row = (long)e * I + min(i0 + r, I - 1);
        w1[r] = W1 + row * (K >> 1); w3[r] = W3 + row * (K >> 1);
        s1[r] = S1 + row * C; s3[r] = S3 + row * C;
    }
    float g[MOE_RW], u[MOE_RW];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) { g[r] = 0.f; u[r] = 0.f; }
    for (int c = lane; c < C; c += 32) {
        uint4 a[MOE_RW], b[MOE_RW];
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) { a[r] = dsk_ld_stream16(w1[r] + c * 16); b[r] = dsk_ld_stream16(w3[r] + c * 16); }
        float xs[32];
        moe_load_x(sm, c, xs);
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) {
            g[r] = fmaf(fp4_scale(s1[r][c]), fp4_chunk_dot(a[r], xs), g[r]);
            u[r] = fmaf(fp4_scale(s3[r][c]), fp4_chunk_dot(b[r], xs), u[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) {
        const float gs = fminf(dsk_warp_sum(g[r]), limit);
        const float us = fminf(fmaxf(dsk_warp_sum(u[r]), -limit), limit);
        if (lane == r && i0 + r < I) h[(long)p * I + i0 + r] = gs / (1.f + expf(-gs)) * us;
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_down(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *sm = reinterpret_cast<float *>(moe_smem4);
    const int p = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = blockIdx.y * MOE_ROWS + warp * MOE_RW;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (lane < MOE_RW && n0 + lane < N) y[(long)p * N + n0 + lane] = 0.f;
        return;
    }
    moe_stage(sm, h + (long)p * I, I);
    const int C = I >> 5;
    const unsigned char *w2[MOE_RW], *s2[MOE_RW];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) {
        const long row = (long)e * N + min(n0 + r, N - 1);
        w2[r] = W2 + row * (I >> 1);
        s2[r] = S2 + row * C;
    }
    float acc[MOE_RW];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) acc[r] = 0.f;
#pragma unroll 2
    for (int c = lane; c < C; c += 32) {
        uint4 a[MOE_RW];
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) a[r] = dsk_ld_stream16(w2[r] + c * 16);
        float xs[32];
        moe_load_x(sm, c, xs);
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) acc[r] = fmaf(fp4_scale(s2[r][c]), fp4_chunk_dot(a[r], xs), acc[r]);
    }
    const float wt = weights[p];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) {
        const float v = dsk_warp_sum(acc[r]);
        if (lane == r && n0 + r < N) y[(long)p * N + n0 + r] = wt * v;
    }
}

// a's bits 1-3 of each byte, b's others: (a & m) | (b & ~m) as one LOP3. Written in C, the
// compiler splits it in two where it can prove bits of b zero (v << 4).
__device__ __forceinline__ unsigned int fp4_bitselect(unsigned int a, unsigned int b) {
    const unsigned int m = 0x0E0E0E0Eu;
#ifdef __CUDA_ARCH__
    unsigned int r;
    asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "r"(m));
    return r;
#else
    return (a & m) | (b & ~m); // CPU emulation (kernels/tools/fp4_moe_emu.cpp)
#endif
}

// v2 decode: the four f16x2 pairs (p, p+4), p = 0..3, of word v, bit for bit those of
// fp4_chunk_dot (magnitude at bits 9-11 / 25-27, sign at 15 / 31), in 11 integer instructions
// instead of ~15. Bytes of `od` hold the odd nibbles, bytes of `ev` the even ones, each as
// magnitude at bits 1-3 and sign at bit 7 (one LOP3 bit-select of two shifted copies of v; the
// other bits are junk). Bytes 1 and 3 are then already under the f16 high bytes (one AND with
// the pair mask); bytes 0 and 2 get there with a shift by 8.
__device__ __forceinline__ void fp4_word_pairs(unsigned int v, unsigned int (&h)[4]) {
    const unsigned int pair = 0x8E008E00u;
    const unsigned int od = fp4_bitselect(v >> 3, v);
    const unsigned int ev = fp4_bitselect(v << 1, v << 4);
    h[0] = (ev << 8) & pair; // nibbles 0, 4
    h[1] = (od << 8) & pair; // nibbles 1, 5
    h[2] = ev & pair;        // nibbles 2, 6
    h[3] = od & pair;        // nibbles 3, 7
}

// fp4_chunk_dot with the v2 decode: same products, same order, same result.
__device__ __forceinline__ float fp4_chunk_dot_v2(uint4 w, const float (&xs)[32]) {
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        unsigned int h[4];
        fp4_word_pairs(words[q], h);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            float lo, hi;
            dsk_f16x2_to_f32(h[p], lo, hi);
            acc = fmaf(lo, xs[8 * q + p], acc);
            acc = fmaf(hi, xs[8 * q + p + 4], acc);
        }
    }
    return acc;
}

// fp4_scale without branches (it fills the v2 kernels' per-block table of all 256 codes):
// 2^(s-127) * 2^14 is the f32 with exponent field s + 14 (s = 0 included: 2^-113 is normal);
// s in 241..254 saturates to inf as the product does, and the NaN code 255 sets the quiet bit.
__device__ __forceinline__ float fp4_scale_v2(unsigned int s) {
    return __uint_as_float((min(s + 14u, 255u) << 23) | (s == 255u ? 0x00400000u : 0u));
}

// ---------------------------------------------------------------------------------------------
// v2 CUDA-core kernels: v1's work split, products and summation order (so bit-identical
// results), with fewer instructions per weight byte and less exposed latency:
//   - fp4_word_pairs: 11 integer instructions per 8 nibbles instead of ~15;
//   - the block scale from a 256-entry table in shared memory (one LDS instead of the branches);
//   - the four rows' warp sums in 6 shuffles instead of 20 (moe_warp_sum4, same bits);
//   - the first chunks of every row (and their scales) are loaded before the activation row is
//     staged, so the block's two memory latencies overlap, and the staging keeps four loads in
//     flight per thread; down also loads the next chunks before computing the current ones
//     (gate/up holds twice the rows: prefetching would cost registers and occupancy).
// Dynamic shared memory: the scale table (256 floats), then the padded activation row
// (launch.rs: fp4_moe_v2_smem_bytes). Rows are never clamped: hidden and inter are multiples of
// 32 = MOE_ROWS (check_fp4_moe), so every tile is whole.

__device__ __forceinline__ void fp4_fill_scale_table(float *lut) {
    for (int s = threadIdx.x; s < 256; s += blockDim.x) lut[s] = fp4_scale_v2(s);
}

// The warp sums of a lane's four row partials, each exactly as dsk_warp_sum computes it (the
// same pairs added at every step, so the same bits) in 6 shuffles instead of 20: at the first two
// steps each lane hands its partner the rows it gives up. Row r ends in lanes (lane >> 3) == r.
static_assert(MOE_RW == 4, "moe_warp_sum4 reduces four rows per warp");
__device__ __forceinline__ float moe_warp_sum4(const float (&v)[4]) {
    const int lane = threadIdx.x & 31;
    const bool b4 = lane & 16, b3 = lane & 8;
    const float r0 = (b4 ? v[2] : v[0]) + __shfl_xor_sync(0xffffffffu, b4 ? v[0] : v[2], 16);
    const float r1 = (b4 ? v[3] : v[1]) + __shfl_xor_sync(0xffffffffu, b4 ? v[1] : v[3], 16);
    float k = (b3 ? r1 : r0) + __shfl_xor_sync(0xffffffffu, b3 ? r0 : r1, 8);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) k += __shfl_xor_sync(0xffffffffu, k, o);
    return k;
}

// moe_stage with up to four 16-byte loads in flight per thread before their stores (moe_stage
// waits out each load before the next: 4 round trips at K = 4096).
__device__ __forceinline__ void moe_stage_v2(float *sm, const float *__restrict__ src, int K) {
    const float4 *s4 = reinterpret_cast<const float4 *>(src);
    const int n = K >> 2, step = MOE_WARPS * 32;
    for (int v = threadIdx.x; v < n; v += 4 * step) {
        float4 t[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (v + j * step < n) t[j] = __ldg(s4 + v + j * step);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (v + j * step < n) *reinterpret_cast<float4 *>(sm + moe_pad((v + j * step) << 2)) = t[j];
    }
    __syncthreads();
}

// The warp sums of a lane's two row partials, each with dsk_warp_sum's bits (its first step
// swaps the row a lane gives up, as moe_warp_sum4): row r ends in lanes (lane >> 4) == r.
__device__ __forceinline__ float moe_warp_sum2(const float (&v)[2]) {
    const bool b4 = threadIdx.x & 16;
    float k = (b4 ? v[1] : v[0]) + __shfl_xor_sync(0xffffffffu, b4 ? v[0] : v[1], 16);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) k += __shfl_xor_sync(0xffffffffu, k, o);
    return k;
}

// A lane's RW row partials summed over the warp; row r ends in lanes lane / (32 / RW) == r.
template <int RW> __device__ __forceinline__ float moe_warp_sum_rows(const float (&v)[RW]);
template <> __device__ __forceinline__ float moe_warp_sum_rows<4>(const float (&v)[4]) {
    return moe_warp_sum4(v);
}
template <> __device__ __forceinline__ float moe_warp_sum_rows<2>(const float (&v)[2]) {
    return moe_warp_sum2(v);
}

// v2 gate/up with RW rows a warp (a block MOE_WARPS * RW rows). RW = 4 is the kernel the file
// describes; RW = 2 gives a call of few pairs twice the blocks (one token's 6 x 1,024 rows: 384
// blocks where RW = 4 gives 192, so every SM holds two or three instead of one or two) with
// fewer registers each. Each row's chunk sums, their order and the warp sums are RW = 4's, so
// the results are bit-identical.
template <int RW>
__device__ __forceinline__ void fp4_gate_up_v2_rows(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *lut = reinterpret_cast<float *>(moe_smem4), *sm = lut + 256;
    const int p = blockIdx.x, t = p / topk;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i0 = blockIdx.y * (MOE_WARPS * RW) + warp * RW;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (lane < RW) h[(long)p * I + i0 + lane] = 0.f;
        return;
    }
    const int C = K >> 5;
    const long row0 = (long)e * I + i0;
    const unsigned char *w1 = W1 + row0 * (K >> 1), *w3 = W3 + row0 * (K >> 1);
    const unsigned char *s1 = S1 + row0 * C, *s3 = S3 + row0 * C;
    uint4 a[RW], b[RW];
    unsigned int sa[RW], sb[RW];
    int c = lane;
    if (c < C) {
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            a[r] = dsk_ld_stream16(w1 + (long)r * (K >> 1) + c * 16);
            b[r] = dsk_ld_stream16(w3 + (long)r * (K >> 1) + c * 16);
            sa[r] = s1[r * C + c];
            sb[r] = s3[r * C + c];
        }
    }
    fp4_fill_scale_table(lut);
    moe_stage_v2(sm, x + (long)t * K, K);
    float g[RW], u[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) { g[r] = 0.f; u[r] = 0.f; }
    for (; c < C; c += 32) {
        float xs[32];
        moe_load_x(sm, c, xs);
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            g[r] = fmaf(lut[sa[r]], fp4_chunk_dot_v2(a[r], xs), g[r]);
            u[r] = fmaf(lut[sb[r]], fp4_chunk_dot_v2(b[r], xs), u[r]);
        }
        const int cn = c + 32;
        if (cn < C) {
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                a[r] = dsk_ld_stream16(w1 + (long)r * (K >> 1) + cn * 16);
                b[r] = dsk_ld_stream16(w3 + (long)r * (K >> 1) + cn * 16);
                sa[r] = s1[r * C + cn];
                sb[r] = s3[r * C + cn];
            }
        }
    }
    const float gw = moe_warp_sum_rows<RW>(g), uw = moe_warp_sum_rows<RW>(u);
    if ((lane & (32 / RW - 1)) == 0) {
        const float gs = fminf(gw, limit), us = fminf(fmaxf(uw, -limit), limit);
        h[(long)p * I + i0 + lane / (32 / RW)] = gs / (1.f + expf(-gs)) * us;
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_gate_up_v2(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    fp4_gate_up_v2_rows<MOE_RW>(x, ids, W1, S1, W3, S3, h, topk, E, I, K, limit);
}

// Two rows a warp (16 a block); at most 80 registers, so three blocks an SM.
extern "C" __global__ void __launch_bounds__(256, 3) dsk_fp4_moe_gate_up_v2_r2(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    fp4_gate_up_v2_rows<2>(x, ids, W1, S1, W3, S3, h, topk, E, I, K, limit);
}

// v2 down; PREFETCH loads a lane's next chunks before computing the current ones. Without it
// (inter <= 1,024: every lane has one chunk a row, so nothing is ever prefetched, but the
// registers for it cost the kernel its third block an SM) the code is otherwise the same, so
// the same bits.
template <bool PREFETCH>
__device__ __forceinline__ void fp4_down_v2_rows(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *lut = reinterpret_cast<float *>(moe_smem4), *sm = lut + 256;
    const int p = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = blockIdx.y * MOE_ROWS + warp * MOE_RW;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (lane < MOE_RW) y[(long)p * N + n0 + lane] = 0.f;
        return;
    }
    const int C = I >> 5;
    const long row0 = (long)e * N + n0;
    const unsigned char *w2 = W2 + row0 * (I >> 1), *s2 = S2 + row0 * C;
    uint4 a[MOE_RW];
    unsigned int sa[MOE_RW];
    int c = lane;
    if (c < C) {
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) {
            a[r] = dsk_ld_stream16(w2 + (long)r * (I >> 1) + c * 16);
            sa[r] = s2[r * C + c];
        }
    }
    fp4_fill_scale_table(lut);
    moe_stage_v2(sm, h + (long)p * I, I);
    float acc[MOE_RW];
#pragma unroll
    for (int r = 0; r < MOE_RW; ++r) acc[r] = 0.f;
    for (; c < C; c += 32) {
        const int cn = c + 32;
        // With PREFETCH the next chunks go out before this one is computed; without, after.
        uint4 an[MOE_RW];
        unsigned int sn[MOE_RW];
        if (PREFETCH && cn < C) {
#pragma unroll
            for (int r = 0; r < MOE_RW; ++r) {
                an[r] = dsk_ld_stream16(w2 + (long)r * (I >> 1) + cn * 16);
                sn[r] = s2[r * C + cn];
            }
        }
        float xs[32];
        moe_load_x(sm, c, xs);
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) acc[r] = fmaf(lut[sa[r]], fp4_chunk_dot_v2(a[r], xs), acc[r]);
        if (!PREFETCH && cn < C) {
#pragma unroll
            for (int r = 0; r < MOE_RW; ++r) {
                an[r] = dsk_ld_stream16(w2 + (long)r * (I >> 1) + cn * 16);
                sn[r] = s2[r * C + cn];
            }
        }
#pragma unroll
        for (int r = 0; r < MOE_RW; ++r) { a[r] = an[r]; sa[r] = sn[r]; }
    }
    const float v = moe_warp_sum4(acc);
    if ((lane & 7) == 0) y[(long)p * N + n0 + (lane >> 3)] = weights[p] * v;
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_down_v2(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    fp4_down_v2_rows<true>(h, ids, weights, W2, S2, y, E, N, I);
}

// Without the prefetch registers: at most 80 a thread, three blocks an SM.
extern "C" __global__ void __launch_bounds__(256, 3) dsk_fp4_moe_down_v2_once(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    fp4_down_v2_rows<false>(h, ids, weights, W2, S2, y, E, N, I);
}

// out[t, n] = sum over the token's slots, in slot order, then + addend[t, n] where an addend is
// given (the shared expert's output: the add it replaces summed the same two f32 values). One
// thread per output element.
extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_combine(
    const float *__restrict__ y, void *__restrict__ out, int out_bf16, int T, int topk, int N,
    const float *__restrict__ addend) {
    dsk_pdl_entry();
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * N) return;
    const long t = idx / N, n = idx % N;
    float acc = 0.f;
    for (int j = 0; j < topk; ++j) acc += y[(t * topk + j) * N + n];
    if (addend) acc += addend[idx];
    if (out_bf16) reinterpret_cast<unsigned short *>(out)[idx] = dsk_f32_to_bf16(acc);
    else reinterpret_cast<float *>(out)[idx] = acc;
}

// ---------------------------------------------------------------------------------------------
// mma2: tensor-core kernels organised for streaming (MoePath::TensorCoreV2; DSPARK_FP4_KERNEL=mma2
// makes Auto pick them). Same arguments, outputs and requirements as the old tensor-core kernels
// further down (hidden and inter multiples of 256, activations below 65504 in magnitude, the
// host falls back to v2 otherwise; scale pointers 8-byte aligned), the same mma (m16n8k16 f16,
// f32 accumulate; B column 0 = f16(x), column 1 = f16(x - f16(x)), columns 2..7 zero) and the
// same K permutation inside a 32-value chunk (lane (g, t) feeds word t of the chunk of rows g and
// g + 8; its nibble pairs (p, p + 4) are its A slots), so each chunk's E8M0 scale is applied to
// the f32 partial of its two mmas. What differs is the organisation:
//   - the block converts its activation row ONCE into ready-made B fragments in shared memory
//     (per chunk and lane t: uint4 of the four f16x2 pairs, hi for column 0, residual for
//     column 1; lanes of columns 2..7 read the chunk's zero uint4, so every lane's address
//     moves by the same 144 bytes per chunk: an immediate offset), a chunk's B is one LDS.128;
//   - each warp owns one 16-row tile over the whole K (gate/up: the W1 and W3 tiles of the same
//     rows, sharing B): no K split, no shared-memory reduction;
//   - weights stream with 16-byte cp.async into a per-warp ring of MMA2_NST stages of
//     MMA2_CPS chunks (128 bytes of each of the 16 rows, and their 8 scale bytes per row), so
//     MMA2_NST - 1 stages are in flight while one is computed; the first stages are issued before
//     the activation row is staged, overlapping both latencies (8 chunks per stage rather than 4:
//     the per-stage issue and wait code was ~30 % of the loop's instructions);
//   - ldmatrix.x4 turns two chunks of the tile into exactly the words lane (g, t) needs (word t
//     of rows g and g + 8; rows swizzled over the 16-byte slots, so conflict-free), decoded by
//     fp4_word_pairs (11 integer instructions per 8 nibbles) straight into A fragments;
//   - the block scale from the 256-entry table (fp4_scale_v2), one FMA per chunk and row.
// Per row the sum runs over the chunks in order (acc = fma(scale_c, hi_c + lo_c, acc)):
// deterministic. Rows: 16 per warp, MMA2_WARPS tiles per block (a last block's missing tiles
// idle). Dynamic shared memory (launch.rs: fp4_moe_mma2_smem_bytes): scale table (1 KB), B
// fragments (K / 32 * 144 B), then per warp and matrix MMA2_NST stages of 16 x 128 weight
// bytes + 16 x 8 scale bytes (gate/up at K = 4096: 70 KB, 3 blocks per SM).
// Needs K % 256 == 0 (whole stages), rows % 16 == 0 and scale pointers 8-byte aligned.

#define MMA2_WARPS 4
#define MMA2_CPS 8
#define MMA2_NST 3
#define MMA2_STAGE_W (16 * MMA2_CPS * 16)
#define MMA2_STAGE (MMA2_STAGE_W + 16 * MMA2_CPS)

// PTX wrappers; the CPU emulation (kernels/tools/fp4_moe_mma2_emu.cpp) defines the emu_ ones.
__device__ __forceinline__ void mma2_cp16(void *dst, const void *src) {
#ifdef __CUDA_ARCH__
    const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
    emu_cp_async(dst, src, 16);
#endif
}
__device__ __forceinline__ void mma2_cp8(void *dst, const void *src) {
#ifdef __CUDA_ARCH__
    const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(d), "l"(src) : "memory");
#else
    emu_cp_async(dst, src, 8);
#endif
}
__device__ __forceinline__ void mma2_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    emu_cp_commit();
#endif
}
// Waits until at most PENDING (by default MMA2_NST - 2: the ring's) of this thread's groups are pending.
template <int PENDING = MMA2_NST - 2> __device__ __forceinline__ void mma2_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#else
    emu_cp_wait(PENDING);
#endif
}
// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j, r[j] = word
// (lane % 4) of row lane / 4 of matrix j.
__device__ __forceinline__ void mma2_ldsm4(const void *p, unsigned int (&r)[4]) {
#ifdef __CUDA_ARCH__
    const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#else
    emu_ldsm4(p, r);
#endif
}
// d = A B + c (m16n8k16, f16 in, f32 accumulate).
__device__ __forceinline__ void mma2_mma(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2,
                                         unsigned int a3, unsigned int b0, unsigned int b1, float c0, float c1,
                                         float c2, float c3) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c0), "f"(c1), "f"(c2), "f"(c3));
#else
    emu_mma_f16(d, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
#endif
}
// (lo, hi) rounded to nearest f16 as one f16x2 (lo in the low half).
__device__ __forceinline__ unsigned int mma2_pack(float lo, float hi) {
#ifdef __CUDA_ARCH__
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return emu_f32_to_f16(lo) | (emu_f32_to_f16(hi) << 16);
#endif
}

// The block's activation row as B fragments, MMA2_BQ uint4 per chunk: for chunk c and lane t,
// b[c * 9 + t] holds the f16x2 pairs (x[32c + 8t + p], x[32c + 8t + p + 4]), p = 0..3, rounded;
// b[c * 9 + 4 + t] the rounding residuals; b[c * 9 + 8] = 0. Each thread loads MMA2_STAGE_U of
// its 8-value groups before converting any (one round trip to L2 for K = 4096 at 128 threads
// where a load-convert loop took four). Ends with __syncthreads (also publishing the scale
// table).
#define MMA2_BQ 9
#define MMA2_STAGE_U 4
__device__ __forceinline__ void mma2_stage_b(uint4 *b, const float *__restrict__ src, int K) {
    const int n = (K >> 5) * 4, step = blockDim.x;
    for (int v0 = threadIdx.x; v0 < n; v0 += MMA2_STAGE_U * step) {
        float4 r[MMA2_STAGE_U][2];
#pragma unroll
        for (int u = 0; u < MMA2_STAGE_U; ++u) {
            const int v = v0 + u * step;
            if (v < n) {
                const float4 *q = reinterpret_cast<const float4 *>(src) + 2 * v;
                r[u][0] = __ldg(q);
                r[u][1] = __ldg(q + 1);
            }
        }
#pragma unroll
        for (int u = 0; u < MMA2_STAGE_U; ++u) {
            const int v = v0 + u * step;
            if (v >= n) break;
            const float4 v0v = r[u][0], v1v = r[u][1];
            const float e[8] = {v0v.x, v0v.y, v0v.z, v0v.w, v1v.x, v1v.y, v1v.z, v1v.w};
            unsigned int hi[4], lo[4];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                hi[p] = mma2_pack(e[p], e[p + 4]);
                float rl, rh;
                dsk_f16x2_to_f32(hi[p], rl, rh);
                lo[p] = mma2_pack(e[p] - rl, e[p + 4] - rh);
            }
            const int c = v >> 2, t = v & 3;
            b[c * MMA2_BQ + t] = uint4{hi[0], hi[1], hi[2], hi[3]};
            b[c * MMA2_BQ + 4 + t] = uint4{lo[0], lo[1], lo[2], lo[3]};
            if (t == 0) b[c * MMA2_BQ + 8] = uint4{0u, 0u, 0u, 0u};
        }
    }
    __syncthreads();
}

// One matrix's tile in flight: 16 rows from `w` (row stride K / 2 bytes), their scale rows `s`
// (stride C bytes), the warp's ring `ring` (MMA2_NST stages).
struct Mma2Tile {
    const unsigned char *w, *s;
    unsigned char *ring;
};

// A stage holds row r's chunk c (of 8) at 16-byte slot c ^ (r % 8) of its 128 bytes, so the 8
// rows of one ldmatrix phase (same chunk) hit 8 different bank groups.
static_assert(MMA2_CPS == 8, "the ring swizzle and the issue pattern assume 8 chunks per stage");
// Issues stage `st` (chunks st * MMA2_CPS ..) of a tile into ring slot `slot`: lane L copies
// chunk L % 8 of rows L / 8 + 4i, i = 0..3 (8 lanes read a row's 128 contiguous bytes), lanes
// 0..15 the 8 scale bytes of row L.
__device__ __forceinline__ void mma2_issue(const Mma2Tile &m, int st, int slot, int K, int lane) {
    const int r = lane >> 3, cc = lane & 7, C = K >> 5;
    unsigned char *dst = m.ring + slot * MMA2_STAGE;
    const unsigned char *src = m.w + (long)r * (K >> 1) + (st * MMA2_CPS + cc) * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = r + 4 * i;
        mma2_cp16(dst + row * 128 + ((cc ^ (row & 7)) << 4), src + 4L * i * (K >> 1));
    }
    if (lane < 16) mma2_cp8(dst + MMA2_STAGE_W + lane * 8, m.s + (long)lane * C + st * MMA2_CPS);
}

// One stage of one tile: for each of its MMA2_CPS chunks, two mmas and the scaled FMA into the
// lane's accumulators (rows g and g + 8; meaningful in lanes t == 0: columns 0 and 1).
// `bq` points at this lane's B uint4 of the stage's first chunk.
__device__ __forceinline__ void mma2_compute(const unsigned char *slot, const uint4 *bq, const float *lut, int lane,
                                             float &acc, float &acc8) {
    const int g = lane >> 2;
    const uint2 sg = *reinterpret_cast<const uint2 *>(slot + MMA2_STAGE_W + g * 8);
    const uint2 sg8 = *reinterpret_cast<const uint2 *>(slot + MMA2_STAGE_W + (g + 8) * 8);
    // ldmatrix row address: matrix j = lane / 8 is rows 8 (j & 1) .. + 7 of chunk j / 2 (+ cc).
    const int j = lane >> 3, r = (lane & 7) + 8 * (j & 1), swz = r & 7;
#pragma unroll
    for (int cc = 0; cc < MMA2_CPS; cc += 2) {
        unsigned int w[4];
        mma2_ldsm4(slot + r * 128 + (((cc + (j >> 1)) ^ swz) << 4), w);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = cc + h;
            const uint4 b = bq[c * MMA2_BQ];
            unsigned int ag[4], a8[4];
            fp4_word_pairs(w[2 * h], ag);
            fp4_word_pairs(w[2 * h + 1], a8);
            float d[4];
            mma2_mma(d, ag[0], a8[0], ag[1], a8[1], b.x, b.y, 0.f, 0.f, 0.f, 0.f);
            mma2_mma(d, ag[2], a8[2], ag[3], a8[3], b.z, b.w, d[0], d[1], d[2], d[3]);
            const unsigned int s0 = c < 4 ? sg.x : sg.y, s8 = c < 4 ? sg8.x : sg8.y;
            acc = fmaf(lut[(s0 >> (8 * (c & 3))) & 255u], d[0] + d[1], acc);
            acc8 = fmaf(lut[(s8 >> (8 * (c & 3))) & 255u], d[2] + d[3], acc8);
        }
    }
}

// The tile loop of NMAT matrices (gate/up: W1, W3) sharing B: prologue (stages 0..NST-2) is
// issued by the caller before staging B; here stage s waits for its group, the warp syncs (all
// lanes' copies visible, and all lanes done with the slot the next issue overwrites), the stage
// s + NST - 1 goes out, then stage s is computed.
// The ring slots are tracked by running offsets (no modulo by 3 per stage).
template <int NMAT>
__device__ __forceinline__ void mma2_tiles(const Mma2Tile (&m)[NMAT], const uint4 *bq, const float *lut, int K,
                                           int lane, float (&acc)[NMAT], float (&acc8)[NMAT]) {
    const int nst = (K >> 5) / MMA2_CPS;
    int rd = 0, wr = MMA2_NST - 1; // slots of stages s and s + MMA2_NST - 1
    for (int s = 0; s < nst; ++s) {
        mma2_wait();
        __syncwarp();
        const int sn = s + MMA2_NST - 1;
        if (sn < nst) {
#pragma unroll
            for (int i = 0; i < NMAT; ++i) mma2_issue(m[i], sn, wr, K, lane);
        }
        mma2_commit();
#pragma unroll
        for (int i = 0; i < NMAT; ++i)
            mma2_compute(m[i].ring + rd * MMA2_STAGE, bq + s * (MMA2_CPS * MMA2_BQ), lut, lane, acc[i], acc8[i]);
        rd = rd == MMA2_NST - 1 ? 0 : rd + 1;
        wr = wr == MMA2_NST - 1 ? 0 : wr + 1;
    }
}

template <int NMAT>
__device__ __forceinline__ void mma2_prologue(const Mma2Tile (&m)[NMAT], int K, int lane) {
    const int nst = (K >> 5) / MMA2_CPS;
#pragma unroll
    for (int s = 0; s < MMA2_NST - 1; ++s) {
        if (s < nst) {
#pragma unroll
            for (int i = 0; i < NMAT; ++i) mma2_issue(m[i], s, s, K, lane);
        }
        mma2_commit();
    }
}

// The B fragments of `src` rows staged once a row for the gate/up kernel's pre-staged form: row r's
// C * MMA2_BQ uint4 (mma2_stage_b's layout and bits) at dst + r * C * MMA2_BQ. In a gate/up launch
// each token's row feeds topk x I / 64 blocks (96 at V4-Flash's TP=2 shard), and staging it in
// every block took about a tenth of the kernel's warp samples under ncu at 16 tokens (session 36).
extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_stage_b_mma2(const float *__restrict__ src,
                                                                           uint4 *__restrict__ dst, int K) {
    dsk_pdl_entry();
    mma2_stage_b(dst + (long)blockIdx.x * (K >> 5) * MMA2_BQ, src + (long)blockIdx.x * K, K);
}

// Copies a row's staged fragments (dsk_fp4_moe_stage_b_mma2) into the block's B array by cp.async,
// every copy issued before any is waited for (one round trip to L2: a load-store loop took nine
// at K = 4,096, and made a 16-token step 0.9 ms slower than staging in the blocks, session 36).
// The wait takes the prologue's weight stages with it, which the tile loop needs next anyway.
// Ends with __syncthreads as mma2_stage_b does.
__device__ __forceinline__ void mma2_copy_b(uint4 *b, const uint4 *__restrict__ src, int K) {
    const int n = (K >> 5) * MMA2_BQ;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mma2_cp16(b + i, src + i);
    mma2_commit();
    mma2_wait<0>();
    __syncthreads();
}

// gate/up for pair p: h[p, rows] from W1 / W3 and token p / topk's B fragments, staged here from x
// (PRE false) or copied from xb, the fragments dsk_fp4_moe_stage_b_mma2 wrote (PRE true): the same
// fragments, so the same bits.
template <bool PRE>
__device__ __forceinline__ void mma2_gate_up_body(const float *__restrict__ x, const uint4 *__restrict__ xb,
                                                  const int *__restrict__ ids, const unsigned char *__restrict__ W1,
                                                  const unsigned char *__restrict__ S1,
                                                  const unsigned char *__restrict__ W3,
                                                  const unsigned char *__restrict__ S3, float *__restrict__ h,
                                                  int topk, int E, int I, int K, float limit) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *lut = reinterpret_cast<float *>(moe_smem4);
    uint4 *bfr = reinterpret_cast<uint4 *>(lut + 256);
    const int C = K >> 5;
    unsigned char *rings = reinterpret_cast<unsigned char *>(bfr + C * MMA2_BQ);
    const int p = blockIdx.x, t_tok = p / topk;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.y * MMA2_WARPS + warp) * 16;
    const bool live = row0 < I;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (live && lane < 16) h[(long)p * I + row0 + lane] = 0.f;
        return;
    }
    const long r0 = (long)e * I + row0;
    unsigned char *ring = rings + warp * (2 * MMA2_NST * MMA2_STAGE);
    const Mma2Tile m[2] = {{W1 + r0 * (K >> 1), S1 + r0 * C, ring},
                           {W3 + r0 * (K >> 1), S3 + r0 * C, ring + MMA2_NST * MMA2_STAGE}};
    if (live) mma2_prologue(m, K, lane);
    fp4_fill_scale_table(lut);
    if constexpr (PRE)
        mma2_copy_b(bfr, xb + (long)t_tok * C * MMA2_BQ, K);
    else
        mma2_stage_b(bfr, x + (long)t_tok * K, K);
    if (!live) return;
    const int g = lane >> 2, t = lane & 3;
    const uint4 *bq = bfr + (g < 2 ? g * 4 + t : 8);
    float acc[2] = {0.f, 0.f}, acc8[2] = {0.f, 0.f};
    mma2_tiles(m, bq, lut, K, lane, acc, acc8);
    if (t == 0) {
        float *hp = h + (long)p * I + row0 + g;
        float gs = fminf(acc[0], limit), us = fminf(fmaxf(acc[1], -limit), limit);
        hp[0] = gs / (1.f + expf(-gs)) * us;
        gs = fminf(acc8[0], limit), us = fminf(fmaxf(acc8[1], -limit), limit);
        hp[8] = gs / (1.f + expf(-gs)) * us;
    }
}

extern "C" __global__ void __launch_bounds__(MMA2_WARPS * 32) dsk_fp4_moe_gate_up_mma2(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    mma2_gate_up_body<false>(x, nullptr, ids, W1, S1, W3, S3, h, topk, E, I, K, limit);
}

// The pre-staged form: xb holds dsk_fp4_moe_stage_b_mma2's fragments of the tokens' rows.
extern "C" __global__ void __launch_bounds__(MMA2_WARPS * 32) dsk_fp4_moe_gate_up_mma2_pre(
    const uint4 *__restrict__ xb, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    mma2_gate_up_body<true>(nullptr, xb, ids, W1, S1, W3, S3, h, topk, E, I, K, limit);
}

extern "C" __global__ void __launch_bounds__(MMA2_WARPS * 32) dsk_fp4_moe_down_mma2(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    dsk_pdl_entry();
    extern __shared__ float4 moe_smem4[];
    float *lut = reinterpret_cast<float *>(moe_smem4);
    uint4 *bfr = reinterpret_cast<uint4 *>(lut + 256);
    const int C = I >> 5;
    unsigned char *rings = reinterpret_cast<unsigned char *>(bfr + C * MMA2_BQ);
    const int p = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.y * MMA2_WARPS + warp) * 16;
    const bool live = row0 < N;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (live && lane < 16) y[(long)p * N + row0 + lane] = 0.f;
        return;
    }
    const long r0 = (long)e * N + row0;
    const Mma2Tile m[1] = {{W2 + r0 * (I >> 1), S2 + r0 * C, rings + warp * (MMA2_NST * MMA2_STAGE)}};
    if (live) mma2_prologue(m, I, lane);
    fp4_fill_scale_table(lut);
    mma2_stage_b(bfr, h + (long)p * I, I);
    if (!live) return;
    const int g = lane >> 2, t = lane & 3;
    const uint4 *bq = bfr + (g < 2 ? g * 4 + t : 8);
    float acc[1] = {0.f}, acc8[1] = {0.f};
    mma2_tiles(m, bq, lut, I, lane, acc, acc8);
    if (t == 0) {
        const float wt = weights[p];
        float *yp = y + (long)p * N + row0 + g;
        yp[0] = wt * acc[0];
        yp[8] = wt * acc8[0];
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant (sm_80+ mma.sync m16n8k16, f16 in, f32 accumulate). Dequantising for the
// CUDA-core FMAs costs about as many instructions as the bytes allow; here the decoded f16 pairs
// feed the tensor core directly and the FMAs and f16->f32 conversions disappear.
//
// Tile: 16 weight rows (A) x 16 k per mma; B column 0 = x rounded to f16, column 1 = the f16 of
// the rounding residual (x - f16(x)), columns 2..7 = 0, so C[:,0] + C[:,1] is the dot with x to
// ~22 bits: accuracy stays at the f32 level. Thread (g = lane/4, t = lane%4) takes word t of each
// 16-byte chunk for rows g and g+8: its four nibble pairs (p, p+4) are exactly its A slots for the
// chunk's two mma steps (K order inside a chunk is permuted identically in A and B), so every mma
// stays inside one 32-value chunk and the chunk's E8M0 scale is applied to the f32 result.
// Activations must be below 65504 in magnitude (f16 range); hidden states after RMSNorm and
// clipped SwiGLU outputs are. The 8 warps of a block split K and reduce through shared memory.
// Needs K % 256 == 0 and rows % 16 == 0 (the host falls back to the CUDA-core kernels otherwise).

__device__ __forceinline__ unsigned int moe_pack_f16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// B fragments of chunk c for this lane: b[p] = (x[32c+8t+p], x[32c+8t+p+4]) as f16x2,
// the rounded value for g == 0, the residual for g == 1, zero otherwise.
__device__ __forceinline__ void moe_xfrag(const float *__restrict__ x, int c, int g, int t, unsigned int (&b)[4]) {
    if (g >= 2) { b[0] = b[1] = b[2] = b[3] = 0u; return; }
    const float4 *q = reinterpret_cast<const float4 *>(x + 32 * c + 8 * t);
    const float4 v0 = __ldg(q), v1 = __ldg(q + 1);
    const float e[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const unsigned int hi = moe_pack_f16x2(e[p], e[p + 4]);
        if (g == 0) {
            b[p] = hi;
        } else {
            float rl, rh;
            dsk_f16x2_to_f32(hi, rl, rh);
            b[p] = moe_pack_f16x2(e[p] - rl, e[p + 4] - rh);
        }
    }
}

// Nibble pair (p, p+4) of word v as f16x2 scaled by 2^-14 (see fp4_chunk_dot).
__device__ __forceinline__ unsigned int moe_pair(unsigned int v, int p) {
    const unsigned int mag = (p < 3 ? (v << (9 - 4 * p)) : (v >> 3)) & 0x0E000E00u;
    const unsigned int sgn = (p < 3 ? (v << (12 - 4 * p)) : v) & 0x80008000u;
    return mag | sgn;
}

// One chunk of one 16-row tile: returns (row g, row g+8) dots of the chunk with x (hi + lo),
// unscaled, valid in lanes with t == 0.
__device__ __forceinline__ void moe_chunk_mma(unsigned int wg, unsigned int wg8, const unsigned int (&b)[4],
                                              float &dg, float &dg8) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    dsk_mma_f16_m16n8k16(d, moe_pair(wg, 0), moe_pair(wg8, 0), moe_pair(wg, 1), moe_pair(wg8, 1), b[0], b[1]);
    dsk_mma_f16_m16n8k16(d, moe_pair(wg, 2), moe_pair(wg8, 2), moe_pair(wg, 3), moe_pair(wg8, 3), b[2], b[3]);
    dg = d[0] + d[1];
    dg8 = d[2] + d[3];
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_gate_up_mma(
    const float *__restrict__ x, const int *__restrict__ ids, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, float *__restrict__ h, int topk, int E, int I, int K,
    float limit) {
    dsk_pdl_entry();
    __shared__ float red[MOE_WARPS][2][16];
    const int p = blockIdx.x, t_tok = p / topk;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int i0 = blockIdx.y * 16;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (threadIdx.x < 16) h[(long)p * I + i0 + threadIdx.x] = 0.f;
        return;
    }
    const int C = K >> 5, Cw = C / MOE_WARPS;
    const long rg = (long)e * I + i0 + g, rg8 = rg + 8;
    const unsigned int *w1g = reinterpret_cast<const unsigned int *>(W1 + rg * (K >> 1)) + t;
    const unsigned int *w1g8 = reinterpret_cast<const unsigned int *>(W1 + rg8 * (K >> 1)) + t;
    const unsigned int *w3g = reinterpret_cast<const unsigned int *>(W3 + rg * (K >> 1)) + t;
    const unsigned int *w3g8 = reinterpret_cast<const unsigned int *>(W3 + rg8 * (K >> 1)) + t;
    const float *xt = x + (long)t_tok * K;
    float gg = 0.f, gg8 = 0.f, uu = 0.f, uu8 = 0.f;
#pragma unroll 4
    for (int c = warp * Cw; c < (warp + 1) * Cw; ++c) {
        const unsigned int a = __ldg(w1g + 4 * c), a8 = __ldg(w1g8 + 4 * c);
        const unsigned int b = __ldg(w3g + 4 * c), b8 = __ldg(w3g8 + 4 * c);
        unsigned int xf[4];
        moe_xfrag(xt, c, g, t, xf);
        float d0, d8;
        moe_chunk_mma(a, a8, xf, d0, d8);
        gg = fmaf(fp4_scale(S1[rg * C + c]), d0, gg);
        gg8 = fmaf(fp4_scale(S1[rg8 * C + c]), d8, gg8);
        moe_chunk_mma(b, b8, xf, d0, d8);
        uu = fmaf(fp4_scale(S3[rg * C + c]), d0, uu);
        uu8 = fmaf(fp4_scale(S3[rg8 * C + c]), d8, uu8);
    }
    if (t == 0) {
        red[warp][0][g] = gg; red[warp][0][g + 8] = gg8;
        red[warp][1][g] = uu; red[warp][1][g + 8] = uu8;
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float gs = 0.f, us = 0.f;
        for (int w = 0; w < MOE_WARPS; ++w) { gs += red[w][0][threadIdx.x]; us += red[w][1][threadIdx.x]; }
        gs = fminf(gs, limit);
        us = fminf(fmaxf(us, -limit), limit);
        h[(long)p * I + i0 + threadIdx.x] = gs / (1.f + expf(-gs)) * us;
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_down_mma(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    float *__restrict__ y, int E, int N, int I) {
    dsk_pdl_entry();
    __shared__ float red[MOE_WARPS][16];
    const int p = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.y * 16;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (threadIdx.x < 16) y[(long)p * N + n0 + threadIdx.x] = 0.f;
        return;
    }
    const int C = I >> 5, Cw = C / MOE_WARPS;
    const long rg = (long)e * N + n0 + g, rg8 = rg + 8;
    const unsigned int *wg = reinterpret_cast<const unsigned int *>(W2 + rg * (I >> 1)) + t;
    const unsigned int *wg8 = reinterpret_cast<const unsigned int *>(W2 + rg8 * (I >> 1)) + t;
    const float *hp = h + (long)p * I;
    float acc = 0.f, acc8 = 0.f;
#pragma unroll 4
    for (int c = warp * Cw; c < (warp + 1) * Cw; ++c) {
        const unsigned int a = __ldg(wg + 4 * c), a8 = __ldg(wg8 + 4 * c);
        unsigned int xf[4];
        moe_xfrag(hp, c, g, t, xf);
        float d0, d8;
        moe_chunk_mma(a, a8, xf, d0, d8);
        acc = fmaf(fp4_scale(S2[rg * C + c]), d0, acc);
        acc8 = fmaf(fp4_scale(S2[rg8 * C + c]), d8, acc8);
    }
    if (t == 0) { red[warp][g] = acc; red[warp][g + 8] = acc8; }
    __syncthreads();
    if (threadIdx.x < 16) {
        float s = 0.f;
        for (int w = 0; w < MOE_WARPS; ++w) s += red[w][threadIdx.x];
        y[(long)p * N + n0 + threadIdx.x] = weights[p] * s;
    }
}

// ---------------------------------------------------------------------------------------------
// Grouped FP4 expert GEMMs for GEMM steps (prefill chunks), the weights decoded inside the kernel
// (no widened copy). The (token, slot) pairs are sorted by expert on the host (gemm_step.rs) and
// their activation rows gathered in that order; a tile is (expert e, first sorted row row0, rows
// <= GRP_TOK) and one block computes a tile against GRP_WROWS weight rows:
//   dsk_fp4_grouped_gate_up: act[r, i] = f16(silu(min(g, limit)) * clamp(u, -limit, limit)),
//                            g = W1[e][i, :] . x[r], u = W3[e][i, :] . x[r]
//   dsk_fp4_grouped_down:    y[r, n] = W2[e][n, :] . act[r]     (f32)
// for the sorted rows r = row0 .. row0 + rows - 1; grid = (tile, GRP_WROWS-row block of W).
// x and act are f16 rows with every 8 values stored in the order 0 4 1 5 2 6 3 7 ("k8 order":
// dsk_gather_rows_f32_to_f16_k8 writes x so, gate_up writes act so), which makes a lane's 16-byte
// shared load exactly its B fragments for both mmas of a 32-value chunk in the k permutation
// that fp4_word_pairs decodes (nibbles p and p + 4 as one f16x2), as the mma2 kernels use.
//
//   - 8 warps; weights are the A operand (16 weight rows an m16 tile), tokens B (8 an n8 tile).
//     Each warp holds two m16 tiles against all 64 tokens (acc: 2 x 8 x 4 f32). gate_up: the
//     two tiles are the same 16 rows of W1 and of W3 (block: 128 rows of each), so the SwiGLU
//     is done on the accumulators; down: 32 consecutive rows of W2 (block: 256 rows).
//   - Stages of 128 values along K (4 chunks): 256 weight rows x 64 bytes (chunk slots swizzled
//     by (row >> 1) & 3 so one ldmatrix phase hits 8 bank groups), their 4 scale bytes, and 64
//     token rows x 256 bytes (16-byte slots swizzled by (token & 1) << 2); NST stages in
//     flight with cp.async (rows past the tile are zero-filled), one __syncthreads per stage.
//   - ldmatrix.x4 gives a lane the FP4 words of rows g, g + 8 of two chunks; fp4_word_pairs
//     decodes them (value * 2^-14, exact) and one f16x2 multiply by the chunk's factor
//     2^(s - 113 - shift) (a 256-entry table) makes them the weights times 2^-shift: exact in
//     f16 for every scale byte s the host allowed (fp4_grouped_scale_shift), so the block scale
//     costs nothing per mma. The accumulators are multiplied by 2^shift at the end.
//   - Products and sums are the f16 tensor cores' (f32 accumulation), as the widened-weight
//     cuBLAS path computes them; activations are the same f16 values.
// Needs K % 128 == 0, gate_up: I % 128 == 0, down: N % 256 == 0; tiles of valid experts.
// Dynamic shared memory: the table (1 KB) + NST stages (launch: Fp4GroupedForm::smem_bytes).

#define GRP_TOK 64
#define GRP_WROWS 256
#define GRP_CPS 4
#define GRP_STAGE_W (GRP_WROWS * GRP_CPS * 16)
#define GRP_STAGE_S (GRP_WROWS * GRP_CPS)
#define GRP_STAGE_X (GRP_TOK * GRP_CPS * 64)
#define GRP_STAGE (GRP_STAGE_W + GRP_STAGE_S + GRP_STAGE_X)

__device__ __forceinline__ void grp_cp16(void *dst, const void *src, bool valid) {
    const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
    const unsigned int n = valid ? 16u : 0u; // 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void grp_cp4(void *dst, const void *src) {
    const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}
template <int N> __device__ __forceinline__ void grp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ unsigned int grp_hmul2(unsigned int a, unsigned int b) {
    unsigned int r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// f16x2 (both halves) of 2^(s - 113 - shift): the block scale 2^(s - 127) times the decoder's
// 2^14, divided by 2^shift. Codes the host excluded get whatever their exponent gives.
__device__ __forceinline__ unsigned int grp_factor(int s, int shift) {
    const int e = s - 113 - shift;
    unsigned int h;
    if (e > 15) h = 0x7c00u;
    else if (e >= -14) h = (unsigned int)(e + 15) << 10;
    else if (e >= -24) h = 1u << (e + 24);
    else h = 0u;
    return h | (h << 16);
}

// Position of value k (0..7) of an 8-group in k8 order.
__device__ __forceinline__ int grp_k8(int k) { return ((k & 3) << 1) | (k >> 2); }

// This thread's part of stage `st`'s weights into `wsl`: rows 0..127 from `wlo`, 128..255 from
// `whi` (row stride K / 2; 16-byte chunk slots swizzled by (row >> 1) & 3), their scale bytes
// from `slo` / `shi` (stride K / 32) at wsl + GRP_STAGE_W.
__device__ __forceinline__ void grp_issue_weights(unsigned char *wsl, const unsigned char *wlo,
                                                  const unsigned char *whi, const unsigned char *slo,
                                                  const unsigned char *shi, int K, int st) {
    const int tid = threadIdx.x;
    const long ws = K >> 1, ss = K >> 5;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = tid + 256 * i, r = q >> 2, c = q & 3;
        const unsigned char *src = (i < 2 ? wlo + r * ws : whi + (r - 128) * ws) + st * 64 + c * 16;
        grp_cp16(wsl + r * 64 + ((c ^ ((r >> 1) & 3)) << 4), src, true);
    }
    grp_cp4(wsl + GRP_STAGE_W + tid * 4, (tid < 128 ? slo + tid * ss : shi + (tid - 128) * ss) + st * 4);
}

// Issues stage `st` into `slot`: weight rows 0..127 from `wlo`, 128..255 from `whi` (row stride
// K / 2), their scales from `slo` / `shi` (stride K / 32), token rows from `x` (stride K values;
// rows >= `rows` zero-filled).
__device__ __forceinline__ void grp_issue(unsigned char *slot, const unsigned char *wlo, const unsigned char *whi,
                                          const unsigned char *slo, const unsigned char *shi,
                                          const unsigned short *x, int rows, int K, int st) {
    const int tid = threadIdx.x;
    grp_issue_weights(slot, wlo, whi, slo, shi, K, st);
    unsigned char *xs = slot + GRP_STAGE_W + GRP_STAGE_S;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int q = tid + 256 * i, tk = q >> 4, sl = q & 15;
        const bool ok = tk < rows;
        grp_cp16(xs + tk * 256 + ((sl ^ ((tk & 1) << 2)) << 4), x + (long)(ok ? tk : 0) * K + st * 128 + sl * 8, ok);
    }
}

// The E8M0 bytes of the stage's four chunks for weight rows m0 + g and m0 + g + 8 (weights at
// `wsl`, scales at wsl + GRP_STAGE_W).
__device__ __forceinline__ void grp_scale_words(const unsigned char *wsl, int m0, int g, unsigned int (&sw)[2]) {
    sw[0] = *reinterpret_cast<const unsigned int *>(wsl + GRP_STAGE_W + (m0 + g) * 4);
    sw[1] = *reinterpret_cast<const unsigned int *>(wsl + GRP_STAGE_W + (m0 + g + 8) * 4);
}

// ldmatrix.x4: this lane's raw FP4 words (word lane % 4) of rows m0 + g and m0 + g + 8 for chunks
// cc and cc + 1 (w = {row g cc, row g + 8 cc, row g cc + 1, row g + 8 cc + 1}); matrix j = lane / 8
// is rows 8 (j & 1) .. + 7 of chunk cc + j / 2.
__device__ __forceinline__ void grp_weight_words(const unsigned char *wsl, int m0, int lane, int cc,
                                                 unsigned int (&w)[4]) {
    const int j8 = lane >> 3, r = m0 + (lane & 7) + 8 * (j8 & 1), ch = cc + (j8 >> 1);
    mma2_ldsm4(wsl + r * 64 + ((ch ^ ((r >> 1) & 3)) << 4), w);
}

// Chunk c (= cc + h) of one m16 tile as f16 weights times 2^-shift: the nibble pairs (p, p + 4)
// of rows g (`ag`) and g + 8 (`a8`), each times its chunk factor from the table.
__device__ __forceinline__ void grp_decode_chunk(const unsigned int (&w)[4], int h, const unsigned int (&sw)[2],
                                                 const unsigned int *lut, int c, unsigned int (&ag)[4],
                                                 unsigned int (&a8)[4]) {
    fp4_word_pairs(w[2 * h], ag);
    fp4_word_pairs(w[2 * h + 1], a8);
    const unsigned int fg = lut[(sw[0] >> (8 * c)) & 255u];
    const unsigned int f8 = lut[(sw[1] >> (8 * c)) & 255u];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        ag[p] = grp_hmul2(ag[p], fg);
        a8[p] = grp_hmul2(a8[p], f8);
    }
}

// One stage of a warp's two m16 tiles (shared-memory rows m0 and m1) against the 64 tokens.
__device__ __forceinline__ void grp_compute(const unsigned char *slot, const unsigned int *lut, int m0, int m1,
                                            int lane, float (&acc)[2][8][4]) {
    const int g = lane >> 2, t = lane & 3;
    const int mrow[2] = {m0, m1};
    const unsigned char *xs = slot + GRP_STAGE_W + GRP_STAGE_S;
    unsigned int sw[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) grp_scale_words(slot, mrow[m], g, sw[m]);
    const int xsw = (g & 1) << 2; // the token's slot swizzle (tokens 8j + g)
#pragma unroll
    for (int cc = 0; cc < GRP_CPS; cc += 2) {
        unsigned int w[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) grp_weight_words(slot, mrow[m], lane, cc, w[m]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = cc + h;
            unsigned int ag[2][4], a8[2][4];
#pragma unroll
            for (int m = 0; m < 2; ++m) grp_decode_chunk(w[m], h, sw[m], lut, c, ag[m], a8[m]);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int tk = 8 * j + g, sl = 4 * c + t;
                const uint4 b = *reinterpret_cast<const uint4 *>(xs + tk * 256 + ((sl ^ xsw) << 4));
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    dsk_mma_f16_m16n8k16(acc[m][j], ag[m][0], a8[m][0], ag[m][1], a8[m][1], b.x, b.y);
                    dsk_mma_f16_m16n8k16(acc[m][j], ag[m][2], a8[m][2], ag[m][3], a8[m][3], b.z, b.w);
                }
            }
        }
    }
}

// The pipelined main loop of both kernels: the factor table for `shift` is filled (published by
// the loop's first barrier), the accumulators start at zero, the first stages go out; ends with
// every stage consumed and the block synced (the stages' memory is free for the epilogue).
template <int NST>
__device__ __forceinline__ void grp_mainloop(unsigned char *stages, unsigned int *lut, int shift, const unsigned char *wlo,
                                             const unsigned char *whi, const unsigned char *slo,
                                             const unsigned char *shi, const unsigned short *x, int rows, int K,
                                             int m0, int m1, float (&acc)[2][8][4]) {
    const int nst = K / (32 * GRP_CPS), lane = threadIdx.x & 31;
    for (int c = threadIdx.x; c < 256; c += blockDim.x) lut[c] = grp_factor(c, shift);
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < NST - 1; ++s) {
        if (s < nst) grp_issue(stages + s * GRP_STAGE, wlo, whi, slo, shi, x, rows, K, s);
        mma2_commit();
    }
    int rd = 0, wr = NST - 1;
    for (int s = 0; s < nst; ++s) {
        grp_wait<NST - 2>();
        __syncthreads(); // stage s landed for every thread; every warp is done with slot wr
        if (s + NST - 1 < nst) grp_issue(stages + wr * GRP_STAGE, wlo, whi, slo, shi, x, rows, K, s + NST - 1);
        mma2_commit();
        grp_compute(stages + rd * GRP_STAGE, lut, m0, m1, lane, acc);
        rd = rd == NST - 1 ? 0 : rd + 1;
        wr = wr == NST - 1 ? 0 : wr + 1;
    }
    grp_wait<0>();
    __syncthreads();
}

template <int NST>
__device__ __forceinline__ void grp_gate_up(
    const unsigned short *__restrict__ x, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,
    const unsigned char *__restrict__ S3, unsigned short *__restrict__ act, int I, int K, int shift, float limit) {
    extern __shared__ float4 moe_smem4[];
    unsigned int *lut = reinterpret_cast<unsigned int *>(moe_smem4);
    unsigned char *stages = reinterpret_cast<unsigned char *>(lut + 256);
    const int4 tile = tiles[blockIdx.x];
    const int e = tile.x, row0 = tile.y, rows = tile.z;
    if (rows <= 0) return; // an unused tile of a list sized for the worst case
    const int n0 = blockIdx.y * (GRP_WROWS / 2);
    const long base = (long)e * I + n0;
    const unsigned char *w1 = W1 + base * (K >> 1), *w3 = W3 + base * (K >> 1);
    const unsigned char *s1 = S1 + base * (K >> 5), *s3 = S3 + base * (K >> 5);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[2][8][4];
    grp_mainloop<NST>(stages, lut, shift, w1, w3, s1, s3, x + (long)row0 * K, rows, K, 16 * warp, 128 + 16 * warp,
                      acc);
    // The SwiGLU on the accumulators into a [64 tokens][128 values] f16 tile in k8 order, then
    // whole 16-byte pieces of each token's row out.
    unsigned short *out = reinterpret_cast<unsigned short *>(stages);
    const float unshift = __uint_as_float((unsigned int)(127 + shift) << 23);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int tk = 8 * j + 2 * t + (q & 1), i = 16 * warp + g + 8 * (q >> 1);
            const float gs = fminf(acc[0][j][q] * unshift, limit);
            const float us = fminf(fmaxf(acc[1][j][q] * unshift, -limit), limit);
            out[tk * 128 + (i & ~7) + grp_k8(i & 7)] = (unsigned short)(dsk_f32x2_to_f16x2(gs / (1.f + expf(-gs)) * us, 0.f) & 0xffffu);
        }
    __syncthreads();
    for (int q = threadIdx.x; q < GRP_TOK * 16; q += blockDim.x) {
        const int tk = q >> 4, sl = q & 15;
        if (tk < rows)
            *reinterpret_cast<uint4 *>(act + (long)(row0 + tk) * I + n0 + sl * 8) =
                *reinterpret_cast<const uint4 *>(out + tk * 128 + sl * 8);
    }
}

#define GRP_OUT_LD (GRP_WROWS + 4)
template <int NST>
__device__ __forceinline__ void grp_down(
    const unsigned short *__restrict__ act, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W2,
    const unsigned char *__restrict__ S2, float *__restrict__ y, int N, int K, int shift) {
    extern __shared__ float4 moe_smem4[];
    unsigned int *lut = reinterpret_cast<unsigned int *>(moe_smem4);
    unsigned char *stages = reinterpret_cast<unsigned char *>(lut + 256);
    const int4 tile = tiles[blockIdx.x];
    const int e = tile.x, row0 = tile.y, rows = tile.z;
    if (rows <= 0) return; // an unused tile of a list sized for the worst case
    const int n0 = blockIdx.y * GRP_WROWS;
    const long base = (long)e * N + n0;
    const unsigned char *w = W2 + base * (K >> 1), *s = S2 + base * (K >> 5);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[2][8][4];
    grp_mainloop<NST>(stages, lut, shift, w, w + 128L * (K >> 1), s, s + 128L * (K >> 5), act + (long)row0 * K, rows,
                      K, 32 * warp, 32 * warp + 16, acc);
    float *out = reinterpret_cast<float *>(stages);
    const float unshift = __uint_as_float((unsigned int)(127 + shift) << 23);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int tk = 8 * j + 2 * t + (q & 1), n = 32 * warp + 16 * m + g + 8 * (q >> 1);
                out[tk * GRP_OUT_LD + n] = acc[m][j][q] * unshift;
            }
    __syncthreads();
    for (int q = threadIdx.x; q < GRP_TOK * (GRP_WROWS / 4); q += blockDim.x) {
        const int tk = q / (GRP_WROWS / 4), c4 = q % (GRP_WROWS / 4);
        if (tk < rows)
            *reinterpret_cast<float4 *>(y + (long)(row0 + tk) * N + n0 + 4 * c4) =
                *reinterpret_cast<const float4 *>(out + tk * GRP_OUT_LD + 4 * c4);
    }
}

// The entry points, two blocks an SM (registers capped at 128 a thread: ptxas spills 24-84
// bytes, measured cheaper than one block an SM without spills): 2 stages (`_2st`, 67 KB of
// shared memory, the default: faster on H200 and within sm_121's 99 KB) or 3 (100 KB).
// launch: Fp4GroupedForm.
#define GRP_ENTRIES(SUFFIX, MINB, NST)                                                                              \
    extern "C" __global__ void __launch_bounds__(256, MINB) dsk_fp4_grouped_gate_up##SUFFIX(                         \
        const unsigned short *__restrict__ x, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W1, \
        const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3,                                 \
        const unsigned char *__restrict__ S3, unsigned short *__restrict__ act, int I, int K, int shift,            \
        float limit) {                                                                                              \
        dsk_pdl_entry();                                                                                            \
        grp_gate_up<NST>(x, tiles, W1, S1, W3, S3, act, I, K, shift, limit);                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256, MINB) dsk_fp4_grouped_down##SUFFIX(                            \
        const unsigned short *__restrict__ act, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W2, \
        const unsigned char *__restrict__ S2, float *__restrict__ y, int N, int K, int shift) {                     \
        dsk_pdl_entry();                                                                                            \
        grp_down<NST>(act, tiles, W2, S2, y, N, K, shift);                                                          \
    }
GRP_ENTRIES(, 2, 3)
GRP_ENTRIES(_2st, 2, 2)

// ---------------------------------------------------------------------------------------------
// The grouped FP4 expert GEMMs on Hopper's warpgroup MMA (wgmma, sm_90a only; the `_wg` entry
// points): the same tiles and results as dsk_fp4_grouped_* above (products exact, f32 sums on the
// tensor cores), but with 128 tokens a tile and the MMAs asynchronous, so one decode of the FP4
// weights feeds twice the tokens and the decode of the next chunk overlaps the MMAs of this one.
//
//   - 256 threads = two warpgroups. Each warpgroup multiplies two m64 tiles of weight rows
//     (gate/up: the same 64 rows of W1 and of W3, so the SwiGLU runs on the accumulators; down:
//     128 consecutive rows of W2) by the tile's tokens: m64n128k16 (or m64n64k16 for a tile of
//     at most 64 rows), A (weights) from registers, B (tokens) from shared memory.
//   - A: ldmatrix.x4 and fp4_word_pairs exactly as above; the wgmma register fragment of A is
//     the m16n8k16 one for each warp's 16 rows, so the same words make the same fragments.
//   - B: token rows in "k32 order" (wgmma reads K in order, so the activations are permuted to
//     match the decode's nibble pairs instead: in each 32-value chunk, position
//     16 st + 8 h + 2 t + e holds value 8 t + 2 st + h + 4 e; grp_k32 below), staged with the
//     128-byte swizzle the B descriptor names: a stage's 128 values are two 64-value atoms of
//     128 tokens x 128 bytes, 16-byte piece c of token r at (c ^ (r & 7)).
//   - Per 32-value chunk a warpgroup issues 4 wgmmas (2 m tiles x 2 k16 steps) and commits them
//     as one group; A registers alternate between two sets so chunk c + 1 is decoded while chunk
//     c runs (wgmma.wait_group 1 before a set is rewritten); the stage's MMAs are waited for
//     before its slot is refilled.
// Shared memory: the factor table, 1 KB of alignment slack, WG_NST stages of 49 KB (x first:
// the descriptor's atoms must sit on 1024-byte boundaries).

#define WG_TOK 128
#define WG_NST 4
#define WG_STAGE_X (2 * WG_TOK * 128)
#define WG_STAGE (WG_STAGE_X + GRP_STAGE_W + GRP_STAGE_S)

// Position of value v (0..31) of a chunk in k32 order.
__device__ __forceinline__ int grp_k32(int v) {
    const int t = v >> 3, r = v & 7;
    return 16 * ((r >> 1) & 1) + 8 * (r & 1) + 2 * t + (r >> 2);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The shared-memory matrix descriptor of B: K-major, 128-byte swizzle, 8-row groups 1024 bytes
// apart (the leading offset is unused in this mode).
__device__ __forceinline__ unsigned long long wg_desc(const void *p) {
    const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
    return (unsigned long long)((a & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

#define WG_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
// d += A B for one m64n128k16 (A: this warp's m16k16 fragment, B: descriptor).
__device__ __forceinline__ void wg_mma128(float (&d)[64], const unsigned int (&a)[4], unsigned long long desc) {
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
                 "}\n"
                 : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24), WG_R8(32), WG_R8(40), WG_R8(48), WG_R8(56)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
// The same for m64n64k16 (the first 32 accumulators).
__device__ __forceinline__ void wg_mma64(float (&d)[64], const unsigned int (&a)[4], unsigned long long desc) {
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
                 "}\n"
                 : WG_R8(0), WG_R8(8), WG_R8(16), WG_R8(24)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}
#undef WG_R8

// Issues stage `st` into `slot`: the weights and scales as grp_issue, and this thread's eight
// activation rows (`xrow[i]`: the row of x for tile row (tid >> 4) + 16 i, or -1: zero-filled;
// rows in k32 order) into the two swizzled atoms.
__device__ __forceinline__ void wg_issue(unsigned char *slot, const unsigned char *wlo, const unsigned char *whi,
                                         const unsigned char *slo, const unsigned char *shi,
                                         const unsigned short *x, const int (&xrow)[8], int K, int st) {
    const int tid = threadIdx.x;
    grp_issue_weights(slot + WG_STAGE_X, wlo, whi, slo, shi, K, st);
    const int sl = tid & 15, atom = sl >> 3, c = sl & 7;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int tk = (tid >> 4) + 16 * i;
        const bool ok = xrow[i] >= 0;
        grp_cp16(slot + atom * (WG_TOK * 128) + (tk >> 3) * 1024 + (tk & 7) * 128 + ((c ^ (tk & 7)) << 4),
                 x + (long)(ok ? xrow[i] : 0) * K + st * 128 + sl * 8, ok);
    }
}

// This thread's activation rows for wg_issue: tile row tk = (tid >> 4) + 16 i of a tile of `rows`
// sorted rows from `row0` is row `row_of[row0 + tk]` of x (a token: the gather done by the loads;
// -1: a zero row), or row0 + tk itself where `row_of` is null (x already in sorted order).
__device__ __forceinline__ void wg_rows(const int *__restrict__ row_of, int row0, int rows, int (&xrow)[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int tk = (threadIdx.x >> 4) + 16 * i;
        xrow[i] = tk < rows ? (row_of ? row_of[row0 + tk] : row0 + tk) : -1;
    }
}

// One stage of a warpgroup: its two m tiles (shared-memory weight rows m0 and m1 for this warp's
// 16) against the tile's tokens, N = 128 or 64.
template <int N>
__device__ __forceinline__ void wg_compute(const unsigned char *slot, const unsigned int *lut, int m0, int m1,
                                           int lane, float (&acc)[2][64]) {
    const int g = lane >> 2;
    const unsigned char *wsl = slot + WG_STAGE_X;
    const int mrow[2] = {m0, m1};
    unsigned int sw[2][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) grp_scale_words(wsl, mrow[m], g, sw[m]);
    // Two register sets of A: [set][m][k16 step][4].
    unsigned int a[2][2][2][4];
#pragma unroll
    for (int cc = 0; cc < GRP_CPS; cc += 2) {
        unsigned int w[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) grp_weight_words(wsl, mrow[m], lane, cc, w[m]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = cc + h, set = h;
            // The set about to be rewritten was last read by chunk c - 2: wait for it.
            if (c >= 2) wg_wait<1>();
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                unsigned int ag[4], a8[4];
                grp_decode_chunk(w[m], h, sw[m], lut, c, ag, a8);
                // k16 step s of the chunk: the pairs (2s, 2s + 1) as the m16k16 fragment.
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    a[set][m][s][0] = ag[2 * s];
                    a[set][m][s][1] = a8[2 * s];
                    a[set][m][s][2] = ag[2 * s + 1];
                    a[set][m][s][3] = a8[2 * s + 1];
                }
            }
            wg_fence();
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                // k16 step 2c + s of the stage: atom c / 2, 32-byte step within its rows.
                const unsigned long long desc = wg_desc(slot + (c >> 1) * (WG_TOK * 128) + (c & 1) * 64 + s * 32);
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    if (N == 128) wg_mma128(acc[m], a[set][m][s], desc);
                    else wg_mma64(acc[m], a[set][m][s], desc);
                }
            }
            wg_commit();
        }
    }
    wg_wait<0>();
}

template <int N>
__device__ __forceinline__ void wg_mainloop(unsigned char *stages, const unsigned char *wlo, const unsigned char *whi,
                                            const unsigned char *slo, const unsigned char *shi,
                                            const unsigned int *lut, const unsigned short *x, const int (&xrow)[8],
                                            int K, int m0, int m1, float (&acc)[2][64]) {
    const int nst = K / (32 * GRP_CPS), lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[m][i] = 0.f;
#pragma unroll
    for (int s = 0; s < WG_NST - 1; ++s) {
        if (s < nst) wg_issue(stages + s * WG_STAGE, wlo, whi, slo, shi, x, xrow, K, s);
        mma2_commit();
    }
    int rd = 0, wr = WG_NST - 1;
    for (int s = 0; s < nst; ++s) {
        grp_wait<WG_NST - 2>();
        // cp.async wrote the stage through the generic proxy; wgmma reads it through the async one.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads(); // stage s landed for every thread; every warpgroup is done with slot wr
        if (s + WG_NST - 1 < nst) wg_issue(stages + wr * WG_STAGE, wlo, whi, slo, shi, x, xrow, K, s + WG_NST - 1);
        mma2_commit();
        wg_compute<N>(stages + rd * WG_STAGE, lut, m0, m1, lane, acc);
        rd = rd == WG_NST - 1 ? 0 : rd + 1;
        wr = wr == WG_NST - 1 ? 0 : wr + 1;
    }
    grp_wait<0>();
    __syncthreads();
}
#endif

// The stages' base (1024-byte aligned) after the factor table, which is filled here.
__device__ __forceinline__ unsigned char *wg_smem(unsigned int *&lut, int shift) {
    extern __shared__ float4 wg_smem4[];
    lut = reinterpret_cast<unsigned int *>(wg_smem4);
    for (int c = threadIdx.x; c < 256; c += blockDim.x) lut[c] = grp_factor(c, shift);
    const unsigned long long base = reinterpret_cast<unsigned long long>(lut + 256);
    return reinterpret_cast<unsigned char *>((base + 1023) & ~1023ull);
}

// `row_of` (may be null): the x row of each sorted row (its token, or -1), so x is the step's own
// rows in k32 order and the loads do the gather; null: x is already in sorted order.
extern "C" __global__ void __launch_bounds__(256, 1) dsk_fp4_grouped_gate_up_wg(
    const unsigned short *__restrict__ x, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W1,
    const unsigned char *__restrict__ S1, const unsigned char *__restrict__ W3, const unsigned char *__restrict__ S3,
    unsigned short *__restrict__ act, int I, int K, int shift, float limit, const int *__restrict__ row_of) {
    dsk_pdl_entry();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const int4 tile = tiles[blockIdx.x];
    const int e = tile.x, row0 = tile.y, rows = tile.z;
    if (rows <= 0) return;
    unsigned int *lut;
    unsigned char *stages = wg_smem(lut, shift);
    const int n0 = blockIdx.y * (GRP_WROWS / 2);
    const long base = (long)e * I + n0;
    const unsigned char *w1 = W1 + base * (K >> 1), *w3 = W3 + base * (K >> 1);
    const unsigned char *s1 = S1 + base * (K >> 5), *s3 = S3 + base * (K >> 5);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, w4 = warp & 3;
    // Warpgroup wg: gate rows 64 wg .. + 63 (shared-memory rows of W1) and the same rows of W3.
    const int m0 = 64 * wg + 16 * w4, m1 = 128 + 64 * wg + 16 * w4;
    float acc[2][64];
    int xrow[8];
    wg_rows(row_of, row0, rows, xrow);
    if (rows <= 64) wg_mainloop<64>(stages, w1, w3, s1, s3, lut, x, xrow, K, m0, m1, acc);
    else wg_mainloop<128>(stages, w1, w3, s1, s3, lut, x, xrow, K, m0, m1, acc);
    // The SwiGLU on the accumulators into a [128 tokens][128 values] f16 tile in k32 order, then
    // whole 16-byte pieces of each token's row out.
    unsigned short *out = reinterpret_cast<unsigned short *>(stages);
    const float unshift = __uint_as_float((unsigned int)(127 + shift) << 23);
    const int g = lane >> 2, t = lane & 3;
    const int jn = rows <= 64 ? 8 : 16;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        if (j >= jn) break;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int tk = 8 * j + 2 * t + (q & 1), i = 64 * wg + 16 * w4 + g + 8 * (q >> 1);
            const float gs = fminf(acc[0][4 * j + q] * unshift, limit);
            const float us = fminf(fmaxf(acc[1][4 * j + q] * unshift, -limit), limit);
            out[tk * 128 + (i & ~31) + grp_k32(i & 31)] =
                (unsigned short)(dsk_f32x2_to_f16x2(gs / (1.f + expf(-gs)) * us, 0.f) & 0xffffu);
        }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < WG_TOK * 16; q += blockDim.x) {
        const int tk = q >> 4, sl = q & 15;
        if (tk < rows)
            *reinterpret_cast<uint4 *>(act + (long)(row0 + tk) * I + n0 + sl * 8) =
                *reinterpret_cast<const uint4 *>(out + tk * 128 + sl * 8);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1) dsk_fp4_grouped_down_wg(
    const unsigned short *__restrict__ act, const int4 *__restrict__ tiles, const unsigned char *__restrict__ W2,
    const unsigned char *__restrict__ S2, float *__restrict__ y, int N, int K, int shift) {
    dsk_pdl_entry();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    const int4 tile = tiles[blockIdx.x];
    const int e = tile.x, row0 = tile.y, rows = tile.z;
    if (rows <= 0) return;
    unsigned int *lut;
    unsigned char *stages = wg_smem(lut, shift);
    const int n0 = blockIdx.y * GRP_WROWS;
    const long base = (long)e * N + n0;
    const unsigned char *w = W2 + base * (K >> 1), *s = S2 + base * (K >> 5);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, w4 = warp & 3;
    const int m0 = 128 * wg + 16 * w4, m1 = 128 * wg + 64 + 16 * w4;
    float acc[2][64];
    int xrow[8];
    wg_rows(nullptr, row0, rows, xrow);
    if (rows <= 64)
        wg_mainloop<64>(stages, w, w + 128L * (K >> 1), s, s + 128L * (K >> 5), lut, act, xrow, K, m0, m1, acc);
    else
        wg_mainloop<128>(stages, w, w + 128L * (K >> 1), s, s + 128L * (K >> 5), lut, act, xrow, K, m0, m1, acc);
    float *out = reinterpret_cast<float *>(stages);
    const float unshift = __uint_as_float((unsigned int)(127 + shift) << 23);
    const int g = lane >> 2, t = lane & 3;
    const int jn = rows <= 64 ? 8 : 16;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            if (j >= jn) break;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int tk = 8 * j + 2 * t + (q & 1), n = 128 * wg + 64 * m + 16 * w4 + g + 8 * (q >> 1);
                out[tk * GRP_OUT_LD + n] = acc[m][4 * j + q] * unshift;
            }
        }
    __syncthreads();
    for (int q = threadIdx.x; q < WG_TOK * (GRP_WROWS / 4); q += blockDim.x) {
        const int tk = q / (GRP_WROWS / 4), c4 = q % (GRP_WROWS / 4);
        if (tk < rows)
            *reinterpret_cast<float4 *>(y + (long)(row0 + tk) * N + n0 + 4 * c4) =
                *reinterpret_cast<const float4 *>(out + tk * GRP_OUT_LD + 4 * c4);
    }
#endif
}
