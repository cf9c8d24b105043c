// CPU emulation of moe_sorted.cu's device sort (dsk_moe_sort_plan, dsk_moe_sort_scatter; one
// std::thread per CUDA thread, barriers for __syncthreads and the warp intrinsics) against the
// host's ExpertOrder + fp4_grouped_tiles written from their definitions, byte for byte: tokens
// (with the -1 tail), slots (with -1 for ids outside the bank), the tiles up to max_tiles (empty
// ones zero). Cases: 1 pair, uniform routing, skewed routing, ids out of range, 1 and 1024
// experts, tile_rows 64 and 128, pair counts that are not multiples of 4.
// The sort is the end of the file from its header comment on:
//   sed -n '/^\/\/ The device sort of a GEMM step/,$p' kernels/moe_sorted.cu > /tmp/moe_sort.cu &&
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools -DSORT_SRC='"/tmp/moe_sort.cu"' \
//       -o /tmp/moe_sort_emu kernels/tools/moe_sort_emu.cpp && /tmp/moe_sort_emu
#include "emu.h"

struct int4 { int x, y, z, w; };
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline void dsk_pdl_entry() {}
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static int g_lane_int[1024];
// Every lane of the warp calls these (as the kernels do).
inline int __shfl_up_sync(unsigned, int v, int o) {
    const unsigned tid = threadIdx.x, lane = tid & 31u;
    g_lane_int[tid] = v;
    g_warp_bar->arrive_and_wait();
    const int r = lane >= (unsigned)o ? g_lane_int[tid - o] : v;
    g_warp_bar->arrive_and_wait();
    return r;
}
inline unsigned __match_any_sync(unsigned, int v) {
    const unsigned tid = threadIdx.x, w0 = tid & ~31u;
    g_lane_int[tid] = v;
    g_warp_bar->arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m |= (unsigned)(g_lane_int[w0 + l] == v) << l;
    g_warp_bar->arrive_and_wait();
    return m;
}

#include SORT_SRC

#include <cstdint>

struct Sorted {
    std::vector<int> tokens, slots, tiles;
};

// ExpertOrder::of (stable counting sort) with the tokens' -1 tail, then fp4_grouped_tiles for
// `tile_rows` padded with zero tiles to max_tiles.
static Sorted host_sort(const std::vector<int> &ids, int topk, int experts, int tile_rows, int max_tiles) {
    const int pairs = (int)ids.size();
    std::vector<int> count(experts, 0), next(experts, 0);
    for (int e : ids)
        if (e >= 0 && e < experts) ++count[e];
    int at = 0;
    for (int e = 0; e < experts; ++e) next[e] = at, at += count[e];
    Sorted s{std::vector<int>(pairs, -1), std::vector<int>(pairs, -1), {}};
    for (int p = 0; p < pairs; ++p) {
        const int e = ids[p];
        if (e < 0 || e >= experts) continue;
        s.tokens[next[e]] = p / topk;
        s.slots[p] = next[e]++;
    }
    int first = 0;
    for (int e = 0; e < experts; ++e) {
        for (int r = 0; r < count[e]; r += tile_rows) {
            const int rows = std::min(tile_rows, count[e] - r);
            s.tiles.insert(s.tiles.end(), {e, first + r, rows, 0});
        }
        first += count[e];
    }
    if ((int)s.tiles.size() > 4 * max_tiles) {
        std::printf("host tiles exceed max_tiles\n");
        std::exit(1);
    }
    s.tiles.resize(4 * max_tiles, 0);
    return s;
}

static int run_case(const char *name, const std::vector<int> &ids, int topk, int experts, int tile_rows) {
    const int pairs = (int)ids.size();
    const int max_tiles = (pairs + tile_rows - 1) / tile_rows + std::min(experts, pairs);
    const int sentinel = 0x7eadbeef;
    // A guard tile past max_tiles and a guard value past each array.
    std::vector<int> tokens(pairs + 1, sentinel), slots(pairs + 1, sentinel), tiles(4 * (max_tiles + 1), sentinel),
        ends(experts, sentinel);
    launch(1, 1024, [&] {
        dsk_moe_sort_plan(ids.data(), pairs, experts, tile_rows, max_tiles, reinterpret_cast<int4 *>(tiles.data()),
                          ends.data(), tokens.data(), slots.data());
    });
    launch(experts, 256, [&] { dsk_moe_sort_scatter(ids.data(), pairs, topk, ends.data(), tokens.data(), slots.data()); });
    const Sorted want = host_sort(ids, topk, experts, tile_rows, max_tiles);
    int bad = 0;
    auto cmp = [&](const char *what, const std::vector<int> &got, const std::vector<int> &w) {
        for (size_t i = 0; i < w.size(); ++i)
            if (got[i] != w[i] && bad++ < 5) std::printf("  %s: %s[%zu] = %d, want %d\n", name, what, i, got[i], w[i]);
        for (size_t i = w.size(); i < got.size(); ++i)
            if (got[i] != sentinel && bad++ < 5) std::printf("  %s: %s[%zu] written past the end\n", name, what, i);
    };
    cmp("tokens", tokens, want.tokens);
    cmp("slots", slots, want.slots);
    cmp("tiles", tiles, want.tiles);
    int used = 0;
    for (int t = 0; t < max_tiles; ++t) used += want.tiles[4 * t + 2] > 0;
    std::printf("%-28s pairs %6d experts %4d tile_rows %3d: %d of %d tiles used: %s\n", name, pairs, experts,
                tile_rows, used, max_tiles, bad ? "FAIL" : "ok");
    return bad != 0;
}

int main() {
    Rng rng{0x5047'1d5e'0000'0001ULL};
    int failed = 0;
    auto uniform = [&](int n, int topk, int experts) {
        std::vector<int> ids(n * topk);
        for (auto &e : ids) e = (int)rng.below(experts);
        return ids;
    };
    failed += run_case("one pair", {5}, 1, 256, 64);
    failed += run_case("one pair, bad id", {256}, 1, 256, 64);
    failed += run_case("uniform 8192 x 6", uniform(8192, 6, 256), 6, 256, 64);
    failed += run_case("uniform 8192 x 6, tiles 128", uniform(8192, 6, 256), 6, 256, 128);
    {
        // One expert takes 90% of the pairs.
        std::vector<int> ids(4001 * 6);
        for (auto &e : ids) e = rng.below(10) ? 7 : (int)rng.below(256);
        failed += run_case("skewed", ids, 6, 256, 64);
        failed += run_case("skewed, tiles 128", ids, 6, 256, 128);
    }
    {
        std::vector<int> ids = uniform(1001, 7, 300);
        const int bad[] = {-1, 300, 1000, INT32_MIN, INT32_MAX, -300};
        for (auto &e : ids)
            if (rng.below(5) == 0) e = bad[rng.below(6)];
        failed += run_case("ids out of range", ids, 7, 300, 64);
    }
    failed += run_case("1024 experts", uniform(1433, 7, 1024), 7, 1024, 64);
    failed += run_case("1 expert", uniform(333, 3, 1), 3, 1, 64);
    failed += run_case("3 experts, tiles 128", uniform(2000, 5, 3), 5, 3, 128);
    {
        std::vector<int> ids(77 * 2, 999);  // every id outside the bank
        failed += run_case("all ids out of range", ids, 2, 16, 64);
    }
    std::printf(failed ? "FAILED %d case(s)\n" : "all cases bit-identical\n", failed);
    return failed != 0;
}
