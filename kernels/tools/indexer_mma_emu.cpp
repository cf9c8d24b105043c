// CPU emulation of attention.cu's tensor-core indexer kernels (dsk_indexer_scores_mma, and the
// f16 form for FP8 rows, dsk_indexer_scores_mma_f16; one std::thread per CUDA thread, barriers for
// __syncthreads, warp shuffles and the warp's MMA, the MMAs from the PTX fragment layouts in
// emu.h) against an f64 reference over the decoded rows, for checking their logic on a machine
// without a GPU: fragment indexing, the row tiles and their prefetch, head padding, masked tails,
// several tokens with their own block tables and visible counts (0 and 1 included) in one launch,
// F32 / BF16 / FP8_INDEXER records at odd strides; for the f16 form, token groups over chunks that
// share a block table next to tokens with their own (runs of equal tables within a group).
// The bounds are those of tests/indexer_mma_gpu.rs:
//   g++ -std=c++20 -O2 -pthread -w -I kernels/tools kernels/tools/indexer_mma_emu.cpp -o /tmp/idxm_emu && /tmp/idxm_emu
#include "emu.h"

// The kernel keeps its shared state in dynamic (extern) shared memory, one array for the block
// that runs; the other kernels' static shared arrays become per-thread locals (not run here).
#undef __shared__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __shared__
// The larger of the two kernels' dynamic shared memory (the f16 form's: 89,216 bytes).
float smem[89216 / 4];
float sq[1], dsk_atth_smem[1];
// The f16 attention forms' shared memory (not run here).
alignas(16) unsigned char dsk_attf_smem[16];

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
template <class... A> inline void dsk_rope_cos_sin_f32(A &&...) { abort(); }
template <class... A> inline void dsk_rope_apply_f32(A &&...) { abort(); }
inline unsigned __match_any_sync(unsigned, unsigned) { abort(); }
inline float __shfl_up_sync(unsigned, float, int) { abort(); }
inline unsigned __ballot_sync(unsigned, int) { abort(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float f) { return emu_float_bits(f); }

inline float dsk_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = std::max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline void __syncwarp() { g_warp_bar->arrive_and_wait(); }
template <class... A> inline void dsk_rope_pair_f32(A &&...) { abort(); }  // kernels not run here
inline void dsk_pdl_entry() {}  // launches run one after another here
#include "../attention.cu"

enum { F32 = 0, BF16 = 1, FP8I = 3 };

static int failures = 0;

// A token's query values as the f16 form multiplies them: times 2^e (the largest magnitude into
// [2^14, 2^15)), rounded to f16 (nearest, ties to even), times 2^-e.
static std::vector<double> f16_form_queries(const float *q, int n) {
    float m = 0.f;
    for (int i = 0; i < n; ++i) m = std::max(m, std::fabs(q[i]));
    int e = 0;
    if (m > 0.f && std::isfinite(m)) e = std::clamp(14 - (int)((emu_float_bits(m) >> 23) & 255) + 127, -126, 126);
    std::vector<double> r(n);
    for (int i = 0; i < n; ++i) r[i] = (double)emu_f16(emu_f32_to_f16(q[i] * std::ldexp(1.f, e))) / std::ldexp(1.0, e);
    return r;
}

// One launch: `visible[t]` rows per token, rows of `dim` stored as `fmt` with `extra` pad slots;
// token t in sequence seq[t] (empty: each its own), the tokens of a sequence sharing one block
// table; `f16`: the f16 form (FP8 rows), in groups of 256 / hp tokens (hp: the heads rounded up
// to a power of two, at least 8).
static void run_case(Rng &rng, int fmt, int heads, int dim, std::vector<int> visible, int blocks, int extra,
                     std::vector<int> seq = {}, bool f16 = false) {
    const int bs = 128, ratio = 4, rpb = bs / ratio, base = 5;
    const int slots = fmt == F32 ? dim : fmt == BF16 ? dim / 2 : dim / 4 + 1;
    const int stride = slots + extra;
    const long long fpb = base + (long long)rpb * stride + 3;
    const int tokens = (int)visible.size();
    if (seq.empty())
        for (int t = 0; t < tokens; ++t) seq.push_back(t);
    const int seqs = *std::max_element(seq.begin(), seq.end()) + 1;
    int max_vis = 0;
    for (int v : visible) max_vis = std::max(max_vis, v);
    const int bps = std::max((max_vis + rpb - 1) / rpb, 1);
    const int nblocks = seqs * bps + 2;
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
    // Shuffled block tables.
    std::vector<unsigned> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    for (int i = nblocks - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
    std::vector<unsigned> bt;
    std::vector<int> bt_start, vis(visible);
    std::vector<long long> out_start;
    long long total = 0;
    std::vector<int> table_at;
    for (int s = 0; s < seqs; ++s) {
        table_at.push_back((int)bt.size());
        for (int j = 0; j < bps; ++j) bt.push_back(perm[s * bps + j]);
    }
    for (int t = 0; t < tokens; ++t) {
        bt_start.push_back(table_at[seq[t]]);
        out_start.push_back(total);
        total += visible[t];
    }
    std::vector<float> q(tokens * heads * dim), w(tokens * heads), out(total + 16, NAN);
    for (auto &x : q) x = rng.f();
    // Tokens' queries at different sizes (powers of two), past f16's range for some.
    for (int i = 0; i < (int)q.size(); ++i) q[i] *= std::ldexp(1.f, (int[]){0, 18, -18, 7}[i / (heads * dim) % 4]);
    for (auto &x : w) x = rng.f();
    const float scale = 1.f / std::sqrt((float)dim);
    const int group = 256 / dsk_idxh_heads(heads);  // the kernel's grouping (heads to a power of two)
    if (f16) {
        launch(D3{(unsigned)blocks, (unsigned)((tokens + group - 1) / group), 1}, 256, [&] {
            dsk_indexer_scores_mma_f16(pool.data(), q.data(), w.data(), bt.data(), bt_start.data(), vis.data(),
                                       nullptr, out_start.data(), fpb, bs, base, ratio, stride, heads, dim, scale, out.data(),
                                       fmt, tokens);
        });
    } else {
        launch(D3{(unsigned)blocks, (unsigned)tokens, 1}, 256, [&] {
            dsk_indexer_scores_mma(pool.data(), q.data(), w.data(), bt.data(), bt_start.data(), vis.data(),
                                   nullptr, out_start.data(), fpb, bs, base, ratio, stride, heads, dim, scale, out.data(), fmt);
        });
    }
    // The second reference rounds the queries as the form that ran does.
    std::vector<double> q_rounded(q.size());
    for (int t = 0; t < tokens; ++t) {
        const float *qt = q.data() + (long long)t * heads * dim;
        if (f16) {
            const auto r = f16_form_queries(qt, heads * dim);
            std::copy(r.begin(), r.end(), q_rounded.begin() + (long long)t * heads * dim);
        } else {
            for (int i = 0; i < heads * dim; ++i) q_rounded[(long long)t * heads * dim + i] = __uint_as_float(dsk_f32_to_tf32(qt[i]));
        }
    }
    // The bound: q rounds to TF32 (2^-11 relative per value), and so do f32 keys, so each product
    // moves by at most 2^-11 (stored keys) or 2^-10 + 2^-22 (f32 keys) of its magnitude; f32
    // sums add well under 1e-5 of the magnitude behind a score (sum_h |w| sum_d |q k| scale).
    const double tol = (fmt == F32 ? std::ldexp(1.0, -10) : std::ldexp(1.0, -11)) + 1e-5;
    double worst = 0, worst_tight = 0;
    for (int t = 0; t < tokens; ++t)
        for (int r = 0; r < visible[t]; ++r) {
            const int pos = r * ratio;
            const auto &k = dec[bt[bt_start[t] + pos / bs] * rpb + (pos % bs) / ratio];  // the token's table
            double want = 0, tight = 0, mag = 0;
            for (int h = 0; h < heads; ++h) {
                double dot = 0, dot_r = 0, abs = 0;
                for (int i = 0; i < dim; ++i) {
                    const float qv = q[(t * heads + h) * dim + i];
                    const double kr = fmt == F32 ? (double)__uint_as_float(dsk_f32_to_tf32((float)k[i])) : k[i];
                    dot += (double)qv * k[i];
                    dot_r += q_rounded[(t * heads + h) * dim + i] * kr;
                    abs += std::fabs((double)qv * k[i]);
                }
                const double wh = w[t * heads + h];
                want += std::max(dot, 0.0) * scale * wh;
                tight += std::max(dot_r, 0.0) * scale * wh;
                mag += abs * scale * std::fabs(wh);
            }
            const double v = out[out_start[t] + r];
            const double err = std::fabs(v - want) / mag, err_t = std::fabs(v - tight) / mag;
            if (!(err < tol) || !(err_t < 1e-5)) {
                if (failures < 10)
                    printf("FAIL fmt %d heads %d dim %d token %d row %d: %g vs %g (tf32 %g), err %.2e / %.2e\n", fmt,
                           heads, dim, t, r, v, want, tight, err, err_t);
                ++failures;
            }
            worst = std::max(worst, err);
            worst_tight = std::max(worst_tight, err_t);
        }
    // Scores past each token's rows stay untouched (NaN).
    for (long long i = total; i < (long long)out.size(); ++i)
        if (!std::isnan(out[i])) ++failures;
    printf("fmt %d%s heads %2d dim %3d blocks %d tokens %d in %d sequences, visible", fmt, f16 ? " (f16 form)" : "",
           heads, dim, blocks, tokens, seqs);
    for (int t = 0; t < std::min(tokens, 12); ++t) printf(" %d", visible[t]);
    if (tokens > 12) printf(" ..");
    printf(": worst %.2e of bound %.2e, vs tf32-rounded f64 %.2e\n", worst, tol, worst_tight);
}

int main() {
    Rng rng{0x1d3e5c0e0003ULL};
    for (int fmt : {FP8I, BF16, F32}) {
        run_case(rng, fmt, 64, 128, {1, 200, 0, 77}, 2, 0);
        run_case(rng, fmt, 32, 128, {130, 5}, 1, 3);
        run_case(rng, fmt, 16, 128, {64, 65}, 2, 1);
        run_case(rng, fmt, 13, 128, {100, 1}, 3, 0);
        run_case(rng, fmt, 64, 64, {90}, 1, 2);
    }
    // The f16 form: a decode token, a chunk of 19 tokens from position 401 (rows 100 .. 105), a
    // decode token, a chunk of 9 from position 0 (rows 0 .. 2) and one of 2, so groups of 4 (64
    // heads), 8 (32, and 24 padded to 32) and 16 (13) hold one run of a table or several.
    std::vector<int> visible, seq;
    const int layout[][2] = {{300, 1}, {401, 19}, {150, 1}, {0, 9}, {37, 2}};
    for (int s = 0; s < 5; ++s)
        for (int i = 0; i < layout[s][1]; ++i) {
            visible.push_back((layout[s][0] + i + 1) / 4);
            seq.push_back(s);
        }
    for (int heads : {64, 32, 24, 13}) run_case(rng, FP8I, heads, 128, visible, 2, 0, seq, true);
    run_case(rng, FP8I, 8, 64, {70, 0, 65, 1}, 1, 2, {}, true);
    printf(failures ? "%d FAILURES\n" : "all cases pass\n", failures);
    return failures ? 1 : 0;
}
