// FP8 (e4m3) weight x activation GEMV / skinny GEMM for decode: out[m, n] = sum_k x[m, k] * W[n, k]
// with W = e4m3 * 2^(s - 127), s the E8M0 byte of W's 128x128 block, f32 accumulation.
//
// Layout: W [N, K] row-major bytes; S [ceil(N/128), ceil(K/128)] bytes; x [M, K] (bf16 or f32,
// row stride K); out [M, N] (f32 or bf16, row stride N). Requires K % 16 == 0, 16-byte aligned W
// rows (K % 16 == 0 gives that) and x rows, M <= MT.
//
// Work split: a block is 8 warps; a warp owns a PAIR of rows (so every activation load feeds two
// rows) and `ksplit` warps share one pair along K (so small-N matrices still fill 132 SMs). Each
// lane reads 16 weight bytes per step; 16 | 128 so a 16-byte chunk has exactly one scale.

#define FP8_WARPS 8

template <int MT> struct XLoadBf16 {
    __device__ static __forceinline__ void load(const void *x, int K, int m, int c, float (&xf)[16]) {
        const uint4 *p = reinterpret_cast<const uint4 *>(reinterpret_cast<const unsigned short *>(x) + (long)m * K + c * 16);
        uint4 a = __ldg(p), b = __ldg(p + 1);
        xf[0] = dsk_bf16lo(a.x); xf[1] = dsk_bf16hi(a.x); xf[2] = dsk_bf16lo(a.y); xf[3] = dsk_bf16hi(a.y);
        xf[4] = dsk_bf16lo(a.z); xf[5] = dsk_bf16hi(a.z); xf[6] = dsk_bf16lo(a.w); xf[7] = dsk_bf16hi(a.w);
        xf[8] = dsk_bf16lo(b.x); xf[9] = dsk_bf16hi(b.x); xf[10] = dsk_bf16lo(b.y); xf[11] = dsk_bf16hi(b.y);
        xf[12] = dsk_bf16lo(b.z); xf[13] = dsk_bf16hi(b.z); xf[14] = dsk_bf16lo(b.w); xf[15] = dsk_bf16hi(b.w);
    }
};

template <int MT> struct XLoadF32 {
    __device__ static __forceinline__ void load(const void *x, int K, int m, int c, float (&xf)[16]) {
        const float4 *p = reinterpret_cast<const float4 *>(reinterpret_cast<const float *>(x) + (long)m * K + c * 16);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float4 v = __ldg(p + q);
            xf[4 * q] = v.x; xf[4 * q + 1] = v.y; xf[4 * q + 2] = v.z; xf[4 * q + 3] = v.w;
        }
    }
};

__device__ __forceinline__ void fp8_decode16(uint4 w, float (&f)[16]) {
    unsigned int words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        dsk_e4m3x2_to_f32(words[q] & 0xffffu, f[4 * q], f[4 * q + 1]);
        dsk_e4m3x2_to_f32(words[q] >> 16, f[4 * q + 2], f[4 * q + 3]);
    }
}

template <int MT, template <int> class XL>
__device__ __forceinline__ void fp8_gemv_body(const unsigned char *__restrict__ W,
                                              const unsigned char *__restrict__ S,
                                              const void *__restrict__ x, void *__restrict__ out,
                                              int out_bf16, int M, int N, int K, int ksplit) {
    __shared__ float red[FP8_WARPS][2][MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pairs_per_block = FP8_WARPS / ksplit;
    const int pair = warp / ksplit, kpart = warp % ksplit;
    const int r0 = (blockIdx.x * pairs_per_block + pair) * 2;
    const int r0c = min(r0, N - 1), r1c = min(r0 + 1, N - 1);
    const int C = K >> 4, KB = (K + 127) >> 7;
    const unsigned char *w0 = W + (long)r0c * K, *w1 = W + (long)r1c * K;
    const unsigned char *s0 = S + (long)(r0c >> 7) * KB, *s1 = S + (long)(r1c >> 7) * KB;

    float acc0[MT], acc1[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) { acc0[m] = 0.f; acc1[m] = 0.f; }

#pragma unroll 2
    for (int c = kpart * 32 + lane; c < C; c += 32 * ksplit) {
        const uint4 q0 = dsk_ld_stream16(w0 + c * 16), q1 = dsk_ld_stream16(w1 + c * 16);
        const float sc0 = dsk_e8m0_to_f32(s0[c >> 3]), sc1 = dsk_e8m0_to_f32(s1[c >> 3]);
        float f0[16], f1[16];
        fp8_decode16(q0, f0);
        fp8_decode16(q1, f1);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < M) {
                float xf[16];
                XL<MT>::load(x, K, m, c, xf);
                float p0 = 0.f, p1 = 0.f;
#pragma unroll
                for (int j = 0; j < 16; ++j) { p0 = fmaf(f0[j], xf[j], p0); p1 = fmaf(f1[j], xf[j], p1); }
                acc0[m] = fmaf(sc0, p0, acc0[m]);
                acc1[m] = fmaf(sc1, p1, acc1[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) { acc0[m] = dsk_warp_sum(acc0[m]); acc1[m] = dsk_warp_sum(acc1[m]); }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MT; ++m) { red[warp][0][m] = acc0[m]; red[warp][1][m] = acc1[m]; }
    }
    __syncthreads();
    // The first warp of each pair sums the ksplit partials: lane = row * MT + m.
    if (kpart == 0 && lane < 2 * MT) {
        const int rr = lane / MT, m = lane % MT;
        const int row = r0 + rr;
        if (m < M && row < N) {
            float v = 0.f;
            for (int s = 0; s < ksplit; ++s) v += red[warp + s][rr][m];
            if (out_bf16) reinterpret_cast<unsigned short *>(out)[(long)m * N + row] = dsk_f32_to_bf16(v);
            else reinterpret_cast<float *>(out)[(long)m * N + row] = v;
        }
    }
}

#define FP8_GEMV_INST(NAME, MT, XL)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                          \
        const unsigned char *__restrict__ W, const unsigned char *__restrict__ S,                     \
        const void *__restrict__ x, void *__restrict__ out, int out_bf16, int M, int N, int K,       \
        int ksplit) {                                                                                 \
        fp8_gemv_body<MT, XL>(W, S, x, out, out_bf16, M, N, K, ksplit);                               \
    }

FP8_GEMV_INST(dsk_fp8_gemv_xbf16_m1, 1, XLoadBf16)
FP8_GEMV_INST(dsk_fp8_gemv_xbf16_m2, 2, XLoadBf16)
FP8_GEMV_INST(dsk_fp8_gemv_xbf16_m4, 4, XLoadBf16)
FP8_GEMV_INST(dsk_fp8_gemv_xbf16_m8, 8, XLoadBf16)
FP8_GEMV_INST(dsk_fp8_gemv_xbf16_m16, 16, XLoadBf16)
FP8_GEMV_INST(dsk_fp8_gemv_xf32_m1, 1, XLoadF32)
FP8_GEMV_INST(dsk_fp8_gemv_xf32_m2, 2, XLoadF32)
FP8_GEMV_INST(dsk_fp8_gemv_xf32_m4, 4, XLoadF32)
FP8_GEMV_INST(dsk_fp8_gemv_xf32_m8, 8, XLoadF32)
FP8_GEMV_INST(dsk_fp8_gemv_xf32_m16, 16, XLoadF32)
