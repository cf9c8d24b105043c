// What the CPU emulations of kernels/*.cu share: one std::thread per CUDA thread, std::barrier for
// __syncthreads and for each warp's shuffles, the CUDA keywords and intrinsics the kernels use, the
// common.cuh helpers they call (written from their definitions, not the PTX), a launch loop over
// blocks, and the tests' xorshift64*. A tool includes this, then the kernel source, then its cases.
// They check kernel logic (indexing, synchronisation, order of operations) on a machine without a
// GPU; they do not reproduce the GPU's expf/cos, nor the tensor cores beyond the TF32 and f16
// MMAs below (from their PTX fragment layouts, summed in double).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

struct D3 { unsigned int x = 0, y = 0, z = 0; };
struct uint4 { unsigned int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
thread_local D3 threadIdx, blockIdx;
D3 blockDim, gridDim;
thread_local std::barrier<> *g_block_bar;
thread_local std::barrier<> *g_warp_bar;
static float g_shfl[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
// 64-bit lane shuffle (the indexer's row offsets, dsk_idxm_load); tools define their float ones.
static long long g_shfl64[1024];
inline long long __shfl_sync(unsigned, long long v, int src) {
    g_shfl64[threadIdx.x] = v;
    g_warp_bar->arrive_and_wait();
    long long r = g_shfl64[(threadIdx.x & ~31u) + (src & 31)];
    g_warp_bar->arrive_and_wait();
    return r;
}
// The shared-memory top-k's dynamic key buffer (attention.cu; blocks run one after another here).
static unsigned g_topk_keys[1 << 17];
#define DSK_TOPK_DYN_KEYS(name) unsigned int *name = g_topk_keys
template <class T> inline T __ldg(const T *p) { T v; memcpy(&v, p, sizeof v); return v; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(unsigned u) { return __uint_as_float(u); }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned emu_float_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// common.cuh helpers.
inline float dsk_bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }
inline float dsk_bf16lo(unsigned w) { return __uint_as_float(w << 16); }
inline float dsk_bf16hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
inline unsigned short dsk_f32_to_bf16(float f) {
    unsigned u = emu_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float dsk_e8m0_to_f32(unsigned s) {
    if (s == 0xffu) return __uint_as_float(0x7fc00000u);
    if (s == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(s << 23);
}
// e4m3fn from its definition (bias 7, subnormals m * 2^-9, 0x7F/0xFF NaN).
inline float emu_e4m3(unsigned b) {
    unsigned e = (b >> 3) & 15u, m = b & 7u;
    float v = (e == 15u && m == 7u) ? NAN
              : e                   ? std::ldexp(1.f + m / 8.f, (int)e - 7)
                                    : std::ldexp((float)m, -9);
    return (b & 0x80u) ? -v : v;
}
inline void dsk_e4m3x2_to_f32(unsigned two, float &lo, float &hi) {
    lo = emu_e4m3(two & 0xffu);
    hi = emu_e4m3((two >> 8) & 0xffu);
}
inline uint4 dsk_ld_stream16(const void *p) { uint4 r; memcpy(&r, p, 16); return r; }
// common.cuh's cp.async. By default a copy lands at once. A tool that defines DSK_EMU_CP_ASYNC
// before including this file gets copies that land only at their wait (per thread: the committed
// groups and the open one; the destination is poisoned with 0xff bytes at issue), so a read
// before its wait shows.
#ifdef DSK_EMU_CP_ASYNC
struct EmuCopy { void *dst; const void *src; int n; };
inline thread_local std::deque<std::vector<EmuCopy>> t_emu_cp_groups;
inline thread_local std::vector<EmuCopy> t_emu_cp_open;
inline void emu_cp_async(void *dst, const void *src, int n) {
    memset(dst, 0xff, n);
    t_emu_cp_open.push_back({dst, src, n});
}
inline void emu_cp_commit() { t_emu_cp_groups.push_back(std::move(t_emu_cp_open)); t_emu_cp_open.clear(); }
inline void emu_cp_wait(int pending) {
    while ((int)t_emu_cp_groups.size() > pending) {
        for (auto &c : t_emu_cp_groups.front()) memcpy(c.dst, c.src, c.n);
        t_emu_cp_groups.pop_front();
    }
}
#else
inline void emu_cp_async(void *dst, const void *src, int n) { memcpy(dst, src, n); }
inline void emu_cp_commit() {}
inline void emu_cp_wait(int) {}
#endif
template <int N> inline void dsk_cp_async(void *dst, const void *src) { emu_cp_async(dst, src, N); }
inline void dsk_cp_commit() { emu_cp_commit(); }
template <int N> inline void dsk_cp_wait() { emu_cp_wait(N); }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
#define __align__(n) __attribute__((aligned(n)))
inline float dsk_pow2(int e) { return std::ldexp(1.0f, e); }  // common.cuh's, exact
// IEEE binary16 from its definition: f32 -> f16 bits rounded to nearest, ties to even
// (subnormals, overflow to infinity, NaN kept quiet), and back.
inline unsigned emu_f32_to_f16(float f) {
    const unsigned sign = (emu_float_bits(f) >> 16) & 0x8000u;
    const float a = std::fabs(f);
    if (std::isnan(f)) return sign | 0x7e00u;
    if (a >= 65520.f) return sign | 0x7c00u;                     // rounds past the largest finite
    if (a < std::ldexp(1.f, -14)) return sign | (unsigned)std::nearbyint(std::ldexp(a, 24));  // units of 2^-24
    int e;
    const float m = std::frexp(a, &e);                           // a = m 2^e, m in [0.5, 1)
    const unsigned mant = (unsigned)std::nearbyint(std::ldexp(m, 11));  // 1024 .. 2048
    return sign | ((((unsigned)(e - 1 + 15)) << 10) + (mant - 1024u));  // a carry bumps the exponent
}
inline float emu_f16(unsigned h) {
    const unsigned e = (h >> 10) & 31u, m = h & 1023u;
    const float v = e == 31u ? (m ? NAN : INFINITY) : e ? std::ldexp(1.f + m / 1024.f, (int)e - 15) : std::ldexp((float)m, -24);
    return (h & 0x8000u) ? -v : v;
}
// common.cuh's f16 helpers, from their definitions.
inline void dsk_f16x2_to_f32(unsigned h2, float &lo, float &hi) {
    lo = emu_f16(h2 & 0xffffu);
    hi = emu_f16(h2 >> 16);
}
inline unsigned dsk_e4m3x2_to_f16x2(unsigned two) {  // e4m3 values are exact in f16
    return emu_f32_to_f16(emu_e4m3(two & 0xffu)) | (emu_f32_to_f16(emu_e4m3((two >> 8) & 0xffu)) << 16);
}
inline void dsk_e4m3x4_to_f16x2(unsigned w, unsigned &lo, unsigned &hi) {
    lo = dsk_e4m3x2_to_f16x2(w & 0xffffu);
    hi = dsk_e4m3x2_to_f16x2(w >> 16);
}
inline unsigned dsk_f32x2_to_f16x2(float lo, float hi) { return emu_f32_to_f16(lo) | (emu_f32_to_f16(hi) << 16); }
inline float dsk_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        g_shfl[threadIdx.x] = v;
        g_warp_bar->arrive_and_wait();
        float other = g_shfl[threadIdx.x ^ o];
        g_warp_bar->arrive_and_wait();
        v += other;
    }
    return v;
}
// common.cuh's dynamic shared memory: one static buffer of 256 KB per kernel, which the threads of
// the block that runs share (blocks run one after another).
#define DSK_DYN_SMEM(type, name) alignas(16) static type name[(256 << 10) / sizeof(type)]
// common.cuh's cluster helpers for the clusters of one block an emulator runs.
inline void dsk_cluster_sync() { __syncthreads(); }
inline float dsk_ld_cluster(const float *p, unsigned) { return *p; }
inline void dsk_cluster_exit_arrive() {}
inline void dsk_cluster_exit_wait() {}
inline unsigned dsk_cluster_rank() { return 0; }
inline unsigned dsk_cluster_id_x() { return blockIdx.x; }
// KV pool row records (common.cuh), decoded from their definition.
#define DSK_KV_F32 0
#define DSK_KV_BF16 1
#define DSK_KV_FP8 2
#define DSK_KV_FP8_INDEXER 3
#define DSK_KV_FP8_GROUP 64
inline float dsk_e4m3_to_f32(unsigned b) { return emu_e4m3(b & 0xffu); }
inline float dsk_kv_value(const float *row, int fmt, int dim, int rope, int d) {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(row);
    if (fmt == DSK_KV_F32) return row[d];
    if (fmt == DSK_KV_BF16) return dsk_bf16_to_f32(reinterpret_cast<const unsigned short *>(row)[d]);
    if (fmt == DSK_KV_FP8) {
        const int nope = dim - rope;
        if (d >= nope) {
            unsigned short h;
            memcpy(&h, b + nope + 2 * (d - nope), 2);
            return dsk_bf16_to_f32(h);
        }
        return emu_e4m3(b[d]) * std::ldexp(1.f, (int)b[nope + 2 * rope + d / DSK_KV_FP8_GROUP] - 127);
    }
    return emu_e4m3(b[d]) * row[dim >> 2];
}
// The same values as the warp decoder, value by value (lane d % 32 writes value d).
inline void dsk_kv_decode_row_warp(const float *row, int fmt, int dim, int rope, float *out) {
    for (int d = (int)(threadIdx.x & 31u); d < dim; d += 32) out[d] = dsk_kv_value(row, fmt, dim, rope, d);
}
// TF32 from its definition: round to nearest on the top 19 bits, ties away from zero.
inline unsigned dsk_f32_to_tf32(float x) {
    const unsigned u = emu_float_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}
// The warp MMAs: each lane's fragments meet in g_mma, then D = C + A B with A(frags, row, k) and
// B(frags, k, n) read from the warp's 32 rows of it, products summed in double.
static unsigned g_mma[1024][6];
template <class FA, class FB>
inline void emu_mma(float (&d)[4], const float (&c)[4], const unsigned (&frag)[6], unsigned k_len, FA A, FB B) {
    const unsigned tid = threadIdx.x, lane = tid & 31u, g = lane >> 2, tg = lane & 3u;
    const unsigned(*warp)[6] = g_mma + (tid & ~31u);
    memcpy(g_mma[tid], frag, sizeof frag);
    g_warp_bar->arrive_and_wait();
    float out[4];
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e >> 1), col = 2 * tg + (e & 1u);
        double s = c[e];
        for (unsigned k = 0; k < k_len; ++k) s += A(warp, row, k) * B(warp, k, col);
        out[e] = (float)s;
    }
    g_warp_bar->arrive_and_wait();
    memcpy(d, out, sizeof out);
}
// mma.sync m16n8k8 TF32 from the PTX fragment layout (lane (g, tg) = (lane / 4, lane % 4)):
// A (16 x 8) a0 (g, tg), a1 (g + 8, tg), a2 (g, tg + 4), a3 (g + 8, tg + 4); B (8 x 8) b0 (tg, g),
// b1 (tg + 4, g); C/D (g, 2 tg), (g, 2 tg + 1), (g + 8, 2 tg), (g + 8, 2 tg + 1). Operands TF32
// (top 19 bits).
inline void dsk_mma_tf32_m16n8k8(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                 unsigned b1) {
    auto tf = [](unsigned bits) { return (double)__uint_as_float(bits & 0xffffe000u); };
    const float c[4] = {d[0], d[1], d[2], d[3]};
    emu_mma(d, c, {a0, a1, a2, a3, b0, b1}, 8,
            [&](const unsigned(*w)[6], unsigned row, unsigned k) { return tf(w[(row & 7u) * 4 + (k & 3u)][(row >= 8) + 2 * (k >= 4)]); },
            [&](const unsigned(*w)[6], unsigned k, unsigned n) { return tf(w[n * 4 + (k & 3u)][4 + (k >= 4)]); });
}
// mma.sync m16n8k16 f16 -> f32 from the PTX fragment layout: A (16 x 16) a0 (g, 2 tg .. +1),
// a1 (g + 8, 2 tg ..), a2 (g, 2 tg + 8 ..), a3 (g + 8, 2 tg + 8 ..), the lower column in the
// low half; B (16 x 8) b0 (k 2 tg .. +1, n g), b1 (k 2 tg + 8 .., n g); C/D as the TF32 MMA.
// D = C + A B (C apart from D for callers that keep them apart).
inline void emu_mma_f16_m16n8k16(float (&d)[4], const float (&c)[4], const unsigned (&frag)[6]) {
    auto half = [](unsigned word, unsigned k) { return (double)emu_f16(k & 1u ? word >> 16 : word & 0xffffu); };
    // A(row, k): lane (row % 8, (k % 8) / 2), register (row >= 8) + 2 (k >= 8), half k % 2.
    emu_mma(d, c, frag, 16,
            [&](const unsigned(*w)[6], unsigned row, unsigned k) { return half(w[(row & 7u) * 4 + ((k & 7u) >> 1)][(row >= 8) + 2 * (k >= 8)], k); },
            [&](const unsigned(*w)[6], unsigned k, unsigned n) { return half(w[n * 4 + ((k & 7u) >> 1)][4 + (k >= 8)], k); });
}
inline void dsk_mma_f16_m16n8k16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                 unsigned b1) {
    const float c[4] = {d[0], d[1], d[2], d[3]};
    emu_mma_f16_m16n8k16(d, c, {a0, a1, a2, a3, b0, b1});
}
inline void dsk_mma_f16_m16n8k16_first(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       unsigned b0, unsigned b1) {
    const float c[4] = {0.f, 0.f, 0.f, 0.f};
    emu_mma_f16_m16n8k16(d, c, {a0, a1, a2, a3, b0, b1});
}
// ldmatrix.m8n8.x4.b16: lanes 8 j .. 8 j + 7 give the 16-byte rows of matrix j; r[j] of lane
// (g, tg) = (lane / 4, lane % 4) is the pair (row g, elements 2 tg, 2 tg + 1) of matrix j, or with
// `trans` (row 2 tg, element g) low and (row 2 tg + 1, element g) high.
static const void *g_ldsm_b16[1024];
inline void emu_ldsm4_b16(const void *p, unsigned (&r)[4], bool trans) {
    const unsigned tid = threadIdx.x, w0 = tid & ~31u, lane = tid & 31u, g = lane / 4, tg = lane % 4;
    g_ldsm_b16[tid] = p;
    g_warp_bar->arrive_and_wait();
    for (int j = 0; j < 4; ++j) {
        const unsigned char *const *rows = reinterpret_cast<const unsigned char *const *>(g_ldsm_b16 + w0 + 8 * j);
        if (!trans) {
            memcpy(&r[j], rows[g] + 4 * tg, 4);
        } else {
            unsigned short lo, hi;
            memcpy(&lo, rows[2 * tg] + 2 * g, 2);
            memcpy(&hi, rows[2 * tg + 1] + 2 * g, 2);
            r[j] = lo | ((unsigned)hi << 16);
        }
    }
    g_warp_bar->arrive_and_wait();
}
using std::fmaf;
using std::max;
using std::min;

// Runs f() as every thread of every block of `grid` (x, then y), `threads` per block.
template <class F> void launch(D3 grid, unsigned threads, F f) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    for (unsigned by = 0; by < std::max(grid.y, 1u); ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> bar(threads);
            std::vector<std::unique_ptr<std::barrier<>>> wb;
            for (unsigned w = 0; w < threads / 32; ++w) wb.emplace_back(new std::barrier<>(32));
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < threads; ++t)
                ts.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    g_block_bar = &bar;
                    g_warp_bar = wb[t / 32].get();
                    f();
                });
            for (auto &t : ts) t.join();
        }
}
template <class F> void launch(unsigned grid, unsigned threads, F f) { launch(D3{grid, 1, 1}, threads, f); }

// xorshift64*, as the GPU tests' Rng.
struct Rng {
    unsigned long long s;
    unsigned long long next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 0x2545f4914f6cdd1dULL;
    }
    // Uniform in [-1, 1) on a grid of 2^-23.
    float f() { return (float)(next() >> 40) / (float)(1ULL << 24) * 2.f - 1.f; }
    size_t below(size_t n) { return next() % n; }
};
