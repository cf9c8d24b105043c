// CPU emulation of attention.cu's tiled f32 indexer kernels, both tile heights
// (dsk_indexer_scores_tiled_f32 = 64 rows, dsk_indexer_scores_tiled16_f32 = 16 rows; one
// std::thread per CUDA thread, barriers for __syncthreads and the warps' shuffles), on V4-Flash's
// shapes (64 heads at TP=1, 32 at TP=2, x 128 dims) and F32 / BF16 / FP8_INDEXER records at
// padded strides, several tokens per launch with their own shuffled block tables and visible
// counts (1, 7, 100, 2048, 3000), ratio 4; and 13 / 16 heads x 64 / 96 dims. Checks, per launch pair:
//  (a) the 16-row scores are bit-identical to the 64-row ones;
//  (b) both are within the bound of the GPU tests of these kernels (server/tests/
//      backend_kv_cuda.rs: max |got - want| / max |want| < 1e-4) of an f64 reference over the
//      decoded rows, and (tighter, as tests/indexer_mma_gpu.rs bounds f32 accumulation) each
//      score within 1e-5 of the magnitude behind it (sum_h |w| scale sum_d |q k|);
//  (c) every visible row is written exactly once and nothing else: each CUDA thread gets its own
//      NaN-filled copy of the output, and after each block every written position is counted
//      (gaps of sentinels sit between the tokens' score ranges and after the last).
// Grids as Kernels::indexer_scores sizes them on 132 SMs, and small grids (blocks loop tiles).
// The emulation does f32 arithmetic on the CPU without contraction; it checks indexing,
// synchronisation and the order of operations, which is what makes the two forms bit-identical.
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools kernels/tools/indexer_tiled_emu.cpp -o /tmp/idxt_emu && /tmp/idxt_emu
#include "emu.h"
#include <functional>

#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __shared__
// Dynamic shared memory of the block that runs (the largest tile: [128][64] + [128][65]).
float smem[128 * (64 + 65)];
float sq[1], dsk_atth_smem[1];
// The f16 attention forms' shared memory (not run here).
alignas(16) unsigned char dsk_attf_smem[16];

inline void dsk_pdl_entry() {}
inline float __shfl_xor_sync(unsigned, float v, int o) {
    g_shfl[threadIdx.x] = v;
    g_warp_bar->arrive_and_wait();
    float r = g_shfl[threadIdx.x ^ o];
    g_warp_bar->arrive_and_wait();
    return r;
}
inline float __shfl_sync(unsigned, float v, int src) {
    g_shfl[threadIdx.x] = v;
    g_warp_bar->arrive_and_wait();
    float r = g_shfl[(threadIdx.x & ~31u) + (src & 31)];
    g_warp_bar->arrive_and_wait();
    return r;
}
// Used only by kernels this tool does not run.
inline unsigned __match_any_sync(unsigned, unsigned) { abort(); }
inline float __shfl_up_sync(unsigned, float, int) { abort(); }
inline unsigned __ballot_sync(unsigned, int) { abort(); }
inline void __syncwarp() { abort(); }
inline float dsk_warp_max(float) { abort(); }
template <class... A> inline void dsk_rope_pair_f32(A &&...) { abort(); }
template <class... A> inline void dsk_rope_cos_sin_f32(A &&...) { abort(); }
template <class... A> inline void dsk_rope_apply_f32(A &&...) { abort(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float f) { return emu_float_bits(f); }

#include "../attention.cu"

enum { F32 = 0, BF16 = 1, FP8I = 3 };
static int failures = 0;
static const int SMS = 132;

using Kernel = void (*)(const float *, const float *, const float *, const unsigned *, const int *, const int *,
                        const int *, const long long *, long long, int, long long, int, int, int, int, float, float *, int);

// Runs `k` on grid (blocks, tokens) with a private NaN-filled output per CUDA thread; returns the
// merged output and counts how often each position was written (over all threads and blocks).
static std::vector<float> run(Kernel k, unsigned blocks, unsigned tokens, size_t out_len, std::vector<int> &writes,
                              const std::function<void(Kernel, float *)> &call) {
    std::vector<float> merged(out_len, NAN);
    writes.assign(out_len, 0);
    std::vector<std::vector<float>> priv(256, std::vector<float>(out_len, NAN));
    gridDim = {blocks, tokens, 1};
    blockDim = {256, 1, 1};
    for (unsigned by = 0; by < tokens; ++by)
        for (unsigned bx = 0; bx < blocks; ++bx) {
            std::barrier<> bar(256);
            std::vector<std::unique_ptr<std::barrier<>>> wb;
            for (int w = 0; w < 8; ++w) wb.emplace_back(new std::barrier<>(32));
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < 256; ++t)
                ts.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    g_block_bar = &bar;
                    g_warp_bar = wb[t / 32].get();
                    call(k, priv[t].data());
                });
            for (auto &t : ts) t.join();
            for (auto &p : priv)
                for (size_t i = 0; i < out_len; ++i)
                    if (!std::isnan(p[i])) {
                        ++writes[i];
                        merged[i] = p[i];
                        p[i] = NAN;
                    }
        }
    return merged;
}

static void run_case(Rng &rng, int fmt, int heads, int dim, std::vector<int> visible, int extra, int small_grid) {
    const int bs = 128, ratio = 4, rpb = bs / ratio, base = 5;
    const int slots = fmt == F32 ? dim : fmt == BF16 ? dim / 2 : dim / 4 + 1;
    const int stride = slots + extra;
    const long long fpb = base + (long long)rpb * stride + 3;
    const int tokens = (int)visible.size();
    int max_vis = 0;
    for (int v : visible) max_vis = std::max(max_vis, v);
    const int bps = std::max((max_vis + rpb - 1) / rpb, 1);
    const int nblocks = tokens * bps + 2;
    std::vector<float> pool(nblocks * fpb);
    for (auto &x : pool) x = rng.f() * 1e3f;  // noise between records
    std::vector<std::vector<double>> dec(nblocks * rpb, std::vector<double>(dim));
    for (int b = 0; b < nblocks; ++b)
        for (int s = 0; s < rpb; ++s) {
            float *rec = pool.data() + b * fpb + base + (long long)s * stride;
            auto &d = dec[b * rpb + s];
            const int e = (int)rng.below(13) - 6;  // row scale 2^e
            if (fmt == FP8I) {
                unsigned char *by = reinterpret_cast<unsigned char *>(rec);
                const float sc = std::ldexp(1.f, e);
                for (int i = 0; i < dim; ++i) {
                    unsigned c;
                    do c = (unsigned)rng.below(256); while ((c & 0x7fu) == 0x7fu);  // no NaN
                    by[i] = (unsigned char)c;
                    d[i] = (double)emu_e4m3(c) * sc;
                }
                rec[dim / 4] = sc;
            } else if (fmt == BF16) {
                unsigned short *h = reinterpret_cast<unsigned short *>(rec);
                for (int i = 0; i < dim; ++i) {
                    h[i] = dsk_f32_to_bf16(std::ldexp(rng.f(), e));
                    d[i] = dsk_bf16_to_f32(h[i]);
                }
            } else {
                for (int i = 0; i < dim; ++i) {
                    rec[i] = std::ldexp(rng.f(), e);
                    d[i] = rec[i];
                }
            }
        }
    // Shuffled (non-contiguous) block tables; 3 sentinel slots between tokens' score ranges.
    std::vector<unsigned> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    for (int i = nblocks - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
    std::vector<unsigned> bt;
    std::vector<int> bt_start, vis(visible);
    std::vector<long long> out_start;
    long long total = 0;
    for (int t = 0; t < tokens; ++t) {
        bt_start.push_back((int)bt.size());
        for (int j = 0; j < bps; ++j) bt.push_back(perm[t * bps + j]);
        out_start.push_back(total);
        total += visible[t] + 3;
    }
    const size_t out_len = total + 16;
    std::vector<float> q(tokens * heads * dim), w(tokens * heads);
    for (auto &x : q) x = rng.f();
    for (auto &x : w) x = rng.f();
    const float scale = 1.f / std::sqrt((float)dim);
    auto call = [&](Kernel k, float *out) {
        k(pool.data(), q.data(), w.data(), bt.data(), bt_start.data(), vis.data(), nullptr, out_start.data(), fpb, bs, base,
          ratio, stride, heads, dim, scale, out, fmt);
    };
    // Grids as the launcher: ceil(max_visible / rows) blocks a token, at most ~4 per SM overall.
    auto grid = [&](int rows) {
        if (small_grid) return small_grid;
        const int per_token = std::max((4 * SMS + tokens - 1) / tokens, 1);
        return std::max(std::min((max_vis + rows - 1) / rows, per_token), 1);
    };
    std::vector<int> w64, w16;
    const int g64 = grid(64), g16 = grid(16);
    auto o64 = run(dsk_indexer_scores_tiled_f32, g64, tokens, out_len, w64, call);
    auto o16 = run(dsk_indexer_scores_tiled16_f32, g16, tokens, out_len, w16, call);
    // (a) bit-identical (NaN sentinels compare by bits too).
    const bool same = memcmp(o64.data(), o16.data(), out_len * sizeof(float)) == 0;
    if (!same) {
        ++failures;
        int shown = 0;
        for (size_t i = 0; i < out_len && shown < 5; ++i)
            if (emu_float_bits(o64[i]) != emu_float_bits(o16[i])) {
                printf("FAIL not bit-identical at %zu: %a vs %a\n", i, o64[i], o16[i]);
                ++shown;
            }
    }
    // (c) each visible row once, nothing else.
    std::vector<char> wanted(out_len, 0);
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < visible[t]; ++r) wanted[out_start[t] + r] = 1;
    int bad_writes = 0;
    for (size_t i = 0; i < out_len; ++i) {
        if (w64[i] != wanted[i]) ++bad_writes;
        if (w16[i] != wanted[i]) ++bad_writes;
    }
    if (bad_writes) {
        printf("FAIL %d positions written other than once per visible row\n", bad_writes);
        ++failures;
    }
    // (b) against f64 over the decoded rows.
    double worst_mag[2] = {0, 0}, max_diff[2] = {0, 0}, max_want = 0;
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < visible[t]; ++r) {
            const int pos = r * ratio;
            const auto &k = dec[bt[bt_start[t] + pos / bs] * rpb + (pos % bs) / ratio];
            double want = 0, mag = 0;
            for (int h = 0; h < heads; ++h) {
                double dot = 0, abs = 0;
                for (int i = 0; i < dim; ++i) {
                    const double p = (double)q[(t * heads + h) * dim + i] * k[i];
                    dot += p;
                    abs += std::fabs(p);
                }
                const double wh = w[t * heads + h];
                want += std::max(dot, 0.0) * scale * wh;
                mag += abs * scale * std::fabs(wh);
            }
            max_want = std::max(max_want, std::fabs(want));
            for (int f = 0; f < 2; ++f) {
                const double v = (f ? o16 : o64)[out_start[t] + r];
                const double diff = std::fabs(v - want);
                max_diff[f] = std::isnan(v) ? INFINITY : std::max(max_diff[f], diff);
                worst_mag[f] = std::isnan(v) ? INFINITY : std::max(worst_mag[f], diff / mag);
            }
        }
    for (int f = 0; f < 2; ++f) {
        const double rel = max_diff[f] / std::max(max_want, 1e-30);
        if (!(rel < 1e-4) || !(worst_mag[f] < 1e-5)) {
            printf("FAIL %s rows: rel diff %.2e (bound 1e-4), worst per-score %.2e of magnitude (bound 1e-5)\n",
                   f ? "16" : "64", rel, worst_mag[f]);
            ++failures;
        }
    }
    printf("fmt %d heads %2d dim %3d stride+%d grid 64:%3d 16:%3d visible", fmt, heads, dim, extra, g64, g16);
    for (int v : visible) printf(" %d", v);
    printf(": bit-identical %s, writes %s, rel diff %.2e / %.2e (bound 1e-4), per-score %.2e / %.2e of mag\n",
           same ? "yes" : "NO", bad_writes ? "BAD" : "once each", max_diff[0] / max_want, max_diff[1] / max_want,
           worst_mag[0], worst_mag[1]);
    fflush(stdout);
}

int main() {
    Rng rng{0x1d3e5c0e0016ULL};
    for (int fmt : {FP8I, BF16, F32}) {
        // V4-Flash TP=1 and TP=2, launcher-sized grids: a long and a 2,048-row token next to
        // short ones (one tile, a partial tile, a single row).
        run_case(rng, fmt, 64, 128, {1, 7, 100, 2048, 3000}, 0, 0);
        run_case(rng, fmt, 32, 128, {3000, 100, 7, 1, 2048}, 3, 0);
        // A decode token alone (the case the 16-row form is for), then small grids: each block
        // loops over several tiles.
        run_case(rng, fmt, 64, 128, {2048}, 1, 0);
        run_case(rng, fmt, 32, 128, {1, 7, 100, 2048, 3000}, 0, 3);
        // Shapes the launcher also sends here: fewer heads (not a multiple of 4), narrower rows.
        run_case(rng, fmt, 13, 64, {100, 1, 33, 0}, 2, 0);
        run_case(rng, fmt, 16, 96, {17, 300}, 1, 2);
    }
    printf(failures ? "%d FAILURES\n" : "all cases pass\n", failures);
    return failures ? 1 : 0;
}
