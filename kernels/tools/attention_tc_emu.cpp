// CPU emulation of attention.cu's tensor-core split-KV pass 1, every form (TF32:
// dsk_attend_partial_heads_tc, 16 heads a block, and _tc32, 32; f16: dsk_attend_partial_heads_f16
// and _f16x32, whose ldmatrix / ldmatrix.trans come from emu.h), one
// std::thread per CUDA thread, barriers for __syncthreads, the warps' shuffles and MMAs (the MMA
// from the PTX fragment layout in emu.h, operands truncated to their top 19 bits as the tensor
// cores read them); cp.async copies land only at the cp.async.wait_group that requires them, the
// destination NaN until then, so a tile read before its wait fails the checks. The records are
// merged on the host exactly as dsk_attend_combine_f32 merges (f32, split order) and compared with
// an f64 reference (softmax with the head's sink in the denominator) and with the f32
// head-grouped kernel (dsk_attend_partial_heads_f32) emulated on the same inputs. Cases: V4-Flash's
// 64 heads x 512 over ~640-key lists with -1 slots, several splits and one (a prefill chunk's),
// several tokens with different key counts (0, 1, partial tiles) in one launch, empty splits, an
// all-masked token, sharp logits (q x 8), and BF16 / FP8 latent records (FP8 also packed as the
// pool stores them: the f16 forms' flat staging and decode).
// Bound (per (token, head) row, max |got - want| / max |want|): TF32 rounds Q, K = V and P to
// 10-bit mantissas (unit roundoff u = 2^-11, round to nearest), f32 accumulation. A value is off
// by up to u, a probability by u from its own rounding and relatively by twice its logit's error
// (both logits of a ratio move). The roundings of a logit's 512 products are independent and of
// either sign, so its error is about u scale sqrt(sum_i (q_i k_i)^2) (= E, rms size, the largest
// over the row's keys), where the worst case 2 u scale sum_i |q_i k_i| is ~20x that at 512 dims
// and would let real bugs through. Bound: 4 u + 16 E (8 sigmas of the logit term) + 1e-5 of f32
// accumulation, per row; each split's record (max, sum, acc) is checked against it too after
// bringing it to the f64 record's max. The f16 forms keep the same bound (f16 has TF32's 10
// mantissa bits); their FP8 cases take both decode paths (scales f16 can carry, and smaller
// ones). About 5 minutes on two cores (`tf32` or `f16` as the argument runs those forms only):
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools kernels/tools/attention_tc_emu.cpp -o /tmp/attc_emu && /tmp/attc_emu
// This tool's cp.async copies land at their wait, the destination poisoned until then (emu.h).
#define DSK_EMU_CP_ASYNC
#include "emu.h"
#include <string>

#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __shared__
// Dynamic shared memory of the block that runs; the other kernels' static shared arrays become
// per-thread locals (those kernels are not run here, the merge is done on the host).
// (the larger form's: 32 heads).
float smem[2 * 16 * 520 + 16 * 32 * 24 + 32 * 20 + 32 + 2 * 16];
float dsk_atth_smem[16 * 512 + 16];
// The f16 forms' dynamic shared memory (the largest: 32 heads over f32 rows).
alignas(16) unsigned char dsk_attf_smem[((32 + 32) * 520 * 2 + 2 * 32 * 36 * 4 + 32 * 40 * 2 + 32 * 4 + 2 * 32 * 4 + 2 * 64 * 4 +
                                         32 * 2048)];
float sq[1];

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
inline float dsk_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = std::fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline void __syncwarp() { g_warp_bar->arrive_and_wait(); }
// Used only by kernels this tool does not run.
inline unsigned __match_any_sync(unsigned, unsigned) { abort(); }
inline float __shfl_up_sync(unsigned, float, int) { abort(); }
inline unsigned __ballot_sync(unsigned, int) { abort(); }
template <class... A> inline void dsk_rope_pair_f32(A &&...) { abort(); }
// The f16 forms' raw queries and one-split finish are not emulated (positions and out null).
template <class... A> inline void dsk_rope_cos_sin_f32(A &&...) { abort(); }
template <class... A> inline void dsk_rope_apply_f32(A &&...) { abort(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float f) { return emu_float_bits(f); }

#include "../attention.cu"

static_assert(sizeof smem / sizeof(float) == DSK_ATTC_SMEM_FLOATS(32), "smem sized as the kernel's layout");
static_assert(sizeof dsk_attf_smem == DSK_ATTF_SMEM_BYTES(32, 2048), "f16 smem sized as the kernel's layout");

// emu.h's launch covers grid x and y; this one adds z (the token).
template <class F> void launch3(D3 grid, unsigned threads, F f) {
    for (unsigned bz = 0; bz < grid.z; ++bz)
        launch(D3{grid.x, grid.y, 1}, threads, [&] {
            blockIdx.z = bz;
            f();
        });
    gridDim = grid;
}

// dsk_attend_combine_f32's merge of (t, h)'s split records with the sink, in f32 and split order
// (without inverse RoPE).
static void combine(const std::vector<float> &part, const std::vector<float> &sinks, int tokens, int heads, int hd,
                    int splits, std::vector<float> &out) {
    for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h) {
            const float *p = &part[((size_t)t * heads + h) * splits * (hd + 2)];
            float mx = sinks[h];
            for (int s = 0; s < splits; ++s)
                if (p[s * (hd + 2) + 1] > 0.f) mx = std::fmax(mx, p[s * (hd + 2)]);
            std::vector<float> w(splits);
            float denom = std::exp(sinks[h] - mx);
            for (int s = 0; s < splits; ++s) {
                const float l = p[s * (hd + 2) + 1];
                w[s] = l > 0.f ? std::exp(p[s * (hd + 2)] - mx) : 0.f;
                if (l > 0.f) denom = std::fma(l, w[s], denom);
            }
            for (int d = 0; d < hd; ++d) {
                float v = 0.f;
                for (int s = 0; s < splits; ++s)
                    if (p[s * (hd + 2) + 1] > 0.f) v = std::fma(p[s * (hd + 2) + 2 + d], w[s], v);
                out[((size_t)t * heads + h) * hd + d] = v / denom;
            }
        }
}

static int fails = 0;
static const double U = 1.0 / 2048;  // TF32 unit roundoff

// One launch: tokens with the given key counts, every `hole`-th key (on average) a -1 slot,
// queries times `qmag`, rows stored as `fmt` (F32, BF16 or FP8 latent with 64 rope dims).
// `vs_f32` also runs the f32 head-grouped kernel on the same inputs.
// `group`: the form run, 16 (dsk_attend_partial_heads_tc) or 32 heads a block (..._tc32); with
// `f16` the f16 forms (dsk_attend_partial_heads_f16 / _f16x32).
static bool g_f16 = false;
static void attention_case(const char *name, int group, int heads, std::vector<int> counts, int splits, int hole,
                           float qmag, int fmt, bool vs_f32, unsigned long long seed, bool packed = false) {
    const int hd = 512, rope = fmt == DSK_KV_FP8 ? 64 : 0;
    Rng rng{seed};
    const int tokens = counts.size();
    // Record size in 4-byte slots and an odd stride between records (records at any 4-byte
    // alignment); `packed`: records back to back from an 8-byte aligned start, as in the pool (FP8
    // records alternately 16- and 8-byte aligned: the f16 forms' flat staging).
    const int slots = fmt == DSK_KV_F32 ? hd : fmt == DSK_KV_BF16 ? hd / 2 : (hd - rope + 2 * rope + (hd - rope) / 64 + 3) / 4;
    const int stride = packed ? slots : slots + 3, first = packed ? 6 : 5;
    const size_t rows = 1500;
    std::vector<float> pool(rows * stride + 8);
    for (auto &v : pool) v = rng.f();
    // The row values every kernel sees (decoded), for the reference.
    std::vector<float> dec(rows * hd);
    for (size_t r = 0; r < rows; ++r) {
        float *rec = &pool[r * stride + first];
        if (fmt == DSK_KV_BF16) {
            unsigned short *b = reinterpret_cast<unsigned short *>(rec);
            for (int d = 0; d < hd; ++d) b[d] = dsk_f32_to_bf16(rng.f());
        } else if (fmt == DSK_KV_FP8) {
            unsigned char *b = reinterpret_cast<unsigned char *>(rec);
            const int nope = hd - rope;
            for (int d = 0; d < nope; ++d) {
                unsigned v = rng.below(256);
                if ((v & 0x7f) == 0x7f) v = 0x30;  // no NaN codes
                b[d] = v;
            }
            for (int d = 0; d < rope; ++d) {
                unsigned short h = dsk_f32_to_bf16(rng.f());
                memcpy(b + nope + 2 * d, &h, 2);
            }
            // Mostly scales whose products the f16 forms scale in f16, one in eight below that
            // range (their f32 path; products in f16's subnormals).
            for (int gi = 0; gi < nope / 64; ++gi)
                b[nope + 2 * rope + gi] = rng.below(8) ? 127 - 8 + rng.below(4) : 105 + rng.below(8);
        }
        for (int d = 0; d < hd; ++d) dec[r * hd + d] = dsk_kv_value(rec, fmt, hd, rope, d);
    }
    std::vector<int> start{0};
    std::vector<long long> off;
    std::vector<int> rowof;
    for (int c : counts) {
        for (int i = 0; i < c; ++i) {
            const bool masked = hole && rng.below(hole) == 0;
            const size_t r = rng.below(rows);
            off.push_back(masked ? -1 : (long long)(r * stride + first));
            rowof.push_back(masked ? -1 : (int)r);
        }
        start.push_back(off.size());
    }
    if (off.empty()) off.push_back(-1);
    std::vector<float> q((size_t)tokens * heads * hd), sinks(heads);
    for (auto &v : q) v = rng.f() * qmag;
    for (auto &v : sinks) v = rng.f() * 2.f;
    const float scale = 1.f / std::sqrt((float)hd);
    const size_t plen = (size_t)tokens * heads * splits * (hd + 2);
    std::vector<float> part(plen, NAN), out((size_t)tokens * heads * hd, NAN);
    if (g_f16) {
        const int rb = 4 * slots, rs = (rb + 15) / 16 * 16;
        launch3({(unsigned)splits, (unsigned)(heads / group), (unsigned)tokens}, DSK_ATTF_WARPS * 32, [&] {
            (group == 32 ? dsk_attend_partial_heads_f16x32 : dsk_attend_partial_heads_f16)(
                pool.data(), q.data(), off.data(), start.data(), heads, hd, splits, scale, part.data(), fmt, rope, rb, rs,
                nullptr, nullptr, 0, 1.f, 0, 0.f, nullptr, nullptr, 0);
        });
    } else {
        launch3({(unsigned)splits, (unsigned)(heads / group), (unsigned)tokens}, (unsigned)group * 16, [&] {
            (group == 32 ? dsk_attend_partial_heads_tc32 : dsk_attend_partial_heads_tc)(
                pool.data(), q.data(), off.data(), start.data(), heads, hd, splits, scale, part.data(), fmt, rope);
        });
    }
    combine(part, sinks, tokens, heads, hd, splits, out);
    std::vector<float> out32;
    if (vs_f32) {
        std::vector<float> part32(plen, NAN);
        out32.assign(out.size(), NAN);
        launch3({(unsigned)splits, (unsigned)(heads / DSK_ATTH_G), (unsigned)tokens}, DSK_ATTH_WARPS * 32, [&] {
            dsk_attend_partial_heads_f32(pool.data(), q.data(), off.data(), start.data(), heads, hd, splits, scale,
                                         part32.data(), fmt, rope);
        });
        combine(part32, sinks, tokens, heads, hd, splits, out32);
    }
    double worst_out = 0, worst_rec = 0, worst_vs32 = 0, worst_ratio = 0, max_bound = 0;
    int empty = 0, bad_rows = 0;
    bool bad_empty = false, nan_seen = false;
    for (int t = 0; t < tokens; ++t)
        for (int h = 0; h < heads; ++h) {
            const float *qh = &q[((size_t)t * heads + h) * hd];
            const int k0 = start[t], k1 = start[t + 1], per = (k1 - k0 + splits - 1) / splits;
            double mx = sinks[h], e_logit = 0;
            std::vector<double> lg(std::max(k1 - k0, 0), -INFINITY);
            for (int k = k0; k < k1; ++k) {
                if (rowof[k] < 0) continue;
                const float *kr = &dec[(size_t)rowof[k] * hd];
                double d = 0, sq2 = 0;
                for (int c = 0; c < hd; ++c) {
                    d += (double)qh[c] * kr[c];
                    sq2 += (double)qh[c] * kr[c] * qh[c] * kr[c];
                }
                lg[k - k0] = d * scale;
                e_logit = std::max(e_logit, U * scale * std::sqrt(sq2));
                mx = std::max(mx, lg[k - k0]);
            }
            const double bound = 4 * U + 16 * e_logit + 1e-5;
            max_bound = std::max(max_bound, bound);
            double den = std::exp(sinks[h] - mx);
            std::vector<double> o(hd, 0.0);
            for (int k = k0; k < k1; ++k) {
                if (rowof[k] < 0) continue;
                const double p = std::exp(lg[k - k0] - mx);
                den += p;
                for (int c = 0; c < hd; ++c) o[c] += p * dec[(size_t)rowof[k] * hd + c];
            }
            double num = 0, mag = 0, n32 = 0;
            for (int c = 0; c < hd; ++c) {
                const double r = o[c] / den, got = out[((size_t)t * heads + h) * hd + c];
                nan_seen |= !std::isfinite(got);
                num = std::max(num, std::fabs(got - r));
                mag = std::max(mag, std::fabs(r));
                if (vs_f32) n32 = std::max(n32, std::fabs(got - out32[((size_t)t * heads + h) * hd + c]));
            }
            // A token without a valid key outputs zeros: measured absolutely.
            const double e = mag > 0 ? num / mag : num;
            worst_out = std::max(worst_out, e);
            worst_ratio = std::max(worst_ratio, e / bound);
            if (vs_f32) worst_vs32 = std::max(worst_vs32, mag > 0 ? n32 / mag : n32);
            bad_rows += !(e < bound);
            // Each split's record against its keys, brought to the f64 record's max.
            for (int s = 0; s < splits; ++s) {
                const int a = k0 + s * per, b = std::min(k1, a + per);
                const float *rec = &part[(((size_t)t * heads + h) * splits + s) * (hd + 2)];
                double m = -INFINITY;
                for (int k = a; k < b; ++k)
                    if (rowof[k] >= 0) m = std::max(m, lg[k - k0]);
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
                    if (rowof[k] < 0) continue;
                    const double p = std::exp(lg[k - k0] - m);
                    l += p;
                    for (int c = 0; c < hd; ++c) acc[c] += p * dec[(size_t)rowof[k] * hd + c];
                }
                const double f = std::exp((double)rec[0] - m);
                double er = std::fabs(rec[0] - m) / (1 + std::fabs(m));
                er = std::max(er, std::fabs(rec[1] * f - l) / l);
                for (int c = 0; c < hd; ++c) {
                    adiff = std::max(adiff, std::fabs(rec[2 + c] * f - acc[c]));
                    amag = std::max(amag, std::fabs(acc[c]));
                }
                er = std::max(er, adiff / amag);
                worst_rec = std::max(worst_rec, std::isfinite(er) ? er : INFINITY);
                bad_rows += !(er < bound);
            }
        }
    const bool ok = bad_rows == 0 && !bad_empty && !nan_seen;
    fails += !ok;
    printf("%s %s%d %-24s heads %2d fmt %d splits %d tokens %d: output err %.2e, record err %.2e (bound %.2e, worst "
           "err/bound %.2f)",
           ok ? "OK  " : "FAIL", g_f16 ? "F16-G" : "TF32-G", group, name, heads, fmt, splits, tokens, worst_out, worst_rec, max_bound, worst_ratio);
    if (vs_f32) printf(", vs f32 kernel %.2e", worst_vs32);
    printf(", %d empty split records%s%s\n", empty, bad_empty ? " (NOT ZERO)" : "", nan_seen ? " NaN/inf" : "");
    fflush(stdout);
}

int main(int argc, char **argv) {
    // Which forms: "tf32", "f16" or both (no argument).
    const std::string which = argc > 1 ? argv[1] : "";
    for (int form = 0; form < 4; ++form) {
        const int G = form % 2 ? 32 : 16;
        g_f16 = form >= 2;
        if (which == "tf32" && g_f16) continue;
        if (which == "f16" && !g_f16) continue;
        // Edges: tokens with 1, 0, 33 (a partial third tile), 70 keys, -1 slots, more splits than
        // some tokens have keys (empty splits); an all-masked token.
        attention_case("edges, holes", G, 32, {1, 0, 33, 70}, 4, 3, 1.f, DSK_KV_F32, true, 1);
        attention_case("all keys masked", G, 32, {5, 40}, 2, 1, 1.f, DSK_KV_F32, false, 2);
        // V4-Flash at TP=1: 64 heads, ~640-key lists (window + compressed rows), -1 slots, splits.
        attention_case("V4 64 heads, 640 keys", G, 64, {640, 611}, 3, 9, 1.f, DSK_KV_F32, true, 3);
        // A prefill chunk's split count (attention_splits gives 1 at thousands of tokens).
        attention_case("prefill, 1 split", G, 64, {640, 129}, 1, 13, 1.f, DSK_KV_F32, false, 7);
        // Sharp logits: queries x 8 (logits of several units; TF32's logit error grows with |q||k|).
        attention_case("sharp logits", G, 32, {640}, 2, 11, 8.f, DSK_KV_F32, false, 4);
        // Stored latent records, decoded as they are staged.
        attention_case("BF16 records", G, 32, {200, 77}, 2, 6, 1.f, DSK_KV_BF16, false, 5);
        attention_case("FP8 records", G, 32, {200}, 3, 6, 1.f, DSK_KV_FP8, false, 6);
        attention_case("FP8 records, packed pool", G, 32, {200, 70}, 1, 6, 1.f, DSK_KV_FP8, false, 8, true);
    }
    printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
    return fails != 0;
}
