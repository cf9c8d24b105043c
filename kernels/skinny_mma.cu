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

    for (int s0 = warp; s0 < spans; s0 += 2 * WARPS) {
        const bool second = s0 + WARPS < spans;
        uint4 wv[2][MTILES][2];
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            const long off = (long)(s0 + p * WARPS) * 64;
#pragma unroll
            for (int a = 0; a < MTILES; ++a)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wv[p][a][h] = (p == 0 || second) ? dsk_ld_stream16(wrow[a][h] + off) : make_uint4(0u, 0u, 0u, 0u);
        }
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
        dsk_pdl_entry();                                                                                 \
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
