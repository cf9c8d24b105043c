// The decode projections' kernels in a chain as the layer stack runs them: 43 launches (one a
// layer) of one kernel on 43 copies of one TP=2 rank's weight (nothing in L2 when a launch
// starts), captured in a CUDA graph with programmatic dependent launch, against a kernel that
// only streams the same bytes (stream_bench.cu's floor). What a launch adds to the chain, per
// projection shape (wq_b, wo_b, the shared expert's w1 and w2, wkv):
//   (no argument): the FP8 GEMV at one token and the f16 skinny GEMM at 1 and 16 tokens, on the
//                  cluster plan launch/skinny_mma.rs makes;
//   plans: the f16 skinny GEMM at 16 tokens on every plan (64/128-row blocks, clusters of 1-8)
//          whose shared memory fits, beside the floor with a cluster's two barriers;
//   gemv: the one-token GEMV at its split and at the one-chunk split, against the one-chunk
//         kernel (dsk_fp8_gemv_xf32_m1c, four rows a warp, DSPARK_FP8_ONE_CHUNK=1) checked bit
//         for bit against the two-row kernel at that split;
//   early: the f16 skinny GEMM at 16 tokens with 8 (the kernel's), 4, 2 or 0 spans' weight
//          loads before the PDL wait and the rest after the activations' (skf_body's EARLY),
//          each checked bit for bit against the kernel. docs/PERFORMANCE.md (session 34) has the figures and what they did in a
//         whole decode step.
//   nvcc -O3 -std=c++17 -arch=sm_90a -include kernels/common.cuh -o /tmp/proj_chain \
//     kernels/tools/proj_chain_bench.cu && /tmp/proj_chain [plans|gemv|early]
// About 20 seconds on an H200.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../fp8_gemv.cu"
#include "../skinny_mma.cu"

#include "cuda_check.h"

constexpr int CHAIN = 43;

// Streams n16 x 16 bytes, two loads a thread before the PDL wait; with CLUSTER, a cluster's two
// barriers at the end as the f16 skinny kernel's reduction has them.
template <bool CLUSTER>
__global__ void __launch_bounds__(256) k_floor(const uint4 *__restrict__ p, long n16, unsigned int *out) {
    const long base = (long)blockIdx.x * 512 + threadIdx.x;
    uint4 a = base < n16 ? dsk_ld_stream16(p + base) : make_uint4(0, 0, 0, 0);
    uint4 b = base + 256 < n16 ? dsk_ld_stream16(p + base + 256) : make_uint4(0, 0, 0, 0);
    dsk_pdl_entry();
    const unsigned int x = a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    if (CLUSTER) dsk_cluster_sync();
    if (x == 0x9e3779b9u) out[0] = x;
    if (CLUSTER) dsk_cluster_sync();
}

__global__ void k_fill(unsigned char *p, long n, unsigned int seed) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        unsigned int h = (unsigned int)i * 2654435761u ^ seed;
        h ^= h >> 13;
        h *= 0x5bd1e995u;
        h ^= h >> 15;
        // e4m3 without the NaN codes (0x7f / 0xff): |x| <= 448.
        unsigned char b = (unsigned char)h;
        if ((b & 0x7f) == 0x7f) b ^= 1;
        p[i] = b;
    }
}

// The f16 skinny kernel with only EARLY spans' loads before the PDL wait (skinny_mma.cu:
// skf_body's EARLY; the product kernels run SKF_SPANS).
template <int NT, int WARPS, int EARLY>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)
    k_skf(const unsigned char *__restrict__ W, const unsigned char *__restrict__ S, const float *__restrict__ x,
          float *__restrict__ out, int M, int N, int K, long ld_x, long ld_out, int group_rows, long x_group_stride,
          int cl) {
    skf_body<NT, WARPS, EARLY>(W, S, x, out, M, N, K, ld_x, ld_out, group_rows, x_group_stride, cl);
}

template <int WARPS> static const void *skf_fn(int early) {
    switch (early) {
    case 0: return (const void *)k_skf<2, WARPS, 0>;
    case 2: return (const void *)k_skf<2, WARPS, 2>;
    case 4: return (const void *)k_skf<2, WARPS, 4>;
    default: return (const void *)k_skf<2, WARPS, SKF_SPANS>;
    }
}

struct Shape {
    const char *name;
    int n, k;
};

static int fp8_ksplit(int n, int k, int sms) {
    const int pairs = (n + 1) / 2, chunks = k / 16;
    int ks = 1;
    while (ks < 8 && (pairs + 8 / ks - 1) / (8 / ks) < 2 * sms && 32 * ks * 2 <= chunks) ks *= 2;
    return ks;
}

// launch/skinny_mma.rs: skinny_f16_plan (128-row blocks wherever their K range is whole 128s).
static void f16_plan(int n, int k, int sms, int &rows, int &cluster) {
    auto with = [&](int rpb, int &cl) -> bool {
        auto halves = [&](int c) { return c < 8 && k % (64 * 2 * c) == 0; };
        cl = 1;
        while (k / cl > 512 && halves(cl)) cl *= 2;
        const int row_blocks = (n + rpb - 1) / rpb;
        while (row_blocks * cl < sms && halves(cl) && k / (2 * cl) >= 256) cl *= 2;
        return k % (64 * cl) == 0 && k / cl <= 1024;
    };
    int cl = 1;
    if (with(128, cl) && (k / cl) % 128 == 0) {
        rows = 128;
        cluster = cl;
        return;
    }
    with(64, cl);
    rows = 64;
    cluster = cl;
}

static size_t f16_smem(int k, int m, int rows, int cluster) {
    const int kb = k / cluster, tt = m > 8 ? 2 : 1;
    return (size_t)kb / 16 * tt * 32 * 16 + kb / 64 * 16 * 4 + 16 * (rows + 4) * 4;
}

struct Ctx {
    cudaStream_t s;
    unsigned char *w, *sc;
    float *x, *out;
    unsigned int *sink;
    long wbytes, sbytes;
    int sms;
};

using Launch = std::function<void(const Ctx &, int, bool)>;

static void launch_ex(const Ctx &c, bool pdl, const void *fn, dim3 grid, dim3 block, size_t smem, int cluster,
                      void **args) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[2];
    int na = 0;
    if (pdl) {
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na].val.programmaticStreamSerializationAllowed = 1;
        ++na;
    }
    if (cluster > 1) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = cluster;
        attr[na].val.clusterDim.y = 1;
        attr[na].val.clusterDim.z = 1;
        ++na;
    }
    cfg.attrs = attr;
    cfg.numAttrs = na;
    cfg.stream = c.s;
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    CK(cudaLaunchKernelExC(&cfg, fn, args));
}

static double chain_us(const Ctx &c, const Launch &l, bool pdl) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(c.s, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < CHAIN; ++i) l(c, i, pdl);
    CK(cudaStreamEndCapture(c.s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int w = 0; w < 3; ++w) CK(cudaGraphLaunch(ge, c.s));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int r = 0; r < 10; ++r) {
        CK(cudaEventRecord(e0, c.s));
        CK(cudaGraphLaunch(ge, c.s));
        CK(cudaEventRecord(e1, c.s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        best = std::min(best, ms);
    }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return best * 1000.0 / CHAIN;
}

int main(int argc, char **argv) {
    const bool sweep = argc > 1 && std::string(argv[1]) == "plans";
    const bool gemv = argc > 1 && std::string(argv[1]) == "gemv";
    const bool early = argc > 1 && std::string(argv[1]) == "early";
    Ctx c{};
    CK(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, 0));
    const Shape shapes[] = {{"wq_b [16384, 1024]", 16384, 1024}, {"wo_b [4096, 4096]", 4096, 4096},
                            {"w1 [1024, 4096]", 1024, 4096},     {"w2 [4096, 1024]", 4096, 1024},
                            {"wkv [512, 4096]", 512, 4096}};
    c.wbytes = 16L << 20;
    c.sbytes = 4096;
    CK(cudaMalloc(&c.w, c.wbytes * CHAIN));
    CK(cudaMalloc(&c.sc, c.sbytes * CHAIN));
    CK(cudaMalloc(&c.x, 16 * 4096 * 4));
    CK(cudaMalloc(&c.out, 16L * 16384 * 4 * CHAIN));
    CK(cudaMalloc(&c.sink, 64));
    k_fill<<<1024, 256>>>(c.w, c.wbytes * CHAIN, 1u);
    CK(cudaMemset(c.sc, 120, c.sbytes * CHAIN));
    {
        std::vector<float> hx(16 * 4096);
        for (size_t i = 0; i < hx.size(); ++i) hx[i] = (float)((i * 7919) % 2001) / 1000.f - 1.f;
        CK(cudaMemcpy(c.x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
    }
    CK(cudaStreamCreateWithFlags(&c.s, cudaStreamNonBlocking));
    for (const void *f : {(const void *)dsk_skinny_f16_fp8_t16_r64, (const void *)dsk_skinny_f16_fp8_t16_r128})
        CK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));

    auto occ = [&](const void *f, int threads, size_t smem) {
        int b = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, f, threads, smem));
        cudaFuncAttributes a;
        CK(cudaFuncGetAttributes(&a, f));
        char buf[64];
        snprintf(buf, sizeof buf, "%d regs, %d blocks/SM", a.numRegs, b);
        return std::string(buf);
    };

    printf("%-20s %-28s %9s %9s  %s\n", "shape", "kernel", "us/launch", "GB/s", "notes");
    for (const Shape &sh : shapes) {
        const long bytes = (long)sh.n * sh.k;
        std::vector<std::pair<std::string, Launch>> cases;
        cases.push_back({"floor (stream only)", [&](const Ctx &c, int i, bool pdl) {
                             const uint4 *p = reinterpret_cast<const uint4 *>(c.w + i * c.wbytes);
                             long n16 = bytes / 16;
                             unsigned int *o = c.sink;
                             void *args[] = {&p, &n16, &o};
                             launch_ex(c, pdl, (const void *)k_floor<false>, dim3((unsigned)((n16 + 511) / 512)), dim3(256), 0, 1,
                                       args);
                         }});
        // The GEMV-shaped kernels (two-row m1, one-chunk m1c) share one parameter list.
        auto gemv_launch = [&](const void *fn, int ks, int rows_per_warp, int i, float *o, bool pdl) {
            const unsigned char *w = c.w + i * c.wbytes, *s = c.sc + i * c.sbytes;
            const void *x = c.x;
            int ob = 0, M = 1, N = sh.n, K = sh.k, k2 = ks;
            void *args[] = {&w, &s, &x, &o, &ob, &M, &N, &K, &k2};
            const int blocks = ((sh.n + rows_per_warp - 1) / rows_per_warp + 8 / ks - 1) / (8 / ks);
            launch_ex(c, pdl, fn, dim3(blocks), dim3(256), 0, 1, args);
        };
        auto gemv_case = [&](const std::string &name, const void *fn, int ks, int rows_per_warp) {
            cases.push_back({name + " (ks " + std::to_string(ks) + ")",
                             [&, fn, ks, rows_per_warp](const Ctx &c, int i, bool pdl) {
                                 gemv_launch(fn, ks, rows_per_warp, i, c.out + (long)i * 16 * 16384, pdl);
                             }});
        };
        gemv_case("fp8 GEMV m=1", (const void *)dsk_fp8_gemv_xf32_m1, fp8_ksplit(sh.n, sh.k, c.sms), 2);
        if (gemv) {
            // launch.rs: fp8_ksplit_one_chunk.
            int k1 = 1;
            while (k1 < 8 && 32 * k1 < sh.k / 16) k1 *= 2;
            gemv_case("fp8 GEMV m=1, one-chunk split", (const void *)dsk_fp8_gemv_xf32_m1, k1, 2);
            // The one-chunk kernel against the two-row one at that split: the same bits.
            float *o_want = c.out + 16L * 16384 * (CHAIN - 1), *o_got = c.out + 16L * 16384 * (CHAIN - 2);
            gemv_launch((const void *)dsk_fp8_gemv_xf32_m1, k1, 2, 0, o_want, false);
            gemv_launch((const void *)dsk_fp8_gemv_xf32_m1c, k1, 4, 0, o_got, false);
            CK(cudaStreamSynchronize(c.s));
            std::vector<float> want(sh.n), got(sh.n);
            CK(cudaMemcpy(want.data(), o_want, sh.n * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(got.data(), o_got, sh.n * 4, cudaMemcpyDeviceToHost));
            const bool same = memcmp(want.data(), got.data(), sh.n * 4) == 0;
            gemv_case(same ? "m1c =bits" : "m1c DIFFERS", (const void *)dsk_fp8_gemv_xf32_m1c, k1, 4);
            for (auto &[name, l] : cases) printf("%-20s %-40s %9.2f\n", sh.name, name.c_str(), chain_us(c, l, true));
            continue;
        }
        int rows0 = 0, cl0 = 0;
        f16_plan(sh.n, sh.k, c.sms, rows0, cl0);
        if (early) {
            // 16 tokens on the launcher's plan, the product kernel against fewer early spans.
            const int rows = rows0, cl = cl0, blocks = (sh.n + rows - 1) / rows * cl;
            const size_t smem = f16_smem(sh.k, 16, rows, cl);
            const void *product = rows == 128 ? (const void *)dsk_skinny_f16_fp8_t16_r128 : (const void *)dsk_skinny_f16_fp8_t16_r64;
            auto launch_f16 = [&, rows, cl, blocks, smem](const Ctx &c, const void *fn, int i, float *o, bool pdl) {
                const unsigned char *w = c.w + i * c.wbytes, *s = c.sc + i * c.sbytes;
                const float *x = c.x;
                int M = 16, N = sh.n, K = sh.k, gr = sh.n, cl2 = cl;
                long ldx = sh.k, ldo = sh.n, xgs = 0;
                void *args[] = {&w, &s, &x, &o, &M, &N, &K, &ldx, &ldo, &gr, &xgs, &cl2};
                launch_ex(c, pdl, fn, dim3(blocks), dim3(rows / 16 * 32), smem, cl, args);
            };
            std::vector<float> want(16L * sh.n), got(16L * sh.n);
            float *o_want = c.out + 16L * 16384 * (CHAIN - 1), *o_got = c.out + 16L * 16384 * (CHAIN - 2);
            CK(cudaFuncSetAttribute(product, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
            launch_f16(c, product, 0, o_want, false);
            CK(cudaStreamSynchronize(c.s));
            CK(cudaMemcpy(want.data(), o_want, want.size() * 4, cudaMemcpyDeviceToHost));
            cases.clear();
            for (int e : {SKF_SPANS, 4, 2, 0}) {
                const void *fn = rows == 128 ? skf_fn<8>(e) : skf_fn<4>(e);
                CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
                CK(cudaMemset(o_got, 0xff, got.size() * 4));
                launch_f16(c, fn, 0, o_got, false);
                CK(cudaStreamSynchronize(c.s));
                CK(cudaMemcpy(got.data(), o_got, got.size() * 4, cudaMemcpyDeviceToHost));
                const bool same = memcmp(want.data(), got.data(), want.size() * 4) == 0;
                cases.push_back({"f16 m=16 r" + std::to_string(rows) + " cl" + std::to_string(cl) + " early " + std::to_string(e) +
                                     (same ? " =bits" : " DIFFERS"),
                                 [&, fn, launch_f16](const Ctx &c, int i, bool pdl) {
                                     launch_f16(c, fn, i, c.out + (long)i * 16 * 16384, pdl);
                                 }});
            }
            for (auto &[name, l] : cases) printf("%-20s %-40s %9.2f\n", sh.name, name.c_str(), chain_us(c, l, true));
            continue;
        }
        std::vector<std::pair<int, int>> plans = {{rows0, cl0}};
        if (sweep)
            for (int r : {64, 128})
                for (int q : {1, 2, 4, 8})
                    if (!(r == rows0 && q == cl0) && sh.k % (64 * q) == 0 && sh.k / q <= 2048 && (r == 64 || (sh.k / q) % 128 == 0) &&
                        f16_smem(sh.k, 16, r, q) <= 200 * 1024)
                        plans.push_back({r, q});
        for (int q : {2, 4, 8}) {
            const long n16 = bytes / 16;
            const int blocks = (int)((n16 + 511) / 512 + q - 1) / q * q;
            cases.push_back({"floor + cluster " + std::to_string(q) + " syncs", [&, q, n16, blocks](const Ctx &c, int i, bool pdl) {
                                 const uint4 *p = reinterpret_cast<const uint4 *>(c.w + i * c.wbytes);
                                 long nn = n16;
                                 unsigned int *o = c.sink;
                                 void *args[] = {&p, &nn, &o};
                                 launch_ex(c, pdl, (const void *)k_floor<true>, dim3(blocks), dim3(256), 0, q, args);
                             }});
        }
        for (const auto &plan : plans)
        for (int m : {1, 16}) {
            const int rows = plan.first, cl = plan.second;
            if (m == 1 && sweep) continue;
            const size_t smem = f16_smem(sh.k, m, rows, cl);
            const void *fn = m > 8 ? (rows == 128 ? (const void *)dsk_skinny_f16_fp8_t16_r128 : (const void *)dsk_skinny_f16_fp8_t16_r64)
                                   : (rows == 128 ? (const void *)dsk_skinny_f16_fp8_t8_r128 : (const void *)dsk_skinny_f16_fp8_t8_r64);
            CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
            const int blocks = (sh.n + rows - 1) / rows * cl;
            cases.push_back({"f16 skinny m=" + std::to_string(m) + " (r" + std::to_string(rows) + " cl" + std::to_string(cl) + ")",
                             [&, m, smem, fn, blocks, rows, cl](const Ctx &c, int i, bool pdl) {
                                 const unsigned char *w = c.w + i * c.wbytes, *s = c.sc + i * c.sbytes;
                                 const float *x = c.x;
                                 float *o = c.out + (long)i * 16 * 16384;
                                 int M = m, N = sh.n, K = sh.k, gr = sh.n, cl2 = cl;
                                 long ldx = sh.k, ldo = sh.n, xgs = 0;
                                 void *args[] = {&w, &s, &x, &o, &M, &N, &K, &ldx, &ldo, &gr, &xgs, &cl2};
                                 launch_ex(c, pdl, fn, dim3(blocks), dim3(rows / 16 * 32), smem, cl, args);
                             }});
            {
                cudaLaunchConfig_t cfg = {};
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeClusterDimension;
                at[0].val.clusterDim.x = cl;
                at[0].val.clusterDim.y = 1;
                at[0].val.clusterDim.z = 1;
                cfg.attrs = at;
                cfg.numAttrs = 1;
                cfg.gridDim = dim3(blocks);
                cfg.blockDim = dim3(rows / 16 * 32);
                cfg.dynamicSmemBytes = smem;
                int mc = 0;
                CK(cudaOccupancyMaxActiveClusters(&mc, fn, &cfg));
                printf("  plan r%d cl%d m=%d: %d blocks = %d clusters, %d clusters fit at once, smem %zu\n", rows, cl, m, blocks,
                       blocks / cl, mc, smem);
            }
        }
        for (auto &[name, l] : cases) {
            const double us = chain_us(c, l, true);
            const double us_plain = chain_us(c, l, false);
            printf("%-20s %-28s %9.2f %9.0f  (no PDL %.2f us)\n", sh.name, name.c_str(), us, bytes / us / 1e3, us_plain);
        }
    }
    printf("occupancy: gemv m1 %s; f16 t16 r128 %s; f16 t16 r64 %s\n",
           occ((const void *)dsk_fp8_gemv_xf32_m1, 256, 0).c_str(),
           occ((const void *)dsk_skinny_f16_fp8_t16_r128, 256, f16_smem(1024, 16, 128, 2)).c_str(),
           occ((const void *)dsk_skinny_f16_fp8_t16_r64, 128, f16_smem(4096, 16, 64, 8)).c_str());
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    return 0;
}
