// Pool addressing on the device: the KV pool's rows found from each step row's position and its
// sequence's tables, so no host-built offset list is needed (server/src/engine/model/kv.rs is
// the layout). A pool section (one region of every layer's part of a block) is addressed by
// (fpb, base, stride, ratio, recent): its row i lives at position p = i * ratio, in block
// t[p / bs], at t[p / bs] * fpb + base + ((p % bs) / ratio) * stride, where t is the row's
// block table (persistent sections: compressed and indexer rows) or, with `recent`, its recent
// table (window rows, compressor inputs).
// Step row r: positions[r] (negative = padding row, skipped), its block table
// bt[bt_start[r] .. + bt_len[r]], its recent table the bt_len[r] entries right after it (0xffffffff:
// released, never read). Offsets are 64-bit element offsets.

#define DSK_NO_RECENT 0xffffffffu

// The table a section is addressed through: the block table tb[0 .. tl) or the recent table
// after it.
__device__ __forceinline__ const unsigned int *dsk_section_table(const unsigned int *tb, int tl,
                                                                 int recent) {
    return recent ? tb + tl : tb;
}

// Element offset of row i of a section for a sequence whose table (see dsk_section_table) is
// tb[0 .. tl), or -1 when i is negative, its block is past the table or has no recent block.
__device__ __forceinline__ long long dsk_section_row(const unsigned int *__restrict__ tb, int tl,
                                                     long long fpb, int bs, long long base,
                                                     long long stride, int ratio, long long i) {
    if (i < 0) return -1;
    const long long p = i * ratio;
    const long long blk = p / bs;
    if (blk >= tl) return -1;
    const unsigned int b = tb[blk];
    if (b == DSK_NO_RECENT) return -1;
    return (long long)b * fpb + base + ((p % bs) / ratio) * stride;
}

#define DSK_PW_MAX_DIM 1024

// Row r of a (first `width` floats, row stride lda) to the section row of positions[r], then,
// when b is not null, row r of b (row stride ldb) right after it. One block per row.
// fmt != DSK_KV_F32 (b null, width <= DSK_PW_MAX_DIM): the row is stored as that record
// (common.cuh; rope = the latent record's bf16 dims), staged in shared memory first.
extern "C" __global__ void __launch_bounds__(256) dsk_pool_write_f32(
    float *__restrict__ pool, const int *__restrict__ positions, const int *__restrict__ bt_start,
    const int *__restrict__ bt_len, const unsigned int *__restrict__ bt, long long fpb, int bs,
    long long base, long long stride, int recent, const float *__restrict__ a, long long lda,
    const float *__restrict__ b, long long ldb, int width, int fmt, int rope) {
    dsk_pdl_entry();
    const int r = blockIdx.x;
    const int pos = positions[r];
    const int tl = bt_len[r];
    const unsigned int *tb = dsk_section_table(bt + bt_start[r], tl, recent);
    const long long o = dsk_section_row(tb, tl, fpb, bs, base, stride, 1, pos);
    if (o < 0) return;
    float *dst = pool + o;
    const float *sa = a + (long long)r * lda;
    if (fmt != DSK_KV_F32) {
        __shared__ float srow[DSK_PW_MAX_DIM];
        for (int c = threadIdx.x; c < width; c += blockDim.x) srow[c] = sa[c];
        __syncthreads();  // o < 0 returned for the whole block
        dsk_kv_store_row(dst, fmt, width, rope, srow);
        return;
    }
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = sa[c];
    if (b != nullptr) {
        const float *sb = b + (long long)r * ldb;
        for (int c = threadIdx.x; c < width; c += blockDim.x) dst[width + c] = sb[c];
    }
}

#define DSK_CMP_MAX_DIM 512
#define DSK_CMP_MAX_SLOTS 256

// The compressed row of every step row whose window closes at its position ((pos + 1) % ratio
// == 0), as the host's compress_window: window w = (pos + 1) / ratio - 1; slots = (CSA, w > 0)
// the ratio tokens of window w - 1 (channels [0, dim) of kv and gate, bias ape[i][0, dim)), then
// the ratio tokens of window w (channels [off, off + dim), off = (coff - 1) * dim); per channel
// the softmax over slots of gate + bias weights kv (in slot order, f32 as gated_pool); RMSNorm
// with `norm`; interleaved RoPE at position w * ratio on the trailing rope_dim channels (angle an
// f32 product, cos/sin in double then f32, times attention_factor); written to output row w as an
// `out_fmt` record (common.cuh; out_rope = the latent record's bf16 dims).
// Inputs are per-token rows of the input section (kv then gate, `coff * dim` each). One block per
// step row, threads over channels.
extern "C" __global__ void __launch_bounds__(256) dsk_compress_rows_f32(
    float *__restrict__ pool, const int *__restrict__ positions, const int *__restrict__ bt_start,
    const int *__restrict__ bt_len, const unsigned int *__restrict__ bt, int bs, long long in_fpb,
    long long in_base, long long in_stride, int in_recent, long long out_fpb, long long out_base,
    long long out_stride, int out_recent, int ratio,
    int coff, int dim, const float *__restrict__ ape, const float *__restrict__ norm,
    const float *__restrict__ inv_freq, int rope_dim, float attention_factor, float eps,
    int out_fmt, int out_rope) {
    dsk_pdl_entry();
    __shared__ long long slot_off[DSK_CMP_MAX_SLOTS];
    __shared__ float row[DSK_CMP_MAX_DIM];
    __shared__ float red[32];
    __shared__ int ok;
    const int r = blockIdx.x;
    const int pos = positions[r];
    if (pos < 0 || (pos + 1) % ratio != 0) return;  // uniform over the block
    const long long w = (pos + 1) / ratio - 1;
    const int overlap = (coff == 2 && w > 0) ? ratio : 0;
    const int nslots = overlap + ratio;
    const unsigned int *tb = bt + bt_start[r];
    const int tl = bt_len[r];
    const unsigned int *in_tb = dsk_section_table(tb, tl, in_recent);
    const unsigned int *out_tb = dsk_section_table(tb, tl, out_recent);
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    for (int s = threadIdx.x; s < nslots; s += blockDim.x) {
        const long long p = s < overlap ? (w - 1) * ratio + s : w * ratio + (s - overlap);
        const long long o = dsk_section_row(in_tb, tl, in_fpb, bs, in_base, in_stride, 1, p);
        if (o < 0) ok = 0;
        slot_off[s] = o;
    }
    const long long out =
        dsk_section_row(out_tb, tl, out_fpb, bs, out_base, out_stride, ratio, w);
    __syncthreads();
    if (!ok || out < 0) return;
    const int width = coff * dim, off = (coff - 1) * dim;
    // Gated pool, one channel per thread; the slot loops keep the host's order and roundings
    // (max, then the sum of exps, then sum kv * (e / denom)).
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float mx = __int_as_float(0xff800000u);
        for (int s = 0; s < nslots; ++s) {
            const int ch = (s < overlap ? 0 : off) + c, i = s < overlap ? s : s - overlap;
            const float l = __fadd_rn(pool[slot_off[s] + width + ch], ape[(long long)i * width + ch]);
            mx = fmaxf(mx, l);
        }
        float denom = 0.f;
        for (int s = 0; s < nslots; ++s) {
            const int ch = (s < overlap ? 0 : off) + c, i = s < overlap ? s : s - overlap;
            const float l = __fadd_rn(pool[slot_off[s] + width + ch], ape[(long long)i * width + ch]);
            denom = __fadd_rn(denom, expf(__fsub_rn(l, mx)));
        }
        float acc = 0.f;
        for (int s = 0; s < nslots; ++s) {
            const int ch = (s < overlap ? 0 : off) + c, i = s < overlap ? s : s - overlap;
            const float l = __fadd_rn(pool[slot_off[s] + width + ch], ape[(long long)i * width + ch]);
            const float e = expf(__fsub_rn(l, mx));
            acc = __fadd_rn(acc, __fmul_rn(pool[slot_off[s] + ch], __fdiv_rn(e, denom)));
        }
        row[c] = acc;
    }
    // RMSNorm: block sum of squares.
    float ss = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss = __fadd_rn(ss, __fmul_rn(row[c], row[c]));
    ss = dsk_warp_sum(ss);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < warps ? red[lane] : 0.f;
        v = dsk_warp_sum(v);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(red[0], (float)dim), eps)));
    for (int c = threadIdx.x; c < dim; c += blockDim.x) row[c] = __fmul_rn(norm[c], __fmul_rn(row[c], inv));
    __syncthreads();
    // RoPE on the trailing rope_dim channels, then the row goes to the pool: f32 straight to its
    // slots; a record rotates in place (thread j owns channels nope + 2j, + 1) and is stored
    // once the whole row is done.
    float *dst = pool + out;
    const int nope = dim - rope_dim;
    const bool raw = out_fmt == DSK_KV_F32;
    if (raw)
        for (int c = threadIdx.x; c < nope; c += blockDim.x) dst[c] = row[c];
    const float p = (float)(w * ratio);
    for (int j = threadIdx.x; j < rope_dim / 2; j += blockDim.x) {
        const float ang = __fmul_rn(inv_freq[j], p);
        const float cs = __fmul_rn((float)cos((double)ang), attention_factor);
        const float sn = __fmul_rn((float)sin((double)ang), attention_factor);
        const float x0 = row[nope + 2 * j], x1 = row[nope + 2 * j + 1];
        float *y = raw ? dst : row;
        y[nope + 2 * j] = __fadd_rn(__fmul_rn(x0, cs), __fmul_rn(-x1, sn));
        y[nope + 2 * j + 1] = __fadd_rn(__fmul_rn(x1, cs), __fmul_rn(x0, sn));
    }
    if (!raw) {
        __syncthreads();
        dsk_kv_store_row(dst, out_fmt, dim, out_rope, row);
    }
}

// Attention key lists: step row r (grid x) writes key_off[key_start[r] .. key_start[r + 1]):
// its window rows lo..=pos (lo = max(0, pos + 1 - window)) of the window section, then
// compressed rows of the compressed section: mode 0 none, mode 1 all visible windows
// 0 .. (pos + 1) / ratio, mode 2 selected[r * sel_stride + j] for j < min(sel_count[r],
// sel_stride). Never writes past key_start[r + 1]; slots it has no valid key for (room beyond
// its keys, a selected index outside the visible windows, a block past the row's table) get -1.
// Grid y splits a row's keys into chunks (grid-stride).
extern "C" __global__ void __launch_bounds__(256) dsk_build_key_offsets(
    const int *__restrict__ positions, const int *__restrict__ bt_start,
    const int *__restrict__ bt_len, const unsigned int *__restrict__ bt, int bs, int window,
    long long win_fpb, long long win_base, long long win_stride, int win_recent,
    long long comp_fpb, long long comp_base, long long comp_stride, int comp_recent, int ratio,
    int mode, const int *__restrict__ selected,
    const int *__restrict__ sel_count, int sel_stride, const int *__restrict__ key_start,
    long long *__restrict__ key_off) {
    dsk_pdl_entry();
    const int r = blockIdx.x;
    const long long k0 = key_start[r];
    const long long room = (long long)key_start[r + 1] - k0;
    if (room <= 0) return;
    const int pos = positions[r];
    long long lo = 0, n_win = 0, n_comp = 0, visible = 0;
    if (pos >= 0) {
        lo = max(0LL, (long long)pos + 1 - window);
        n_win = (long long)pos - lo + 1;
        visible = ratio > 0 ? ((long long)pos + 1) / ratio : 0;
        if (mode == 1) n_comp = visible;
        if (mode == 2) n_comp = max(0, min(sel_count[r], sel_stride));
    }
    const int tl = bt_len[r];
    const unsigned int *win_tb = dsk_section_table(bt + bt_start[r], tl, win_recent);
    const unsigned int *comp_tb = dsk_section_table(bt + bt_start[r], tl, comp_recent);
    for (long long j = (long long)blockIdx.y * blockDim.x + threadIdx.x; j < room;
         j += (long long)gridDim.y * blockDim.x) {
        long long o = -1;
        if (j < n_win) {
            o = dsk_section_row(win_tb, tl, win_fpb, bs, win_base, win_stride, 1, lo + j);
        } else if (j - n_win < n_comp) {
            const long long k = j - n_win;
            long long i = k;
            if (mode == 2) {
                const int s = selected[(long long)r * sel_stride + k];
                i = (s >= 0 && s < visible) ? s : -1;
            }
            o = dsk_section_row(comp_tb, tl, comp_fpb, bs, comp_base, comp_stride, ratio, i);
        }
        key_off[k0 + j] = o;
    }
}
