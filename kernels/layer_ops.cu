// f32 "layer ops" of the device-resident decode path: RMSNorm, RoPE, hyper-connections (mHC),
// the MoE router and small dense SwiGLU experts. Each mirrors the server's host code
// (engine/model/{ops,rope,hyper,forward}.rs); elementwise steps use __fmul_rn/__fadd_rn so NVRTC's
// default FMA contraction does not change their rounding against the host. Reductions are
// parallel (not the host's sequential order), so sums agree to f32 rounding, not bit for bit.

#define LO_BLOCK 256
// Tokens one hc_mix block keeps accumulators for (grid.z covers more).
#define LO_MIX_TOKENS 16
#define LO_HC_MAX 8
#define LO_ROUTE_MAX_E 1024
#define LO_ROUTE_MAX_K 16

// Sum over a block of LO_BLOCK threads; every thread gets the result. `red` holds 32 floats.
__device__ __forceinline__ float lo_block_sum(float v, float *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = dsk_warp_sum(v);
    __syncthreads();  // `red` may still be read from a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.0f;
    if (warp == 0) {
        t = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
        t = dsk_warp_sum(t);
        if (lane == 0) red[0] = t;
    }
    __syncthreads();
    return red[0];
}

__device__ __forceinline__ float lo_sigmoid(float x) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

// 1 / sqrt(sum(xr^2) / dim + eps) of one row, summed by the whole block (the same order for
// every kernel that norms a row with it, so they agree bit for bit).
__device__ __forceinline__ float lo_rms_inv(const float *xr, int dim, float eps, float *red) {
    float sq = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) sq = fmaf(xr[c], xr[c], sq);
    const float ms = __fdiv_rn(lo_block_sum(sq, red), (float)dim);
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: out = w * (v * inv), inv = 1 / sqrt(sum(v^2) / dim + eps); one block per row.
// weight may be null (no weight). x == out is fine: each thread rewrites only what it read.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_rms_norm_f32(
    const float *x, float *out, const float *__restrict__ weight, int dim, long long ld_x,
    long long ld_out, float eps) {
    dsk_pdl_entry();
    __shared__ float red[32];
    const float *xr = x + (long long)blockIdx.x * ld_x;
    float *orow = out + (long long)blockIdx.x * ld_out;
    const float inv = lo_rms_inv(xr, dim, eps, red);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        const float v = __fmul_rn(xr[c], inv);
        orow[c] = weight ? __fmul_rn(weight[c], v) : v;
    }
}

// RMSNorm then RoPE of each row in one launch: row r = t * heads + h of x [rows, dim] (row
// stride ld_x; out likewise, x == out allowed) is normed as dsk_lo_rms_norm_f32 does (same block
// size, so the same sum), and its trailing rope_dim channels rotated at positions[t] as
// dsk_lo_rope_f32 does: the bits of the two launches it replaces (the query heads' and the
// latent KV row's norm + RoPE of every attention layer).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_rms_norm_rope_f32(
    const float *x, float *out, const float *__restrict__ weight, int dim, long long ld_x,
    long long ld_out, float eps, const int *__restrict__ positions,
    const float *__restrict__ inv_freq, int heads, int rope_dim, float attention_factor) {
    dsk_pdl_entry();
    __shared__ float red[32];
    const float *xr = x + (long long)blockIdx.x * ld_x;
    float *orow = out + (long long)blockIdx.x * ld_out;
    // Every read of the row for the sum precedes its barrier: the writes below may overwrite it
    // in place (each thread rewrites only channels it reads again itself).
    const float inv = lo_rms_inv(xr, dim, eps, red);
    const int rope0 = dim - rope_dim;
    for (int c = threadIdx.x; c < rope0; c += blockDim.x) {
        const float v = __fmul_rn(xr[c], inv);
        orow[c] = weight ? __fmul_rn(weight[c], v) : v;
    }
    const int pos = positions[blockIdx.x / heads];
    for (int j = threadIdx.x; j < (rope_dim >> 1); j += blockDim.x) {
        const int c = rope0 + 2 * j;
        float v0 = __fmul_rn(xr[c], inv), v1 = __fmul_rn(xr[c + 1], inv);
        if (weight) {
            v0 = __fmul_rn(weight[c], v0);
            v1 = __fmul_rn(weight[c + 1], v1);
        }
        float y0, y1;
        dsk_rope_pair_f32(v0, v1, inv_freq[j], pos, attention_factor, false, y0, y1);
        orow[c] = y0;
        orow[c + 1] = y1;
    }
}

// ---------------------------------------------------------------------------------------------
// Interleaved RoPE on the trailing rope_dim channels of x [tokens, heads, head_dim] (in place).
// As RopeTable::cos_sin: the angle is the f32 product inv_freq * pos, widened; cos/sin in
// double, rounded to f32, then times the attention factor.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_rope_f32(
    float *x, const int *__restrict__ positions, const float *__restrict__ inv_freq, int tokens,
    int heads, int head_dim, int rope_dim, long long ld_token, long long ld_head,
    float attention_factor, int inverse) {
    dsk_pdl_entry();
    const int half = rope_dim >> 1;
    const long long total = (long long)tokens * heads * half;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(i % half);
        const long long th = i / half;
        const int h = (int)(th % heads);
        const int t = (int)(th / heads);
        float *r = x + t * ld_token + h * ld_head + (head_dim - rope_dim) + 2 * j;
        dsk_rope_pair_f32(r[0], r[1], inv_freq[j], positions[t], attention_factor, inverse != 0,
                          r[0], r[1]);
    }
}

// ---------------------------------------------------------------------------------------------
// Hyper-connection projections, split along the width so one token fills the GPU.
// Block (kc, o, tz): chunk kc of the width, output o, tokens tz*16 .. +16. Writes
// partial[(kc * n + t) * outs + o] = sum_chunk v[t, c] * fn[o, c]; blocks with o == 0 also
// sq[kc * n + t] = sum_chunk v[t, c]^2. The reduce applies the RMS scale to the finished dot
// (inv * dot instead of the host's dot(v * inv): equal up to f32 rounding).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_mix_partial_f32(
    const float *__restrict__ streams, const float *__restrict__ fn, float *__restrict__ partial,
    float *__restrict__ sq, int n, int width, int outs, int chunk) {
    dsk_pdl_entry();
    __shared__ float red[32];
    const int kc = blockIdx.x, o = blockIdx.y, t0 = blockIdx.z * LO_MIX_TOKENS;
    const int nt = min(LO_MIX_TOKENS, n - t0);
    const int c0 = kc * chunk, c1 = min(width, c0 + chunk);
    const float *f = fn + (long long)o * width;
    float acc[LO_MIX_TOKENS], acc2[LO_MIX_TOKENS];
#pragma unroll
    for (int t = 0; t < LO_MIX_TOKENS; ++t) acc[t] = acc2[t] = 0.0f;
    for (int c = c0 + threadIdx.x; c < c1; c += blockDim.x) {
        const float w = f[c];
#pragma unroll
        for (int t = 0; t < LO_MIX_TOKENS; ++t) {
            if (t < nt) {
                const float v = streams[(long long)(t0 + t) * width + c];
                acc[t] = fmaf(v, w, acc[t]);
                acc2[t] = fmaf(v, v, acc2[t]);
            }
        }
    }
#pragma unroll 1
    for (int t = 0; t < nt; ++t) {
        const float d = lo_block_sum(acc[t], red);
        if (threadIdx.x == 0) partial[((long long)kc * n + t0 + t) * outs + o] = d;
        if (o == 0) {
            const float s = lo_block_sum(acc2[t], red);
            if (threadIdx.x == 0) sq[(long long)kc * n + t0 + t] = s;
        }
    }
}

// out[t, o] = inv_t * sum_kc partial, inv_t = 1 / sqrt(sum_kc sq / width + eps); one thread each.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_mix_reduce_f32(
    const float *__restrict__ partial, const float *__restrict__ sq, float *__restrict__ out,
    int n, int outs, int splits, int width, float eps) {
    dsk_pdl_entry();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * outs) return;
    const int t = i / outs, o = i % outs;
    float d = 0.0f, s = 0.0f;
    for (int kc = 0; kc < splits; ++kc) {
        d += partial[((long long)kc * n + t) * outs + o];
        s += sq[(long long)kc * n + t];
    }
    const float ms = __fdiv_rn(s, (float)width);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
    out[i] = __fmul_rn(d, inv);
}

// hyper.rs sinkhorn: row softmax + eps, column normalisation, then iters - 1 (row, column) rounds.
__device__ void lo_sinkhorn(float *m, int hc, int iters, float eps) {
    for (int r = 0; r < hc; ++r) {
        float mx = __int_as_float(0xff800000);  // -inf
        for (int c = 0; c < hc; ++c) mx = fmaxf(mx, m[r * hc + c]);
        float e[LO_HC_MAX];
        float sum = 0.0f;
        for (int c = 0; c < hc; ++c) {
            e[c] = expf(__fadd_rn(m[r * hc + c], -mx));
            sum = __fadd_rn(sum, e[c]);
        }
        for (int c = 0; c < hc; ++c) m[r * hc + c] = __fadd_rn(__fdiv_rn(e[c], sum), eps);
    }
    // The first column pass always runs (iters = 0 included), as in the host.
    for (int it = 0; it < max(iters, 1); ++it) {
        if (it > 0) {
            for (int r = 0; r < hc; ++r) {
                float s = 0.0f;
                for (int c = 0; c < hc; ++c) s = __fadd_rn(s, m[r * hc + c]);
                s = __fadd_rn(s, eps);
                for (int c = 0; c < hc; ++c) m[r * hc + c] = __fdiv_rn(m[r * hc + c], s);
            }
        }
        for (int c = 0; c < hc; ++c) {
            float s = 0.0f;
            for (int r = 0; r < hc; ++r) s = __fadd_rn(s, m[r * hc + c]);
            s = __fadd_rn(s, eps);
            for (int r = 0; r < hc; ++r) m[r * hc + c] = __fdiv_rn(m[r * hc + c], s);
        }
    }
}

// sum_k pre[k] * stream_k[c], k ascending from 0 (hyper.rs collapse).
__device__ __forceinline__ float lo_collapse(const float *s, const float *pre, int hc, int hidden,
                                             int c) {
    float acc = 0.0f;
    for (int k = 0; k < hc; ++k) acc = __fadd_rn(acc, __fmul_rn(pre[k], s[(long long)k * hidden + c]));
    return acc;
}

// HyperConnection::finish + collapse. Block (cx, t): every block derives pre for its token; the
// cx == 0 block also writes mix_out[t] = pre[hc], post[hc], comb[hc*hc] (sinkhorn by one thread).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_pre_finish_f32(
    const float *__restrict__ proj, const float *__restrict__ base, float scale0, float scale1,
    float scale2, const float *__restrict__ streams, float *__restrict__ x_out,
    float *__restrict__ mix_out, int hc, int hidden, int iters, float hc_eps) {
    dsk_pdl_entry();
    __shared__ float pre[LO_HC_MAX];
    const int t = blockIdx.y, outs = (2 + hc) * hc;
    const float *m = proj + (long long)t * outs;
    if (threadIdx.x < hc) {
        const int i = threadIdx.x;
        pre[i] = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(m[i], scale0), base[i])), hc_eps);
    }
    if (blockIdx.x == 0 && threadIdx.x == 32) {
        float *mo = mix_out + (long long)t * outs;
        for (int i = 0; i < hc; ++i) {
            mo[i] = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(m[i], scale0), base[i])), hc_eps);
            mo[hc + i] = __fmul_rn(
                2.0f, lo_sigmoid(__fadd_rn(__fmul_rn(m[hc + i], scale1), base[hc + i])));
        }
        float cm[LO_HC_MAX * LO_HC_MAX];
        for (int i = 0; i < hc * hc; ++i)
            cm[i] = __fadd_rn(__fmul_rn(m[2 * hc + i], scale2), base[2 * hc + i]);
        lo_sinkhorn(cm, hc, iters, hc_eps);
        for (int i = 0; i < hc * hc; ++i) mo[2 * hc + i] = cm[i];
    }
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < hidden)
        x_out[(long long)t * hidden + c] =
            lo_collapse(streams + (long long)t * hc * hidden, pre, hc, hidden, c);
}

// hyper.rs sinkhorn by one warp with the matrix in shared memory (`cm`, filled; `sums` hc
// floats): each row and column summed by one lane in the host's order.
__device__ __forceinline__ void lo_sinkhorn_warp_smem(float *cm, float *sums, int hc, int iters,
                                                      float hc_eps) {
    const int lane = threadIdx.x & 31;
    if (lane < hc) {
        // Row softmax + eps (row `lane`).
        float *row = cm + lane * hc;
        float mx = __int_as_float(0xff800000);
#pragma unroll
        for (int c = 0; c < LO_HC_MAX; ++c)
            if (c < hc) mx = fmaxf(mx, row[c]);
        float e[LO_HC_MAX];
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < LO_HC_MAX; ++c)
            if (c < hc) {
                e[c] = expf(__fadd_rn(row[c], -mx));
                sum = __fadd_rn(sum, e[c]);
            }
#pragma unroll
        for (int c = 0; c < LO_HC_MAX; ++c)
            if (c < hc) row[c] = __fadd_rn(__fdiv_rn(e[c], sum), hc_eps);
    }
    __syncwarp();
    for (int it = 0; it < max(iters, 1); ++it) {
        if (it > 0) {
            if (lane < hc) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < LO_HC_MAX; ++c)
                    if (c < hc) s = __fadd_rn(s, cm[lane * hc + c]);
                sums[lane] = __fadd_rn(s, hc_eps);
            }
            __syncwarp();
            for (int i = lane; i < hc * hc; i += 32) cm[i] = __fdiv_rn(cm[i], sums[i / hc]);
            __syncwarp();
        }
        if (lane < hc) {
            float s = 0.0f;
#pragma unroll
            for (int r = 0; r < LO_HC_MAX; ++r)
                if (r < hc) s = __fadd_rn(s, cm[r * hc + lane]);
            sums[lane] = __fadd_rn(s, hc_eps);
        }
        __syncwarp();
        for (int i = lane; i < hc * hc; i += 32) cm[i] = __fdiv_rn(cm[i], sums[i % hc]);
        __syncwarp();
    }
}

// The whole pre side of a hyper-connection site for token t = blockIdx.x in one block of
// LO_HC_FUSED_BLOCK threads: the mix projections from hc_mix_partial's chunks (one warp per
// output sums its chunks, so a decoding token does not wait on one thread's chain of loads),
// times the RMS scale, pre / post / comb (sinkhorn by warp 0 with the matrix in shared memory,
// each row and column summed in the host's order), the collapse (kept in registers), and the
// sub-layer's RMSNorm with `norm_w` (null: no weight) into x_out.
#define LO_HC_FUSED_BLOCK 1024
// Collapsed values each thread keeps in registers between the collapse and the norm.
#define LO_HC_VPT 8
extern "C" __global__ void __launch_bounds__(LO_HC_FUSED_BLOCK) dsk_lo_hc_pre_fused_f32(
    const float *__restrict__ partial, const float *__restrict__ sq, int splits, int width,
    float mix_eps, const float *__restrict__ base, float scale0, float scale1, float scale2,
    const float *__restrict__ streams, const float *__restrict__ norm_w,
    float *__restrict__ x_out, float *__restrict__ mix_out, int n, int hc, int hidden, int iters,
    float hc_eps, float norm_eps) {
    dsk_pdl_entry();
    __shared__ float red[32];
    __shared__ float dots[(2 + LO_HC_MAX) * LO_HC_MAX + 1];
    __shared__ float proj[(2 + LO_HC_MAX) * LO_HC_MAX];
    __shared__ float cm[LO_HC_MAX * LO_HC_MAX];
    __shared__ float sums[LO_HC_MAX];
    __shared__ float pre[LO_HC_MAX];
    const int t = blockIdx.x, outs = (2 + hc) * hc;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    // Output o's chunk sums (o == outs: the sum of squares).
    for (int o = warp; o <= outs; o += warps) {
        float v = 0.0f;
        for (int kc = lane; kc < splits; kc += 32)
            v += o < outs ? partial[((long long)kc * n + t) * outs + o] : sq[(long long)kc * n + t];
        v = dsk_warp_sum(v);
        if (lane == 0) dots[o] = v;
    }
    __syncthreads();
    if (threadIdx.x < outs) {
        const int o = threadIdx.x;
        const float ms = __fdiv_rn(dots[outs], (float)width);
        proj[o] = __fmul_rn(dots[o], __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, mix_eps))));
    }
    __syncthreads();
    float *mo = mix_out + (long long)t * outs;
    if (threadIdx.x < hc) {
        const int i = threadIdx.x;
        const float p = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(proj[i], scale0), base[i])), hc_eps);
        pre[i] = p;
        mo[i] = p;
        mo[hc + i] =
            __fmul_rn(2.0f, lo_sigmoid(__fadd_rn(__fmul_rn(proj[hc + i], scale1), base[hc + i])));
    }
    if (warp == 0) {
        for (int i = lane; i < hc * hc; i += 32)
            cm[i] = __fadd_rn(__fmul_rn(proj[2 * hc + i], scale2), base[2 * hc + i]);
        __syncwarp();
        lo_sinkhorn_warp_smem(cm, sums, hc, iters, hc_eps);
        for (int i = lane; i < hc * hc; i += 32) mo[2 * hc + i] = cm[i];
    }
    __syncthreads();
    const float *st = streams + (long long)t * hc * hidden;
    float *xo = x_out + (long long)t * hidden;
    const int step = blockDim.x;
    float vals[LO_HC_VPT];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < LO_HC_VPT; ++i) {
        const int c = threadIdx.x + i * step;
        vals[i] = c < hidden ? lo_collapse(st, pre, hc, hidden, c) : 0.0f;
        ss = fmaf(vals[i], vals[i], ss);
    }
    // Rows wider than the registers hold go through x_out.
    for (int c = threadIdx.x + LO_HC_VPT * step; c < hidden; c += step) {
        const float v = lo_collapse(st, pre, hc, hidden, c);
        xo[c] = v;
        ss = fmaf(v, v, ss);
    }
    const float ms = __fdiv_rn(lo_block_sum(ss, red), (float)hidden);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, norm_eps)));
#pragma unroll
    for (int i = 0; i < LO_HC_VPT; ++i) {
        const int c = threadIdx.x + i * step;
        if (c < hidden) {
            const float v = __fmul_rn(vals[i], inv);
            xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
        }
    }
    for (int c = threadIdx.x + LO_HC_VPT * step; c < hidden; c += step) {
        const float v = __fmul_rn(xo[c], inv);
        xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
    }
}

// ---------------------------------------------------------------------------------------------
// The pre side again, with a short dependent chain (HcPreKernel::Split / Fused in the launcher).
// Every value is the one dsk_lo_hc_mix_partial_f32 + dsk_lo_hc_pre_fused_f32 compute, bit for bit:
// the same per-thread fmaf order and block sums for the chunks, the same warp sums of them, the
// same _rn steps, the host's order in the Sinkhorn, and the same 1024-thread layout for the
// norm's sum of squares. What changes is what waits on what:
// - the partial loads of a thread's chunk are issued together (U per tile) instead of one
//   dependent round trip per column step, and a block's per-token sums share one barrier;
// - the Sinkhorn (40 dependent passes) keeps the matrix in registers of one warp (a lane per
//   element, row / column gathered by shuffles) instead of shared memory with __syncwarp and
//   integer divisions between passes, and it runs beside the collapse and the norm (named
//   barriers let warp 0 leave them) instead of before them;
// - the streams and norm weights a thread collapses are loaded before the projections are
//   reduced, so their latency overlaps;
// - for one token, the partials and the finish are one launch: the last block to finish its
//   partials (a counter in the workspace, reset by that block) does the finish.

#define LO_FULL_MASK 0xffffffffu
// Streams x columns a finishing thread prefetches (hc <= 4, hidden <= 4 * block: 4 x 4096).
#define LO_PF_HC 4
#define LO_PF_VPT 4

#ifndef DSK_EMU
// Named barriers (ids 1..3; __syncthreads is 0): `bar.arrive` signals without waiting, so the
// warp doing the Sinkhorn hands its values to the norm and goes on.
__device__ __forceinline__ void lo_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void lo_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Counts a block in: a release of what the block wrote before its barrier (as CUTLASS's
// semaphore) and an acquire of what the blocks counted before it wrote; no SC fences.
__device__ __forceinline__ unsigned int lo_count_block(unsigned int *counter) {
    unsigned int old;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
    return old;
}
#endif

// Chunk kc of projection o for tokens t0 .. t0 + TOK by the 256-thread group threadIdx.x / 256
// (dsk_lo_hc_mix_partial_f32's block, same sums). `red` [TOK][2][32] is the block's; inactive
// groups still reach the barrier. Lane 0 of each group's first warp writes the results.
template <int TOK, int U>
__device__ __forceinline__ void lo_hc_mix_partial_group(
    const float *__restrict__ streams, const float *__restrict__ fn, float *__restrict__ partial,
    float *__restrict__ sq, int n, int width, int outs, int chunk, int kc, int o, int t0,
    bool active, float (*red)[2][32]) {
    const int gt = threadIdx.x & (LO_BLOCK - 1), g = threadIdx.x / LO_BLOCK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nt = active ? min(TOK, n - t0) : 0;
    const int c0 = kc * chunk, c1 = active ? min(width, c0 + chunk) : c0;
    const float *f = fn + (long long)o * width;
    float acc[TOK], acc2[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = acc2[t] = 0.0f;
    for (int cb = c0 + gt; cb < c1; cb += LO_BLOCK * U) {
        float w[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = cb + u * LO_BLOCK;
            w[u] = c < c1 ? f[c] : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            if (t < nt) {
                const float *sr = streams + (long long)(t0 + t) * width;
                float v[U];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int c = cb + u * LO_BLOCK;
                    v[u] = c < c1 ? sr[c] : 0.0f;
                }
                // Columns ascending, as the one-column-per-step loop.
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    if (cb + u * LO_BLOCK < c1) {
                        acc[t] = fmaf(v[u], w[u], acc[t]);
                        acc2[t] = fmaf(v[u], v[u], acc2[t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
        if (t < nt) {
            const float d = dsk_warp_sum(acc[t]);
            if (lane == 0) red[t][0][warp] = d;
            if (o == 0) {
                const float s = dsk_warp_sum(acc2[t]);
                if (lane == 0) red[t][1][warp] = s;
            }
        }
    }
    __syncthreads();
    if ((warp & 7) == 0) {
        // lo_block_sum's second level for a 256-thread block: 8 warp sums, zeros above.
#pragma unroll
        for (int t = 0; t < TOK; ++t) {
            if (t < nt) {
                const float d = dsk_warp_sum(lane < 8 ? red[t][0][g * 8 + lane] : 0.0f);
                if (lane == 0) partial[((long long)kc * n + t0 + t) * outs + o] = d;
                if (o == 0) {
                    const float s = dsk_warp_sum(lane < 8 ? red[t][1][g * 8 + lane] : 0.0f);
                    if (lane == 0) sq[(long long)kc * n + t0 + t] = s;
                }
            }
        }
    }
}

// sum over lanes first + j * stride (j < hc) of v, in j order, + eps (a row or column sum).
template <int HCT>
__device__ __forceinline__ float lo_gather_sum(float v, int hc_rt, int first, int stride,
                                               float eps) {
    const int hc = HCT > 0 ? HCT : hc_rt;
    float g[LO_HC_MAX];
#pragma unroll
    for (int j = 0; j < LO_HC_MAX; ++j)
        if (j < hc) g[j] = __shfl_sync(LO_FULL_MASK, v, first + j * stride);
    // The host's f32 sum starts at -0.0 and the old kernel's at 0; the elements are never -0.0
    // (softmax + eps, then quotients of them by positive sums), so both equal g[0] + g[1] + ...
    float s = g[0];
#pragma unroll
    for (int j = 1; j < LO_HC_MAX; ++j)
        if (j < hc) s = __fadd_rn(s, g[j]);
    return __fadd_rn(s, eps);
}

// hyper.rs sinkhorn for hc * hc <= 32 by one warp, the matrix in registers: lane l holds element
// l % (hc * hc) (lanes past hc * hc mirror lower ones, so the warp runs one set of values) with
// logit x; returns that element. Each pass is hc shuffles, hc adds and one division per lane.
template <int HCT>
__device__ __forceinline__ float lo_sinkhorn_regs(float x, int hc_rt, int iters, float eps) {
    const int hc = HCT > 0 ? HCT : hc_rt;
    const int idx = (threadIdx.x & 31) % (hc * hc);
    const int r = idx / hc, c = idx - r * hc;
    // Row softmax + eps: every lane of a row gathers the row and computes its sum.
    float g[LO_HC_MAX];
    float mx = __int_as_float(0xff800000);
#pragma unroll
    for (int j = 0; j < LO_HC_MAX; ++j)
        if (j < hc) {
            g[j] = __shfl_sync(LO_FULL_MASK, x, r * hc + j);
            mx = fmaxf(mx, g[j]);
        }
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < LO_HC_MAX; ++j)
        if (j < hc) sum = __fadd_rn(sum, expf(__fadd_rn(g[j], -mx)));
    float m = __fadd_rn(__fdiv_rn(expf(__fadd_rn(x, -mx)), sum), eps);
    // The first column pass always runs (iters = 0 included), as in the host.
    for (int it = 0; it < max(iters, 1); ++it) {
        if (it > 0) m = __fdiv_rn(m, lo_gather_sum<HCT>(m, hc, r * hc, 1, eps));
        m = __fdiv_rn(m, lo_gather_sum<HCT>(m, hc, c, hc, eps));
    }
    return m;
}

// The finish of token t in a block of LO_HC_FUSED_BLOCK threads (dsk_lo_hc_pre_fused_f32's work
// after its chunk sums, same values): `st` / `xo` / `mo` are the token's streams, x_out and
// mix_out rows. Warp 0 computes pre / post, hands pre to the block (barrier 1), collapses its
// columns, hands its values and square sum over (barrier 2) and runs the Sinkhorn; warps 1..31
// collapse, sum the squares (warp 1 as lo_block_sum's warp 0) and write the normed row
// (warp 1 also warp 0's columns). Partials are read through L2 (other blocks wrote them).
__device__ __forceinline__ void lo_hc_pre_token(
    const float *partial, const float *sq, int splits, int width, float mix_eps,
    const float *__restrict__ base, float scale0, float scale1, float scale2,
    const float *__restrict__ st, const float *__restrict__ norm_w, float *__restrict__ xo,
    float *__restrict__ mo, int n, int t, int hc, int hidden, int iters, float hc_eps,
    float norm_eps) {
    __shared__ float dots[(2 + LO_HC_MAX) * LO_HC_MAX + 1];
    __shared__ float pre_s[LO_HC_MAX];
    __shared__ float red[32];
    __shared__ float total;
    __shared__ float vals0[LO_HC_VPT * 32];
    __shared__ float nw0[LO_PF_VPT * 32];
    __shared__ float cm[LO_HC_MAX * LO_HC_MAX];
    __shared__ float sums[LO_HC_MAX];
    const int outs = (2 + hc) * hc, nn = hc * hc;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int step = blockDim.x;
    // Loads that wait on nothing, issued before the chunk sums they overlap.
    const bool pf = hc <= LO_PF_HC && hidden <= LO_PF_VPT * step;
    float sv[LO_PF_HC][LO_PF_VPT], nw[LO_PF_VPT];
#pragma unroll
    for (int i = 0; i < LO_PF_VPT; ++i) {
        const int c = threadIdx.x + i * step;
#pragma unroll
        for (int k = 0; k < LO_PF_HC; ++k)
            sv[k][i] = pf && k < hc && c < hidden ? st[(long long)k * hidden + c] : 0.0f;
        nw[i] = pf && norm_w && c < hidden ? norm_w[c] : 1.0f;
    }
    float b_pp = 0.0f, b_cm = 0.0f;
    if (warp == 0) {
        if (lane < 2 * hc) b_pp = base[lane];
        if (nn <= 32) b_cm = base[2 * hc + lane % nn];
    }
    // Output o's chunk sums (o == outs: the sum of squares), as dsk_lo_hc_pre_fused_f32.
    for (int o = warp; o <= outs; o += warps) {
        float v = 0.0f;
        for (int kc = lane; kc < splits; kc += 32)
            v += o < outs ? __ldcg(partial + ((long long)kc * n + t) * outs + o)
                          : __ldcg(sq + (long long)kc * n + t);
        v = dsk_warp_sum(v);
        if (lane == 0) dots[o] = v;
    }
    __syncthreads();
    float logit = 0.0f;
    if (warp == 0) {
        const float ms = __fdiv_rn(dots[outs], (float)width);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, mix_eps)));
        if (lane < 2 * hc) {
            const float pj = __fmul_rn(dots[lane], inv);
            if (lane < hc) {
                const float p = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale0), b_pp)), hc_eps);
                pre_s[lane] = p;
                mo[lane] = p;
            } else {
                mo[lane] = __fmul_rn(2.0f, lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale1), b_pp)));
            }
        }
        if (nn <= 32) {
            logit = __fadd_rn(__fmul_rn(__fmul_rn(dots[2 * hc + lane % nn], inv), scale2), b_cm);
        } else {
            for (int i = lane; i < nn; i += 32)
                cm[i] = __fadd_rn(__fmul_rn(__fmul_rn(dots[2 * hc + i], inv), scale2),
                                  base[2 * hc + i]);
        }
        __syncwarp();
        lo_bar_arrive(1, step);
    } else {
        lo_bar_sync(1, step);
    }
    // Collapse (hyper.rs order: k ascending from 0) and this thread's sum of squares. Columns
    // past hidden add fmaf(0, 0, ss) in the old kernel, which leaves ss as it is.
    float vals[LO_HC_VPT];
    float ss = 0.0f;
    if (pf) {
        float pre[LO_PF_HC];
#pragma unroll
        for (int k = 0; k < LO_PF_HC; ++k) pre[k] = k < hc ? pre_s[k] : 0.0f;
#pragma unroll
        for (int i = 0; i < LO_PF_VPT; ++i) {
            float acc = 0.0f;
            if (threadIdx.x + i * step < hidden) {
#pragma unroll
                for (int k = 0; k < LO_PF_HC; ++k)
                    if (k < hc) acc = __fadd_rn(acc, __fmul_rn(pre[k], sv[k][i]));
            }
            vals[i] = acc;
            ss = fmaf(acc, acc, ss);
        }
    } else {
#pragma unroll
        for (int i = 0; i < LO_HC_VPT; ++i) {
            const int c = threadIdx.x + i * step;
            vals[i] = c < hidden ? lo_collapse(st, pre_s, hc, hidden, c) : 0.0f;
            ss = fmaf(vals[i], vals[i], ss);
        }
        // Rows wider than the registers hold go through x_out.
        for (int c = threadIdx.x + LO_HC_VPT * step; c < hidden; c += step) {
            const float v = lo_collapse(st, pre_s, hc, hidden, c);
            xo[c] = v;
            ss = fmaf(v, v, ss);
        }
    }
    ss = dsk_warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    if (warp == 0) {
        // Warp 1 norms and writes this warp's columns.
        if (pf) {
#pragma unroll
            for (int i = 0; i < LO_PF_VPT; ++i) {
                vals0[i * 32 + lane] = vals[i];
                nw0[i * 32 + lane] = nw[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < LO_HC_VPT; ++i) vals0[i * 32 + lane] = vals[i];
        }
        lo_bar_arrive(2, step);
        if (nn <= 32) {
            const float m = hc == 4 ? lo_sinkhorn_regs<4>(logit, 4, iters, hc_eps)
                                    : lo_sinkhorn_regs<0>(logit, hc, iters, hc_eps);
            if (lane < nn) mo[2 * hc + lane] = m;
        } else {
            lo_sinkhorn_warp_smem(cm, sums, hc, iters, hc_eps);
            for (int i = lane; i < nn; i += 32) mo[2 * hc + i] = cm[i];
        }
        return;
    }
    lo_bar_sync(2, step);
    if (warp == 1) {
        const float s = dsk_warp_sum(lane < warps ? red[lane] : 0.0f);
        if (lane == 0) total = s;
    }
    lo_bar_sync(3, step - 32);
    const float ms = __fdiv_rn(total, (float)hidden);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, norm_eps)));
    if (pf) {
#pragma unroll
        for (int i = 0; i < LO_PF_VPT; ++i) {
            const int c = threadIdx.x + i * step;
            if (c < hidden) {
                const float v = __fmul_rn(vals[i], inv);
                xo[c] = norm_w ? __fmul_rn(nw[i], v) : v;
            }
        }
        if (warp == 1) {
#pragma unroll
            for (int i = 0; i < LO_PF_VPT; ++i) {
                const int c = lane + i * step;
                if (c < hidden) {
                    const float v = __fmul_rn(vals0[i * 32 + lane], inv);
                    xo[c] = norm_w ? __fmul_rn(nw0[i * 32 + lane], v) : v;
                }
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < LO_HC_VPT; ++i) {
        const int c = threadIdx.x + i * step;
        if (c < hidden) {
            const float v = __fmul_rn(vals[i], inv);
            xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
        }
    }
    for (int c = threadIdx.x + LO_HC_VPT * step; c < hidden; c += step) {
        const float v = __fmul_rn(xo[c], inv);
        xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
    }
    if (warp == 1) {
        // Warp 0's columns.
#pragma unroll
        for (int i = 0; i < LO_HC_VPT; ++i) {
            const int c = lane + i * step;
            if (c < hidden) {
                const float v = __fmul_rn(vals0[i * 32 + lane], inv);
                xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
            }
        }
        for (int c = lane + LO_HC_VPT * step; c < hidden; c += step) {
            const float v = __fmul_rn(xo[c], inv);
            xo[c] = norm_w ? __fmul_rn(norm_w[c], v) : v;
        }
    }
}

// dsk_lo_hc_mix_partial_f32 with the loads of U column steps issued together (same grid, same
// values).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_mix_partial2_f32(
    const float *__restrict__ streams, const float *__restrict__ fn, float *__restrict__ partial,
    float *__restrict__ sq, int n, int width, int outs, int chunk) {
    dsk_pdl_entry();
    __shared__ float red[LO_MIX_TOKENS][2][32];
    lo_hc_mix_partial_group<LO_MIX_TOKENS, 4>(streams, fn, partial, sq, n, width, outs, chunk,
                                              blockIdx.x, blockIdx.y,
                                              blockIdx.z * LO_MIX_TOKENS, true, red);
}

// The finish of token blockIdx.x after dsk_lo_hc_mix_partial2_f32 (dsk_lo_hc_pre_fused_f32's
// arguments and values).
extern "C" __global__ void __launch_bounds__(LO_HC_FUSED_BLOCK) dsk_lo_hc_pre_finish2_f32(
    const float *__restrict__ partial, const float *__restrict__ sq, int splits, int width,
    float mix_eps, const float *__restrict__ base, float scale0, float scale1, float scale2,
    const float *__restrict__ streams, const float *__restrict__ norm_w,
    float *__restrict__ x_out, float *__restrict__ mix_out, int n, int hc, int hidden, int iters,
    float hc_eps, float norm_eps) {
    dsk_pdl_entry();
    const int t = blockIdx.x, outs = (2 + hc) * hc;
    lo_hc_pre_token(partial, sq, splits, width, mix_eps, base, scale0, scale1, scale2,
                    streams + (long long)t * hc * hidden, norm_w, x_out + (long long)t * hidden,
                    mix_out + (long long)t * outs, n, t, hc, hidden, iters, hc_eps, norm_eps);
}

// The whole pre side of n tokens in one launch: block (b, t) computes token t's chunks of (kc, o)
// pairs 4b .. 4b + 3 (pair p: kc = p % splits, o = p / splits), one per 256-thread group, into the
// [splits, n, outs] partials; the last of token t's blocks to count itself in counter[t] (zero
// before the launch) finishes that token as dsk_lo_hc_pre_finish2_f32 does and zeroes its counter
// again, so the next launch or graph replay starts from zero. A chunk's sums are those of the
// partial kernels (each thread's columns in ascending order, then the two-level block sum,
// whatever the tokens a block holds), so every path gives the same bits.
extern "C" __global__ void __launch_bounds__(LO_HC_FUSED_BLOCK) dsk_lo_hc_pre_single_f32(
    const float *__restrict__ streams, const float *__restrict__ fn, float *partial, float *sq,
    unsigned int *counter, int splits, int chunk, int width, float mix_eps,
    const float *__restrict__ base, float scale0, float scale1, float scale2,
    const float *__restrict__ norm_w, float *__restrict__ x_out, float *__restrict__ mix_out,
    int n, int hc, int hidden, int iters, float hc_eps, float norm_eps) {
    dsk_pdl_entry();
    __shared__ float red[1][2][32];
    __shared__ int last;
    const int outs = (2 + hc) * hc, t = blockIdx.y;
    const int p = blockIdx.x * (LO_HC_FUSED_BLOCK / LO_BLOCK) + threadIdx.x / LO_BLOCK;
    const bool active = p < splits * outs;
    lo_hc_mix_partial_group<1, 8>(streams, fn, partial, sq, n, width, outs, chunk,
                                  active ? p % splits : 0, active ? p / splits : 1, t, active,
                                  red);
    // The partials written, one thread counts the block (release / acquire at gpu scope); the
    // barriers order the other threads' writes before it and its acquire before their reads.
    __syncthreads();
    if (threadIdx.x == 0) last = lo_count_block(counter + t) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    if (threadIdx.x == 0) counter[t] = 0u;
    lo_hc_pre_token(partial, sq, splits, width, mix_eps, base, scale0, scale1, scale2,
                    streams + (long long)t * hc * hidden, norm_w, x_out + (long long)t * hidden,
                    mix_out + (long long)t * outs, n, t, hc, hidden, iters, hc_eps, norm_eps);
}

// ---------------------------------------------------------------------------------------------
// The pre side of GEMM steps (thousands of tokens): a cuBLAS GEMM writes the mix dots [n, outs]
// and these kernels the sums of squares [n] (one chunk: hc_given_dots / hc_given_squares), then
// the finish. Every value is the one dsk_lo_hc_mix_partial2_f32 (chunk = width) and
// dsk_lo_hc_pre_finish2_f32 compute, bit for bit (tools/hc_rows_emu.cpp checks it).

// The squares' two levels as dsk_lo_hc_mix_partial_f32 sums them in its 256-thread block: each
// warp (dsk_warp_sum), then warp 0 the 8 warp sums (zeros above); thread 0 writes *dst.
__device__ __forceinline__ void lo_squares_total(float acc, float *red, float *dst) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    acc = dsk_warp_sum(acc);
    if (lane == 0) red[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const float s = dsk_warp_sum(lane < LO_BLOCK / 32 ? red[lane] : 0.0f);
        if (lane == 0) *dst = s;
    }
}

// Loads a thread of dsk_lo_hc_squares_f32 issues together.
#define LO_SQ_U 8
// sq[t] = sum of squares of row t of streams [n, width], one 256-thread block per row: thread
// gt sums columns gt + 256 m in m order (fmaf), as the chunk kernel with one chunk does.
// Replaces that kernel in GEMM steps: it re-read the projection row and wrote output 0's dot
// (which the GEMM overwrites), and kept 16 tokens in a block (n / 16 blocks).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_squares_f32(
    const float *__restrict__ streams, float *__restrict__ sq, int width) {
    dsk_pdl_entry();
    __shared__ float red[LO_BLOCK / 32];
    const float *sr = streams + (long long)blockIdx.x * width;
    float acc = 0.0f;
    for (int cb = threadIdx.x; cb < width; cb += LO_BLOCK * LO_SQ_U) {
        float v[LO_SQ_U];
#pragma unroll
        for (int u = 0; u < LO_SQ_U; ++u) {
            const int c = cb + u * LO_BLOCK;
            v[u] = c < width ? sr[c] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < LO_SQ_U; ++u)
            if (cb + u * LO_BLOCK < width) acc = fmaf(v[u], v[u], acc);
    }
    lo_squares_total(acc, red, sq + blockIdx.x);
}

// The finish from given dots. finish2 gives each token a 1,024-thread block whose warp 0 runs
// the Sinkhorn (40 dependent passes) while the others collapse and norm: one block fits an SM,
// which then idles on that chain (442 us for 8,192 tokens on an H200, 1.5 TB/s). Here blocks
// come in groups of LO_ROWS_GROUP + 1: LO_ROWS_GROUP blocks of 256 threads collapse and norm a
// token each from float4 loads, and one block runs those tokens' Sinkhorns (a warp each), so
// the chains share the SMs with the streaming. finish2's bits:
// - pre / post / comb: the same steps and Sinkhorn functions on the same values (a dot there is
//   a warp sum of one chunk partial and zeros: x + 0, here __fadd_rn(x, 0));
// - the norm's sum of squares: finish2's thread T (of 1,024) chains channels T + 1024 i in i
//   order (fmaf), warps sum their threads (dsk_warp_sum), one warp the 32 warps. Thread r here
//   loads the float4s r + 256 i, channels 4 r + e + 1024 i (e < 4): the whole chains of
//   finish2's threads 4 r + e. Its warp W = r / 8 has them as lanes 4 (r % 8) + e, so that
//   warp's butterfly (lanes xor 16, 8, 4, 2, 1) is, with the same operands, lanes xor 4, 2, 1
//   here, then e ^ 2 and e ^ 1 in the thread; the 32 warp sums are summed as there.
#define LO_ROWS_GROUP 8
// float4s per stream a thread collapses: hidden <= LO_ROWS_VPT * 4 * 256.
#define LO_ROWS_VPT 4

// One token's pre[hc] / post[hc] / comb[hc * hc] into mo by one warp (finish2's warp 0).
__device__ __forceinline__ void lo_hc_rows_mix(const float *__restrict__ d, float sq, int width,
                                               float mix_eps, const float *__restrict__ base,
                                               float scale0, float scale1, float scale2,
                                               float *__restrict__ mo, int hc, int iters,
                                               float hc_eps, float *cm, float *sums) {
    const int lane = threadIdx.x & 31, nn = hc * hc;
    const float ms = __fdiv_rn(__fadd_rn(sq, 0.0f), (float)width);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, mix_eps)));
    if (lane < 2 * hc) {
        const float pj = __fmul_rn(__fadd_rn(d[lane], 0.0f), inv);
        mo[lane] = lane < hc
                       ? __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale0), base[lane])), hc_eps)
                       : __fmul_rn(2.0f, lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale1), base[lane])));
    }
    if (nn <= 32) {
        const int i = lane % nn;
        const float logit = __fadd_rn(
            __fmul_rn(__fmul_rn(__fadd_rn(d[2 * hc + i], 0.0f), inv), scale2), base[2 * hc + i]);
        const float m = hc == 4 ? lo_sinkhorn_regs<4>(logit, 4, iters, hc_eps)
                                : lo_sinkhorn_regs<0>(logit, hc, iters, hc_eps);
        if (lane < nn) mo[2 * hc + lane] = m;
    } else {
        for (int i = lane; i < nn; i += 32)
            cm[i] = __fadd_rn(__fmul_rn(__fmul_rn(__fadd_rn(d[2 * hc + i], 0.0f), inv), scale2),
                              base[2 * hc + i]);
        __syncwarp();
        lo_sinkhorn_warp_smem(cm, sums, hc, iters, hc_eps);
        for (int i = lane; i < nn; i += 32) mo[2 * hc + i] = cm[i];
    }
}

// One token's collapse and sub-layer norm by a 256-thread block: `st`, `xo` the token's streams
// and x_out rows (16-byte aligned, hidden a multiple of 4). HCT = 4 loads all four streams
// before pre is known.
template <int HCT>
__device__ __forceinline__ void lo_hc_rows_collapse(
    const float *__restrict__ d, float sq, int width, float mix_eps,
    const float *__restrict__ base, float scale0, const float *__restrict__ st,
    const float *__restrict__ norm_w, float *__restrict__ xo, int hc_rt, int hidden,
    float hc_eps, float norm_eps, float *pre_s, float *red) {
    const int hc = HCT > 0 ? HCT : hc_rt;
    const int r = threadIdx.x, lane = r & 31;
    float4 sv[HCT > 0 ? HCT : 1][LO_ROWS_VPT];
#pragma unroll
    for (int i = 0; i < LO_ROWS_VPT; ++i) {
        const int c = 4 * (r + LO_BLOCK * i);
        if constexpr (HCT > 0) {
            if (c < hidden) {
#pragma unroll
                for (int k = 0; k < HCT; ++k)
                    sv[k][i] = *reinterpret_cast<const float4 *>(st + (long long)k * hidden + c);
            }
        }
    }
    if (r < hc) {
        const float ms = __fdiv_rn(__fadd_rn(sq, 0.0f), (float)width);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, mix_eps)));
        const float pj = __fmul_rn(__fadd_rn(d[r], 0.0f), inv);
        pre_s[r] = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale0), base[r])), hc_eps);
    }
    __syncthreads();
    float pre[HCT > 0 ? HCT : LO_HC_MAX];
#pragma unroll
    for (int k = 0; k < (HCT > 0 ? HCT : LO_HC_MAX); ++k) pre[k] = k < hc ? pre_s[k] : 0.0f;
    // Collapse (k ascending from 0, as lo_collapse) and the chains of threads 4 r + e.
    float v[LO_ROWS_VPT][4];
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < LO_ROWS_VPT; ++i) {
        const int c = 4 * (r + LO_BLOCK * i);
        if (c < hidden) {
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int k = 0; k < (HCT > 0 ? HCT : LO_HC_MAX); ++k) {
                if (k < hc) {
                    float4 s;
                    if constexpr (HCT > 0)
                        s = sv[k][i];
                    else
                        s = *reinterpret_cast<const float4 *>(st + (long long)k * hidden + c);
                    a[0] = __fadd_rn(a[0], __fmul_rn(pre[k], s.x));
                    a[1] = __fadd_rn(a[1], __fmul_rn(pre[k], s.y));
                    a[2] = __fadd_rn(a[2], __fmul_rn(pre[k], s.z));
                    a[3] = __fadd_rn(a[3], __fmul_rn(pre[k], s.w));
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                v[i][e] = a[e];
                x[e] = fmaf(a[e], a[e], x[e]);
            }
        }
    }
    // finish2's warp r / 8: its lanes xor 16, 8, 4 (lanes xor 4, 2, 1 here), then xor 2, 1.
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] += __shfl_xor_sync(LO_FULL_MASK, x[e], o);
    }
    const float wsum = (x[0] + x[2]) + (x[1] + x[3]);
    if ((lane & 7) == 0) red[r >> 3] = wsum;
    __syncthreads();
    // Every warp sums the 32 warp sums (same bits in each), so no second barrier.
    const float total = dsk_warp_sum(red[lane]);
    const float ms = __fdiv_rn(total, (float)hidden);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, norm_eps)));
#pragma unroll
    for (int i = 0; i < LO_ROWS_VPT; ++i) {
        const int c = 4 * (r + LO_BLOCK * i);
        if (c < hidden) {
            float y[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] = __fmul_rn(v[i][e], inv);
            if (norm_w) {
                const float4 w = *reinterpret_cast<const float4 *>(norm_w + c);
                y[0] = __fmul_rn(w.x, y[0]);
                y[1] = __fmul_rn(w.y, y[1]);
                y[2] = __fmul_rn(w.z, y[2]);
                y[3] = __fmul_rn(w.w, y[3]);
            }
            *reinterpret_cast<float4 *>(xo + c) = make_float4(y[0], y[1], y[2], y[3]);
        }
    }
}

// dsk_lo_hc_pre_finish2_f32 with one chunk (dots [n, outs], sq [n]) for many tokens: block
// g * (LO_ROWS_GROUP + 1) + j collapses and norms token g * LO_ROWS_GROUP + j (j <
// LO_ROWS_GROUP), or (j == LO_ROWS_GROUP) writes the mix_out rows of those tokens, a warp each.
// 256 threads; streams, x_out and norm_w 16-byte aligned, hidden a multiple of 4 and at most
// 4,096. The arguments are finish2's (so one launcher serves both); `splits` must be 1.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_pre_rows_f32(
    const float *__restrict__ dots, const float *__restrict__ sq, int splits, int width, float mix_eps,
    const float *__restrict__ base, float scale0, float scale1, float scale2,
    const float *__restrict__ streams, const float *__restrict__ norm_w,
    float *__restrict__ x_out, float *__restrict__ mix_out, int n, int hc, int hidden, int iters,
    float hc_eps, float norm_eps) {
    dsk_pdl_entry();
    __shared__ float cm[LO_BLOCK / 32][LO_HC_MAX * LO_HC_MAX];
    __shared__ float sums[LO_BLOCK / 32][LO_HC_MAX];
    __shared__ float pre_s[LO_HC_MAX];
    __shared__ float red[32];
    const int outs = (2 + hc) * hc;
    const int g = blockIdx.x / (LO_ROWS_GROUP + 1), j = blockIdx.x % (LO_ROWS_GROUP + 1);
    if (j == LO_ROWS_GROUP) {
        const int warp = threadIdx.x >> 5, t = g * LO_ROWS_GROUP + warp;
        if (warp < LO_ROWS_GROUP && t < n)
            lo_hc_rows_mix(dots + (long long)t * outs, sq[t], width, mix_eps, base, scale0,
                           scale1, scale2, mix_out + (long long)t * outs, hc, iters, hc_eps,
                           cm[warp], sums[warp]);
        return;
    }
    const int t = g * LO_ROWS_GROUP + j;
    if (t >= n) return;
    const float *st = streams + (long long)t * hc * hidden;
    float *xo = x_out + (long long)t * hidden;
    if (hc == 4)
        lo_hc_rows_collapse<4>(dots + (long long)t * outs, sq[t], width, mix_eps, base, scale0, st,
                               norm_w, xo, 4, hidden, hc_eps, norm_eps, pre_s, red);
    else
        lo_hc_rows_collapse<0>(dots + (long long)t * outs, sq[t], width, mix_eps, base, scale0, st,
                               norm_w, xo, hc, hidden, hc_eps, norm_eps, pre_s, red);
}

// expand: new[k][c] = post[k] * out[c] + sum_j comb[j, k] * old[j][c] (j ascending), in place;
// each thread owns channel c of one token across all streams.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_post_f32(
    float *streams, const float *__restrict__ mix, const float *__restrict__ out, int n, int hc,
    int hidden) {
    dsk_pdl_entry();
    const long long total = (long long)n * hidden;
    const int outs = (2 + hc) * hc;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / hidden), c = (int)(i % hidden);
        float *s = streams + (long long)t * hc * hidden + c;
        const float *mx = mix + (long long)t * outs;
        float old[LO_HC_MAX];
        for (int j = 0; j < hc; ++j) old[j] = s[(long long)j * hidden];
        const float o = out[i];
        for (int k = 0; k < hc; ++k) {
            float v = __fmul_rn(mx[hc + k], o);
            for (int j = 0; j < hc; ++j) v = __fadd_rn(v, __fmul_rn(mx[2 * hc + j * hc + k], old[j]));
            s[(long long)k * hidden] = v;
        }
    }
}

// VEC consecutive floats at p (VEC 4: one 16-byte access, p 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void lo_ld(const float *p, float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        const float4 q = *reinterpret_cast<const float4 *>(p);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u) v[u] = p[u];
    }
}
template <int VEC>
__device__ __forceinline__ void lo_st(float *p, const float (&v)[VEC]) {
    if constexpr (VEC == 4) {
        *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int u = 0; u < VEC; ++u) p[u] = v[u];
    }
}

// dsk_lo_hc_post_f32's update of channels c .. c + VEC of token blockIdx.y, element by element
// the same steps (post[k] * out, then + comb[j, k] * old[j] for j ascending). The old kernel
// spent its time on 64-bit index divisions, the coefficients re-read per element and its
// streams in a local-memory array (runtime hc); here the streams are registers (hc a constant or
// guarded loops up to LO_HC_MAX), the token's coefficients are read once into shared memory
// (after the streams' loads are issued, so the two latencies overlap) and a thread moves VEC
// channels of every stream with 16-byte accesses.
template <int HCT, int VEC>
__device__ __forceinline__ void lo_hc_post_cols(float *streams, const float *__restrict__ mix,
                                                const float *__restrict__ out, int hc_rt,
                                                int hidden, float *coef) {
    constexpr int HM = HCT > 0 ? HCT : LO_HC_MAX;
    const int hc = HCT > 0 ? HCT : hc_rt;
    const int t = blockIdx.y;
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const bool live = c < hidden;
    float *s = streams + (long long)t * hc * hidden + c;
    float old[HM][VEC], o[VEC];
    if (live) {
#pragma unroll
        for (int j = 0; j < HM; ++j)
            if (j < hc) lo_ld<VEC>(s + (long long)j * hidden, old[j]);
        lo_ld<VEC>(out + (long long)t * hidden + c, o);
    }
    for (int i = threadIdx.x; i < (1 + hc) * hc; i += blockDim.x)
        coef[i] = mix[(long long)t * (2 + hc) * hc + hc + i];
    __syncthreads();
    if (!live) return;
#pragma unroll
    for (int k = 0; k < HM; ++k) {
        if (k < hc) {
            const float pk = coef[k];
            float v[VEC];
#pragma unroll
            for (int u = 0; u < VEC; ++u) v[u] = __fmul_rn(pk, o[u]);
#pragma unroll
            for (int j = 0; j < HM; ++j) {
                if (j < hc) {
                    const float cjk = coef[hc + j * hc + k];
#pragma unroll
                    for (int u = 0; u < VEC; ++u) v[u] = __fadd_rn(v[u], __fmul_rn(cjk, old[j][u]));
                }
            }
            lo_st<VEC>(s + (long long)k * hidden, v);
        }
    }
}

// dsk_lo_hc_post_f32's values (same bits) for tokens blockIdx.y and channel groups of VEC = 4
// (vec4: hidden a multiple of 4, streams and out 16-byte aligned) or 1 per thread over
// blockIdx.x. Any block size (the launcher takes fewer threads at decode sizes, so one row's
// channels spread over more SMs).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_post2_f32(
    float *streams, const float *__restrict__ mix, const float *__restrict__ out, int hc,
    int hidden, int vec4) {
    dsk_pdl_entry();
    __shared__ float coef[(1 + LO_HC_MAX) * LO_HC_MAX];
    if (vec4) {
        if (hc == 4)
            lo_hc_post_cols<4, 4>(streams, mix, out, 4, hidden, coef);
        else
            lo_hc_post_cols<0, 4>(streams, mix, out, hc, hidden, coef);
    } else if (hc == 4) {
        lo_hc_post_cols<4, 1>(streams, mix, out, 4, hidden, coef);
    } else {
        lo_hc_post_cols<0, 1>(streams, mix, out, hc, hidden, coef);
    }
}

// Channels a thread of dsk_lo_hc_post_squares_f32 updates per stream: hidden <= 16 * 256.
#define LO_PS_CPT 16
// dsk_lo_hc_post_f32 for hc = 4, plus sq[t] = the sum of squares of token t's new streams with
// dsk_lo_hc_squares_f32's bits (so a GEMM step's next pre skips that launch and its read of the
// streams). One 256-thread block per token (blockIdx.x); hidden a multiple of 256. Thread gt
// owns channels gt + 256 m of every stream: the squares kernel's columns gt + 256 m' of the
// flat row, in the same order (stream-major) once the thread holds all its new values.
extern "C" __global__ void __launch_bounds__(LO_BLOCK, 2) dsk_lo_hc_post_squares_f32(
    float *streams, const float *__restrict__ mix, const float *__restrict__ out,
    float *__restrict__ sq, int hidden) {
    dsk_pdl_entry();
    __shared__ float coef[5 * 4];
    __shared__ float red[LO_BLOCK / 32];
    const int t = blockIdx.x, cpt = hidden / LO_BLOCK;
    float *s = streams + (long long)t * 4 * hidden + threadIdx.x;
    const float *o = out + (long long)t * hidden + threadIdx.x;
    float old[4][LO_PS_CPT], ov[LO_PS_CPT];
#pragma unroll
    for (int m = 0; m < LO_PS_CPT; ++m) {
        if (m < cpt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) old[j][m] = s[(long long)j * hidden + m * LO_BLOCK];
            ov[m] = o[m * LO_BLOCK];
        }
    }
    if (threadIdx.x < 5 * 4) coef[threadIdx.x] = mix[(long long)t * 24 + 4 + threadIdx.x];
    __syncthreads();
    float pk[4], cjk[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        pk[k] = coef[k];
#pragma unroll
        for (int j = 0; j < 4; ++j) cjk[j][k] = coef[4 + j * 4 + k];
    }
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int m = 0; m < LO_PS_CPT; ++m) {
            if (m < cpt) {
                float v = __fmul_rn(pk[k], ov[m]);
#pragma unroll
                for (int j = 0; j < 4; ++j) v = __fadd_rn(v, __fmul_rn(cjk[j][k], old[j][m]));
                s[(long long)k * hidden + m * LO_BLOCK] = v;
                acc = fmaf(v, v, acc);
            }
        }
    }
    lo_squares_total(acc, red, sq + t);
}

// HyperHead::collapse after the projections: pre[i] = sigmoid(dot * scale + base[i]) + hc_eps.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_hc_head_finish_f32(
    const float *__restrict__ proj, const float *__restrict__ base, float scale,
    const float *__restrict__ streams, float *__restrict__ x_out, int hc, int hidden,
    float hc_eps) {
    dsk_pdl_entry();
    __shared__ float pre[LO_HC_MAX];
    const int t = blockIdx.y;
    if (threadIdx.x < hc) {
        const int i = threadIdx.x;
        pre[i] = __fadd_rn(
            lo_sigmoid(__fadd_rn(__fmul_rn(proj[(long long)t * hc + i], scale), base[i])), hc_eps);
    }
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < hidden)
        x_out[(long long)t * hidden + c] =
            lo_collapse(streams + (long long)t * hc * hidden, pre, hc, hidden, c);
}

// ---------------------------------------------------------------------------------------------
// The seam between two hyper-connection sites of a decode step: the post of the site that ends
// (streams = post * out + comb^T streams) and the pre of the site that starts (mix projections of
// the new streams, pre / post / comb logits, collapse, sub-layer norm) in one launch, where they
// were a post and a one-launch pre whose last block finished the token alone. hc = 4 (mix outputs
// 24). A cluster of C blocks of T = hidden / C threads (a multiple of 32, at most LO_SEAM_MAX_T)
// serves TK consecutive tokens (cluster blockIdx.y: tokens TK y .. TK y + TK - 1, fewer at the
// end of n); thread cl of cluster block b owns channel c = b T + cl of the four streams of each,
// so the post, the collapse and the norm stay in its registers, and the cross-block sums (the 24
// dots with the sum of squares, then the norm's sum of squares) go through distributed shared
// memory, summed in rank order by every block (the same bits). The projection columns a thread
// holds (96 values) are loaded once for its TK tokens: at 16 tokens of V4-Flash one cluster a
// token read the site's 1.5 MB projection 16 times and needed more clusters of 16 blocks than
// the GPU holds at once; TK tokens a cluster read it n / TK times in one wave. Each token's
// arithmetic is the same whatever TK (the same bits).
//
// What it reads before griddepcontrol.wait (so PDL overlaps it with the kernel before): the next
// site's projection columns, norm weight and biases (model weights), and in post mode the old
// streams and the ending site's post / comb: the previous seam (or pre) wrote those, and at least
// one launch (the sub-layer) separates it from this one, which PDL starts only once its own
// predecessor has passed its wait, i.e. once everything before that predecessor has finished.
// The comb is final: the Sinkhorn of the logits this kernel leaves runs in its own launch
// (dsk_lo_hc_sinkhorn_f32, off the critical path on the layer stack's second stream).
// `post_mix` and `mix_out` may be the same rows: every block reads post_mix before the first
// cluster barrier, and only block 0 writes mix_out, after it.
//
// Summation orders (f32 throughout): a dot is thread cl's four columns (stream order, fmaf), the
// block's threads (lane + 32 i in i order, then dsk_warp_sum), then the C blocks in rank order;
// the norm's squares likewise. Element-wise steps are those of dsk_lo_hc_post2_f32 and the finish
// (__fmul_rn / __fadd_rn, the host's order), so the new streams are post2's bits and the rest is
// within f32 rounding of the host (tests/layer_ops_gpu.rs).
//
// Dynamic shared memory: TK * (LO_SEAM_OUTS + 1) * T floats (the dots' transpose).
#define LO_SEAM_OUTS 24
#define LO_SEAM_MAX_T 256
#define LO_SEAM_MAX_TK 4

template <int C, int TK>
__device__ __forceinline__ void lo_hc_seam(
    float *streams, const float *post_mix, const float *__restrict__ out,
    const float *__restrict__ fn, const float *__restrict__ base, float scale0, float scale1,
    float scale2, const float *__restrict__ norm_w, float *__restrict__ x_out, float *mix_out,
    int n, int hidden, float mix_eps, float hc_eps, float norm_eps) {
    constexpr int O = LO_SEAM_OUTS;
    DSK_DYN_SMEM(float, lo_seam_sums);  // [TK][O + 1][T]
    __shared__ float part[TK][O + 1];
    __shared__ float mixv[TK][O];
    __shared__ float coefs[TK][20];
    __shared__ float sq_warp[TK][LO_SEAM_MAX_T / 32];
    __shared__ float sq_part[TK], sq_total[TK];
    const int T = blockDim.x, cl = threadIdx.x, lane = cl & 31, warp = cl >> 5, warps = T >> 5;
    const int b = blockIdx.x, t0 = blockIdx.y * TK, c = b * T + cl;
    const int tokens = min(TK, n - t0);
    const long long width = 4ll * hidden;
    float w[O][4];
#pragma unroll
    for (int o = 0; o < O; ++o) {
#pragma unroll
        for (int k = 0; k < 4; ++k) w[o][k] = __ldg(fn + o * width + (long long)k * hidden + c);
    }
    const float nw = norm_w ? __ldg(norm_w + c) : 1.0f;
    const float bias = lane < O ? __ldg(base + lane) : 0.0f;
    const bool post = post_mix != nullptr;
    float old[TK][4];
    if (post) {
#pragma unroll
        for (int j = 0; j < TK; ++j) {
            if (j < tokens) {
                const float *st = streams + (long long)(t0 + j) * width;
#pragma unroll
                for (int k = 0; k < 4; ++k) old[j][k] = __ldcg(st + (long long)k * hidden + c);
            }
        }
        for (int i = cl; i < TK * 20; i += T) {
            const int j = i / 20;
            coefs[j][i % 20] = j < tokens ? __ldcg(post_mix + (long long)(t0 + j) * O + 4 + i % 20) : 0.0f;
        }
    }
    dsk_pdl_entry();
    __syncthreads();
    float nv[TK][4];
#pragma unroll
    for (int j = 0; j < TK; ++j) {
        float *st = streams + (long long)(t0 + j) * width;
        if (j >= tokens) {
#pragma unroll
            for (int k = 0; k < 4; ++k) nv[j][k] = 0.0f;
        } else if (post) {
            const float o = out[(long long)(t0 + j) * hidden + c];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                float v = __fmul_rn(coefs[j][k], o);
#pragma unroll
                for (int i = 0; i < 4; ++i) v = __fadd_rn(v, __fmul_rn(coefs[j][4 + i * 4 + k], old[j][i]));
                nv[j][k] = v;
                st[(long long)k * hidden + c] = v;
            }
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) nv[j][k] = st[(long long)k * hidden + c];
        }
    }
    // The 24 dots and the sum of squares of this thread's four columns, then the block's.
#pragma unroll
    for (int j = 0; j < TK; ++j) {
        float *sums = lo_seam_sums + (long long)j * (O + 1) * T;
#pragma unroll
        for (int o = 0; o < O; ++o) {
            float d = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) d = fmaf(nv[j][k], w[o][k], d);
            sums[o * T + cl] = d;
        }
        float q = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) q = fmaf(nv[j][k], nv[j][k], q);
        sums[O * T + cl] = q;
    }
    __syncthreads();
    for (int r = warp; r < TK * (O + 1); r += warps) {
        const float *row = lo_seam_sums + (long long)r * T;
        float a = 0.0f;
        for (int i = lane; i < T; i += 32) a += row[i];
        a = dsk_warp_sum(a);
        if (lane == 0) part[r / (O + 1)][r % (O + 1)] = a;
    }
    if constexpr (C > 1) dsk_cluster_sync(); else __syncthreads();
    for (int j = warp; j < TK; j += warps) {
        float total = 0.0f;
        if (lane <= O) {
            float r[C];
#pragma unroll
            for (int q = 0; q < C; ++q) r[q] = C > 1 ? dsk_ld_cluster(&part[j][lane], q) : part[j][lane];
#pragma unroll
            for (int q = 0; q < C; ++q) total += r[q];
        }
        const float sq = __shfl_sync(LO_FULL_MASK, total, O);
        const float ms = __fdiv_rn(sq, (float)width);
        const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, mix_eps)));
        const float pj = __fmul_rn(total, inv);
        float m = 0.0f;
        if (lane < 4)
            m = __fadd_rn(lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale0), bias)), hc_eps);
        else if (lane < 8)
            m = __fmul_rn(2.0f, lo_sigmoid(__fadd_rn(__fmul_rn(pj, scale1), bias)));
        else if (lane < O)
            m = __fadd_rn(__fmul_rn(pj, scale2), bias);
        if (lane < O) {
            mixv[j][lane] = m;
            if (b == 0 && j < tokens) mix_out[(long long)(t0 + j) * O + lane] = m;
        }
    }
    __syncthreads();
    // Collapse (k ascending from 0, as lo_collapse) and the norm's sum of squares.
    float x[TK];
#pragma unroll
    for (int j = 0; j < TK; ++j) {
        x[j] = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) x[j] = __fadd_rn(x[j], __fmul_rn(mixv[j][k], nv[j][k]));
        const float xs = dsk_warp_sum(__fmul_rn(x[j], x[j]));
        if (lane == 0) sq_warp[j][warp] = xs;
    }
    __syncthreads();
    for (int j = warp; j < TK; j += warps) {
        const float s = dsk_warp_sum(lane < warps ? sq_warp[j][lane] : 0.0f);
        if (lane == 0) sq_part[j] = s;
    }
    if constexpr (C > 1) dsk_cluster_sync(); else __syncthreads();
    for (int j = warp; j < TK; j += warps) {
        float r = 0.0f;
        if constexpr (C > 1) {
            if (lane < C) r = dsk_ld_cluster(&sq_part[j], lane);
        } else {
            if (lane == 0) r = sq_part[j];
        }
        // Lane q holds rank q's part (zeros above): the same butterfly in every block.
        const float s = dsk_warp_sum(r);
        if (lane == 0) sq_total[j] = s;
    }
    __syncthreads();
    // Every remote read of this block's shared memory is done (their values summed and stored
    // above): arrive now, wait before leaving (a block's shared memory must outlive the
    // cluster's reads of it).
    if constexpr (C > 1) dsk_cluster_exit_arrive();
#pragma unroll
    for (int j = 0; j < TK; ++j) {
        if (j < tokens) {
            const float ms = __fdiv_rn(sq_total[j], (float)hidden);
            const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, norm_eps)));
            const float y = __fmul_rn(x[j], inv);
            x_out[(long long)(t0 + j) * hidden + c] = norm_w ? __fmul_rn(nw, y) : y;
        }
    }
    if constexpr (C > 1) dsk_cluster_exit_wait();
}

// dsk_lo_hc_seam_c{C}_f32 serves one token a cluster, dsk_lo_hc_seam_c{C}_t{TK}_f32 TK tokens.
#define LO_HC_SEAM(C, TK, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(LO_SEAM_MAX_T) NAME(                          \
        float *streams, const float *post_mix, const float *__restrict__ out,                  \
        const float *__restrict__ fn, const float *__restrict__ base, float scale0,            \
        float scale1, float scale2, const float *__restrict__ norm_w, float *__restrict__ x_out, \
        float *mix_out, int n, int hidden, float mix_eps, float hc_eps, float norm_eps) {      \
        lo_hc_seam<C, TK>(streams, post_mix, out, fn, base, scale0, scale1, scale2, norm_w,     \
                          x_out, mix_out, n, hidden, mix_eps, hc_eps, norm_eps);               \
    }
LO_HC_SEAM(1, 1, dsk_lo_hc_seam_c1_f32)
LO_HC_SEAM(2, 1, dsk_lo_hc_seam_c2_f32)
LO_HC_SEAM(4, 1, dsk_lo_hc_seam_c4_f32)
LO_HC_SEAM(8, 1, dsk_lo_hc_seam_c8_f32)
LO_HC_SEAM(16, 1, dsk_lo_hc_seam_c16_f32)
LO_HC_SEAM(1, 2, dsk_lo_hc_seam_c1_t2_f32)
LO_HC_SEAM(2, 2, dsk_lo_hc_seam_c2_t2_f32)
LO_HC_SEAM(4, 2, dsk_lo_hc_seam_c4_t2_f32)
LO_HC_SEAM(8, 2, dsk_lo_hc_seam_c8_t2_f32)
LO_HC_SEAM(16, 2, dsk_lo_hc_seam_c16_t2_f32)
LO_HC_SEAM(1, 4, dsk_lo_hc_seam_c1_t4_f32)
LO_HC_SEAM(2, 4, dsk_lo_hc_seam_c2_t4_f32)
LO_HC_SEAM(4, 4, dsk_lo_hc_seam_c4_t4_f32)
LO_HC_SEAM(8, 4, dsk_lo_hc_seam_c8_t4_f32)
LO_HC_SEAM(16, 4, dsk_lo_hc_seam_c16_t4_f32)

// The comb of each token's mix row in place: mix[t, 8 .. 24) holds the logits the seam left and
// gets lo_sinkhorn_regs's matrix of them (the bits the pre's finish writes). A warp per token.
extern "C" __global__ void __launch_bounds__(32) dsk_lo_hc_sinkhorn_f32(float *mix, int iters,
                                                                         float hc_eps) {
    dsk_pdl_entry();
    float *m = mix + (long long)blockIdx.x * LO_SEAM_OUTS + 8;
    const int lane = threadIdx.x;
    const float logit = m[lane & 15];
    // Every lane has read its logit before any writes (the shuffles inside synchronise the warp).
    const float v = lo_sinkhorn_regs<4>(logit, 4, iters, hc_eps);
    if (lane < 16) m[lane] = v;
}

// ---------------------------------------------------------------------------------------------
// Router (forward.rs router_scores + route): one block per token.

// f32::total_cmp order as an unsigned key (larger key = larger value; NaN ordered by its bits).
__device__ __forceinline__ unsigned int lo_total_key(float v) {
    int b = __float_as_int(v);
    b ^= (int)(((unsigned int)(b >> 31)) >> 1);
    return (unsigned int)b ^ 0x80000000u;
}

__device__ __forceinline__ unsigned long long lo_warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// A hash layer's experts of a token: row `id` of the table (none for an id outside the vocabulary).
__device__ __forceinline__ void lo_route_hash(const int *__restrict__ hash_table, int id, int vocab, int k,
                                              int *chosen) {
    for (int j = 0; j < k; ++j) chosen[j] = (id >= 0 && id < vocab) ? hash_table[(long long)id * k + j] : -1;
}

// One thread writes token t's ids and weights from the chosen experts' scores `s`: the scores'
// sum in slot order + 1e-20, each weight score / sum * scale; a slot outside [0, experts) gets
// id -1 and weight 0.
__device__ __forceinline__ void lo_route_finish(const float *s, const int *chosen, int experts, int k, int t,
                                                float routed_scaling_factor, int *__restrict__ out_ids,
                                                float *__restrict__ out_weights) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
        const int c = chosen[j];
        if (c >= 0 && c < experts) sum = __fadd_rn(sum, s[c]);
    }
    sum = __fadd_rn(sum, 1e-20f);
    for (int j = 0; j < k; ++j) {
        const int c = chosen[j];
        const bool ok = c >= 0 && c < experts;
        out_ids[(long long)t * k + j] = ok ? c : -1;
        out_weights[(long long)t * k + j] = ok ? __fmul_rn(__fdiv_rn(s[c], sum), routed_scaling_factor) : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_route_f32(
    const float *__restrict__ logits, int scoring, const float *__restrict__ bias,
    const int *__restrict__ hash_table, const int *__restrict__ token_ids, int vocab, int experts,
    int k, float routed_scaling_factor, int *__restrict__ out_ids,
    float *__restrict__ out_weights) {
    dsk_pdl_entry();
    __shared__ float s[LO_ROUTE_MAX_E];
    __shared__ unsigned char taken[LO_ROUTE_MAX_E];
    __shared__ unsigned long long red[32];
    __shared__ int chosen[LO_ROUTE_MAX_K];
    const int t = blockIdx.x;
    const float *l = logits + (long long)t * experts;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        const float v = l[e];
        float sc;
        if (scoring == 0) {
            const float sp = v > 20.0f ? v : log1pf(expf(v));
            sc = __fsqrt_rn(sp);
        } else {
            sc = lo_sigmoid(v);
        }
        s[e] = sc;
        taken[e] = 0;
    }
    __syncthreads();
    if (hash_table) {
        if (threadIdx.x == 0) lo_route_hash(hash_table, token_ids[t], vocab, k, chosen);
    } else {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (int j = 0; j < k; ++j) {
            // Largest biased score not yet taken; ties to the lower index (~index in the low bits).
            unsigned long long best = 0;
            for (int e = threadIdx.x; e < experts; e += blockDim.x) {
                if (taken[e]) continue;
                const float b = bias ? __fadd_rn(s[e], bias[e]) : s[e];
                const unsigned long long key =
                    ((unsigned long long)lo_total_key(b) << 32) | (unsigned int)~(unsigned int)e;
                best = key > best ? key : best;
            }
            best = lo_warp_max_u64(best);
            if (lane == 0) red[warp] = best;
            __syncthreads();
            if (warp == 0) {
                unsigned long long v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0ull;
                v = lo_warp_max_u64(v);
                if (lane == 0) {
                    const int e = (int)~(unsigned int)(v & 0xffffffffull);
                    chosen[j] = e;
                    taken[e] = 1;
                }
            }
            __syncthreads();
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) lo_route_finish(s, chosen, experts, k, t, routed_scaling_factor, out_ids, out_weights);
}

// The router of up to LO_ROUTE_WARP_MAX_E experts on one warp per token (launch/layer_ops.rs:
// RouteKernel::Warp): dsk_lo_route_f32's outputs bit for bit (the same score, bias and key of
// each expert, the same top-k order, the same sum and weights from lane 0), without its block
// barriers: a top-k round was a block-wide max with two __syncthreads, six of them a token; here
// lane l keeps the keys of experts l + 32 i in registers and a round is one warp max. The bias, a
// weight, is loaded before the PDL wait.
#define LO_ROUTE_WARP_MAX_E 256
extern "C" __global__ void __launch_bounds__(32) dsk_lo_route_warp_f32(
    const float *__restrict__ logits, int scoring, const float *__restrict__ bias,
    const int *__restrict__ hash_table, const int *__restrict__ token_ids, int vocab, int experts,
    int k, float routed_scaling_factor, int *__restrict__ out_ids,
    float *__restrict__ out_weights) {
    constexpr int PER = LO_ROUTE_WARP_MAX_E / 32;
    __shared__ float s[LO_ROUTE_WARP_MAX_E];
    __shared__ int chosen[LO_ROUTE_MAX_K];
    const int lane = threadIdx.x, t = blockIdx.x;
    float bv[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int e = lane + 32 * i;
        bv[i] = bias != nullptr && e < experts ? bias[e] : 0.0f;
    }
    dsk_pdl_entry();
    const float *l = logits + (long long)t * experts;
    float v[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int e = lane + 32 * i;
        v[i] = e < experts ? l[e] : 0.0f;
    }
    // 0 marks an expert taken or absent: a real key never is (its low word is ~e, e < 2^10).
    unsigned long long key[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int e = lane + 32 * i;
        key[i] = 0ull;
        if (e < experts) {
            float sc;
            if (scoring == 0) {
                const float sp = v[i] > 20.0f ? v[i] : log1pf(expf(v[i]));
                sc = __fsqrt_rn(sp);
            } else {
                sc = lo_sigmoid(v[i]);
            }
            s[e] = sc;
            const float b = bias != nullptr ? __fadd_rn(sc, bv[i]) : sc;
            key[i] = ((unsigned long long)lo_total_key(b) << 32) | (unsigned int)~(unsigned int)e;
        }
    }
    if (hash_table) {
        if (lane == 0) lo_route_hash(hash_table, token_ids[t], vocab, k, chosen);
    } else {
        for (int j = 0; j < k; ++j) {
            // Largest biased score not yet taken; ties to the lower index (~index in the low bits).
            unsigned long long best = 0ull;
#pragma unroll
            for (int i = 0; i < PER; ++i) best = key[i] > best ? key[i] : best;
            best = lo_warp_max_u64(best);
            const int e = (int)~(unsigned int)(best & 0xffffffffull);
#pragma unroll
            for (int i = 0; i < PER; ++i)
                if (lane + 32 * i == e) key[i] = 0ull;
            if (lane == 0) chosen[j] = e;
        }
    }
    __syncwarp();  // every lane's scores are in s
    if (lane == 0) lo_route_finish(s, chosen, experts, k, t, routed_scaling_factor, out_ids, out_weights);
}

// ---------------------------------------------------------------------------------------------
// Dense f32 SwiGLU experts (tiny models / tests). One warp per output row.

__device__ __forceinline__ float lo_warp_dot(const float *__restrict__ a,
                                             const float *__restrict__ b, int len) {
    float acc = 0.0f;
    for (int i = threadIdx.x & 31; i < len; i += 32) acc = fmaf(a[i], b[i], acc);
    return dsk_warp_sum(acc);
}

// h[(t * k + j), r] = silu(min(w1[e, r] . x[t], limit)) * clamp(w3[e, r] . x[t], -limit, limit).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_dense_gate_up_f32(
    const float *__restrict__ w1, const float *__restrict__ w3, const float *__restrict__ x,
    const int *__restrict__ ids, float *__restrict__ h, int n, int k, int experts, int hidden,
    int inter, float limit) {
    dsk_pdl_entry();
    const long long rows = (long long)n * k * inter;
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    if (warp >= rows) return;
    const int r = (int)(warp % inter);
    const long long slot = warp / inter;
    const int t = (int)(slot / k);
    const int e = ids[slot];
    float a = 0.0f;
    if (e >= 0 && e < experts) {
        const long long wrow = ((long long)e * inter + r) * hidden;
        const float *xr = x + (long long)t * hidden;
        const float g = fminf(lo_warp_dot(w1 + wrow, xr, hidden), limit);
        const float u = fminf(fmaxf(lo_warp_dot(w3 + wrow, xr, hidden), -limit), limit);
        a = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
    }
    if ((threadIdx.x & 31) == 0) h[slot * inter + r] = a;
}

// out[t, c] = sum_j weights[t, j] * (w2[e_j, c] . h[t * k + j]), j ascending; invalid ids skipped.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_dense_down_f32(
    const float *__restrict__ w2, const float *__restrict__ h, const int *__restrict__ ids,
    const float *__restrict__ weights, float *__restrict__ out, int n, int k, int experts,
    int hidden, int inter) {
    dsk_pdl_entry();
    const long long rows = (long long)n * hidden;
    const long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    if (warp >= rows) return;
    const int c = (int)(warp % hidden), t = (int)(warp / hidden);
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
        const long long slot = (long long)t * k + j;
        const int e = ids[slot];
        if (e < 0 || e >= experts) continue;
        const float y = lo_warp_dot(w2 + ((long long)e * hidden + c) * inter, h + slot * inter, inter);
        acc = __fadd_rn(acc, __fmul_rn(weights[slot], y));
    }
    if ((threadIdx.x & 31) == 0) out[warp] = acc;
}

// ---------------------------------------------------------------------------------------------
// x *= s.
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_scale_f32(float *x, long long len,
                                                                        float s) {
    dsk_pdl_entry();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], s);
}

// dst[r, c] = src[r, c] for c < width (strided rows).
extern "C" __global__ void __launch_bounds__(LO_BLOCK) dsk_lo_copy_rows_f32(
    const float *__restrict__ src, long long ld_src, float *__restrict__ dst, long long ld_dst,
    int rows, int width) {
    dsk_pdl_entry();
    const long long total = (long long)rows * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        dst[r * ld_dst + c] = src[r * ld_src + c];
    }
}
