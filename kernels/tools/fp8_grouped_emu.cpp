// CPU emulation of fp8_gemv.cu's CUDA-core kernels (one std::thread per CUDA thread, barriers for
// __syncthreads and warp shuffles), checking the grouped entry points on a machine without a GPU
// (tests/fp8_grouped_gpu.rs runs the same checks on the device): the grouped kernel against an
// f64 reference per group, bit-exact against the plain kernel run per group at the same K split,
// and nothing written outside out's n columns; at one token with one chunk a lane the one-chunk
// kernels (_m1c, four rows a warp) too, bit-exact against the two-row ones. The tensor-core part (PTX asm) is cut off first:
//   sed '/Tensor-core variant/,$d' kernels/fp8_gemv.cu > /tmp/fp8_gemv_cc.cu &&
//   g++ -std=c++20 -O2 -pthread -w -DFP8_SRC='"/tmp/fp8_gemv_cc.cu"' \
//       -o /tmp/fp8_grouped_emu kernels/tools/fp8_grouped_emu.cpp && /tmp/fp8_grouped_emu
#include "emu.h"
inline void dsk_pdl_entry() {}  // launches run one after another here
#define __grid_constant__
// The merged-launch segment table and lookup, as common.cuh has them.
#define DSK_GEMV_SEGMENTS 8
struct DskGemvSegments {
    unsigned long long w[DSK_GEMV_SEGMENTS];
    unsigned long long s[DSK_GEMV_SEGMENTS];
    unsigned long long out[DSK_GEMV_SEGMENTS];
    int n[DSK_GEMV_SEGMENTS];
    int ksplit[DSK_GEMV_SEGMENTS];
    int block_end[DSK_GEMV_SEGMENTS];
    int count;
};

// The segment block b belongs to, and b's index inside it.
inline int dsk_gemv_segment(const DskGemvSegments &g, int b, int &local) {
    int i = 0;
    while (i + 1 < g.count && b >= g.block_end[i]) ++i;
    local = b - (i ? g.block_end[i - 1] : 0);
    return i;
}

#include FP8_SRC

typedef void (*Plain)(const unsigned char *, const unsigned char *, const void *, void *, int, int, int, int, int);
typedef void (*Grouped)(const unsigned char *, const unsigned char *, const float *, float *, int, int, int, int, int, long, long, long);
static const Plain plain_fns[5] = {dsk_fp8_gemv_xf32_m1, dsk_fp8_gemv_xf32_m2, dsk_fp8_gemv_xf32_m4, dsk_fp8_gemv_xf32_m8, dsk_fp8_gemv_xf32_m16};
static const Grouped grouped_fns[5] = {dsk_fp8_gemv_grouped_xf32_m1, dsk_fp8_gemv_grouped_xf32_m2, dsk_fp8_gemv_grouped_xf32_m4,
                                       dsk_fp8_gemv_grouped_xf32_m8, dsk_fp8_gemv_grouped_xf32_m16};
static int bucket(int m) { return m <= 1 ? 0 : m <= 2 ? 1 : m <= 4 ? 2 : m <= 8 ? 3 : 4; }

int fails = 0;
void run_case(int groups, int rows, int K, int M, int gap, int ks, unsigned long long seed) {
    Rng rng{seed};
    const int N = groups * rows, KB = (K + 127) / 128, stride = K + gap;
    const long ld_x = (long)groups * stride + gap, ld_out = N + 8;
    std::vector<unsigned char> W((size_t)N * K), S((size_t)N / 128 * KB);
    for (auto &b : W) { b = (unsigned char)rng.next(); if ((b & 0x7f) == 0x7f) b ^= 1; }
    for (auto &s : S) s = 118 + rng.next() % 8;
    std::vector<float> x(M * ld_x, NAN);
    for (int m = 0; m < M; ++m) for (int g = 0; g < groups; ++g) for (int j = 0; j < K; ++j) x[m * ld_x + (long)g * stride + j] = rng.f();
    std::vector<float> out(M * ld_out, NAN);
    for (int m = 0; m < M; ++m) for (long c = N; c < ld_out; ++c) out[m * ld_out + c] = -12345.f;
    const int blocks = (N / 2 + (FP8_WARPS / ks) - 1) / (FP8_WARPS / ks);
    launch(blocks, 256, [&] { grouped_fns[bucket(M)](W.data(), S.data(), x.data(), out.data(), M, N, K, ks, rows, stride, ld_x, ld_out); });
    // The one-chunk kernels (one token, every lane at most one chunk of a row; four rows a warp),
    // run here at the same split: the two-row kernels' bits, called with the same parameters.
    const bool one_chunk = M == 1 && K / 16 <= 32 * ks;
    std::vector<float> outc(M * ld_out, NAN);
    if (one_chunk) {
        for (long c = N; c < ld_out; ++c) outc[c] = -12345.f;
        const int cblocks = ((N + 3) / 4 + (FP8_WARPS / ks) - 1) / (FP8_WARPS / ks);
        launch(cblocks, 256, [&] { dsk_fp8_gemv_grouped_xf32_m1c(W.data(), S.data(), x.data(), outc.data(), M, N, K, ks, rows, stride, ld_x, ld_out); });
    }
    double worst = 0; long differ = 0;
    for (int g = 0; g < groups; ++g) {
        std::vector<float> xg((size_t)M * K), og((size_t)M * rows, NAN);
        for (int m = 0; m < M; ++m) std::copy_n(&x[m * ld_x + (long)g * stride], K, &xg[(size_t)m * K]);
        const unsigned char *Wg = &W[(size_t)g * rows * K], *Sg = &S[(size_t)g * rows / 128 * KB];
        const int pblocks = (rows / 2 + (FP8_WARPS / ks) - 1) / (FP8_WARPS / ks);
        launch(pblocks, 256, [&] { plain_fns[bucket(M)](Wg, Sg, xg.data(), og.data(), 0, M, rows, K, ks); });
        if (one_chunk) {
            std::vector<float> ogc((size_t)rows, NAN);
            const int cblocks = ((rows + 3) / 4 + (FP8_WARPS / ks) - 1) / (FP8_WARPS / ks);
            launch(cblocks, 256, [&] { dsk_fp8_gemv_xf32_m1c(Wg, Sg, xg.data(), ogc.data(), 0, M, rows, K, ks); });
            for (int r = 0; r < rows; ++r) {
                if (emu_float_bits(ogc[r]) != emu_float_bits(og[r])) differ++;
                if (emu_float_bits(outc[(long)g * rows + r]) != emu_float_bits(og[r])) differ++;
            }
        }
        double num = 0, den = 0;
        for (int m = 0; m < M; ++m) for (int r = 0; r < rows; ++r) {
            double ref = 0;
            for (int j = 0; j < K; ++j) ref += (double)emu_e4m3(Wg[(size_t)r * K + j]) * dsk_e8m0_to_f32(Sg[(r / 128) * KB + j / 128]) * xg[(size_t)m * K + j];
            float got = out[m * ld_out + (long)g * rows + r], want = og[(size_t)m * rows + r];
            num += (got - ref) * (got - ref); den += ref * ref;
            if (emu_float_bits(got) != emu_float_bits(want)) differ++;
        }
        double e = std::sqrt(num / den);
        if (!(e < 1e-5)) worst = INFINITY; else worst = std::max(worst, e);
    }
    long pad_bad = 0;
    for (int m = 0; m < M; ++m) for (long c = N; c < ld_out; ++c) if (out[m * ld_out + c] != -12345.f) pad_bad++;
    if (one_chunk)
        for (long c = N; c < ld_out; ++c) if (outc[c] != -12345.f) pad_bad++;
    bool ok = worst < 1e-5 && differ == 0 && pad_bad == 0;
    if (!ok) fails++;
    printf("%s groups %d x [%d, %d] M %d gap %d ksplit %d%s: max rel err %.2e, %ld bits differ from plain, %ld pad writes\n",
           ok ? "ok  " : "FAIL", groups, rows, K, M, gap, ks, one_chunk ? " (and one-chunk)" : "", worst, differ, pad_bad);
}

int main() {
    for (int ks : {1, 2, 4, 8}) run_case(3, 128, 512, 1, 16, ks, 11 + ks);
    for (int M : {2, 3, 5, 16}) run_case(3, 128, 512, M, 16, 2, 100 + M);
    run_case(2, 128, 256, 3, 0, 1, 7);
    run_case(2, 256, 272, 4, 4, 1, 8);   // k not a multiple of 128: ceil scale grid
    run_case(4, 128, 4096, 1, 0, 8, 9);  // wo_a's k, per-group split of 1024-row groups
    run_case(2, 128, 1024, 1, 8, 2, 10); // k = 1024 split in two: one chunk a lane
    run_case(2, 256, 1040, 1, 4, 4, 12); // 65 chunks over 128 lanes, the last lanes without one
    printf(fails ? "%d FAILED\n" : "all passed\n", fails);
    return fails ? 1 : 0;
}
