// bf16 weight x f32 activation GEMV / skinny GEMM for decode: out[m, n] = sum_k x[m, k] * W[n, k]
// with f32 FMAs. bf16 -> f32 is exact, so every product is the f32 product of the f32 reference
// (a widened copy of W): only the summation order differs.
//
// Layout: W [N, K] bf16 row-major; x [M, K] f32 (row stride K); out [M, N] f32 (row stride N).
// Requires K % 8 == 0 (16-byte weight rows and 32-byte activation rows) and M <= MT.
//
// Work split (as fp8_gemv.cu): a block is 8 warps; a warp owns BG_ROWS consecutive rows, so every
// activation load feeds BG_ROWS rows, and `ksplit` warps share one row group along K, so a
// small-N matrix still fills every SM. Each lane streams 16 weight bytes (8 bf16) per row per
// step past L1; activations go through L1 (__ldg), where all rows of a block reuse them.

#define BG_WARPS 8
#define BG_ROWS 4

__device__ __forceinline__ void bg_unpack8(uint4 w, float (&f)[8]) {
    f[0] = dsk_bf16lo(w.x); f[1] = dsk_bf16hi(w.x); f[2] = dsk_bf16lo(w.y); f[3] = dsk_bf16hi(w.y);
    f[4] = dsk_bf16lo(w.z); f[5] = dsk_bf16hi(w.z); f[6] = dsk_bf16lo(w.w); f[7] = dsk_bf16hi(w.w);
}

template <int MT>
__device__ __forceinline__ void bf16_gemv_body(const unsigned short *__restrict__ W,
                                               const float *__restrict__ x,
                                               float *__restrict__ out, int M, int N, int K,
                                               int ksplit, int block) {
    __shared__ float red[BG_WARPS][BG_ROWS][MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups_per_block = BG_WARPS / ksplit;
    const int group = warp / ksplit, kpart = warp % ksplit;
    const long r0 = ((long)block * groups_per_block + group) * BG_ROWS;
    const int C = K >> 3;
    // Rows past N read row N - 1 (valid memory) and are never written.
    const unsigned short *wr[BG_ROWS];
#pragma unroll
    for (int r = 0; r < BG_ROWS; ++r) wr[r] = W + min(r0 + r, (long)N - 1) * K;

    float acc[BG_ROWS][MT];
#pragma unroll
    for (int r = 0; r < BG_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    // Weights are never written while a step runs, so the first chunk's loads go out before
    // the wait for the previous kernel (programmatic dependent launch: they overlap its tail);
    // each later chunk's loads go out before the previous chunk's arithmetic.
    const int cstep = 32 * ksplit;
    int c = kpart * 32 + lane;
    uint4 next[BG_ROWS];
#pragma unroll
    for (int r = 0; r < BG_ROWS; ++r) next[r] = c < C ? dsk_ld_stream16(wr[r] + c * 8) : make_uint4(0u, 0u, 0u, 0u);
    dsk_pdl_entry();

#pragma unroll 2
    for (; c < C; c += cstep) {
        uint4 q[BG_ROWS];
#pragma unroll
        for (int r = 0; r < BG_ROWS; ++r) {
            q[r] = next[r];
            if (c + cstep < C) next[r] = dsk_ld_stream16(wr[r] + (c + cstep) * 8);
        }
        float f[BG_ROWS][8];
#pragma unroll
        for (int r = 0; r < BG_ROWS; ++r) bg_unpack8(q[r], f[r]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < M) {
                const float4 *xp = reinterpret_cast<const float4 *>(x + (long)m * K + c * 8);
                const float4 a = __ldg(xp), b = __ldg(xp + 1);
                const float xf[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int r = 0; r < BG_ROWS; ++r) {
                    float p = acc[r][m];
#pragma unroll
                    for (int j = 0; j < 8; ++j) p = fmaf(f[r][j], xf[j], p);
                    acc[r][m] = p;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < BG_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = dsk_warp_sum(acc[r][m]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < BG_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < MT; ++m) red[warp][r][m] = acc[r][m];
    }
    __syncthreads();
    // The first warp of each group sums its ksplit partials in a fixed order: o = row * MT + m.
    if (kpart == 0) {
        for (int o = lane; o < BG_ROWS * MT; o += 32) {
            const int rr = o / MT, m = o % MT;
            const long row = r0 + rr;
            if (m < M && row < N) {
                float v = 0.f;
                for (int s = 0; s < ksplit; ++s) v += red[warp + s][rr][m];
                out[(long)m * N + row] = v;
            }
        }
    }
}

// grid.y tiles the tokens MT at a time (tile y: tokens y MT .. y MT + MT - 1 of M). More than 4
// tokens run as 4-token tiles: a block holding 16 spent its issue slots on 16 FMAs and activation
// loads per weight, and a small matrix (the router's 256 rows) gave only 64 blocks (18 us at 16
// tokens); tiles give 4x the blocks, the weights re-read from L2, each token's arithmetic (and
// bits) unchanged.
#define BF16_GEMV_INST(NAME, MT)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                          \
        const unsigned short *__restrict__ W, const float *__restrict__ x, float *__restrict__ out,  \
        int M, int N, int K, int ksplit) {                                                           \
        const int t0 = blockIdx.y * MT;                                                              \
        bf16_gemv_body<MT>(W, x + (long)t0 * K, out + (long)t0 * N, min(MT, M - t0), N, K, ksplit,   \
                           blockIdx.x);                                                              \
    }

BF16_GEMV_INST(dsk_bf16_gemv_xf32_m1, 1)
BF16_GEMV_INST(dsk_bf16_gemv_xf32_m2, 2)
BF16_GEMV_INST(dsk_bf16_gemv_xf32_m4, 4)

// One f32 activation row through every bf16 segment of `segs` (DskGemvSegments, scales unused) in
// one launch, each row computed as dsk_bf16_gemv_xf32_m1 computes it for that matrix alone.
extern "C" __global__ void __launch_bounds__(256) dsk_bf16_gemv_multi_xf32_m1(
    const __grid_constant__ DskGemvSegments segs, const float *__restrict__ x, int K) {
    // The body waits for the previous kernel (after its first weight loads).
    int block;
    const int i = dsk_gemv_segment(segs, blockIdx.x, block);
    bf16_gemv_body<1>(reinterpret_cast<const unsigned short *>(segs.w[i]), x,
                      reinterpret_cast<float *>(segs.out[i]), 1, segs.n[i], K, segs.ksplit[i], block);
}

// dst[i] = f32(src[i]), i < len. 8 values per thread per step (16-byte load, two 16-byte stores);
// the last len % 8 one by one. src and dst 16-byte aligned (checked at launch).
extern "C" __global__ void __launch_bounds__(256) dsk_widen_bf16_f32(
    const unsigned short *__restrict__ src, float *__restrict__ dst, long len) {
    dsk_pdl_entry();
    const long groups = len >> 3;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long g = (long)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const uint4 w = dsk_ld_stream16(src + g * 8);
        float f[8];
        bg_unpack8(w, f);
        float4 *d = reinterpret_cast<float4 *>(dst + g * 8);
        d[0] = make_float4(f[0], f[1], f[2], f[3]);
        d[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    if (blockIdx.x == 0) {
        for (long i = groups * 8 + threadIdx.x; i < len; i += blockDim.x) dst[i] = dsk_bf16_to_f32(src[i]);
    }
}

// out[i, :] = f32(W[ids[i], :]) for i < n (embedding lookup): one block per id, K % 8 == 0.
// An id outside [0, rows) writes a zero row (never reads past W).
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_bf16(
    const unsigned short *__restrict__ W, const int *__restrict__ ids, float *__restrict__ out,
    int n, int K, int rows) {
    dsk_pdl_entry();
    const int i = blockIdx.x;
    if (i >= n) return;
    const int id = ids[i];
    const bool valid = id >= 0 && id < rows;
    const unsigned short *src = W + (long)(valid ? id : 0) * K;
    float *dst = out + (long)i * K;
    for (int c = threadIdx.x; c < (K >> 3); c += blockDim.x) {
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (valid) bg_unpack8(__ldg(reinterpret_cast<const uint4 *>(src + c * 8)), f);
        float4 *d = reinterpret_cast<float4 *>(dst + c * 8);
        d[0] = make_float4(f[0], f[1], f[2], f[3]);
        d[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
}
