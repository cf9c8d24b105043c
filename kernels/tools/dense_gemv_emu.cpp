// CPU emulation of dense_gemv.cu (one std::thread per CUDA thread, barriers for __syncthreads and
// warp shuffles) against f64 host references, for checking kernel logic on a machine without a
// GPU (row groups, split K, tails, buckets, widening, gather; the same kinds of cases as
// tests/dense_gemv_gpu.rs at smaller sizes):
//   g++ -std=c++20 -O2 -pthread -w -o /tmp/dense_gemv_emu kernels/tools/dense_gemv_emu.cpp && /tmp/dense_gemv_emu
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

#include "../dense_gemv.cu"

// Random bf16 bit patterns of finite values in about +-2^(-8..1), both signs.
static unsigned short rand_bf16(Rng &rng) {
    unsigned long long r = rng.next();
    return (unsigned short)(((r >> 63) << 15) | ((119 + (r >> 32) % 9) << 7) | (r & 0x7f));
}

// Host side of the launch (kernels/src/launch/dense_gemv.rs): split and grid.
static int ksplit(int n, int k, int sms) {
    int groups = (n + 3) / 4, chunks = k / 8, ks = 1;
    while (ks < 8 && (groups + 8 / ks - 1) / (8 / ks) < 2 * sms && 32 * ks * 2 * 2 <= chunks) ks *= 2;
    return ks;
}

static int failures = 0;

static void gemv_case(Rng &rng, int M, int N, int K, int sms) {
    std::vector<unsigned short> W(size_t(N) * K);
    for (auto &w : W) w = rand_bf16(rng);
    std::vector<float> x(size_t(M) * K);
    for (auto &v : x) v = rng.f();
    std::vector<float> out(size_t(M) * N, NAN);
    int ks = ksplit(N, K, sms);
    unsigned blocks = ((N + 3) / 4 + 8 / ks - 1) / (8 / ks);
    // More than 4 tokens run as 4-token tiles along grid.y (the launcher's token_tiles).
    int mt = M <= 1 ? 1 : M <= 2 ? 2 : 4;
    unsigned tiles = (unsigned)((M + mt - 1) / mt);
    launch(D3{blocks, tiles, 1}, 256, [&] {
        switch (mt) {
        case 1: dsk_bf16_gemv_xf32_m1(W.data(), x.data(), out.data(), M, N, K, ks); break;
        case 2: dsk_bf16_gemv_xf32_m2(W.data(), x.data(), out.data(), M, N, K, ks); break;
        default: dsk_bf16_gemv_xf32_m4(W.data(), x.data(), out.data(), M, N, K, ks); break;
        }
    });
    double num = 0, den = 0;
    bool finite = true;
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < N; ++r) {
            double ref = 0;
            for (int k = 0; k < K; ++k) ref += double(dsk_bf16_to_f32(W[size_t(r) * K + k])) * x[size_t(m) * K + k];
            double o = out[size_t(m) * N + r];
            finite &= std::isfinite(o);
            num += (o - ref) * (o - ref);
            den += ref * ref;
        }
    double err = finite ? std::sqrt(num / den) : INFINITY;
    bool ok = err < 1e-5;
    failures += !ok;
    printf("%s bf16_gemv M=%2d N=%5d K=%5d ksplit=%d blocks=%u x %u: rel err %.2e\n", ok ? "PASS" : "FAIL", M, N, K, ks, blocks,
           tiles, err);
}

static void widen_case(Rng &rng, long len) {
    std::vector<unsigned short> src(len);
    for (auto &h : src) h = rand_bf16(rng);
    std::vector<float> dst(len, NAN);
    unsigned blocks = std::max(1L, std::min<long>((len + 8 * 256 - 1) / (8 * 256), 3));
    launch(blocks, 256, [&] { dsk_widen_bf16_f32(src.data(), dst.data(), len); });
    bool ok = true;
    for (long i = 0; i < len; ++i) {
        float want = dsk_bf16_to_f32(src[i]);
        ok &= memcmp(&dst[i], &want, 4) == 0;
    }
    failures += !ok;
    printf("%s bf16_to_f32 len=%ld blocks=%u\n", ok ? "PASS" : "FAIL", len, blocks);
}

static void gather_case(Rng &rng, int rows, int K) {
    std::vector<unsigned short> W(size_t(rows) * K);
    for (auto &w : W) w = rand_bf16(rng);
    std::vector<int> ids = {0, rows - 1, 3 % rows, -1, rows, 2147483647, rows / 2};
    int n = ids.size();
    std::vector<float> out(size_t(n) * K, NAN);
    unsigned threads = 32;
    while (threads < 256 && threads < unsigned(K / 8)) threads *= 2;
    launch(n, threads, [&] { dsk_gather_rows_bf16(W.data(), ids.data(), out.data(), n, K, rows); });
    bool ok = true;
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < K; ++k) {
            float want = (ids[i] < 0 || ids[i] >= rows) ? 0.f : dsk_bf16_to_f32(W[size_t(ids[i]) * K + k]);
            ok &= memcmp(&out[size_t(i) * K + k], &want, 4) == 0;
        }
    failures += !ok;
    printf("%s gather_rows_bf16 rows=%d K=%d threads=%u\n", ok ? "PASS" : "FAIL", rows, K, threads);
}

int main() {
    Rng rng{0x9e3779b97f4a7c15ULL};
    // Small "SM counts" force every split (1, 2, 4, 8) at sizes the emulation runs quickly.
    for (int M : {1, 2, 3, 5, 8, 11, 16}) gemv_case(rng, M, 64, 4096, 132);
    gemv_case(rng, 1, 1024, 4096, 132);
    gemv_case(rng, 16, 37, 1024, 132);
    gemv_case(rng, 6, 37, 264, 132);
    gemv_case(rng, 3, 1001, 512, 4);
    gemv_case(rng, 2, 130, 2048, 2);
    gemv_case(rng, 5, 37, 2048, 132);
    gemv_case(rng, 16, 3, 32, 132);
    gemv_case(rng, 9, 129, 8, 132);
    for (long len : {1L, 7L, 8L, 9L, 4096L + 5, 100003L}) widen_case(rng, len);
    gather_case(rng, 1000, 256);
    gather_case(rng, 10, 8);
    gather_case(rng, 5, 24);
    gather_case(rng, 3, 4096);
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
