// CPU emulation of layer_ops.cu's hyper-connection kernels for many rows (one std::thread per CUDA
// thread, barriers for __syncthreads, named barriers and warp shuffles), checking bit for bit what
// tests/layer_ops_gpu.rs checks on the device (`hc_rows_kernels_equal_the_old_ones`):
// - dsk_lo_hc_post2_f32 (hc 4 and generic, float4 and scalar, any block size) == dsk_lo_hc_post_f32;
// - dsk_lo_hc_squares_f32 == the chunk kernel's squares (dsk_lo_hc_mix_partial2_f32, one chunk);
// - dsk_lo_hc_post_squares_f32 == dsk_lo_hc_post_f32 then those squares (streams and squares);
// - dsk_lo_hc_pre_rows_f32 == dsk_lo_hc_pre_finish2_f32 from the same dots and squares (x_out and
//   mix_out), including a last group of fewer than 8 tokens, hc 3 .. 8 (the register Sinkhorn and
//   the shared-memory one), rows narrower than a block, iters 0 / 1 / 20, with and without weight.
// The emulation reproduces the kernels' order of operations, not the GPU's expf; both sides here
// use the same expf, so what differs can only be the order.
//   g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -o /tmp/hc_rows_emu kernels/tools/hc_rows_emu.cpp && /tmp/hc_rows_emu
#include "layer_ops_emu.h"

#include <algorithm>
#include <random>

// Every block of `grid` (blocks in a random order), `threads` threads each, with the named
// barriers of lo_hc_pre_token (1, 2: all threads; 3: all but warp 0).
static std::mt19937_64 g_order_rng(11);
template <class F> void launch_named(D3 grid, unsigned threads, F f) {
    gridDim = grid;
    blockDim = {threads, 1, 1};
    std::vector<D3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
    std::shuffle(blocks.begin(), blocks.end(), g_order_rng);
    for (D3 b : blocks) {
        std::barrier<> bar(threads), n1(threads), n2(threads), n3(threads > 32 ? threads - 32 : 1);
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
            wb.emplace_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([&, t] {
                threadIdx = {t, 0, 0};
                blockIdx = b;
                g_block_bar = &bar;
                g_warp_bar = wb[t / 32].get();
                g_named[1] = &n1;
                g_named[2] = &n2;
                g_named[3] = &n3;
                f();
            });
        for (auto &t : ts) t.join();
    }
}

static int failures = 0;
static void check(bool ok, const char *what) {
    if (!ok) ++failures;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}
static bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * 4) == 0;
}
static std::vector<float> vec(Rng &rng, size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (auto &x : v) x = lo + (hi - lo) * ((float)(rng.next() >> 40) / (float)(1ULL << 24));
    return v;
}

// A mix row as hc_pre leaves it: pre (unused by the post), post in (0, 2), comb rows of a doubly
// stochastic-ish matrix.
static std::vector<float> mixes(Rng &rng, int n, int hc) {
    const int outs = (2 + hc) * hc;
    std::vector<float> m((size_t)n * outs);
    for (int t = 0; t < n; ++t) {
        std::vector<float> r = vec(rng, outs, 0.0f, 1.0f);
        for (int i = 0; i < hc; ++i) r[hc + i] *= 2.0f;
        for (int i = 0; i < hc * hc; ++i) r[2 * hc + i] *= 2.0f / hc;
        std::copy(r.begin(), r.end(), m.begin() + (size_t)t * outs);
    }
    return m;
}

static void old_post(std::vector<float> &streams, const std::vector<float> &mix, const std::vector<float> &out, int n,
                     int hc, int hidden) {
    const unsigned blocks = std::min<unsigned>((n * hidden + 255) / 256, 7);  // grid-stride
    launch_named({blocks, 1, 1}, 256, [&] { dsk_lo_hc_post_f32(streams.data(), mix.data(), out.data(), n, hc, hidden); });
}

// The chunk kernel's squares over the whole width (hc_squares_f32 with HcPreKernel::Split).
static std::vector<float> old_squares(const std::vector<float> &streams, int n, int width, int outs) {
    std::vector<float> fn(width, 0.5f), partial((size_t)n * outs, NAN), sq(n, NAN);
    launch_named({1, 1, (unsigned)((n + 15) / 16)}, 256, [&] {
        dsk_lo_hc_mix_partial2_f32(streams.data(), fn.data(), partial.data(), sq.data(), n, width, outs, width);
    });
    return sq;
}

static void post_case(int n, int hc, int hidden, unsigned long long seed) {
    Rng rng{seed};
    const int width = hc * hidden, outs = (2 + hc) * hc;
    const std::vector<float> streams = vec(rng, (size_t)n * width, -4, 4), out = vec(rng, (size_t)n * hidden, -1, 1);
    const std::vector<float> mix = mixes(rng, n, hc);
    std::vector<float> want = streams;
    old_post(want, mix, out, n, hc, hidden);
    char msg[200];
    for (int vec4 : {1, 0}) {
        if (vec4 && hidden % 4) continue;
        for (unsigned threads : {256u, 64u}) {
            std::vector<float> got = streams;
            const int per = vec4 ? hidden / 4 : hidden;
            launch_named({(unsigned)((per + threads - 1) / threads), (unsigned)n, 1}, threads,
                   [&] { dsk_lo_hc_post2_f32(got.data(), mix.data(), out.data(), hc, hidden, vec4); });
            snprintf(msg, sizeof msg, "post2 n %2d hc %d hidden %5d vec4 %d threads %3u == old post, bit for bit", n,
                     hc, hidden, vec4, threads);
            check(same_bits(got, want), msg);
        }
    }
    const std::vector<float> want_sq = old_squares(want, n, width, outs);
    std::vector<float> got_sq(n, NAN);
    launch_named({(unsigned)n, 1, 1}, 256, [&] { dsk_lo_hc_squares_f32(want.data(), got_sq.data(), width); });
    snprintf(msg, sizeof msg, "squares n %2d width %6d == the chunk kernel's, bit for bit", n, width);
    check(same_bits(got_sq, want_sq), msg);
    if (hc == 4 && hidden % 256 == 0 && hidden <= 16 * 256) {
        std::vector<float> got = streams, sq(n, NAN);
        launch_named({(unsigned)n, 1, 1}, 256,
               [&] { dsk_lo_hc_post_squares_f32(got.data(), mix.data(), out.data(), sq.data(), hidden); });
        snprintf(msg, sizeof msg,
                 "post_squares n %2d hidden %5d == old post then the chunk kernel's squares: streams %d squares %d", n,
                 hidden, same_bits(got, want), same_bits(sq, want_sq));
        check(same_bits(got, want) && same_bits(sq, want_sq), msg);
    }
}

static void rows_case(int n, int hc, int hidden, int iters, bool weighted, unsigned long long seed) {
    Rng rng{seed};
    const int width = hc * hidden, outs = (2 + hc) * hc;
    const float eps = 1e-6f;
    const std::vector<float> streams = vec(rng, (size_t)n * width, -4, 4);
    const std::vector<float> base = vec(rng, outs, -1, 1), norm = vec(rng, hidden, 0.5f, 1.5f);
    float scale[3];
    for (float &s : scale) s = vec(rng, 1, 0.5f, 1.5f)[0];
    // The workspace as a GEMM step leaves it: raw dots [n, outs] (as the GEMM writes them; a few
    // exact zeros and negative zeros among them), then the squares.
    std::vector<float> dots = vec(rng, (size_t)n * outs, -30, 30);
    dots[0] = -0.0f;
    if (dots.size() > 5) dots[5] = 0.0f;
    const std::vector<float> sq = old_squares(streams, n, width, outs);
    std::vector<float> ws(dots);
    ws.insert(ws.end(), sq.begin(), sq.end());
    const float *nw = weighted ? norm.data() : nullptr;
    std::vector<float> x_old((size_t)n * hidden, NAN), m_old((size_t)n * outs, NAN);
    launch_named({(unsigned)n, 1, 1}, 1024, [&] {
        dsk_lo_hc_pre_finish2_f32(ws.data(), ws.data() + (size_t)n * outs, 1, width, eps, base.data(), scale[0],
                                  scale[1], scale[2], streams.data(), nw, x_old.data(), m_old.data(), n, hc, hidden,
                                  iters, eps, eps);
    });
    std::vector<float> x_new((size_t)n * hidden, NAN), m_new((size_t)n * outs, NAN);
    launch_named({(unsigned)((n + 7) / 8 * 9), 1, 1}, 256, [&] {
        dsk_lo_hc_pre_rows_f32(ws.data(), ws.data() + (size_t)n * outs, 1, width, eps, base.data(), scale[0], scale[1],
                               scale[2], streams.data(), nw, x_new.data(), m_new.data(), n, hc, hidden, iters, eps,
                               eps);
    });
    const bool finite = std::all_of(x_new.begin(), x_new.end(), [](float v) { return std::isfinite(v); }) &&
                        std::all_of(m_new.begin(), m_new.end(), [](float v) { return std::isfinite(v); });
    char msg[220];
    snprintf(msg, sizeof msg,
             "pre_rows n %2d hc %d hidden %5d iters %2d %s == finish2 from the same dots: x %d mix %d (finite %d)", n,
             hc, hidden, iters, weighted ? "w " : "nw", same_bits(x_new, x_old), same_bits(m_new, m_old), finite);
    check(same_bits(x_new, x_old) && same_bits(m_new, m_old) && finite, msg);
}

int main() {
    // (n, hc, hidden): V4-Flash's row, rows over a 256-thread block's float4s, generic hc (3, 8:
    // float4; 2 x 30 scalar), hidden a few 256-channel columns (the fused squares).
    post_case(3, 4, 4096, 1);
    post_case(1, 4, 4096, 2);
    post_case(2, 4, 256, 3);
    post_case(5, 4, 1024, 4);
    post_case(2, 3, 40, 5);
    post_case(1, 8, 16, 6);
    post_case(3, 2, 30, 7);
    post_case(17, 4, 512, 8);
    // (n, hc, hidden, iters, weighted): a last group of 1 (n 17) and of 3 (n 3), V4-Flash's row,
    // narrow rows, hc 3 / 5 (registers), 6 / 8 (shared memory).
    rows_case(3, 4, 4096, 20, true, 11);
    rows_case(17, 4, 512, 20, false, 12);
    rows_case(9, 4, 1024, 1, true, 13);
    rows_case(2, 4, 4096, 0, true, 14);
    rows_case(2, 3, 40, 20, true, 15);
    rows_case(1, 5, 96, 20, false, 16);
    rows_case(3, 6, 64, 20, true, 17);
    rows_case(2, 8, 16, 1, true, 18);
    rows_case(10, 4, 44, 20, true, 19);
    rows_case(1, 1, 300, 20, true, 20);
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
