// CPU emulation of paged.cu (one std::thread per CUDA thread, barriers for __syncthreads and
// warp shuffles) against a host reference port of the server's compressor and key lists, for
// checking kernel logic on a machine without a GPU (cases like tests/paged_gpu.rs's, with every
// section in one part per block through the block table; the GPU test covers recent tables):
//   g++ -std=c++20 -O2 -pthread -w -o /tmp/paged_emu kernels/tools/paged_emu.cpp && /tmp/paged_emu
#include "emu.h"
inline void dsk_pdl_entry() {}  // launches run one after another here
// f32 pool rows only here (fmt 0): the record writers are checked by tests/kv_record_gpu.rs.
#define DSK_KV_F32 0
template <class... A> inline void dsk_kv_store_row(A &&...) { abort(); }
#include "../paged.cu"

struct Lay { size_t bs, ratio, coff, dim, hd, lb, fpb;
    Lay(size_t bs_, size_t r, size_t c, size_t d, size_t h, size_t l) : bs(bs_), ratio(r), coff(c), dim(d), hd(h), lb(l) {
        fpb = lb + bs * hd + bs * 2 * c * d + bs / r * d + 13; }
    size_t width() const { return coff * dim; }
    size_t cin() const { return bs * hd; }
    size_t crows() const { return cin() + bs * 2 * width(); }
    size_t region(const std::vector<unsigned> &bt, size_t pos) const { return bt[pos / bs] * fpb + lb; }
    size_t window_row(const std::vector<unsigned> &bt, size_t pos) const { return region(bt, pos) + pos % bs * hd; }
    size_t comp_in_row(const std::vector<unsigned> &bt, size_t pos) const { return region(bt, pos) + cin() + pos % bs * 2 * width(); }
    size_t comp_row(const std::vector<unsigned> &bt, size_t w) const { size_t p = w * ratio; return region(bt, p) + crows() + (p % bs) / ratio * dim; }
};

std::vector<float> ref_compress(const std::vector<float> &pool, const Lay &L, const std::vector<unsigned> &bt, size_t w,
        const std::vector<float> &ape, const std::vector<float> &norm, const std::vector<float> &inv, float af, float eps) {
    size_t dim = L.dim, ratio = L.ratio, width = L.width();
    struct S { const float *kv, *g, *b; };
    std::vector<S> slots;
    if (L.coff == 2 && w > 0) for (size_t i = 0; i < ratio; ++i) { const float *v = &pool[L.comp_in_row(bt, (w - 1) * ratio + i)]; slots.push_back({v, v + width, &ape[i * width]}); }
    size_t off = (L.coff - 1) * dim;
    for (size_t i = 0; i < ratio; ++i) { const float *v = &pool[L.comp_in_row(bt, w * ratio + i)]; slots.push_back({v + off, v + width + off, &ape[i * width + off]}); }
    std::vector<float> row(dim), lg(slots.size());
    for (size_t c = 0; c < dim; ++c) {
        float mx = -INFINITY;
        for (size_t s = 0; s < slots.size(); ++s) { lg[s] = slots[s].g[c] + slots[s].b[c]; mx = std::max(mx, lg[s]); }
        float den = 0; for (auto &l : lg) { l = std::exp(l - mx); den += l; }
        float acc = 0; for (size_t s = 0; s < slots.size(); ++s) acc += slots[s].kv[c] * (lg[s] / den);
        row[c] = acc;
    }
    float ss = 0; for (float v : row) ss += v * v;
    float ivr = 1.f / std::sqrt(ss / (float)dim + eps);
    for (size_t c = 0; c < dim; ++c) row[c] = norm[c] * (row[c] * ivr);
    float p = (float)(w * ratio); size_t rd = inv.size() * 2; float *r = &row[dim - rd];
    for (size_t j = 0; j < inv.size(); ++j) { double a = (double)(inv[j] * p); float cs = (float)cos(a) * af, sn = (float)sin(a) * af;
        float x0 = r[2 * j], x1 = r[2 * j + 1]; r[2 * j] = x0 * cs + (-x1) * sn; r[2 * j + 1] = x1 * cs + x0 * sn; }
    return row;
}

struct Step { std::vector<std::vector<unsigned>> tables; std::vector<std::pair<int,int>> rows;
    std::vector<int> pos, st, ln; std::vector<unsigned> flat;
    void build() { std::vector<int> so; for (auto &t : tables) { so.push_back(flat.size()); flat.insert(flat.end(), t.begin(), t.end()); }
        for (auto &r : rows) { pos.push_back(r.second); st.push_back(so[r.first]); ln.push_back(tables[r.first].size()); } } };

int fails = 0;
void compress_case(const char *name, Lay L, int rope_dim, Step S, unsigned long long seed) {
    S.build(); Rng rng{seed};
    unsigned nb = 0; for (auto &t : S.tables) for (auto b : t) nb = std::max(nb, b + 1);
    std::vector<float> pool(nb * L.fpb); for (auto &v : pool) v = rng.f();
    size_t n = S.rows.size(), width = L.width(), ldl = L.hd + 8;
    std::vector<float> kv(n * width), gate(n * width), lat(n * ldl), ape(L.ratio * width), norm(L.dim), inv(rope_dim / 2);
    for (auto &v : kv) v = rng.f(); for (auto &v : gate) v = 2 * rng.f(); for (auto &v : lat) v = rng.f();
    for (auto &v : ape) v = 0.5f * rng.f(); for (auto &v : norm) v = 1 + 0.5f * rng.f();
    for (int i = 0; i < rope_dim / 2; ++i) inv[i] = std::pow(10000.f, -(float)(2 * i) / rope_dim);
    float af = 1.25f, eps = 1e-6f;
    std::vector<float> dev = pool;
    unsigned thr = std::clamp<unsigned>(1u << (unsigned)std::ceil(std::log2((double)L.hd)), 32, 256);
    launch({(unsigned)n, 1, 1}, thr, [&] { dsk_pool_write_f32(dev.data(), S.pos.data(), S.st.data(), S.ln.data(), S.flat.data(), L.fpb, L.bs, L.lb, L.hd, 0, lat.data(), ldl, nullptr, 0, L.hd, DSK_KV_F32, 0); });
    thr = std::clamp<unsigned>(1u << (unsigned)std::ceil(std::log2((double)width)), 32, 256);
    launch({(unsigned)n, 1, 1}, thr, [&] { dsk_pool_write_f32(dev.data(), S.pos.data(), S.st.data(), S.ln.data(), S.flat.data(), L.fpb, L.bs, L.lb + L.cin(), 2 * width, 0, kv.data(), width, gate.data(), width, width, DSK_KV_F32, 0); });
    thr = std::clamp<unsigned>(1u << (unsigned)std::ceil(std::log2((double)L.dim)), 32, 256);
    launch({(unsigned)n, 1, 1}, thr, [&] { dsk_compress_rows_f32(dev.data(), S.pos.data(), S.st.data(), S.ln.data(), S.flat.data(), L.bs, L.fpb, L.lb + L.cin(), 2 * width, 0, L.fpb, L.lb + L.crows(), L.dim, 0, L.ratio, L.coff, L.dim, ape.data(), norm.data(), inv.data(), rope_dim, af, eps, DSK_KV_F32, 0); });
    for (size_t r = 0; r < n; ++r) { if (S.pos[r] < 0) continue; auto &bt = S.tables[S.rows[r].first]; size_t p = S.pos[r];
        std::copy_n(&lat[r * ldl], L.hd, &pool[L.window_row(bt, p)]);
        std::copy_n(&kv[r * width], width, &pool[L.comp_in_row(bt, p)]);
        std::copy_n(&gate[r * width], width, &pool[L.comp_in_row(bt, p) + width]); }
    std::vector<char> mask(pool.size(), 0); int nc = 0;
    std::vector<float> want = pool;
    for (size_t r = 0; r < n; ++r) { if (S.pos[r] < 0 || (S.pos[r] + 1) % L.ratio) continue; auto &bt = S.tables[S.rows[r].first];
        size_t w = (S.pos[r] + 1) / L.ratio - 1; auto row = ref_compress(pool, L, bt, w, ape, norm, inv, af, eps);
        size_t at = L.comp_row(bt, w); double num = 0, den = 0;
        for (size_t c = 0; c < L.dim; ++c) { double d = dev[at + c] - row[c]; num += d * d; den += (double)row[c] * row[c]; mask[at + c] = 1; }
        double e = std::sqrt(num / den); nc++;
        if (!(e < 1e-5)) { printf("FAIL %s row %zu rel %g\n", name, r, e); fails++; } else printf("%s: row %zu w %zu rel %.3g\n", name, r, w, e); }
    size_t bad = 0; for (size_t i = 0; i < pool.size(); ++i) if (!mask[i] && memcmp(&pool[i], &dev[i], 4)) bad++;
    if (bad || !nc) { printf("FAIL %s: %zu differ outside, %d compressed\n", name, bad, nc); fails++; }
}

std::vector<long long> host_keys(const Lay &L, const std::vector<unsigned> &bt, long long pos, long long window, const std::vector<size_t> &comp) {
    std::vector<long long> v; long long lo = std::max(0LL, pos + 1 - window);
    for (long long p = lo; p <= pos; ++p) v.push_back(L.window_row(bt, p));
    for (auto w : comp) v.push_back(L.comp_row(bt, w)); return v; }

std::vector<long long> run_keys(const Lay &L, Step &S, int window, int mode, const std::vector<int> &sel, const std::vector<int> &cnt, int stride, const std::vector<int> &starts) {
    std::vector<long long> out(starts.back(), LLONG_MIN);
    int maxk = 0; for (size_t i = 0; i + 1 < starts.size(); ++i) maxk = std::max(maxk, starts[i + 1] - starts[i]);
    unsigned chunks = std::max(1, std::min((maxk + 255) / 256, (int)((4 * 132 + S.rows.size() - 1) / S.rows.size())));
    launch({(unsigned)S.rows.size(), chunks, 1}, 256, [&] { dsk_build_key_offsets(S.pos.data(), S.st.data(), S.ln.data(), S.flat.data(), L.bs, window, L.fpb, L.lb, L.hd, 0, L.fpb, L.lb + L.crows(), L.dim, 0, mode == 0 ? 0 : L.ratio, mode, sel.empty() ? nullptr : sel.data(), cnt.empty() ? nullptr : cnt.data(), stride, starts.data(), out.data()); });
    return out; }

void check(const char *n, const std::vector<long long> &a, const std::vector<long long> &b) {
    if (a != b) { printf("FAIL %s (sizes %zu %zu)\n", n, a.size(), b.size()); for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) if (a[i] != b[i]) { printf(" first diff at %zu: %lld vs %lld\n", i, a[i], b[i]); break; } fails++; }
    else printf("%s: %zu keys equal\n", n, a.size()); }

int main() {
    compress_case("csa bs16", Lay(16, 4, 2, 64, 64, 7), 16, Step{{{5, 2, 7, 0}, {3, 6, 1}, {4}}, {{0, 29}, {0, 30}, {0, 31}, {1, 19}, {2, 3}, {2, 10}, {0, -1}}}, 1);
    Step fl{{{6, 1, 4}, {0, 3}, {2}}, {{0, 131}, {0, 132}, {0, 135}, {1, 255}, {2, 3}, {2, 0}}};
    compress_case("csa bs128 dim512", Lay(128, 4, 2, 512, 512, 5), 64, fl, 2);
    compress_case("indexer", Lay(128, 4, 2, 128, 512, 3), 64, fl, 3);
    Step hc{{{3, 7, 0, 9, 1, 11, 4, 2, 8, 5}, {10}}, {{0, 1278}, {0, 1279}, {0, 639}, {1, 127}, {1, 100}}};
    compress_case("hca", Lay(128, 128, 1, 512, 512, 11), 64, hc, 4);
    // keys, tiny
    Lay L(16, 4, 2, 64, 64, 7);
    Step S{{{5, 2, 7, 0}, {3, 6, 1}, {4}}, {{0, 29}, {0, 31}, {1, 19}, {2, 3}, {2, 2}, {1, 40}, {0, -1}}}; S.build();
    int window = 8, topk = 3; Rng rng{7};
    for (int mode = 0; mode < 3; ++mode) {
        std::vector<int> starts{0}, sel(S.rows.size() * topk, -7), cnt(S.rows.size(), 0); std::vector<long long> want;
        for (size_t r = 0; r < S.rows.size(); ++r) { int pos = S.pos[r]; std::vector<size_t> comp;
            if (pos >= 0) { size_t vis = (pos + 1) / 4;
                if (mode == 1) for (size_t i = 0; i < vis; ++i) comp.push_back(i);
                if (mode == 2) { std::vector<size_t> p; while (p.size() < std::min<size_t>(topk, vis)) { size_t v = rng.below(vis); if (std::find(p.begin(), p.end(), v) == p.end()) p.push_back(v); }
                    for (size_t j = 0; j < p.size(); ++j) sel[r * topk + j] = p[j]; cnt[r] = p.size(); comp = p; }
                auto k = host_keys(L, S.tables[S.rows[r].first], pos, window, comp); want.insert(want.end(), k.begin(), k.end()); }
            starts.push_back(want.size()); }
        char nm[32]; snprintf(nm, 32, "keys tiny mode %d", mode);
        check(nm, run_keys(L, S, window, mode, mode == 2 ? sel : std::vector<int>{}, mode == 2 ? cnt : std::vector<int>{}, mode == 2 ? topk : 0, starts), want); }
    {
        Step T{{{5, 2}, {3}}, {{0, 11}, {0, 5}, {0, 7}, {1, 40}}}; T.build();
        std::vector<int> sel{2, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0}, cnt{3, 1, 1, 0}, starts{0, 13, 20, 23, 25};
        auto &bt = T.tables[0]; auto want = host_keys(L, bt, 11, 8, {2, 0, 1}); want.push_back(-1); want.push_back(-1);
        auto k = host_keys(L, bt, 5, 8, {}); want.insert(want.end(), k.begin(), k.end()); want.push_back(-1);
        k = host_keys(L, bt, 7, 8, {0}); want.insert(want.end(), k.begin(), k.begin() + 3); want.push_back(-1); want.push_back(-1);
        check("keys edge", run_keys(L, T, 8, 2, sel, cnt, 3, starts), want);
    }
    {
        Lay H(128, 128, 1, 512, 512, 5000000); H.fpb = 398784 * 32;
        std::vector<unsigned> tb(8192); for (unsigned i = 0; i < 8192; ++i) tb[i] = i; for (size_t i = 8191; i > 0; --i) std::swap(tb[i], tb[rng.below(i + 1)]);
        Step M{{tb, std::vector<unsigned>(tb.begin(), tb.begin() + 4096)}, {{0, (1 << 20) - 1}, {0, (1 << 20) - 200}, {1, 300000}}}; M.build();
        std::vector<int> starts{0}; std::vector<long long> want;
        for (size_t r = 0; r < 3; ++r) { std::vector<size_t> comp; for (size_t i = 0; i < (size_t)(M.pos[r] + 1) / 128; ++i) comp.push_back(i);
            auto k = host_keys(H, M.tables[M.rows[r].first], M.pos[r], 128, comp); want.insert(want.end(), k.begin(), k.end()); starts.push_back(want.size()); }
        check("keys 1M hca", run_keys(H, M, 128, 1, {}, {}, 0, starts), want);
    }
    printf(fails ? "FAILURES %d\n" : "ALL OK\n", fails);
    return fails != 0;
}
