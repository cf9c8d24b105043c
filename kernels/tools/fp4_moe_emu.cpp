// CPU emulation of fp4_moe.cu's CUDA-core kernels (one std::thread per CUDA thread, barriers for
// __syncthreads and warp shuffles), checking the v2 kernels (dsk_fp4_moe_gate_up_v2 /
// dsk_fp4_moe_down_v2, and their forms _v2_r2 / _v2_once) against v1 on a machine without a GPU:
//   - the v2 nibble-pair decode gives v1's f16x2 bits for every value of every pair's two
//     nibbles (the other six nibbles random), and for random words;
//   - the v2 block scale has v1's bits for all 256 E8M0 codes (NaN for 255);
//   - the v2 chunk dot is bit-identical to v1's on random chunks with edge activations (0, +-0,
//     f32 subnormals, 2^+-100, inf, NaN);
//   - whole launches (gate/up + SwiGLU, down; both v2 forms) bit-identical to v1, including an invalid expert
//     id, scales 0 and 254 and the NaN code, and within 1e-4 of an f64 reference on sane scales.
// The tensor-core parts (PTX mma, cp.async; mma2 has its own emulator, fp4_moe_mma2_emu.cpp)
// are cut off first:
//   sed '/^\/\/ mma2: tensor-core kernels/,$d' kernels/fp4_moe.cu > /tmp/fp4_moe_cc.cu &&
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools -DFP4_SRC='"/tmp/fp4_moe_cc.cu"' \
//       -o /tmp/fp4_moe_emu kernels/tools/fp4_moe_emu.cpp && /tmp/fp4_moe_emu
#include "emu.h"

#include <cstdint>

// The expert kernels keep their activation row (v2: after a 256-float scale table) in dynamic
// (extern) shared memory: one array for the block that runs (blocks run one after another).
#undef __shared__
#define __shared__
float4 moe_smem4[64 + (4096 / 32) * 36 / 4]; // K <= 4096 here

inline float expf(float v) { return std::exp(v); }
inline void dsk_pdl_entry() {} // launches run one after another here
inline float __shfl_xor_sync(unsigned, float v, int o) {
    g_shfl[threadIdx.x] = v;
    g_warp_bar->arrive_and_wait();
    const float r = g_shfl[threadIdx.x ^ o];
    g_warp_bar->arrive_and_wait();
    return r;
}

#include FP4_SRC

static int fails = 0;
#define CHECK(cond, ...)                                                                              \
    do {                                                                                              \
        if (!(cond)) {                                                                                \
            if (++fails <= 20) { printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } \
        }                                                                                             \
    } while (0)

// v1's pair p of word v (the expression in fp4_chunk_dot).
static unsigned v1_pair(unsigned v, int p) {
    const unsigned mag = (p < 3 ? (v << (9 - 4 * p)) : (v >> 3)) & 0x0E000E00u;
    const unsigned sgn = (p < 3 ? (v << (12 - 4 * p)) : v) & 0x80008000u;
    return mag | sgn;
}

static bool same_bits(float a, float b) { return emu_float_bits(a) == emu_float_bits(b) || (std::isnan(a) && std::isnan(b)); }

static void check_decode(Rng &rng) {
    long n = 0;
    for (int p = 0; p < 4; ++p)
        for (unsigned lo = 0; lo < 16; ++lo)
            for (unsigned hi = 0; hi < 16; ++hi)
                for (int r = 0; r < 4096; ++r) {
                    unsigned v = (unsigned)rng.next();
                    v &= ~((0xFu << (4 * p)) | (0xFu << (4 * p + 16)));
                    v |= (lo << (4 * p)) | (hi << (4 * p + 16));
                    unsigned h[4];
                    fp4_word_pairs(v, h);
                    for (int q = 0; q < 4; ++q) CHECK(h[q] == v1_pair(v, q), "word %08x pair %d: %08x vs %08x", v, q, h[q], v1_pair(v, q));
                    ++n;
                }
    // The f16 of every code (scaled by 2^-14) is the e2m1 value.
    static const float e2m1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (unsigned c = 0; c < 16; ++c) {
        unsigned h[4];
        fp4_word_pairs(c * 0x11111111u, h);
        for (int q = 0; q < 4; ++q) {
            float lo, hi;
            dsk_f16x2_to_f32(h[q], lo, hi);
            const float want = (c & 8u ? -1.f : 1.f) * e2m1[c & 7u];
            CHECK(lo * 16384.f == want && hi * 16384.f == want && std::signbit(lo) == bool(c & 8u), "code %u pair %d: %g %g", c, q, lo, hi);
        }
    }
    printf("decode: %ld words (all pairs' nibble values x 4096), 16 codes\n", n);
}

static void check_scale() {
    for (unsigned s = 0; s < 256; ++s) {
        const float a = fp4_scale(s), b = fp4_scale_v2(s);
        CHECK(same_bits(a, b), "scale %u: %a vs %a", s, a, b);
        CHECK(std::isnan(b) == (s == 255u), "scale %u NaN-ness", s);
    }
    printf("scale: 256 codes (0 -> %a, 240 -> %a, 241..254 -> %a, 255 -> %a)\n", fp4_scale_v2(0), fp4_scale_v2(240), fp4_scale_v2(254),
           fp4_scale_v2(255));
}

static float edge_x(Rng &rng) {
    static const float special[] = {0.f, -0.f, 1e-45f, -1e-40f, 0x1p-100f, -0x1p100f, 65504.f, INFINITY, -INFINITY, NAN, 1.f, -3.f};
    const unsigned r = (unsigned)(rng.next() % 64);
    if (r < sizeof special / sizeof special[0]) return special[r];
    return rng.f();
}

static void check_chunk(Rng &rng) {
    long n = 0;
    for (int it = 0; it < 200000; ++it) {
        const uint4 w = {(unsigned)rng.next(), (unsigned)rng.next(), (unsigned)rng.next(), (unsigned)rng.next()};
        float xs[32];
        const bool edge = it % 4 == 0;
        for (float &v : xs) v = edge ? edge_x(rng) : rng.f();
        const float a = fp4_chunk_dot(w, xs), b = fp4_chunk_dot_v2(w, xs);
        CHECK(same_bits(a, b), "chunk %d: %a vs %a", it, a, b);
        ++n;
    }
    printf("chunk dot: %ld chunks (1 in 4 with edge activations)\n", n);
}

// A layer: E experts, inter I, hidden H; weights random bytes, scales drawn by `scale_of`.
struct Layer {
    int E, I, H;
    std::vector<unsigned char> w1, s1, w3, s3, w2, s2;
};

static double e2m1_f64(unsigned c) {
    static const double v[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    return (c & 8u ? -1.0 : 1.0) * v[c & 7u];
}
static double e8m0_f64(unsigned s) { return s == 255u ? NAN : std::ldexp(1.0, (int)s - 127); }
static double row_dot(const unsigned char *w, const unsigned char *s, const float *x, int K) {
    double acc = 0;
    for (int k = 0; k < K; ++k) acc += e2m1_f64((w[k / 2] >> (4 * (k & 1))) & 15u) * e8m0_f64(s[k / 32]) * x[k];
    return acc;
}

// form 0: v1; 1: v2 (four rows a warp, down with the prefetch); 2: v2's other forms (gate/up at
// two rows a warp, dsk_fp4_moe_gate_up_v2_r2; down without the prefetch, dsk_fp4_moe_down_v2_once).
static void run_moe(const Layer &L, const std::vector<int> &ids, const std::vector<float> &x, const std::vector<float> &wts, int topk,
                     float limit, int form, std::vector<float> &h, std::vector<float> &y) {
    const int pairs = (int)ids.size();
    h.assign((size_t)pairs * L.I, NAN);
    y.assign((size_t)pairs * L.H, NAN);
    const int gate_up_rows = form == 2 ? MOE_ROWS / 2 : MOE_ROWS;
    auto gate_up = form == 0 ? dsk_fp4_moe_gate_up : form == 1 ? dsk_fp4_moe_gate_up_v2 : dsk_fp4_moe_gate_up_v2_r2;
    auto down = form == 0 ? dsk_fp4_moe_down : form == 1 ? dsk_fp4_moe_down_v2 : dsk_fp4_moe_down_v2_once;
    launch(D3{(unsigned)pairs, (unsigned)((L.I + gate_up_rows - 1) / gate_up_rows), 1}, 256, [&] {
        gate_up(x.data(), ids.data(), L.w1.data(), L.s1.data(), L.w3.data(), L.s3.data(), h.data(), topk, L.E, L.I, L.H, limit);
    });
    launch(D3{(unsigned)pairs, (unsigned)((L.H + MOE_ROWS - 1) / MOE_ROWS), 1}, 256, [&] {
        down(h.data(), ids.data(), wts.data(), L.w2.data(), L.s2.data(), y.data(), L.E, L.H, L.I);
    });
}

static double rel_err(const std::vector<float> &got, const std::vector<double> &ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// `odd_scales`: scales 0 / 254 / 255 planted in some rows (then only v1 == v2 is checked).
static void moe_case(Rng &rng, int E, int I, int H, int tokens, int topk, bool bad_id, bool odd_scales) {
    Layer L{E, I, H};
    auto bytes = [&](size_t n) {
        std::vector<unsigned char> b(n);
        for (auto &v : b) v = (unsigned char)rng.next();
        return b;
    };
    // Scales 2^-3..2^1 (x ~ +-1): g, u reach past the clip limit in part of the rows.
    auto scales = [&](size_t n) {
        std::vector<unsigned char> b(n);
        for (auto &v : b) v = (unsigned char)(124 + rng.next() % 5);
        return b;
    };
    L.w1 = bytes((size_t)E * I * H / 2), L.w3 = bytes((size_t)E * I * H / 2), L.w2 = bytes((size_t)E * H * I / 2);
    L.s1 = scales((size_t)E * I * H / 32), L.s3 = scales((size_t)E * I * H / 32), L.s2 = scales((size_t)E * H * I / 32);
    if (odd_scales) {
        const unsigned char odd[3] = {0, 254, 255};
        for (int k = 0; k < 24; ++k) {
            L.s1[rng.next() % L.s1.size()] = odd[k % 3];
            L.s3[rng.next() % L.s3.size()] = odd[k % 3];
            L.s2[rng.next() % L.s2.size()] = odd[k % 3];
        }
    }
    std::vector<int> ids((size_t)tokens * topk);
    for (auto &e : ids) e = (int)(rng.next() % E);
    if (tokens > 1) ids[topk] = ids[0]; // an expert shared between tokens
    if (bad_id) ids[topk - 1] = -1;
    std::vector<float> x((size_t)tokens * H), wts(ids.size());
    for (auto &v : x) v = rng.f();
    for (auto &v : wts) v = 0.1f + 0.4f * (rng.f() + 1.f);
    const float limit = 10.f;
    std::vector<float> h1, y1, h2, y2, h3, y3;
    run_moe(L, ids, x, wts, topk, limit, 0, h1, y1);
    run_moe(L, ids, x, wts, topk, limit, 1, h2, y2);
    run_moe(L, ids, x, wts, topk, limit, 2, h3, y3);
    long diff = 0, diff_forms = 0, nan = 0;
    for (size_t i = 0; i < h1.size(); ++i) diff += !same_bits(h1[i], h2[i]), nan += std::isnan(h2[i]);
    for (size_t i = 0; i < y1.size(); ++i) diff += !same_bits(y1[i], y2[i]), nan += std::isnan(y2[i]);
    for (size_t i = 0; i < h1.size(); ++i) diff_forms += !same_bits(h2[i], h3[i]);
    for (size_t i = 0; i < y1.size(); ++i) diff_forms += !same_bits(y2[i], y3[i]);
    CHECK(diff == 0, "E%d I%d H%d T%d: %ld outputs differ between v1 and v2", E, I, H, tokens, diff);
    CHECK(diff_forms == 0, "E%d I%d H%d T%d: %ld outputs differ between v2's forms", E, I, H, tokens, diff_forms);
    double eh = 0, ey = 0;
    long clipped = 0;
    if (!odd_scales) {
        // f64 reference (h from the reference g/u; y from the kernel's h, so the check is the down
        // kernel's alone).
        std::vector<double> rh(h2.size()), ry(y2.size());
        for (int p = 0; p < (int)ids.size(); ++p) {
            const int e = ids[p], t = p / topk;
            for (int i = 0; i < I; ++i) {
                double v = 0;
                if (e >= 0 && e < E) {
                    const size_t row = (size_t)e * I + i;
                    double g = row_dot(&L.w1[row * H / 2], &L.s1[row * H / 32], &x[(size_t)t * H], H);
                    double u = row_dot(&L.w3[row * H / 2], &L.s3[row * H / 32], &x[(size_t)t * H], H);
                    g = std::min(g, (double)limit), u = std::clamp(u, -(double)limit, (double)limit);
                    v = g / (1 + std::exp(-g)) * u;
                    clipped += std::abs(v) > 5;
                }
                rh[(size_t)p * I + i] = v;
            }
            for (int n = 0; n < H; ++n) {
                double v = 0;
                if (e >= 0 && e < E) {
                    const size_t row = (size_t)e * H + n;
                    v = wts[p] * row_dot(&L.w2[row * I / 2], &L.s2[row * I / 32], &h2[(size_t)p * I], I);
                }
                ry[(size_t)p * H + n] = v;
            }
        }
        eh = rel_err(h2, rh), ey = rel_err(y2, ry);
        CHECK(eh < 1e-4 && ey < 1e-4 && nan == 0, "E%d I%d H%d T%d: rel err h %.2e y %.2e, %ld NaN", E, I, H, tokens, eh, ey, nan);
    }
    printf("moe E%d I%d H%d T%d top%d%s%s: v1 == v2 == v2 r2/once bitwise (%ld, %ld differ); rel err vs f64 h %.2e y %.2e; %ld near clip, %ld NaN\n", E, I, H,
           tokens, topk, bad_id ? " +invalid id" : "", odd_scales ? " +scales 0/254/255" : "", diff, diff_forms, eh, ey, clipped, nan);
}

int main() {
    Rng rng{0xf4f4f4f4ULL};
    check_decode(rng);
    check_scale();
    check_chunk(rng);
    moe_case(rng, 4, 64, 256, 1, 3, false, false);
    moe_case(rng, 5, 96, 1024, 2, 3, true, false);  // 3 row tiles of gate/up, an invalid id
    moe_case(rng, 3, 32, 512, 2, 2, false, false);  // I = 32: one chunk per row in down
    moe_case(rng, 4, 64, 4096, 1, 2, false, false); // K = 4096: 4 chunks per lane in gate/up
    moe_case(rng, 3, 3072, 64, 1, 2, false, false); // I = 3072: 3 chunks per lane in down
    moe_case(rng, 4, 64, 256, 2, 3, true, true);
    printf(fails ? "FAILED (%d)\n" : "all checks passed\n", fails);
    return fails != 0;
}
