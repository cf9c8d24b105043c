// CPU emulation of attention.cu's exact top-k select: the single-block kernel
// (dsk_topk_select_f32) and the two-stage select for long lists (dsk_topk_select_segments_f32,
// then dsk_topk_select_merge_f32), and two ranks' shares of each list selected in index order
// then merged (dsk_topk_merge_ranks_f32), and the shared-key form of the select and the merge
// (dsk_topk_select_smem_f32, dsk_topk_merge_ranks_smem_f32: 256 threads, lists resident in its
// key buffer or read from global memory), one std::thread per CUDA thread (as launched),
// barriers for __syncthreads and the warp intrinsics. Both must equal a host reference exactly
// (the top k by value descending, ties to the lower index; the rows above the k-th value in index
// order, then its ties in index order) and leave the
// rows past min(k, count) untouched, on random lists of 262,144 / 70,000 / 2 * SEG + 1 scores,
// several tokens with different counts (below k and exactly k included), heavy ties, ties at the
// k-th value spread over segment boundaries, -inf, -0.0 / +0.0 and negative values.
// The top-k kernels are the tail of attention.cu (their static shared arrays are block-wide here,
// which the other kernels' extern shared arrays would not compile with), so cut it out first:
//   sed -n '/^\/\/ Order-preserving u32 key/,$p' kernels/attention.cu > /tmp/topk_section.cu &&
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools -I /tmp kernels/tools/topk_select_emu.cpp \
//     -o /tmp/topk_emu && /tmp/topk_emu
#include "emu.h"

#include <limits>
#include <numeric>

static unsigned g_u32[1024];
inline unsigned __float_as_uint(float f) { return emu_float_bits(f); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
// The lanes (of this warp) holding the same value.
inline unsigned __match_any_sync(unsigned, unsigned v) {
    const unsigned w0 = threadIdx.x & ~31u;
    g_u32[threadIdx.x] = v;
    g_warp_bar->arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (g_u32[w0 + l] == v) m |= 1u << l;
    g_warp_bar->arrive_and_wait();
    return m;
}
inline unsigned __ballot_sync(unsigned, bool p) {
    const unsigned w0 = threadIdx.x & ~31u;
    g_u32[threadIdx.x] = p ? 1u : 0u;
    g_warp_bar->arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (g_u32[w0 + l]) m |= 1u << l;
    g_warp_bar->arrive_and_wait();
    return m;
}
inline void __syncwarp() { g_warp_bar->arrive_and_wait(); }
inline int __shfl_up_sync(unsigned, int v, int o) {
    g_u32[threadIdx.x] = (unsigned)v;
    g_warp_bar->arrive_and_wait();
    const unsigned lane = threadIdx.x & 31u;
    const int r = lane >= (unsigned)o ? (int)g_u32[threadIdx.x - o] : v;
    g_warp_bar->arrive_and_wait();
    return r;
}

inline void dsk_pdl_entry() {}  // launches run one after another here
#include "topk_section.cu"

static int failures = 0;
static const float NEG_INF = -std::numeric_limits<float>::infinity();

// f32::total_cmp as a key.
static long long total_key(float f) {
    int b;
    memcpy(&b, &f, 4);
    return b < 0 ? (long long)(b ^ 0x7fffffff) : (long long)b;
}

// The reference: top k by (value descending in total order, index ascending), written as the
// selects write it: the rows above the k-th value in index order, then its ties in index order.
static std::vector<std::pair<int, float>> reference(const float *v, int n, int k) {
    std::vector<int> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
        const long long ka = total_key(v[a]), kb = total_key(v[b]);
        return ka != kb ? ka > kb : a < b;
    });
    idx.resize(std::min(k, n));
    if (!idx.empty()) {
        const long long kth = total_key(v[idx.back()]);
        std::sort(idx.begin(), idx.end(), [&](int a, int b) {
            const bool ta = total_key(v[a]) == kth, tb = total_key(v[b]) == kth;
            return ta != tb ? tb : a < b;
        });
    }
    std::vector<std::pair<int, float>> r;
    for (int i : idx) r.push_back({i, v[i]});
    return r;
}

// Launch geometry as Kernels::topk_select picks it.
static const int SEG = DSK_TOPK_SEG;

// Runs both selects over tokens' score lists and checks each against the reference, and that
// stage 1 wrote each segment's top k with global indices all in index order.
static void run_case(const char *name, const std::vector<std::vector<float>> &lists, int k) {
    const int tokens = (int)lists.size();
    std::vector<float> scores;
    std::vector<long long> starts;
    std::vector<int> counts;
    int max_count = 0;
    for (auto &l : lists) {
        starts.push_back((long long)scores.size());
        counts.push_back((int)l.size());
        max_count = std::max(max_count, (int)l.size());
        scores.insert(scores.end(), l.begin(), l.end());
    }
    const int sentinel_idx = -7;
    const float sentinel_val = 1234.5f;
    auto fresh = [&](std::vector<int> &oi, std::vector<float> &ov) {
        oi.assign((size_t)tokens * k, sentinel_idx);
        ov.assign((size_t)tokens * k, sentinel_val);
    };
    std::vector<int> oi1, oi2;
    std::vector<float> ov1, ov2;
    fresh(oi1, ov1);
    fresh(oi2, ov2);
    launch((unsigned)tokens, 1024, [&] {
        dsk_topk_select_f32(scores.data(), starts.data(), counts.data(), k, oi1.data(), ov1.data(), nullptr, 0);
    });
    const int max_segs = (max_count + SEG - 1) / SEG;
    const int kseg = std::min(k, SEG);
    // Noise in the workspace: the stages must not read a slot they did not write.
    std::vector<int> cand_idx((size_t)tokens * max_segs * kseg, 999999);
    std::vector<float> cand_val(cand_idx.size(), 1e30f);
    launch(D3{(unsigned)max_segs, (unsigned)tokens, 1}, 1024, [&] {
        dsk_topk_select_segments_f32(scores.data(), starts.data(), counts.data(), k, max_segs,
                                     cand_idx.data(), cand_val.data(), nullptr);
    });
    // The first round, then the last block over all its candidates (the launcher adds middle
    // rounds for long lists, dsk_topk_select_reduce_f32; tests/topk_two_stage_gpu.rs covers them).
    launch((unsigned)tokens, 1024, [&] {
        dsk_topk_select_merge_f32(counts.data(), k, max_segs, 1, (long long)max_segs * kseg,
                                  cand_idx.data(), cand_val.data(), oi2.data(), ov2.data(), 0);
    });
    // Two ranks splitting every list (launch/attention.rs: indexer_row_share): each selects the
    // top k of its share in index order (the single-block select with index_base), their
    // outputs [values | indices] side by side as an all-gather leaves them, then the merge; in
    // the wide form (1,024 threads) or the shared-key one (256, keys for the longest share).
    auto two_ranks = [&](bool smem, std::vector<int> &oi, std::vector<float> &ov) {
        const int ranks = 2;
        const long long tk = (long long)tokens * k;
        std::vector<float> gathered((size_t)(ranks * 2 * tk), std::numeric_limits<float>::quiet_NaN());
        std::vector<int> cand(tokens, 0), per(tokens, 0);
        for (int r = 0; r < ranks; ++r) {
            std::vector<long long> sst(tokens);
            std::vector<int> scnt(tokens), sbase(tokens);
            int max_share = 1;
            for (int t = 0; t < tokens; ++t) {
                const int share = std::max((counts[t] + ranks - 1) / ranks, k);
                const int lo = std::min(counts[t], r * share), hi = std::min(counts[t], (r + 1) * share);
                sst[t] = starts[t] + lo;
                scnt[t] = hi - lo;
                sbase[t] = lo;
                cand[t] += std::min(k, hi - lo);
                if (r == 0) per[t] = std::min(k, hi - lo);
                max_share = std::max(max_share, hi - lo);
            }
            float *out = gathered.data() + (size_t)r * 2 * tk;
            int *out_idx = reinterpret_cast<int *>(out + tk);
            launch((unsigned)tokens, smem ? DSK_TOPK_SMEM_THREADS : 1024, [&] {
                if (smem)
                    dsk_topk_select_smem_f32(scores.data(), sst.data(), scnt.data(), k, out_idx, out, sbase.data(), 1,
                                             std::min(max_share, 16384));
                else
                    dsk_topk_select_f32(scores.data(), sst.data(), scnt.data(), k, out_idx, out, sbase.data(), 1);
            });
        }
        launch((unsigned)tokens, smem ? DSK_TOPK_SMEM_THREADS : 1024, [&] {
            if (smem)
                dsk_topk_merge_ranks_smem_f32(gathered.data(), cand.data(), per.data(), (long long)k, tokens, k,
                                              oi.data(), ov.data(), ranks * k);
            else
                dsk_topk_merge_ranks_f32(gathered.data(), cand.data(), per.data(), (long long)k, tokens, k, oi.data(),
                                         ov.data());
        });
    };
    std::vector<int> oi3, oi4, oi5, oi6;
    std::vector<float> ov3, ov4, ov5, ov6;
    fresh(oi3, ov3);
    fresh(oi4, ov4);
    fresh(oi5, ov5);
    fresh(oi6, ov6);
    two_ranks(false, oi3, ov3);
    // The shared-key form: with the keys the launcher gives it (every list resident up to
    // 16,384), with 1,000 (longer lists read from global memory in every pass), and as both
    // ranks' share selects and their merge.
    for (int cap : {std::min(max_count, 16384), 1000}) {
        auto &oi = cap == 1000 ? oi5 : oi4;
        auto &ov = cap == 1000 ? ov5 : ov4;
        launch((unsigned)tokens, DSK_TOPK_SMEM_THREADS, [&] {
            dsk_topk_select_smem_f32(scores.data(), starts.data(), counts.data(), k, oi.data(), ov.data(), nullptr,
                                     0, cap);
        });
    }
    two_ranks(true, oi6, ov6);
    int bad = 0;
    for (int t = 0; t < tokens; ++t)
        for (int sg = 0; sg * SEG < counts[t]; ++sg) {
            const int lo = sg * SEG, len = std::min(SEG, counts[t] - lo);
            auto want = reference(lists[t].data() + lo, len, kseg);
            std::sort(want.begin(), want.end());
            const size_t at = ((size_t)t * max_segs + sg) * kseg;
            for (size_t j = 0; j < want.size(); ++j)
                if ((cand_idx[at + j] != want[j].first + lo ||
                     emu_float_bits(cand_val[at + j]) != emu_float_bits(want[j].second)) &&
                    bad++ < 5)
                    printf("  %s: candidates of token %d segment %d row %zu: got (%d, %g), want (%d, %g)\n",
                           name, t, sg, j, cand_idx[at + j], cand_val[at + j], want[j].first + lo,
                           want[j].second);
        }
    for (int t = 0; t < tokens; ++t) {
        const auto want = reference(lists[t].data(), counts[t], k);
        const int m = (int)want.size();
        static const char *const forms[6] = {"single",          "two-stage",       "two ranks' shares",
                                             "shared-key single", "shared-key single (1,000 keys)",
                                             "shared-key shares"};
        const std::vector<int> *ois[6] = {&oi1, &oi2, &oi3, &oi4, &oi5, &oi6};
        const std::vector<float> *ovs[6] = {&ov1, &ov2, &ov3, &ov4, &ov5, &ov6};
        for (int which = 0; which < 6; ++which) {
            const auto &oi = *ois[which];
            const auto &ov = *ovs[which];
            for (int j = 0; j < k; ++j) {
                const int gi = oi[(size_t)t * k + j];
                const float gv = ov[(size_t)t * k + j];
                const bool ok = j < m ? gi == want[j].first && emu_float_bits(gv) == emu_float_bits(want[j].second)
                                      : gi == sentinel_idx && gv == sentinel_val;
                if (!ok && bad++ < 5)
                    printf("  %s: %s token %d (count %d) row %d: got (%d, %g), want (%d, %g)\n", name,
                           forms[which], t, counts[t], j, gi, gv,
                           j < m ? want[j].first : sentinel_idx, j < m ? want[j].second : sentinel_val);
            }
        }
    }
    printf("%s %s: %d tokens, max count %d, k %d, %d segments\n", bad ? "FAIL" : "ok  ", name, tokens,
           max_count, k, max_segs);
    failures += bad != 0;
}

static std::vector<float> random_list(Rng &rng, int n, float scale) {
    std::vector<float> v(n);
    for (auto &x : v) x = rng.f() * scale;
    return v;
}

int main() {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    Rng rng{0x70b5e1ec7ull};
    const int k = 512;
    // Several tokens with their own counts: long, 2 SEG + 1, SEG + 1, exactly k, below k, 1, 0.
    run_case("random mixed counts",
             {random_list(rng, 70000, 3.f), random_list(rng, 2 * SEG + 1, 3.f), random_list(rng, SEG + 1, 3.f),
              random_list(rng, k, 3.f), random_list(rng, 100, 3.f), random_list(rng, 1, 3.f), {}},
             k);
    // Heavy ties: 7 distinct values (negative, zero and positive) over 70,000 and 2 SEG + 1 rows.
    {
        const float vals[7] = {-3.f, -1.f, -0.5f, 0.f, 0.25f, 1.f, 2.f};
        std::vector<std::vector<float>> lists;
        for (int n : {70000, 2 * SEG + 1, 5000}) {
            std::vector<float> v(n);
            for (auto &x : v) x = vals[rng.below(7)];
            lists.push_back(v);
        }
        run_case("7 distinct values", lists, k);
        // Two values only, so the k-th value has tens of thousands of ties in every segment.
        for (auto &l : lists)
            for (auto &x : l) x = x > 0.f ? 1.f : -1.f;
        run_case("2 distinct values", lists, k);
    }
    // Ties exactly at the k-th value spread over segment boundaries: k - 10 rows above it, 50
    // rows at it around each boundary (the 10 lowest-indexed are taken), the rest below.
    {
        const int n = 70000;
        std::vector<float> v(n);
        for (auto &x : v) x = -1.f - (rng.f() + 1.f);  // below -1
        std::vector<int> above;
        while ((int)above.size() < k - 10) {
            const int i = (int)rng.below(n);
            if (v[i] < 0.f) {
                v[i] = 1.f + (float)above.size();
                above.push_back(i);
            }
        }
        int placed = 0;
        for (int b = SEG; b < n && placed < 50; b += SEG)
            for (int d : {-2, -1, 0, 1}) {
                if (v[b + d] < 0.f && placed < 50) {
                    v[b + d] = 0.5f;
                    ++placed;
                }
            }
        // The same with the ties at -0.0 next to +0.0 rows (total order: -0.0 < +0.0).
        std::vector<float> z = v;
        for (auto &x : z)
            if (x == 0.5f) x = -0.f;
        for (int b = 3 * SEG - 3; b < 3 * SEG + 3; ++b)
            if (z[b] < -0.5f) z[b] = 0.f;
        run_case("ties at the k-th across segment boundaries", {v, z}, k);
    }
    // -inf: fewer than k finite rows, so the k-th value is -inf and its ties are taken by index;
    // and a list that is all -inf.
    {
        std::vector<float> v(70000, NEG_INF), all(2 * SEG + 1, NEG_INF);
        for (int j = 0; j < 300; ++j) v[rng.below(v.size())] = -rng.f() * 1e3f - 2e3f;
        for (int b = SEG; b < (int)v.size(); b += 7 * SEG) v[b] = 5.f;
        run_case("-inf below k finite rows", {v, all}, k);
        // -inf among negative values only, above and below k, and a -inf every 3 rows.
        std::vector<float> w = random_list(rng, 70000, 1.f);
        for (size_t i = 0; i < w.size(); ++i) w[i] = i % 3 == 0 ? NEG_INF : -std::fabs(w[i]) - 1.f;
        run_case("-inf and negatives", {w}, k);
    }
    // A k that is not a power of two, a list of a partial last segment of 1 row.
    run_case("k 100", {random_list(rng, 2 * SEG + 1, 1.f), random_list(rng, 3 * SEG, 1.f)}, 100);
    // A 1M-context decode: 262,144 random scores (the two-stage launch's shape).
    run_case("random 262144", {random_list(rng, 262144, 10.f)}, k);
    printf(failures ? "FAILED (%d cases)\n" : "all cases passed\n", failures);
    return failures ? 1 : 0;
}
