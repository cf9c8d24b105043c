// CPU emulation of layer_ops.cu's two routers (one std::thread per CUDA thread, barriers for
// __syncthreads and the warp's shuffles), checking on a machine without a GPU what
// tests/layer_ops_gpu.rs (`route_warp_equals_route_block`) checks on the device: the one-warp
// router (dsk_lo_route_warp_f32) writes the block router's (dsk_lo_route_f32) ids and weights bit
// for bit, and both equal a sequential port of the host's router_scores + route (forward.rs:
// top-k of score + bias, ties to the lower expert, weights = score / (sum + 1e-20) * scale),
// on scores with ties at the cut, a NaN, both scorings, with and without bias, 1..256 experts
// (the warp kernel's range), k up to 16, and hash layers with ids and table entries out of range.
// Both sides use this machine's expf / log1pf, so what could differ is only the order of work.
//   g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -o /tmp/route_emu kernels/tools/route_emu.cpp && /tmp/route_emu
#include "layer_ops_emu.h"

#include <algorithm>
#include <numeric>

static int failures = 0;

// forward.rs's router for one token, sequentially (the kernels' expf / log1pf / sqrt).
static void route_host(const float *logits, const float *bias, const int *chosen_in, int experts, int k,
                       int scoring, float rsf, int *ids, float *weights) {
    std::vector<float> s(experts);
    for (int e = 0; e < experts; ++e) {
        const float v = logits[e];
        s[e] = scoring == 0 ? std::sqrt(v > 20.0f ? v : log1pf(expf(v))) : 1.0f / (1.0f + expf(-v));
    }
    std::vector<int> chosen(k);
    if (chosen_in) {
        std::copy(chosen_in, chosen_in + k, chosen.begin());
    } else {
        std::vector<int> idx(experts);
        std::iota(idx.begin(), idx.end(), 0);
        auto key = [&](int e) { return lo_total_key(bias ? s[e] + bias[e] : s[e]); };
        std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) > key(b); });
        std::copy(idx.begin(), idx.begin() + k, chosen.begin());
    }
    float sum = 0.0f;
    for (int c : chosen)
        if (c >= 0 && c < experts) sum += s[c];
    sum += 1e-20f;
    for (int j = 0; j < k; ++j) {
        const int c = chosen[j];
        const bool ok = c >= 0 && c < experts;
        ids[j] = ok ? c : -1;
        weights[j] = ok ? s[c] / sum * rsf : 0.0f;
    }
}

static void run_case(Rng &rng, int n, int experts, int k, int hash_vocab, int scoring, bool with_bias, bool nan) {
    std::vector<float> logits(n * experts), bias(experts);
    // A grid of 0.25 from -6 to 24: many equal scores, so the cut falls on ties.
    for (auto &v : logits) v = (float)(rng.next() % 121) * 0.25f - 6.0f;
    if (nan) logits[rng.next() % logits.size()] = NAN;
    for (auto &b : bias) b = (float)(rng.next() % 5) * 0.125f - 0.25f;
    const int vocab = hash_vocab;
    std::vector<int> table(std::max(vocab, 1) * k), token_ids(n);
    for (auto &e : table) e = (int)(rng.next() % (experts + 3)) - 1;
    for (auto &id : token_ids) id = (int)(rng.next() % (vocab + 3)) - 1;
    const float *bp = with_bias ? bias.data() : nullptr;
    const int *tp = hash_vocab ? table.data() : nullptr;
    std::vector<int> ids_block(n * k, -7), ids_warp(n * k, -7), ids_host(n * k);
    std::vector<float> w_block(n * k, NAN), w_warp(n * k, NAN), w_host(n * k);
    launch(n, 256, [&] {
        dsk_lo_route_f32(logits.data(), scoring, bp, tp, token_ids.data(), vocab, experts, k, 1.5f, ids_block.data(),
                         w_block.data());
    });
    launch(n, 32, [&] {
        dsk_lo_route_warp_f32(logits.data(), scoring, bp, tp, token_ids.data(), vocab, experts, k, 1.5f,
                              ids_warp.data(), w_warp.data());
    });
    for (int t = 0; t < n; ++t) {
        const int id = token_ids[t];
        std::vector<int> none(k, -1);
        const int *chosen = !tp ? nullptr : (id >= 0 && id < vocab) ? tp + (long)id * k : none.data();
        route_host(logits.data() + (long)t * experts, bp, chosen, experts, k, scoring, 1.5f, ids_host.data() + t * k,
                   w_host.data() + t * k);
    }
    const bool warp_ok = ids_warp == ids_block && memcmp(w_warp.data(), w_block.data(), w_warp.size() * 4) == 0;
    const bool host_ok = ids_block == ids_host && memcmp(w_block.data(), w_host.data(), w_host.size() * 4) == 0;
    if (!warp_ok || !host_ok) ++failures;
    printf("%s n %3d experts %3d k %2d hash %2d %s bias %d nan %d: warp == block %s, block == host %s\n",
           warp_ok && host_ok ? "ok  " : "FAIL", n, experts, k, hash_vocab, scoring ? "sigmoid " : "sqrtsoft", with_bias,
           nan, warp_ok ? "yes" : "NO", host_ok ? "yes" : "NO");
}

int main() {
    Rng rng{0x5eed0b10ull};
    // (n, experts, k, hash vocab)
    const int cases[][4] = {{1, 256, 6, 0},  {16, 256, 6, 0}, {3, 256, 16, 0}, {7, 1, 1, 0},  {5, 31, 16, 0},
                            {5, 33, 3, 0},   {9, 100, 6, 0},  {4, 255, 16, 0}, {6, 256, 6, 40}, {3, 8, 2, 5}};
    int i = 0;
    for (const auto &c : cases)
        for (int scoring = 0; scoring < 2; ++scoring)
            for (int with_bias = 0; with_bias < 2; ++with_bias) run_case(rng, c[0], c[1], c[2], c[3], scoring, with_bias, ++i % 3 == 1);
    printf(failures ? "route_emu: %d FAILED\n" : "route_emu: all passed\n", failures);
    return failures ? 1 : 0;
}
