// CPU emulation of attention.cu's head-grouped split-KV pass 1 (dsk_attend_partial_heads_f32) and
// the combine pass (one std::thread per CUDA thread, barriers for __syncthreads and warp
// shuffles) against a straightforward f64 reference, for checking the kernel's logic on a machine
// without a GPU: tiles, chunks, the transposing warp sum, empty splits, -1 offsets, several tokens
// with different key counts in one launch (the same kinds of cases as tests/attention_heads_gpu.rs,
// fewer of them: about 5 minutes on two cores):
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools kernels/tools/attention_heads_emu.cpp -o /tmp/attn_emu && /tmp/attn_emu
#include "emu.h"

// Only the head-grouped kernel is run here, and it keeps its shared state in dynamic (extern)
// shared memory, defined below as one array for the block that runs. With an empty __shared__,
// every other kernel's static shared arrays become per-thread locals: those kernels compile but
// are not run (the combine pass is done on the host below).
#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __shared__
float dsk_atth_smem[16 * 512 + 16];
float sq[1], smem[1];
// The f16 attention forms' shared memory (not run here).
alignas(16) unsigned char dsk_attf_smem[16];

// Warp intrinsics the file uses, through emu.h's per-warp exchange.
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
inline unsigned __ballot_sync(unsigned, int) { abort(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float f) { return emu_float_bits(f); }

inline float dsk_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = std::max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline void __syncwarp() { g_warp_bar->arrive_and_wait(); }
inline float __shfl_up_sync(unsigned, float, int) { abort(); }
template <class... A> inline void dsk_rope_pair_f32(A &&...) { abort(); }  // no inverse RoPE here
template <class... A> inline void dsk_rope_cos_sin_f32(A &&...) { abort(); }
template <class... A> inline void dsk_rope_apply_f32(A &&...) { abort(); }
inline void dsk_pdl_entry() {}  // launches run one after another here
#include "../attention.cu"

// emu.h's launch covers grid x and y; this one adds z (the token) for the attention grids.
template <class F> void launch3(D3 grid, unsigned threads, F f) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
        launch(D3{grid.x, grid.y, 1}, threads, [&] {
            blockIdx.z = bz;
            f();
        });
    gridDim = grid;
}

// The launch's host side (kernels/src/launch/attention.rs).
static int attention_splits(int max_keys, int tokens, int heads, int sms) {
    int blocks = std::max(tokens * heads, 1);
    int want = (4 * sms + blocks - 1) / blocks;
    return std::max(std::min(want, (max_keys + 63) / 64), 1);
}

static int fails = 0;

// One launch: tokens with the given key counts, every `hole`-th key offset -1 (0: none).
static void attention_case(const char *name, int heads, int hd, std::vector<int> counts, int splits, int hole, unsigned long long seed) {
    Rng rng{seed};
    int tokens = counts.size();
    size_t rows = 3000;
    std::vector<float> pool(rows * hd + 5);
    for (auto &v : pool) v = rng.f();
    std::vector<int> start{0};
    std::vector<long long> off;
    for (int c : counts) {
        for (int i = 0; i < c; ++i) {
            bool masked = hole && rng.below(hole) == 0;
            off.push_back(masked ? -1 : (long long)(rng.below(rows) * hd + (rng.below(2) ? 5 : 0)));
        }
        start.push_back(off.size());
    }
    if (off.empty()) off.push_back(-1);
    std::vector<float> q((size_t)tokens * heads * hd), sinks(heads);
    for (auto &v : q) v = rng.f();
    for (auto &v : sinks) v = rng.f();
    float scale = 1.f / std::sqrt((float)hd);
    std::vector<float> part((size_t)tokens * heads * splits * (hd + 2), NAN), out((size_t)tokens * heads * hd, NAN);
    launch3({(unsigned)splits, (unsigned)(heads / DSK_ATTH_G), (unsigned)tokens}, DSK_ATTH_WARPS * 32, [&] {
        // f32 pool rows (fmt 0, no rope part to decode).
        dsk_attend_partial_heads_f32(pool.data(), q.data(), off.data(), start.data(), heads, hd, splits, scale, part.data(), 0, 0);
    });
    // Pass 2 on the host, as dsk_attend_combine_f32 defines it (that kernel keeps shared arrays,
    // which this emulation does not give static kernels; tests/attention_heads_gpu.rs checks it).
    for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h) {
            const float *p = &part[((size_t)t * heads + h) * splits * (hd + 2)];
            float mx = sinks[h];
            for (int s = 0; s < splits; ++s)
                if (p[s * (hd + 2) + 1] > 0.f) mx = std::max(mx, p[s * (hd + 2)]);
            float denom = std::exp(sinks[h] - mx);
            std::vector<float> w(splits, 0.f);
            for (int s = 0; s < splits; ++s) {
                const float l = p[s * (hd + 2) + 1];
                if (l > 0.f) {
                    w[s] = std::exp(p[s * (hd + 2)] - mx);
                    denom = std::fma(l, w[s], denom);
                }
            }
            for (int d = 0; d < hd; ++d) {
                float v = 0.f;
                for (int s = 0; s < splits; ++s)
                    if (p[s * (hd + 2) + 1] > 0.f) v = std::fma(p[s * (hd + 2) + 2 + d], w[s], v);
                out[((size_t)t * heads + h) * hd + d] = v / denom;
            }
        }
    double worst_rec = 0, worst_out = 0;
    int empty = 0;
    bool bad_empty = false;
    for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h) {
            const float *qh = &q[((size_t)t * heads + h) * hd];
            int k0 = start[t], k1 = start[t + 1], per = (k1 - k0 + splits - 1) / splits;
            // Whole-row reference: softmax with the sink in the denominator.
            double mx = sinks[h];
            std::vector<double> lg(k1 - k0, -INFINITY);
            for (int k = k0; k < k1; ++k) {
                if (off[k] < 0) continue;
                double d = 0;
                for (int c = 0; c < hd; ++c) d += (double)qh[c] * pool[off[k] + c];
                lg[k - k0] = d * scale;
                mx = std::max(mx, lg[k - k0]);
            }
            double den = std::exp(sinks[h] - mx);
            std::vector<double> o(hd, 0.0);
            for (int k = k0; k < k1; ++k) {
                if (off[k] < 0) continue;
                double p = std::exp(lg[k - k0] - mx);
                den += p;
                for (int c = 0; c < hd; ++c) o[c] += p * pool[off[k] + c];
            }
            double num = 0, mag = 0;
            for (int c = 0; c < hd; ++c) {
                double r = o[c] / den;
                num = std::max(num, std::fabs(out[((size_t)t * heads + h) * hd + c] - r));
                mag = std::max(mag, std::fabs(r));
            }
            double e = mag > 0 ? num / mag : num;
            worst_out = std::max(worst_out, std::isfinite(e) ? e : INFINITY);
            // Each split's record (max, sum, acc) against its keys, brought to the reference max.
            for (int s = 0; s < splits; ++s) {
                int a = k0 + s * per, b = std::min(k1, a + per);
                const float *rec = &part[(((size_t)t * heads + h) * splits + s) * (hd + 2)];
                double m = -INFINITY;
                for (int k = a; k < b; ++k)
                    if (off[k] >= 0) m = std::max(m, lg[k - k0]);
                if (m == -INFINITY) {
                    empty++;
                    bool zero = rec[1] == 0.f;
                    for (int c = 0; c < hd; ++c) zero &= rec[2 + c] == 0.f;
                    bad_empty |= !zero;
                    continue;
                }
                double l = 0, amag = 0, adiff = 0;
                std::vector<double> acc(hd, 0.0);
                for (int k = a; k < b; ++k) {
                    if (off[k] < 0) continue;
                    double p = std::exp(lg[k - k0] - m);
                    l += p;
                    for (int c = 0; c < hd; ++c) acc[c] += p * pool[off[k] + c];
                }
                double f = std::exp((double)rec[0] - m);
                double er = std::fabs(rec[0] - m) / (1 + std::fabs(m));
                er = std::max(er, std::fabs(rec[1] * f - l) / l);
                for (int c = 0; c < hd; ++c) {
                    adiff = std::max(adiff, std::fabs(rec[2 + c] * f - acc[c]));
                    amag = std::max(amag, std::fabs(acc[c]));
                }
                er = std::max(er, adiff / amag);
                worst_rec = std::max(worst_rec, std::isfinite(er) ? er : INFINITY);
            }
        }
    bool ok = worst_rec < 1e-5 && worst_out < 1e-5 && !bad_empty;
    fails += !ok;
    printf("%s %-28s heads %2d hd %3d splits %2d tokens %d: record err %.2e, output err %.2e, %d empty split records%s\n",
           ok ? "OK  " : "FAIL", name, heads, hd, splits, tokens, worst_rec, worst_out, empty, bad_empty ? " (NOT ZERO)" : "");
}

int main() {
    // Tiny shape: 16 heads per block means heads 16 (one group); hd 64 leaves lanes' upper
    // dimensions unused.
    attention_case("tiny", 16, 64, {1, 7, 0, 20}, 1, 0, 1);
    attention_case("tiny split 3, holes", 16, 64, {1, 7, 0, 20, 33}, 3, 3, 2);
    attention_case("all keys masked", 16, 64, {5, 9}, 2, 1, 3);
    int sms = 132;
    // V4 shapes, hd 512: 32 heads (TP=2) and 64 (TP=1), mixed key counts in one launch.
    attention_case("mixed, 1 split", 32, 512, {1, 7, 128, 700}, 1, 0, 4);
    attention_case("mixed, 1 split, holes", 64, 512, {7, 128, 1400, 1}, 1, 5, 5);
    attention_case("mixed, 4 splits, holes", 32, 512, {1, 7, 128, 700}, 4, 4, 6);
    int s1 = attention_splits(8320, 1, 64, sms);
    attention_case("decode 8320 keys", 64, 512, {8320}, s1, 0, 7);
    s1 = attention_splits(1400, 1, 32, sms);
    attention_case("decode 1400 keys, holes", 32, 512, {1400}, s1, 7, 8);
    // More splits than a token has keys: empty splits.
    attention_case("empty splits", 16, 512, {1, 7, 30}, 9, 0, 9);
    printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
    return fails != 0;
}
