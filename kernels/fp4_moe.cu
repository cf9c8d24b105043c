// FP4 (e2m1) routed experts for decode: only the experts each token selected are touched.
//
// Weights (the checkpoint's layout): W [E, rows, K/2] bytes, element 2j in the LOW nibble of byte j;
// S [E, rows, K/32] E8M0 bytes, one per 32 values along K. A 16-byte chunk is exactly 32 values,
// so one scale covers one chunk.
//
// dsk_fp4_moe_gate_up: h[p, i] = silu(min(g, limit)) * clamp(u, -limit, limit) with
//   g = W1[e_p][i, :] . x[t_p], u = W3[e_p][i, :] . x[t_p], p = t * topk + j, e_p = ids[p].
// dsk_fp4_moe_down:    out[t, n] = sum_j weight[t, j] * (W2[e][n, :] . h[t * topk + j, :]).
// x, h, weights f32; out f32 or bf16. Expert ids outside [0, E) are skipped (their h row is 0 and
// they add nothing), so a bad id can never read out of bounds.
//
// A warp owns one output row (gate_up: the gate and up rows together), a block 8 warps. The grid's
// fastest axis is the (token, slot) pair / token, so blocks reading the same expert rows for
// different tokens run together and the repeats are served by L2.

#define MOE_WARPS 8

// Dot of one 16-byte FP4 chunk (32 values, times 2^-14, see common.cuh) with 32 f32 activations.
__device__ __forceinline__ float fp4_chunk_dot(uint4 w, const float *__restrict__ xc) {
    const float4 *x4 = reinterpret_cast<const float4 *>(xc);
    unsigned int words[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        // Word q holds elements 8q..8q+7, nibble p = element 8q+p; pair (p, p+4) shares one f16x2.
        const float4 xa = __ldg(x4 + 2 * q), xb = __ldg(x4 + 2 * q + 1);
        const float xs_lo[4] = {xa.x, xa.y, xa.z, xa.w};
        const float xs_hi[4] = {xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            float lo, hi;
            dsk_f16x2_to_f32(dsk_e2m1_pair_f16x2_scaled(words[q] >> (4 * p)), lo, hi);
            acc = fmaf(lo, xs_lo[p], acc);
            acc = fmaf(hi, xs_hi[p], acc);
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
    const int p = blockIdx.x;               // (token, slot) pair
    const int t = p / topk;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i = blockIdx.y * MOE_WARPS + warp;
    if (i >= I) return;
    const int e = ids[p];
    if (e < 0 || e >= E) {
        if (lane == 0) h[(long)p * I + i] = 0.f;
        return;
    }
    const int C = K >> 5;                   // 16-byte chunks per row
    const long row = (long)e * I + i;
    const unsigned char *w1 = W1 + row * (K >> 1), *w3 = W3 + row * (K >> 1);
    const unsigned char *s1 = S1 + row * C, *s3 = S3 + row * C;
    const float *xt = x + (long)t * K;
    float g = 0.f, u = 0.f;
#pragma unroll 4
    for (int c = lane; c < C; c += 32) {
        const uint4 a = dsk_ld_stream16(w1 + c * 16), b = dsk_ld_stream16(w3 + c * 16);
        const float sa = fp4_scale(s1[c]), sb = fp4_scale(s3[c]);
        g = fmaf(sa, fp4_chunk_dot(a, xt + c * 32), g);
        u = fmaf(sb, fp4_chunk_dot(b, xt + c * 32), u);
    }
    g = dsk_warp_sum(g);
    u = dsk_warp_sum(u);
    if (lane == 0) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        h[(long)p * I + i] = g / (1.f + expf(-g)) * u;
    }
}

extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_down(
    const float *__restrict__ h, const int *__restrict__ ids, const float *__restrict__ weights,
    const unsigned char *__restrict__ W2, const unsigned char *__restrict__ S2,
    void *__restrict__ out, int out_bf16, int topk, int E, int N, int I) {
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = blockIdx.y * MOE_WARPS + warp;
    if (n >= N) return;
    const int C = I >> 5;
    float acc = 0.f;
    for (int j = 0; j < topk; ++j) {
        const int p = t * topk + j;
        const int e = ids[p];
        if (e < 0 || e >= E) continue;
        const long row = (long)e * N + n;
        const unsigned char *w2 = W2 + row * (I >> 1);
        const unsigned char *s2 = S2 + row * C;
        const float *hp = h + (long)p * I;
        float part = 0.f;
#pragma unroll 2
        for (int c = lane; c < C; c += 32) {
            const uint4 a = dsk_ld_stream16(w2 + c * 16);
            part = fmaf(fp4_scale(s2[c]), fp4_chunk_dot(a, hp + c * 32), part);
        }
        acc = fmaf(weights[p], part, acc);
    }
    acc = dsk_warp_sum(acc);
    if (lane == 0) {
        if (out_bf16) reinterpret_cast<unsigned short *>(out)[(long)t * N + n] = dsk_f32_to_bf16(acc);
        else reinterpret_cast<float *>(out)[(long)t * N + n] = acc;
    }
}
