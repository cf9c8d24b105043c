// What a decode step's hyper-connection sites cost on its critical path, as the layer stack runs
// them: one token at V4-Flash's width (hc 4 x 4,096), a CUDA graph of 86 sites (43 layers x 2),
// programmatic dependent launch (PDL) on every kernel. A site is
//   [its pre] -> GEMV stand-in A (x -> tmp) -> GEMV stand-in B (tmp -> out) -> [its post]
// with the site's own projection and stand-in weights (no site's bytes stay in L2 for the next).
// `ncu` times kernels one at a time, which says little about a chain of dependent launches that
// PDL overlaps; here each variant's time a site, less the stand-ins' alone, is what its kernels
// add to the chain, and a traced replay gives the time from stand-in B's end to the next A's
// start past its wait (%globaltimer, the same clock on every SM).
// Variants: the split pair (dsk_lo_hc_pre_single_f32, dsk_lo_hc_post2_f32), the seam
// (dsk_lo_hc_seam_c16_f32) with the comb's Sinkhorn on a second stream (as the layer stack) or
// in stream order, each alone, and an empty launch. First it checks the seam against the pair on
// the same inputs (the new streams bit for bit, the rest to f32 rounding).
//   nvcc -O3 -std=c++17 -arch=sm_90a -include kernels/common.cuh -o /tmp/hc_chain \
//     kernels/tools/hc_chain_bench.cu && /tmp/hc_chain
// About 20 seconds on an H200; `nopdl` as the argument launches without PDL.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../layer_ops.cu"

#include "cuda_check.h"

__device__ __forceinline__ unsigned long long chain_clock() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// A GEMV stand-in: streams `n16` 16-byte words of weights, the first round of loads before the
// PDL wait as the project's GEMVs issue theirs, then writes out[c] = 0.5 in[c] for c < h (plus
// nothing from the weights, so their loads stay). Traced (`tr` non-null): tr[0] the latest
// block's end, tr[1] the earliest block past its wait.
extern "C" __global__ void __launch_bounds__(256) stand_in_gemv(const uint4 *__restrict__ w,
                                                                long long n16, const float *in,
                                                                float *out, int h,
                                                                unsigned long long *tr) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = i + u * stride < n16 ? __ldcs(w + i + u * stride) : uint4{};
    dsk_pdl_entry();
    if (tr && threadIdx.x == 0) atomicMin(tr + 1, chain_clock());
    for (;;) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        i += 4 * stride;
        if (i >= n16) break;
#pragma unroll
        for (int u = 0; u < 4; ++u)
            v[u] = i + u * stride < n16 ? __ldcs(w + i + u * stride) : uint4{};
    }
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < h) out[c] = 0.5f * in[c] + (acc == 0x9e3779b9u ? 1e-30f : 0.0f);
    if (tr) {
        __syncthreads();
        if (threadIdx.x == 0) atomicMax(tr, chain_clock());
    }
}

extern "C" __global__ void empty_launch() { dsk_pdl_entry(); }

static const int HC = 4, HIDDEN = 4096, WIDTH = HC * HIDDEN, OUTS = (2 + HC) * HC;
static const int SITES = 86, ITERS = 20, SPLITS = 11, SINKHORN = 20;
static const long long STAND_IN_BYTES = 8ll << 20;

struct Bufs {
    float *streams, *fn, *base, *norm, *x, *mix, *ws, *tmp, *out;
    uint4 *w;
};

enum class Pre { None, Pair, PairOnePass, Seam, SeamInOrder, Empty };

struct Variant {
    const char *name;
    Pre kind;
    bool post;  // the pair's post (the seam has its own)
};

template <typename... KArgs, typename... Args>
static void launch(cudaStream_t s, void (*k)(KArgs...), dim3 grid, dim3 block, bool pdl,
                   int cluster, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = s;
    // The seam's dots' transpose: one token a cluster, 25 rows of a float per thread.
    if ((void *)k == (void *)dsk_lo_hc_seam_c16_f32) cfg.dynamicSmemBytes = 25 * block.x * 4;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
    attr[1].id = cudaLaunchAttributeClusterDimension;
    attr[1].val.clusterDim.x = cluster;
    attr[1].val.clusterDim.y = 1;
    attr[1].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = cluster > 1 ? 2 : 1;
    CK(cudaLaunchKernelEx(&cfg, k, args...));
}

static cudaStream_t g_side;
static cudaEvent_t g_fork[SITES], g_comb[SITES];

// Site i: its pre (the seam: site i-1's post with it, reading the comb the Sinkhorn after seam
// i-1 wrote), the stand-ins, and the pair's post.
static void site(cudaStream_t s, const Bufs &b, int i, const Variant &v, int sms, bool pdl,
                 unsigned long long *tr) {
    const float *fn = b.fn + (long long)i * OUTS * WIDTH;
    float *partial = b.ws + 32, *sq = partial + SPLITS * OUTS;
    switch (v.kind) {
    case Pre::Pair:
    case Pre::PairOnePass:
        launch(s, dsk_lo_hc_pre_single_f32, dim3((SPLITS * OUTS + 3) / 4, 1), dim3(1024), pdl, 1,
               (const float *)b.streams, fn, partial, sq, (unsigned int *)b.ws, SPLITS,
               (WIDTH + SPLITS - 1) / SPLITS, WIDTH, 1e-6f, (const float *)b.base, 0.7f, 0.9f,
               1.1f, (const float *)b.norm, b.x, b.mix, 1, HC, HIDDEN,
               v.kind == Pre::Pair ? SINKHORN : 1, 1e-6f, 1e-6f);
        break;
    case Pre::Seam:
    case Pre::SeamInOrder:
        if (v.kind == Pre::Seam && i > 0) CK(cudaStreamWaitEvent(s, g_comb[i - 1], 0));
        launch(s, dsk_lo_hc_seam_c16_f32, dim3(16, 1), dim3(HIDDEN / 16), pdl, 16, b.streams,
               (const float *)b.mix, (const float *)b.out, fn, (const float *)b.base, 0.7f, 0.9f,
               1.1f, (const float *)b.norm, b.x, b.mix, 1, HIDDEN, 1e-6f, 1e-6f, 1e-6f);
        if (v.kind == Pre::Seam) {
            CK(cudaEventRecord(g_fork[i], s));
            CK(cudaStreamWaitEvent(g_side, g_fork[i], 0));
            launch(g_side, dsk_lo_hc_sinkhorn_f32, dim3(1), dim3(32), pdl, 1, b.mix, SINKHORN,
                   1e-6f);
            CK(cudaEventRecord(g_comb[i], g_side));
        } else {
            launch(s, dsk_lo_hc_sinkhorn_f32, dim3(1), dim3(32), pdl, 1, b.mix, SINKHORN, 1e-6f);
        }
        break;
    case Pre::Empty:
        launch(s, empty_launch, dim3(16), dim3(256), pdl, 1);
        break;
    case Pre::None:
        break;
    }
    const long long n16 = STAND_IN_BYTES / 16;
    const uint4 *wa = b.w + (long long)(2 * i) * n16, *wb = wa + n16;
    launch(s, stand_in_gemv, dim3(2 * sms), dim3(256), pdl, 1, wa, n16, (const float *)b.x,
           b.tmp, HIDDEN, tr ? tr : nullptr);
    launch(s, stand_in_gemv, dim3(2 * sms), dim3(256), pdl, 1, wb, n16, (const float *)b.tmp,
           b.out, HIDDEN, tr ? tr + 2 : nullptr);
    if (v.post)
        launch(s, dsk_lo_hc_post2_f32, dim3(HIDDEN / 4 / 64, 1), dim3(64), pdl, 1, b.streams,
               (const float *)b.mix, (const float *)b.out, HC, HIDDEN, 1);
}

static float *up(const std::vector<float> &h) {
    float *d;
    CK(cudaMalloc(&d, h.size() * 4));
    CK(cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    return d;
}

static std::vector<float> down(cudaStream_t s, const float *d, size_t n) {
    std::vector<float> h(n);
    CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

static std::vector<float> rnd(size_t n, float lo, float hi, unsigned &seed) {
    std::vector<float> v(n);
    for (auto &x : v) {
        seed = seed * 1664525u + 1013904223u;
        x = lo + (hi - lo) * ((seed >> 8) / 16777216.0f);
    }
    return v;
}

static double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num = fmax(num, fabs((double)a[i] - b[i]));
        den = fmax(den, fabs((double)b[i]));
    }
    return num / fmax(den, 1e-30);
}

// The seam and its Sinkhorn against the pair's post then pre on the same inputs.
static bool check_seam(cudaStream_t s, const Bufs &b) {
    unsigned seed = 777;
    auto s0 = rnd(WIDTH, -2.0f, 2.0f, seed);
    auto outv = rnd(HIDDEN, -1.0f, 1.0f, seed);
    auto logits = rnd(16, -1.0f, 1.0f, seed);
    auto postc = rnd(4, 0.2f, 1.8f, seed);
    std::vector<float> mix0(OUTS, 0.5f);
    for (int i = 0; i < 4; ++i) mix0[4 + i] = postc[i];
    for (int i = 0; i < 16; ++i) mix0[8 + i] = logits[i];
    // The ending site's comb: the in-place Sinkhorn of the logits.
    float *mix_prev = up(mix0);
    launch(s, dsk_lo_hc_sinkhorn_f32, dim3(1), dim3(32), false, 1, mix_prev, SINKHORN, 1e-6f);
    float *s1 = up(s0), *s2 = up(s0), *out = up(outv);
    float *mix_pair = up(std::vector<float>(OUTS, 0.0f)), *x_pair = up(std::vector<float>(HIDDEN));
    float *partial = b.ws + 32, *sq = partial + SPLITS * OUTS;
    launch(s, dsk_lo_hc_post2_f32, dim3(16), dim3(64), false, 1, s1, (const float *)mix_prev,
           (const float *)out, HC, HIDDEN, 1);
    launch(s, dsk_lo_hc_pre_single_f32, dim3(66), dim3(1024), false, 1, (const float *)s1,
           (const float *)b.fn, partial, sq, (unsigned int *)b.ws, SPLITS,
           (WIDTH + SPLITS - 1) / SPLITS, WIDTH, 1e-6f, (const float *)b.base, 0.7f, 0.9f, 1.1f,
           (const float *)b.norm, x_pair, mix_pair, 1, HC, HIDDEN, SINKHORN, 1e-6f, 1e-6f);
    // The seam writes its mix over the ending site's (the layer stack's one buffer).
    float *x_seam = up(std::vector<float>(HIDDEN));
    launch(s, dsk_lo_hc_seam_c16_f32, dim3(16), dim3(HIDDEN / 16), false, 16, s2,
           (const float *)mix_prev, (const float *)out, (const float *)b.fn,
           (const float *)b.base, 0.7f, 0.9f, 1.1f, (const float *)b.norm, x_seam, mix_prev,
           1, HIDDEN, 1e-6f, 1e-6f, 1e-6f);
    launch(s, dsk_lo_hc_sinkhorn_f32, dim3(1), dim3(32), false, 1, mix_prev, SINKHORN, 1e-6f);
    auto a1 = down(s, s1, WIDTH), a2 = down(s, s2, WIDTH);
    int differ = 0;
    for (int i = 0; i < WIDTH; ++i) differ += memcmp(&a1[i], &a2[i], 4) != 0;
    const double ex = rel_err(down(s, x_seam, HIDDEN), down(s, x_pair, HIDDEN));
    const double em = rel_err(down(s, mix_prev, OUTS), down(s, mix_pair, OUTS));
    printf("seam against the pair: new streams %d of %d differ in bits; x rel %.3g; mix rel "
           "%.3g\n",
           differ, WIDTH, ex, em);
    return differ == 0 && ex < 1e-5 && em < 1e-5;
}

int main(int argc, char **argv) {
    const bool pdl = !(argc > 1 && strcmp(argv[1], "nopdl") == 0);
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaFuncSetAttribute(dsk_lo_hc_seam_c16_f32,
                            cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    unsigned seed = 12345;
    Bufs b;
    b.streams = up(rnd(WIDTH, -1.0f, 1.0f, seed));
    b.fn = up(rnd((size_t)SITES * OUTS * WIDTH, -0.05f, 0.05f, seed));
    b.base = up(rnd(OUTS, -1.0f, 1.0f, seed));
    b.norm = up(rnd(HIDDEN, 0.5f, 1.5f, seed));
    b.x = up(std::vector<float>(HIDDEN, 0.0f));
    b.mix = up(std::vector<float>(OUTS, 0.25f));
    b.ws = up(std::vector<float>(32 + 32 * (OUTS + 1), 0.0f));
    b.tmp = up(std::vector<float>(HIDDEN, 0.0f));
    b.out = up(std::vector<float>(HIDDEN, 0.0f));
    CK(cudaMalloc(&b.w, 2ll * SITES * STAND_IN_BYTES));
    CK(cudaMemset(b.w, 1, 2ll * SITES * STAND_IN_BYTES));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&g_side, cudaStreamNonBlocking));
    for (int i = 0; i < SITES; ++i) {
        CK(cudaEventCreateWithFlags(&g_fork[i], cudaEventDisableTiming));
        CK(cudaEventCreateWithFlags(&g_comb[i], cudaEventDisableTiming));
    }
    const bool ok = check_seam(s, b);
    const Variant variants[] = {
        {"stand-ins only", Pre::None, false},
        {"empty launch", Pre::Empty, false},
        {"pair: pre + post", Pre::Pair, true},
        {"pair, 1 Sinkhorn pass", Pre::PairOnePass, true},
        {"pair: pre only", Pre::Pair, false},
        {"pair: post only", Pre::None, true},
        {"seam, Sinkhorn on a second stream", Pre::Seam, false},
        {"seam, Sinkhorn in stream order", Pre::SeamInOrder, false},
    };
    unsigned long long *tr;
    CK(cudaMalloc(&tr, (size_t)SITES * 4 * 8));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf("hc_chain: %d sites a step, %d SMs, PDL %s, stand-ins of %lld MB\n", SITES, sms,
           pdl ? "on" : "off", STAND_IN_BYTES >> 20);
    for (const Variant &v : variants) {
        for (int traced = 0; traced < 2; ++traced) {
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            for (int i = 0; i < SITES; ++i)
                site(s, b, i, v, sms, pdl, traced ? tr + i * 4 : nullptr);
            if (v.kind == Pre::Seam) CK(cudaStreamWaitEvent(s, g_comb[SITES - 1], 0));
            CK(cudaStreamEndCapture(s, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            for (int w = 0; w < 3; ++w) CK(cudaGraphLaunch(ge, s));
            if (!traced) {
                CK(cudaEventRecord(e0, s));
                for (int it = 0; it < ITERS; ++it) CK(cudaGraphLaunch(ge, s));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                printf("  %-36s %8.3f us a site (%.3f ms a step)", v.name,
                       ms * 1e3 / ITERS / SITES, ms / ITERS);
            } else {
                // [site][A end, A past wait, B end, B past wait]: B(i-1)'s end to A(i)'s start.
                std::vector<unsigned long long> h((size_t)SITES * 4, 0ull);
                for (int i = 0; i < SITES; ++i) h[i * 4 + 1] = h[i * 4 + 3] = ~0ull;
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(tr, h.data(), h.size() * 8, cudaMemcpyHostToDevice));
                CK(cudaGraphLaunch(ge, s));
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(h.data(), tr, h.size() * 8, cudaMemcpyDeviceToHost));
                double gap = 0;
                for (int i = 2; i < SITES; ++i)
                    gap += (double)(long long)(h[i * 4 + 1] - h[(i - 1) * 4 + 2]);
                printf("; B's end to the next A past its wait %.2f us\n", gap / (SITES - 2) / 1e3);
            }
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
        }
    }
    return ok ? 0 : 1;
}
