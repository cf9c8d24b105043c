// What the CPU emulations of kernels/*.cu share: one std::thread per CUDA thread, std::barrier for
// __syncthreads and for each warp's shuffles, the CUDA keywords and intrinsics the kernels use, the
// common.cuh helpers they call (written from their definitions, not the PTX), a launch loop over
// blocks, and the tests' xorshift64*. A tool includes this, then the kernel source, then its cases.
// They check kernel logic (indexing, synchronisation, order of operations) on a machine without a
// GPU; they do not reproduce the GPU's expf/cos or the tensor-core paths.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct D3 { unsigned int x = 0, y = 0, z = 0; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
thread_local D3 threadIdx, blockIdx;
D3 blockDim, gridDim;
thread_local std::barrier<> *g_block_bar;
thread_local std::barrier<> *g_warp_bar;
static float g_shfl[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
template <class T> inline T __ldg(const T *p) { T v; memcpy(&v, p, sizeof v); return v; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(unsigned u) { return __uint_as_float(u); }
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
