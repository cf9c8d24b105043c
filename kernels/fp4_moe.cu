// FP4 (e2m1) routed experts for decode: only the experts each token selected are touched.
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

// out[t, n] = sum over the token's slots, in slot order. One thread per output element.
extern "C" __global__ void __launch_bounds__(256) dsk_fp4_moe_combine(
    const float *__restrict__ y, void *__restrict__ out, int out_bf16, int T, int topk, int N) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)T * N) return;
    const long t = idx / N, n = idx % N;
    float acc = 0.f;
    for (int j = 0; j < topk; ++j) acc += y[(t * topk + j) * N + n];
    if (out_bf16) reinterpret_cast<unsigned short *>(out)[idx] = dsk_f32_to_bf16(acc);
    else reinterpret_cast<float *>(out)[idx] = acc;
}
