// CPU emulation of collective.cu's two-rank all-reduce (dsk_peer_all_reduce2_f32). Two host
// threads play the two ranks' streams (a call starts after the rank's previous call ended); each
// call's 32 blocks run at once, one std::thread per CUDA thread, as on the GPU where all of them
// are resident; the flags' release stores and acquire loads are std::atomic_ref. Blocks and ranks
// are skewed at random (sleeps before pushing, before reading, between calls). Checked bit for
// bit: every output of every call is the sum of the two ranks' inputs of that call, over
// thousands of calls whose sizes change call to call (vector and scalar paths, in place and not,
// with and without the system fence before the flag: every other call each).
// A stale half, a flag read one call early or a missed barrier shows as a wrong sum.
//
// `--one-half` runs the kernel with both halves at one place (capacity 0), i.e. the protocol
// without its double buffer: that must fail (a rank runs a call ahead and overwrites what the
// other still reads), which shows the check can see the hazard the halves exist for.
//
//   g++ -std=c++20 -O2 -pthread -w -o /tmp/peer_reduce_emu kernels/tools/peer_reduce_emu.cpp
//   /tmp/peer_reduce_emu && /tmp/peer_reduce_emu --one-half   (the second must report failures)
// With -fsanitize=thread (and fewer calls: `/tmp/peer_reduce_emu 200`) it reports no data race.
#include "emu.h"

#include <atomic>
#include <chrono>
#include <random>
#include <string>

#undef __launch_bounds__
#define __launch_bounds__(...)
#define DSK_EMU
inline void dsk_pdl_entry() {}
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void dsk_st_release_sys(unsigned *p, unsigned v) {
    std::atomic_ref<unsigned>(*p).store(v, std::memory_order_release);
}
inline unsigned dsk_ld_acquire_sys(const unsigned *p) {
    std::this_thread::yield();  // two cores, hundreds of threads: let the peer run
    return std::atomic_ref<unsigned>(*const_cast<unsigned *>(p)).load(std::memory_order_acquire);
}
template <class T> inline T __ldcg(const T *p) { return *p; }

#include "../collective.cu"

constexpr int kBlocks = DSK_PEER_BLOCKS;
constexpr int kThreads = 4;  // threads a block here (256 on the GPU; the kernel takes any)
constexpr long long kCap = 4096;

struct Rank {
    // Flags (2 x 32 u32 in 256 bytes) then the two halves, as PeerRegion lays them out.
    std::vector<float> region = std::vector<float>(64 + 2 * kCap, 0.f);
    std::vector<unsigned> epochs = std::vector<unsigned>(kBlocks, 0u);
    unsigned *flags() { return reinterpret_cast<unsigned *>(region.data()); }
    float *recv() { return region.data() + 64; }
};

static float value(int rank, int call, long long j) {
    return (float)((rank * 7 + call * 13 + j * 3) % 4093) * 0.25f - 500.f;
}

struct Skew {
    std::mt19937 rng;
    explicit Skew(unsigned seed) : rng(seed) {}
    void maybe_sleep(int percent, int max_us) {
        if ((int)(rng() % 100) < percent)
            std::this_thread::sleep_for(std::chrono::microseconds(rng() % (unsigned)max_us));
    }
};

// One launch on `me`, the peer's region mapped as `peer`; returns when every block has ended.
static void launch(Rank &me, Rank &peer, const float *in, float *out, long long n, long long cap,
                   unsigned seed) {
    std::vector<std::unique_ptr<std::barrier<>>> bars;
    for (int b = 0; b < kBlocks; ++b) bars.push_back(std::make_unique<std::barrier<>>(kThreads));
    std::vector<std::thread> threads;
    const int vec4 = n % 4 == 0;
    for (int b = 0; b < kBlocks; ++b)
        for (int t = 0; t < kThreads; ++t)
            threads.emplace_back([&, b, t] {
                blockIdx.x = (unsigned)b;
                threadIdx.x = (unsigned)t;
                g_block_bar = bars[b].get();
                Skew skew(seed * 7919u + (unsigned)(b * kThreads + t));
                skew.maybe_sleep(10, 200);
                // Odd calls without the system fence (DSPARK_PEER_FENCE=0): the release alone.
                // Every third launch takes the scalar accesses of a rank whose buffers are not
                // 16-byte aligned (its peer's launch of the call usually not): same index map.
                dsk_peer_all_reduce2_f32(in, out, n, vec4, vec4 && seed % 3 != 0, peer.recv(), peer.flags(),
                                         me.recv(), me.flags(), me.epochs.data(), cap, (int)(seed / 2 % 2 == 0));
            });
    for (auto &th : threads) th.join();
}

int main(int argc, char **argv) {
    bool one_half = false;
    int calls = 2000;
    for (int i = 1; i < argc; ++i) {
        if (std::string(argv[i]) == "--one-half") one_half = true;
        else calls = std::atoi(argv[i]);
    }
    gridDim.x = kBlocks;
    blockDim.x = kThreads;
    const long long sizes[] = {1, 3, 4, 5, 7, 64, 130, 1000, 4093, 4096, 2048, 17};
    std::mt19937 pick(12345);
    std::vector<long long> n_of(calls);
    std::vector<int> in_place(calls);
    for (int c = 0; c < calls; ++c) {
        n_of[c] = sizes[pick() % (sizeof sizes / sizeof sizes[0])];
        in_place[c] = (int)(pick() % 2);
    }
    Rank ranks[2];
    std::atomic<long long> wrong{0}, checked{0};
    auto stream = [&](int r) {
        Skew skew(1000u + (unsigned)r);
        std::vector<float> in(kCap), out(kCap);
        for (int c = 0; c < calls; ++c) {
            const long long n = n_of[c];
            for (long long j = 0; j < n; ++j) in[j] = value(r, c, j);
            float *dst = in_place[c] ? in.data() : out.data();
            skew.maybe_sleep(20, 300);  // one rank's host lags the other's
            launch(ranks[r], ranks[1 - r], in.data(), dst, n, one_half ? 0 : kCap,
                   (unsigned)(c * 2 + r));
            for (long long j = 0; j < n; ++j) {
                const float want = value(0, c, j) + value(1, c, j);
                if (emu_float_bits(dst[j]) != emu_float_bits(want)) {
                    if (wrong.fetch_add(1) < 5)
                        std::printf("rank %d call %d n %lld value %lld: %g, want %g\n", r, c, n, j, dst[j], want);
                }
            }
            checked += n;
        }
    };
    std::thread r0(stream, 0), r1(stream, 1);
    r0.join();
    r1.join();
    std::printf("%s: %d calls a rank, %lld values checked, %lld wrong\n",
                one_half ? "one half (the hazard, must fail)" : "two halves", calls, checked.load(),
                wrong.load());
    return wrong.load() == 0 ? 0 : 1;
}
