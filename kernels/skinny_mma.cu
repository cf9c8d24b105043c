// Skinny GEMM on the TF32 tensor cores for f32 activations: out[m * ld_out + n] =
// sum_k x[m * ld_x + xg(n) + k] * W[n, k] for 1..16 tokens (the backend uses it from 4: decode
// batches, DSpark verify), W e4m3 with E8M0 scales per 128x128 tile (the checkpoint's FP8
// projections) or bf16. A token's results do not depend on the other tokens of the launch (each
// output is its own mma column, summed in the same order whatever m is).
//
// Why: at 16 tokens the CUDA-core GEMVs (fp8_gemv.cu, dense_gemv.cu) spend their issue slots on
// activation loads and 16 FMAs per weight, ~5-8x slower than at one token (docs/KERNELS.md). Here
// the multiply-adds run on mma.sync.m16n8k8 (TF32 in, f32 accumulate), weights as the M side
// (16 rows per tile), tokens as N (8 per tile).
//
// Precision: e4m3 and bf16 weights are exact in TF32. Each activation is split x = hi + lo with
// hi = tf32(x) and lo = tf32(x - hi) (x - hi is exact in f32), and both halves are multiplied:
// |x - hi - lo| <= 2^-22 |x|, so every product is within 2^-22 of the f32 product and only the
// summation (f32, in tile order) differs from the CUDA-core kernels: f32-level results, not TF32.
//
// Work split: a block is WARPS warps over ROWS = 16 * MTILES weight rows; a "span" is 64 bytes of
// each row (64 e4m3 or 32 bf16 weights), lane (g, t) = (lane / 4, lane % 4) loading the 16 bytes
// at 16 t of rows g and g + 8 of each tile. Warp w takes spans w, w + WARPS, ... two at a time (both
// spans' loads in flight before either is used); the warps' partial tiles are summed through
// shared memory in warp order (deterministic). Within a span, mma step j uses the weights at
// VPL t + 2j and VPL t + 2j + 1 (VPL = weights per 16 bytes) as its k slots t and t + 4; the
// activations are read with the same permutation, so the dot product is unchanged. A span never
// crosses a 128-wide scale block, so the FP8 scale multiplies each span's tile once.
//
// Grouped form (DeepSeek-V4's wo_a): rows n of group n / group_rows read x at an extra offset
// (n / group_rows) * x_group_stride; a block never spans two groups (group_rows % ROWS == 0).
// The plain form passes group_rows = N.

// Warps per block: 8 over 32-row blocks; 16 over 16-row blocks, which the launcher picks for
// matrices with too few rows to give every SM a 32-row block (more warps share each row's spans,
// so the chain of loads per warp is half as long).

template <bool FP8> struct SkFmt {
    static constexpr int VPL = FP8 ? 16 : 8;  // weights per 16-byte load
    static constexpr int SPAN = 4 * VPL;      // k per span
    static constexpr int STEPS = VPL / 2;     // mma k8 steps per span
};

// The two A-fragment weights (k slots t and t + 4) of step j from a lane's 16 weight bytes, as
// f32 bit patterns (exact in TF32).
template <bool FP8>
__device__ __forceinline__ void sk_weights(const uint4 &w, int j, unsigned int &k0, unsigned int &k1) {
    const unsigned int word = (j >> (FP8 ? 1 : 0)) == 0 ? w.x : (j >> (FP8 ? 1 : 0)) == 1 ? w.y
                              : (j >> (FP8 ? 1 : 0)) == 2 ? w.z : w.w;
    if (FP8) {
        float lo, hi;
        dsk_e4m3x2_to_f32((j & 1) ? (word >> 16) : (word & 0xffffu), lo, hi);
        k0 = __float_as_uint(lo);
        k1 = __float_as_uint(hi);
    } else {
        k0 = word << 16;
        k1 = word & 0xffff0000u;
    }
}

// x = hi + lo, both TF32 (see the precision note above).
__device__ __forceinline__ void sk_split(float x, unsigned int &hi, unsigned int &lo) {
    hi = dsk_f32_to_tf32(x);
    lo = dsk_f32_to_tf32(__fsub_rn(x, __uint_as_float(hi)));
}

template <int NT, int MTILES, bool FP8, int WARPS>
__device__ __forceinline__ void sk_body(const unsigned char *__restrict__ W,
                                        const unsigned char *__restrict__ S,
                                        const float *__restrict__ x, float *__restrict__ out,
                                        int M, int N, int K, long ld_x, long ld_out,
                                        int group_rows, long x_group_stride) {
    typedef SkFmt<FP8> F;
    constexpr int ROWS = 16 * MTILES;
    __shared__ float red[WARPS][ROWS][8 * NT + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * ROWS;
    const long row_bytes = FP8 ? (long)K : 2L * K;
    const int spans = (int)(row_bytes >> 6);
    const int KB = (K + 127) >> 7;
    const float *xb = x + (long)(min(r0, N - 1) / group_rows) * x_group_stride;

    // Rows g and g + 8 of each tile (past N: row N - 1, loaded but never written).
    const unsigned char *wrow[MTILES][2];
    const unsigned char *srow[MTILES];
#pragma unroll
    for (int a = 0; a < MTILES; ++a) {
#pragma unroll
        for (int h = 0; h < 2; ++h) wrow[a][h] = W + (long)min(r0 + 16 * a + 8 * h + g, N - 1) * row_bytes + 16 * t;
        srow[a] = S + (long)(min(r0 + 16 * a, N - 1) >> 7) * KB;
    }
    // This lane's B-fragment tokens (n * 8 + g); rows past M read as zeros.
    const float *xrow[NT];
    bool live[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        live[n] = n * 8 + g < M;
        xrow[n] = xb + (long)min(n * 8 + g, M - 1) * ld_x + F::VPL * t;
    }

    float acc[MTILES][NT][4];
#pragma unroll
    for (int a = 0; a < MTILES; ++a)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][n][i] = 0.f;

    // Spans s0 and s0 + WARPS (where below `spans`) of every row this lane reads.
    uint4 wv[2][MTILES][2];
    auto load_spans = [&](int s0) {
        const bool second = s0 + WARPS < spans;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const long off = (long)(s0 + p * WARPS) * 64;
#pragma unroll
            for (int a = 0; a < MTILES; ++a)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wv[p][a][h] = (p == 0 || second) ? dsk_ld_stream16(wrow[a][h] + off) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    // Weights are never written while a step runs: the first spans' loads go out before the wait
    // for the previous kernel (programmatic dependent launch: they overlap its tail).
    if (warp < spans) load_spans(warp);
    dsk_pdl_entry();
    for (int s0 = warp; s0 < spans; s0 += 2 * WARPS) {
        const bool second = s0 + WARPS < spans;
        if (s0 != warp) load_spans(s0);
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            if (p == 1 && !second) break;
            const int s = s0 + p * WARPS;
            float4 xv[NT][F::VPL / 4];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const float4 *xp = reinterpret_cast<const float4 *>(xrow[n] + (long)s * F::SPAN);
#pragma unroll
                for (int q = 0; q < F::VPL / 4; ++q) xv[n][q] = live[n] ? __ldg(xp + q) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            float d[MTILES][NT][4];
#pragma unroll
            for (int a = 0; a < MTILES; ++a)
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) d[a][n][i] = 0.f;
#pragma unroll
            for (int j = 0; j < F::STEPS; ++j) {
                unsigned int bh[NT][2], bl[NT][2];
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const float4 &v = xv[n][j >> 1];
                    sk_split((j & 1) ? v.z : v.x, bh[n][0], bl[n][0]);
                    sk_split((j & 1) ? v.w : v.y, bh[n][1], bl[n][1]);
                }
#pragma unroll
                for (int a = 0; a < MTILES; ++a) {
                    unsigned int a0, a1, a2, a3;
                    sk_weights<FP8>(wv[p][a][0], j, a0, a2);
                    sk_weights<FP8>(wv[p][a][1], j, a1, a3);
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        dsk_mma_tf32_m16n8k8(d[a][n], a0, a1, a2, a3, bh[n][0], bh[n][1]);
                        dsk_mma_tf32_m16n8k8(d[a][n], a0, a1, a2, a3, bl[n][0], bl[n][1]);
                    }
                }
            }
#pragma unroll
            for (int a = 0; a < MTILES; ++a) {
                const float sc = FP8 ? dsk_e8m0_to_f32(srow[a][s >> 1]) : 1.f;
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[a][n][i] = fmaf(sc, d[a][n][i], acc[a][n][i]);
            }
        }
    }
    // C fragment: acc[a][n][i] is row 16 a + g + 8 (i >> 1), token 8 n + 2 t + (i & 1).
#pragma unroll
    for (int a = 0; a < MTILES; ++a)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][16 * a + g + 8 * (i >> 1)][8 * n + 2 * t + (i & 1)] = acc[a][n][i];
    __syncthreads();
    for (int o = threadIdx.x; o < ROWS * 8 * NT; o += blockDim.x) {
        const int rl = o / (8 * NT), tok = o % (8 * NT), row = r0 + rl;
        if (row < N && tok < M) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) v += red[w][rl][tok];
            out[(long)tok * ld_out + row] = v;
        }
    }
}

#define SK_INST(NAME, NT, MTILES, FP8)                                                               \
    extern "C" __global__ void __launch_bounds__(MTILES == 1 ? 512 : 256) NAME(                      \
        const unsigned char *__restrict__ W, const unsigned char *__restrict__ S,                     \
        const float *__restrict__ x, float *__restrict__ out, int M, int N, int K, long ld_x,        \
        long ld_out, int group_rows, long x_group_stride) {                                              \
        sk_body<NT, MTILES, FP8, MTILES == 1 ? 16 : 8>(W, S, x, out, M, N, K, ld_x, ld_out, group_rows,  \
                                                 x_group_stride);                                 \
    }

SK_INST(dsk_skinny_mma_fp8_t8_r16, 1, 1, true)
SK_INST(dsk_skinny_mma_fp8_t8_r32, 1, 2, true)
SK_INST(dsk_skinny_mma_fp8_t16_r16, 2, 1, true)
SK_INST(dsk_skinny_mma_fp8_t16_r32, 2, 2, true)
SK_INST(dsk_skinny_mma_bf16_t8_r16, 1, 1, false)
SK_INST(dsk_skinny_mma_bf16_t8_r32, 1, 2, false)
SK_INST(dsk_skinny_mma_bf16_t16_r16, 2, 1, false)
SK_INST(dsk_skinny_mma_bf16_t16_r32, 2, 2, false)

// ---------------------------------------------------------------------------------------------
// FP8 skinny GEMM on the f16 tensor cores, split over a thread-block cluster (sm_90+): the same
// out[m * ld_out + n] = sum_k x[m * ld_x + xg(n) + k] * W[n, k] for 1..16 tokens, e4m3 weights
// with 128x128 E8M0 scales, plain or grouped.
//
// Why: a decode step's projections are 4-32 MB each, so a launch is mostly latency: the kernel
// that issues its loads earliest and in the fewest dependent rounds wins. The TF32 kernel above
// re-reads every token's activations from L2 for each warp's 32 rows, two spans at a time (at 16
// tokens twice the weights' bytes) and issues two TF32 mmas per 8 k and token tile.
// Here a block is 64 or 128 weight rows (4 or 8 warps of one 16-row tile) by at most 512 k (32 or
// 64 KB of weights), small enough that every block of a 16 MB projection is resident at once
// (128 registers a thread), and
// - each lane issues all its weight loads (16 x 16 bytes) before anything else;
// - meanwhile the block stages its K range of the activations once, as ready-made B fragments in
//   shared memory (each thread's loads in flight together);
// - e4m3 converts exactly to f16 (one cvt per two weights, no widening to f32) for
//   mma.m16n8k16: half the TF32 path's mma issues per weight, at the same precision;
// - the blocks of a cluster (up to 8) split K and sum their partial tiles through distributed
//   shared memory in cluster-rank order: deterministic, no scratch in global memory, no second
//   launch. K beyond 8 x 512 takes several rounds of loads per block.
//
// Precision: each activation span (64 k of one token) is scaled by the power of two that puts its
// largest magnitude in [2^14, 2^15) (exact) and split x' = hi + lo, hi = f16(x'), lo = f16(x' - hi):
// |x' - hi - lo| <= 2^-22 |x'| where lo is a normal f16 and below 2^-25 (2^-39 of the span's
// largest value) where it is subnormal. e4m3 x f16 products are exact in the f32 accumulators, and
// the power of two is undone with the weight scale. So, as the TF32 path: f32-level results, for
// any activation magnitude (no f16 overflow). A token's result depends on its own row only, and
// the split (cluster size) on k only: the same bits whatever m is.
//
// K order: lane (g, t) loads 16 bytes at 16 t of a 64-byte span of weight rows g and g + 8; mma
// step j of the span takes word j (k = 16 t + 4 j .. + 3) as its A slots (2t, 2t+1) and (2t+8,
// 2t+9), and the staged B fragment of (step, token tile, lane) holds the same four k of token
// 8 tile + g as {hi(k0, k1), hi(k2, k3), lo(k0, k1), lo(k2, k3)}.

#define SKF_SPANS 8  // spans of one round of loads (512 k)


// Loads spans sp0 + P0 .. sp0 + P1 - 1 (those below `spans`) of rows g and g + 8.
template <int P0, int P1>
__device__ __forceinline__ void skf_load_part(uint4 (&w)[SKF_SPANS][2], const unsigned char *const (&wrow)[2],
                                              int sp0, int spans) {
#pragma unroll
    for (int p = P0; p < P1; ++p) {
        if (sp0 + p < spans) {
#pragma unroll
            for (int h = 0; h < 2; ++h) w[p][h] = dsk_ld_stream16(wrow[h] + (long)(sp0 + p) * 64);
        }
    }
}

// Loads spans sp0 .. sp0 + SKF_SPANS - 1 (those below `spans`) of rows g and g + 8.
__device__ __forceinline__ void skf_load(uint4 (&w)[SKF_SPANS][2], const unsigned char *const (&wrow)[2], int sp0,
                                         int spans) {
    skf_load_part<0, SKF_SPANS>(w, wrow, sp0, spans);
}

// Multiplies spans sp0 .. (of the block's range) of the warp's tile by the staged fragments.
template <int NT>
__device__ __forceinline__ void skf_compute(const uint4 (&w)[SKF_SPANS][2], int sp0, int spans, int k0,
                                            const uint4 *__restrict__ bfr, const float *__restrict__ sxf,
                                            const unsigned char *__restrict__ srow, int lane,
                                            float (&acc)[NT][4]) {
    const int t = lane & 3;
#pragma unroll
    for (int p = 0; p < SKF_SPANS; ++p) {
        const int sp = sp0 + p;
        if (sp >= spans) break;
        float d[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) d[n][i] = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint4 &wg = w[p][0], &wg8 = w[p][1];
            const unsigned int vg = j == 0 ? wg.x : j == 1 ? wg.y : j == 2 ? wg.z : wg.w;
            const unsigned int v8 = j == 0 ? wg8.x : j == 1 ? wg8.y : j == 2 ? wg8.z : wg8.w;
            const unsigned int a0 = dsk_e4m3x2_to_f16x2(vg & 0xffffu), a2 = dsk_e4m3x2_to_f16x2(vg >> 16);
            const unsigned int a1 = dsk_e4m3x2_to_f16x2(v8 & 0xffffu), a3 = dsk_e4m3x2_to_f16x2(v8 >> 16);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 b = bfr[((sp * 4 + j) * NT + n) * 32 + lane];
                dsk_mma_f16_m16n8k16(d[n], a0, a1, a2, a3, b.x, b.y);
                dsk_mma_f16_m16n8k16(d[n], a0, a1, a2, a3, b.z, b.w);
            }
        }
        const float ws = dsk_e8m0_to_f32(srow[(k0 + sp * 64) >> 7]);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            // C fragment: d[i] is token 8 n + 2 t + (i & 1); the span's unscale of each token.
            const float2 u = *reinterpret_cast<const float2 *>(sxf + sp * 16 + 8 * n + 2 * t);
            const float f0 = ws * u.x, f1 = ws * u.y;
            acc[n][0] = fmaf(f0, d[n][0], acc[n][0]);
            acc[n][1] = fmaf(f1, d[n][1], acc[n][1]);
            acc[n][2] = fmaf(f0, d[n][2], acc[n][2]);
            acc[n][3] = fmaf(f1, d[n][3], acc[n][3]);
        }
    }
}

// One (token, quad of 4 k) item of the staging: scale by the span's power of two (the max over
// the 16 lanes of the half-warp, which hold the span's 16 quads), split, store the fragment.
template <int NT>
__device__ __forceinline__ void skf_stage_item(float4 v, int tok, int q, uint4 *__restrict__ bfr,
                                               float *__restrict__ sxf) {
    float mx = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int o = 8; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const int ex = (int)((__float_as_uint(mx) >> 23) & 0xffu) - 127;
    const int sf = max(-126, min(126, 14 - ex));
    const float up = __uint_as_float((unsigned int)(127 + sf) << 23);
    const float e0 = v.x * up, e1 = v.y * up, e2 = v.z * up, e3 = v.w * up;
    const unsigned int h01 = dsk_f32x2_to_f16x2(e0, e1), h23 = dsk_f32x2_to_f16x2(e2, e3);
    float r0, r1, r2, r3;
    dsk_f16x2_to_f32(h01, r0, r1);
    dsk_f16x2_to_f32(h23, r2, r3);
    const unsigned int l01 = dsk_f32x2_to_f16x2(e0 - r0, e1 - r1), l23 = dsk_f32x2_to_f16x2(e2 - r2, e3 - r3);
    const int sp = q >> 4, tq = (q >> 2) & 3, j = q & 3;
    bfr[((sp * 4 + j) * NT + (tok >> 3)) * 32 + (tok & 7) * 4 + tq] = make_uint4(h01, h23, l01, l23);
    if ((threadIdx.x & 15) == 0) sxf[sp * 16 + tok] = __uint_as_float((unsigned int)(127 - sf) << 23);
}

// Block: WARPS warps of one 16-row tile each (ROWS = 16 WARPS), rank c of a cluster of `cl`
// blocks along x taking k range [c K / cl, (c + 1) K / cl) (Kb, a multiple of 64). Dynamic shared
// memory: B fragments [Kb / 16][NT][32] uint4, span unscales [Kb / 64][16] f32, the partial tile
// [16][ROWS + 4] f32 (the pad spreads a fragment's tokens over the banks).
// EARLY: spans of the first round whose loads go out before the PDL wait; the rest go out right
// after the staging's activation loads (SKF_SPANS, every span early, is what the kernels below
// run; tools/proj_chain_bench.cu times fewer: a lane's 16 loads in flight may hold back the
// staging's own loads). Which loads go first changes no arithmetic: the same bits.
template <int NT, int WARPS, int EARLY = SKF_SPANS>
__device__ __forceinline__ void skf_body(const unsigned char *__restrict__ W, const unsigned char *__restrict__ S,
                                         const float *__restrict__ x, float *__restrict__ out, int M, int N,
                                         int K, long ld_x, long ld_out, int group_rows, long x_group_stride,
                                         int cl) {
    constexpr int ROWS = 16 * WARPS, RS = ROWS + 4;
    extern __shared__ uint4 skf_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Cluster rank and index from the special registers: no integer division on the chain.
    const int c = cl > 1 ? (int)dsk_cluster_rank() : 0;
    const int r0 = (cl > 1 ? (int)dsk_cluster_id_x() : (int)blockIdx.x) * ROWS;
    const int Kb = K / cl, k0 = c * Kb, spans = Kb >> 6;
    uint4 *bfr = skf_smem;
    float *sxf = reinterpret_cast<float *>(bfr + (Kb >> 4) * NT * 32);
    float *red = sxf + spans * 16;
    const float *xb = x + (long)(min(r0, N - 1) / group_rows) * x_group_stride + k0;

    // Rows g and g + 8 of the warp's tile (past N: row N - 1, loaded but never written).
    const int rt = r0 + warp * 16;
    const unsigned char *wrow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[h] = W + (long)min(rt + 8 * h + g, N - 1) * K + k0 + 16 * t;
    const unsigned char *srow = S + (long)(min(rt, N - 1) >> 7) * ((K + 127) >> 7);
    // Weights are never written while a step runs: the first round's loads go out before the
    // wait for the previous kernel (programmatic dependent launch: they overlap its tail).
    uint4 w[SKF_SPANS][2];
    skf_load_part<0, EARLY>(w, wrow, 0, spans);
    dsk_pdl_entry();

    // Stage while the weights are in flight: item (token, quad of 4 k), quads fastest (Kb / 4 is
    // a multiple of 16 and blockDim of 32, so a half-warp holds one span of one token); eight
    // loads in flight per thread, tokens past M as zeros without a load. The items (2 NT Kb) are
    // whole rounds of the block's threads: for 8 warps the host's plan keeps Kb % 128 == 0.
    // Item it = (token it / quads, quad it % quads); a thread's items step by blockDim, so their
    // (token, quad) are carried from one to the next (one division a thread, not one an item).
    const int quads = Kb >> 2, per_thread = 8 * NT * quads / blockDim.x;
    const int step_tok = blockDim.x / quads, step_q = blockDim.x - step_tok * quads;
    int tok_n = threadIdx.x / quads, q_n = threadIdx.x - tok_n * quads;
    for (int b0 = 0; b0 < per_thread; b0 += 8) {
        float4 v[8];
        int tok[8], q[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            tok[u] = tok_n;
            q[u] = q_n;
            q_n += step_q;
            tok_n += step_tok;
            if (q_n >= quads) {
                q_n -= quads;
                ++tok_n;
            }
            v[u] = b0 + u < per_thread && tok[u] < M
                       ? __ldg(reinterpret_cast<const float4 *>(xb + (long)tok[u] * ld_x) + q[u])
                       : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        if (b0 == 0) skf_load_part<EARLY, SKF_SPANS>(w, wrow, 0, spans);
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            if (b0 + u < per_thread) skf_stage_item<NT>(v[u], tok[u], q[u], bfr, sxf);
        }
    }
    if (per_thread == 0) skf_load_part<EARLY, SKF_SPANS>(w, wrow, 0, spans);
    __syncthreads();

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
    skf_compute<NT>(w, 0, spans, k0, bfr, sxf, srow, lane, acc);
    // K ranges past one round (more than 8 x 512 k in all) load and compute in turn.
    for (int s0 = SKF_SPANS; s0 < spans; s0 += SKF_SPANS) {
        skf_load(w, wrow, s0, spans);
        skf_compute<NT>(w, s0, spans, k0, bfr, sxf, srow, lane, acc);
    }

    // The block's partial tile, then the cluster's sum: block c writes rows [c R / cl, (c+1) R / cl)
    // of the output, adding the ranks' partials in rank order.
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[(8 * n + 2 * t + (i & 1)) * RS + warp * 16 + g + 8 * (i >> 1)] = acc[n][i];
    if (cl > 1) dsk_cluster_sync(); else __syncthreads();
    // Output o = (token o / per, row o % per of this block's share), carried as in the staging.
    const int per = ROWS / cl, o_tok = blockDim.x / per, o_rl = blockDim.x - o_tok * per;
    int tok = threadIdx.x / per, rl = threadIdx.x - tok * per;
    for (int o = threadIdx.x; o < M * per; o += blockDim.x) {
        const int col = c * per + rl, row = r0 + col;
        if (row < N) {
            const float *p = red + tok * RS + col;
            float v;
            if (cl == 1) {
                v = *p;
            } else {
                v = dsk_ld_cluster(p, 0);
                for (int q = 1; q < cl; ++q) v += dsk_ld_cluster(p, q);
            }
            out[(long)tok * ld_out + row] = v;
        }
        rl += o_rl;
        tok += o_tok;
        if (rl >= per) {
            rl -= per;
            ++tok;
        }
    }
    // No block may leave while another still reads its partial tile; every remote value read
    // above was stored before this arrive.
    if (cl > 1) {
        dsk_cluster_exit_arrive();
        dsk_cluster_exit_wait();
    }
}

// At most 128 registers a thread: four 4-warp or two 8-warp blocks an SM.
#define SKF_INST(NAME, NT, WARPS)                                                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 16 / WARPS) NAME(                       \
        const unsigned char *__restrict__ W, const unsigned char *__restrict__ S,                     \
        const float *__restrict__ x, float *__restrict__ out, int M, int N, int K, long ld_x,        \
        long ld_out, int group_rows, long x_group_stride, int cl) {                                  \
        skf_body<NT, WARPS>(W, S, x, out, M, N, K, ld_x, ld_out, group_rows, x_group_stride, cl);   \
    }

SKF_INST(dsk_skinny_f16_fp8_t8_r64, 1, 4)
SKF_INST(dsk_skinny_f16_fp8_t8_r128, 1, 8)
SKF_INST(dsk_skinny_f16_fp8_t16_r64, 2, 4)
SKF_INST(dsk_skinny_f16_fp8_t16_r128, 2, 8)
