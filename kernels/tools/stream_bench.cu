// How fast a decode step's weight streaming can be on this GPU: a chain of 43 kernels (one a
// layer), each reading its own buffer of SIZE bytes once (no byte is in L2 when its kernel
// starts), captured in a CUDA graph with programmatic dependent launch (PDL) as the layer stack
// runs its kernels: a kernel issues its loads, then waits for the previous one, then lets the
// next one start. The time a kernel adds to the chain, against the sizes of the projections
// (wq_b / wo_a / wo_b at TP=2: 16 MB; wq_a, the shared expert: 4 MB; wkv: 2 MB), says how far
// the GEMVs and skinny GEMMs are from the memory system's floor and what load organisation gets
// there:
//   warp16  : every lane U 16-byte loads in flight, a warp's load 512 contiguous bytes
//             (the GEMVs' organisation), one block per U x 4 KB;
//   rows16  : the skinny f16 kernel's: a warp over a 16-row tile, lane (g, t) loading 16 bytes at
//             16 t of rows g and g + 8, 8 spans of 64 bytes (16 loads a lane; rows of 1,024 B);
//   loop    : a persistent grid (4 blocks an SM) streaming in rounds of U loads a lane;
//   bulk    : the bulk copy engine (cp.async.bulk, 16 KB pieces into shared memory, one mbarrier);
// each with the plain streaming load, with `.L2::256B` (the L2 fetches the whole 256-byte
// segment on a miss) and with an L2 evict-first policy. `empty` is a chain of empty kernels.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/stream_bench kernels/tools/stream_bench.cu && /tmp/stream_bench
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

constexpr int CHAIN = 43;

__device__ __forceinline__ void pdl_wait_and_release() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Load flavours: 0 plain streaming, 1 with the 256-byte L2 prefetch size, 2 L2 evict-first.
template <int H>
__device__ __forceinline__ uint4 ld16(const void *p, unsigned long long pol) {
    uint4 r;
    if (H == 0) {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else if (H == 1) {
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    } else {
        asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(pol));
    }
    return r;
}

template <int H> __device__ __forceinline__ unsigned long long policy() {
    unsigned long long pol = 0;
    if (H == 2) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}

__device__ __forceinline__ void sink(unsigned int v, unsigned int *out) {
    // Never true for the buffers' contents (filled with 0x01 bytes): keeps the loads alive.
    if (v == 0x9e3779b9u) out[0] = v;
}

__device__ __forceinline__ unsigned int fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

template <int U, int H>
__global__ void __launch_bounds__(256) k_warp16(const uint4 *__restrict__ p, long n16, unsigned int *out) {
    const unsigned long long pol = policy<H>();
    const long base = (long)blockIdx.x * U * 256 + threadIdx.x;
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = base + u * 256 < n16 ? ld16<H>(p + base + u * 256, pol) : make_uint4(0, 0, 0, 0);
    pdl_wait_and_release();
    unsigned int x = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) x ^= fold(v[u]);
    sink(x, out);
}

// Rows of 1,024 bytes; warp w: tile w >> 1 (16 rows), k half w & 1 (512 bytes).
template <int H>
__global__ void __launch_bounds__(256) k_rows16(const unsigned char *__restrict__ p, long bytes, unsigned int *out) {
    const unsigned long long pol = policy<H>();
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long w = (long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const long tile = w >> 1, kh = w & 1;
    const unsigned char *r0 = p + (tile * 16 + g) * 1024 + kh * 512 + 16 * t, *r1 = r0 + 8 * 1024;
    uint4 v[8][2];
    const bool ok = (tile + 1) * 16 * 1024 <= bytes;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
        v[s][0] = ok ? ld16<H>(r0 + 64 * s, pol) : make_uint4(0, 0, 0, 0);
        v[s][1] = ok ? ld16<H>(r1 + 64 * s, pol) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait_and_release();
    unsigned int x = 0;
#pragma unroll
    for (int s = 0; s < 8; ++s) x ^= fold(v[s][0]) ^ fold(v[s][1]);
    sink(x, out);
}

// Persistent: rounds of U loads a lane over the whole buffer, the next round's loads issued
// before the current one is folded.
template <int U, int H>
__global__ void __launch_bounds__(256) k_loop(const uint4 *__restrict__ p, long n16, unsigned int *out) {
    const unsigned long long pol = policy<H>();
    const long stride = (long)gridDim.x * 256 * U;
    long i = (long)blockIdx.x * 256 * U + threadIdx.x;
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = i + u * 256 < n16 ? ld16<H>(p + i + u * 256, pol) : make_uint4(0, 0, 0, 0);
    pdl_wait_and_release();
    unsigned int x = 0;
    for (; i < n16; i += stride) {
        uint4 nv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const long j = i + stride + u * 256;
            nv[u] = j < n16 ? ld16<H>(p + j, pol) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) { x ^= fold(v[u]); v[u] = nv[u]; }
    }
    sink(x, out);
}

// Bulk copies: the block's slab in pieces of 16 KB into a buffer of `buf` bytes, one mbarrier.
__global__ void __launch_bounds__(128) k_bulk(const unsigned char *__restrict__ p, long bytes, int buf, unsigned int *out) {
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long bar;
    const long slab = ((bytes / gridDim.x) + 15) & ~15L;
    const long b0 = (long)blockIdx.x * slab, b1 = min(bytes, b0 + slab);
    const unsigned int bar_a = (unsigned int)__cvta_generic_to_shared(&bar);
    const unsigned int sm_a = (unsigned int)__cvta_generic_to_shared(sm);
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar_a));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    unsigned int phase = 0, x = 0;
    bool first = true;
    for (long r = b0; r < b1; r += buf) {
        const int n = (int)min((long)buf, b1 - r);
        if (threadIdx.x == 0) {
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar_a), "r"(n) : "memory");
            for (int o = 0; o < n; o += 16384) {
                const int m = min(16384, n - o);
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(sm_a + o),
                    "l"(p + r + o), "r"(m), "r"(bar_a)
                    : "memory");
            }
        }
        if (first) {
            pdl_wait_and_release();
            first = false;
        }
        unsigned int done = 0;
        while (!done) {
            asm volatile(
                "{\n\t.reg .pred q;\n\tmbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\n\tselp.u32 %0, 1, 0, q;\n\t}"
                : "=r"(done)
                : "r"(bar_a), "r"(phase)
                : "memory");
        }
        phase ^= 1;
        for (int o = threadIdx.x * 16; o < n; o += 128 * 16) x ^= fold(*reinterpret_cast<const uint4 *>(sm + o));
        __syncthreads();
    }
    if (first) pdl_wait_and_release();
    sink(x, out);
}

__global__ void k_empty(unsigned int *out) {
    pdl_wait_and_release();
    sink(threadIdx.x, out);
}

struct Case {
    const char *name;
    int kind;  // 0 warp16, 1 rows16, 2 loop, 3 bulk, 4 empty
    void *fn;
    int u;     // loads a lane (warp16 / loop)
};

static void launch(const Case &c, const unsigned char *buf, long bytes, unsigned int *out, cudaStream_t s, bool pdl,
                   int sms) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cfg.stream = s;
    const long n16 = bytes / 16;
    void *args[4];
    long nb = n16;
    int bufsz = 0;
    switch (c.kind) {
    case 0:
        cfg.gridDim = dim3((unsigned)((n16 + 256L * c.u - 1) / (256L * c.u)));
        cfg.blockDim = dim3(256);
        args[0] = (void *)&buf; args[1] = &nb; args[2] = &out;
        break;
    case 1:
        cfg.gridDim = dim3((unsigned)(bytes / (16 * 1024) * 2 / 8));
        cfg.blockDim = dim3(256);
        nb = bytes;
        args[0] = (void *)&buf; args[1] = &nb; args[2] = &out;
        break;
    case 2:
        cfg.gridDim = dim3(sms * 4);
        cfg.blockDim = dim3(256);
        args[0] = (void *)&buf; args[1] = &nb; args[2] = &out;
        break;
    case 3: {
        cfg.gridDim = dim3(sms * 2);
        cfg.blockDim = dim3(128);
        bufsz = 96 * 1024;
        cfg.dynamicSmemBytes = bufsz;
        nb = bytes;
        args[0] = (void *)&buf; args[1] = &nb; args[2] = &bufsz; args[3] = &out;
        break;
    }
    default:
        cfg.gridDim = dim3(sms);
        cfg.blockDim = dim3(128);
        args[0] = &out;
    }
    CK(cudaLaunchKernelExC(&cfg, c.fn, args));
}

int main() {
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CK(cudaFuncSetAttribute((const void *)k_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
    const std::vector<Case> cases = {
        {"empty", 4, (void *)k_empty, 0},
        {"warp16 U=2", 0, (void *)k_warp16<2, 0>, 2},
        {"warp16 U=4", 0, (void *)k_warp16<4, 0>, 4},
        {"warp16 U=8", 0, (void *)k_warp16<8, 0>, 8},
        {"warp16 U=16", 0, (void *)k_warp16<16, 0>, 16},
        {"warp16 U=4 L2::256B", 0, (void *)k_warp16<4, 1>, 4},
        {"warp16 U=8 L2::256B", 0, (void *)k_warp16<8, 1>, 8},
        {"warp16 U=16 L2::256B", 0, (void *)k_warp16<16, 1>, 16},
        {"warp16 U=8 evict_first", 0, (void *)k_warp16<8, 2>, 8},
        {"rows16", 1, (void *)k_rows16<0>, 0},
        {"rows16 L2::256B", 1, (void *)k_rows16<1>, 0},
        {"rows16 evict_first", 1, (void *)k_rows16<2>, 0},
        {"loop U=4", 2, (void *)k_loop<4, 0>, 4},
        {"loop U=8", 2, (void *)k_loop<8, 0>, 8},
        {"loop U=8 L2::256B", 2, (void *)k_loop<8, 1>, 8},
        {"bulk 16 KB pieces", 3, (void *)k_bulk, 0},
    };
    const long sizes[] = {2L << 20, 4L << 20, 16L << 20, 32L << 20};
    const long max_bytes = 32L << 20;
    unsigned char *pool = nullptr;
    unsigned int *out = nullptr;
    CK(cudaMalloc(&pool, max_bytes * CHAIN));
    CK(cudaMalloc(&out, 64));
    CK(cudaMemset(pool, 1, max_bytes * CHAIN));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    // The copy ceiling: one 1 GiB device-to-device copy (read + write counted).
    {
        float best = 1e30f;
        for (int r = 0; r < 5; ++r) {
            CK(cudaEventRecord(e0, s));
            CK(cudaMemcpyAsync(pool + (512L << 20), pool, 512L << 20, cudaMemcpyDeviceToDevice, s));
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            best = std::min(best, ms);
        }
        printf("copy ceiling: 512 MiB D2D %.3f ms, %.0f GB/s (read + write)\n", best, 2.0 * (512L << 20) / best / 1e6);
    }
    printf("%-26s %4s %8s %9s %9s %9s\n", "case", "MB", "pdl", "us/kernel", "GB/s", "");
    for (long bytes : sizes) {
        for (const Case &c : cases) {
            for (int pdl = 1; pdl >= 0; --pdl) {
                if (pdl == 0 && !(c.kind == 4 || (c.kind == 0 && c.u == 8) || c.kind == 1)) continue;
                cudaGraph_t g;
                cudaGraphExec_t ge;
                CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
                for (int i = 0; i < CHAIN; ++i) launch(c, pool + i * max_bytes, bytes, out, s, pdl == 1, sms);
                CK(cudaStreamEndCapture(s, &g));
                CK(cudaGraphInstantiate(&ge, g, 0));
                for (int w = 0; w < 3; ++w) CK(cudaGraphLaunch(ge, s));
                float best = 1e30f;
                for (int r = 0; r < 10; ++r) {
                    CK(cudaEventRecord(e0, s));
                    CK(cudaGraphLaunch(ge, s));
                    CK(cudaEventRecord(e1, s));
                    CK(cudaEventSynchronize(e1));
                    float ms;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    best = std::min(best, ms);
                }
                const double us = best * 1000.0 / CHAIN;
                printf("%-26s %4ld %8s %9.2f %9.0f\n", c.name, bytes >> 20, pdl ? "pdl" : "plain", us,
                       c.kind == 4 ? 0.0 : bytes / us / 1e3);
                CK(cudaGraphExecDestroy(ge));
                CK(cudaGraphDestroy(g));
            }
        }
    }
    CK(cudaGetLastError());
    return 0;
}
