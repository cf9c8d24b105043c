// Routed experts over many tokens (prefill): the (token, slot) pairs are sorted by expert (on the
// host, or on the device for the grouped FP4 kernels: dsk_moe_sort_plan / _scatter), each
// expert's FP4 matrices are widened to f32 once per step, and cuBLAS multiplies every expert's
// contiguous run of rows. These kernels are the glue around those GEMMs.
//
//   dsk_fp4_dequant_experts_f32: FP4 (e2m1 + one E8M0 scale per 32 values along K) matrices of
//       the listed experts to f32, back to back: exact (an e2m1 value times a power of two).
//   dsk_gather_rows_f32:         dst[i, :] = src[idx[i], :] (activations into expert order);
//       idx[i] < 0 (a sorted row no pair maps to, from the device sort) writes zeros.
//   dsk_moe_combine_sorted_f32:  out[t, :] = sum_j w[t, j] * y[pos[t, j], :], slots in order (as
//       the decode kernels sum them), then + addend[t, :] where addend is given (the shared
//       expert's output, added as a separate add_f32 would); pos < 0 adds nothing.
//   The f16 forms (GEMMs on f16 tensor cores with f32 accumulation): the widened weights are
//   exact in f16 when every block scale is 2^-23 .. 2^13 (checked per bank with dsk_u8_range);
//   activations round to f16's 11 significant bits, as TF32 rounds them.

__device__ __forceinline__ unsigned short moe_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// e2m1 code (sign, two exponent bits, one mantissa bit) to f32 without a table: e > 0 is
// 2^(e-1) * (1 + m/2), e = 0 the subnormal m/2.
__device__ __forceinline__ float moe_e2m1(unsigned int nibble) {
    const unsigned int e = (nibble >> 1) & 3u, m = nibble & 1u;
    const float mag = e ? __uint_as_float(((e + 126u) << 23) | (m << 22)) : 0.5f * (float)m;
    return (nibble & 8u) ? -mag : mag;
}

// W: bank [E, rows, k/2] bytes (element 2j in the low nibble of byte j), S: [E, rows, k/32].
// out: [count, rows, k] f32, matrix blockIdx.y = expert experts[blockIdx.y]. One thread per
// four values (two bytes in, one 16-byte store out), so a warp reads 64 contiguous bytes and
// writes 512 contiguous bytes; eight consecutive threads share one scale.
extern "C" __global__ void __launch_bounds__(256) dsk_fp4_dequant_experts_f32(
    const unsigned char *__restrict__ w, const unsigned char *__restrict__ s,
    const int *__restrict__ experts, int count, int rows, int k, float *__restrict__ out) {
    dsk_pdl_entry();
    const long long quads = (long long)rows * (k / 4);
    const long long e = experts[blockIdx.y];
    const unsigned short *src = reinterpret_cast<const unsigned short *>(w + e * quads * 2);
    const unsigned char *sc = s + e * (quads / 8);
    float4 *dst = reinterpret_cast<float4 *>(out + (long long)blockIdx.y * quads * 4);
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < quads;
         j += (long long)gridDim.x * blockDim.x) {
        const unsigned int x = src[j];
        const float scale = dsk_e8m0_to_f32(sc[j >> 3]);
        dst[j] = make_float4(moe_e2m1(x & 0xFu) * scale, moe_e2m1((x >> 4) & 0xFu) * scale,
                             moe_e2m1((x >> 8) & 0xFu) * scale, moe_e2m1(x >> 12) * scale);
    }
}

// dsk_fp4_dequant_experts_f32 into f16: one thread per eight values (a 4-byte load, one 16-byte
// store; four consecutive threads share one scale), so a warp reads 128 and writes 512 contiguous
// bytes, as the f32 form does.
extern "C" __global__ void __launch_bounds__(256) dsk_fp4_dequant_experts_f16(
    const unsigned char *__restrict__ w, const unsigned char *__restrict__ s,
    const int *__restrict__ experts, int count, int rows, int k, unsigned short *__restrict__ out) {
    dsk_pdl_entry();
    const long long octs = (long long)rows * (k / 8);
    const long long e = experts[blockIdx.y];
    const unsigned int *src = reinterpret_cast<const unsigned int *>(w + e * octs * 4);
    const unsigned char *sc = s + e * (octs / 4);
    uint4 *dst = reinterpret_cast<uint4 *>(out + (long long)blockIdx.y * octs * 8);
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < octs;
         j += (long long)gridDim.x * blockDim.x) {
        const unsigned int x = src[j];
        const float scale = dsk_e8m0_to_f32(sc[j >> 2]);
        unsigned int h[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const unsigned int lo = moe_f16(moe_e2m1((x >> (8 * p)) & 0xFu) * scale);
            const unsigned int hi = moe_f16(moe_e2m1((x >> (8 * p + 4)) & 0xFu) * scale);
            h[p] = lo | (hi << 16);
        }
        dst[j] = make_uint4(h[0], h[1], h[2], h[3]);
    }
}

// range[0] = min, range[1] = max of n bytes (range set to {255, 0} before the launch).
extern "C" __global__ void __launch_bounds__(256) dsk_u8_range(
    const unsigned char *__restrict__ v, long long n, unsigned int *range) {
    dsk_pdl_entry();
    unsigned int lo = 255u, hi = 0u;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const unsigned int b = v[i];
        lo = min(lo, b);
        hi = max(hi, b);
    }
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if ((threadIdx.x & 31) == 0) {
        atomicMin(&range[0], lo);
        atomicMax(&range[1], hi);
    }
}

// dst[i, c] = f16(src[idx[i], c]); 0 where idx[i] < 0.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32_to_f16(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const long long total = (long long)n * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        const int row = idx[r];
        dst[i] = row < 0 ? (unsigned short)0 : moe_f16(src[(long long)row * width + c]);
    }
}

// The clipped SwiGLU of dsk_swiglu_clip_f32 (same f32 arithmetic), stored as f16.
extern "C" __global__ void __launch_bounds__(256) dsk_swiglu_clip_to_f16(
    const float *__restrict__ gate, const float *__restrict__ up,
    unsigned short *__restrict__ out, long long len, float limit) {
    dsk_pdl_entry();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = fminf(gate[i], limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        out[i] = moe_f16(g / (1.0f + expf(-g)) * u);
    }
}

// dst[i, c] = src[idx[i], c] for i < n, c < width; 0 where idx[i] < 0.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    float *__restrict__ dst) {
    dsk_pdl_entry();
    const long long total = (long long)n * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        const int row = idx[r];
        dst[i] = row < 0 ? 0.0f : src[(long long)row * width + c];
    }
}

// out[t, c] = sum over j < topk (in order) of weights[t * topk + j] * y[pos[t * topk + j], c].
extern "C" __global__ void __launch_bounds__(256) dsk_moe_combine_sorted_f32(
    const float *__restrict__ y, const int *__restrict__ pos, const float *__restrict__ weights,
    int tokens, int topk, int hidden, float *__restrict__ out, const float *__restrict__ addend) {
    dsk_pdl_entry();
    // Four values a thread with 16-byte loads and stores where hidden allows (the same products
    // summed in the same slot order, so the same bits): the scalar form ran at about half the
    // copy bandwidth.
    if ((hidden & 3) == 0 && ((reinterpret_cast<unsigned long long>(y) | reinterpret_cast<unsigned long long>(out) |
                               reinterpret_cast<unsigned long long>(addend)) & 15) == 0) {
        const int quads = hidden >> 2;
        const long long total = (long long)tokens * quads;
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
             i += (long long)gridDim.x * blockDim.x) {
            const long long t = i / quads;
            const int c = (int)(i % quads);
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int j = 0; j < topk; ++j) {
                const int p = pos[t * topk + j];
                if (p < 0) continue;
                const float w = weights[t * topk + j];
                const float4 v = reinterpret_cast<const float4 *>(y + (long long)p * hidden)[c];
                acc.x += w * v.x;
                acc.y += w * v.y;
                acc.z += w * v.z;
                acc.w += w * v.w;
            }
            if (addend != nullptr) {
                const float4 a = reinterpret_cast<const float4 *>(addend + t * hidden)[c];
                acc.x += a.x;
                acc.y += a.y;
                acc.z += a.z;
                acc.w += a.w;
            }
            reinterpret_cast<float4 *>(out + t * hidden)[c] = acc;
        }
        return;
    }
    const long long total = (long long)tokens * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / hidden, c = i % hidden;
        float acc = 0.0f;
        for (int j = 0; j < topk; ++j) {
            const int p = pos[t * topk + j];
            if (p >= 0) acc += weights[t * topk + j] * y[(long long)p * hidden + c];
        }
        if (addend != nullptr) acc += addend[i];
        out[i] = acc;
    }
}

// dsk_gather_rows_f32_to_f16 into "k8 order" for the grouped FP4 kernels (fp4_moe.cu): every 8
// values of a row stored as 0 4 1 5 2 6 3 7. One thread per 8 values (two 16-byte loads, one
// 16-byte store); width % 8 == 0. idx[i] < 0 writes a row of zeros: with the device sort the
// host does not know how many rows are valid, so it gathers every pair's row and the rows past
// the last valid one (token -1) come out defined.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32_to_f16_k8(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const int per_row = width >> 3;
    const long long total = (long long)n * per_row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / per_row, c = i % per_row;
        const int row = idx[r];
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row >= 0) {
            const float4 *s = reinterpret_cast<const float4 *>(src + (long long)row * width) + 2 * c;
            const float4 a = s[0], b = s[1];
            v.x = moe_f16(a.x) | ((unsigned int)moe_f16(b.x) << 16);
            v.y = moe_f16(a.y) | ((unsigned int)moe_f16(b.y) << 16);
            v.z = moe_f16(a.z) | ((unsigned int)moe_f16(b.z) << 16);
            v.w = moe_f16(a.w) | ((unsigned int)moe_f16(b.w) << 16);
        }
        reinterpret_cast<uint4 *>(dst)[i] = v;
    }
}

// dsk_gather_rows_f32_to_f16 into "k32 order" for the wgmma build of the grouped FP4 kernels: one thread per 8 stored values
// (positions 16 st + 8 h + 0..7 of a chunk: values 8 t + 2 st + h + 4 e for t = 0..3, e = 0..1);
// a negative index writes a zero row (sorted rows no pair maps to); a null idx converts the rows
// in place order (x for the wgmma gate/up's own gather). width % 32 == 0.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32_to_f16_k32(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const int per_row = width >> 3;
    const long long total = (long long)n * per_row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / per_row;
        const int piece = (int)(i % per_row), chunk = piece >> 2, st = (piece >> 1) & 1, h = piece & 1;
        const int row = idx ? idx[r] : (int)r;
        unsigned int p[4] = {0u, 0u, 0u, 0u};
        if (row >= 0) {
            const float *s = src + (long long)row * width + 32 * chunk + 2 * st + h;
#pragma unroll
            for (int t = 0; t < 4; ++t) p[t] = (unsigned int)moe_f16(s[8 * t]) | ((unsigned int)moe_f16(s[8 * t + 4]) << 16);
        }
        reinterpret_cast<uint4 *>(dst)[i] = make_uint4(p[0], p[1], p[2], p[3]);
    }
}

// Rows already rounded to f16 (in place order) into "k32 order", as dsk_gather_rows_f32_to_f16_k32
// with a null idx stores them: the same values, for a split step whose x was gathered in f16
// (rounding then reordering equals reordering then rounding). One thread per 32-value chunk: four
// 16-byte loads, four 16-byte stores. width % 32 == 0, src and dst 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256) dsk_rows_f16_to_k32(
    const unsigned short *__restrict__ src, int n, int width, unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const long long total = (long long)n * (width >> 5);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const uint4 *in = reinterpret_cast<const uint4 *>(src) + 4 * i;
        unsigned int w[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint4 v = in[q];
            w[4 * q] = v.x;
            w[4 * q + 1] = v.y;
            w[4 * q + 2] = v.z;
            w[4 * q + 3] = v.w;
        }
        // Stored position 16 st + 8 h + 2 t + e holds value 8 t + 2 st + h + 4 e.
        unsigned int out[16];
#pragma unroll
        for (int st = 0; st < 2; ++st)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const int v0 = 8 * t + 2 * st + h, v1 = v0 + 4;
                    const unsigned int lo = (w[v0 >> 1] >> (16 * (v0 & 1))) & 0xffffu;
                    const unsigned int hi = (w[v1 >> 1] >> (16 * (v1 & 1))) & 0xffffu;
                    out[8 * st + 4 * h + t] = lo | (hi << 16);
                }
        uint4 *o = reinterpret_cast<uint4 *>(dst) + 4 * i;
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q] = make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
    }
}

// The device sort of a GEMM step's (token, slot) pairs by expert for the grouped FP4 kernels
// (dsk_moe_sort_plan, then dsk_moe_sort_scatter): the host never waits for the router's ids, and
// the result is bit for bit the host's (ExpertOrder and fp4_grouped_tiles in the server and
// launch/moe_grouped.rs): experts ascending, stable by pair within an expert, each expert's rows
// cut into tiles of tile_rows. launch/moe_sorted.rs: Kernels::moe_sort.

// Most experts of the device sort: the plan scans the experts with one thread each.
#define MOE_SORT_MAX_EXPERTS 1024
// Consecutive pairs a thread of dsk_moe_sort_scatter takes per pass (bits of one match mask).
#define MOE_SCATTER_ITEMS 16

// Four consecutive ids from pair p on (ids 16-byte aligned, p a multiple of 4), -1 (never an
// expert) past `pairs`.
__device__ __forceinline__ int4 moe_ids4(const int *__restrict__ ids, long long p, int pairs) {
    if (p + 4 <= pairs) return *reinterpret_cast<const int4 *>(ids + p);
    int4 v = make_int4(-1, -1, -1, -1);
    if (p < pairs) v.x = ids[p];
    if (p + 1 < pairs) v.y = ids[p + 1];
    if (p + 2 < pairs) v.z = ids[p + 2];
    return v;
}

// Inclusive sum over the lanes of a warp up to this one.
__device__ __forceinline__ int moe_warp_scan(int v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    return v;
}

// The sort's plan, one block of 1024 threads (a few microseconds, against a host round trip):
// each expert's pair count (shared atomics, one per group of equal ids in a warp, so skewed
// routing does not serialise on one counter), then one scan over the experts (a thread each) of
// rows and tiles. Writes every tile [expert, first row, rows, 0] in expert order and then
// [0, 0, 0, 0] (rows = 0: an empty tile) up to max_tiles, so the GEMMs launch max_tiles blocks
// without the host knowing the count; ends[e] = one past expert e's last sorted row, for the
// scatter; tokens[r] = -1 for the sorted rows no pair maps to (r >= the valid count: the gather
// writes zeros there) and slots[p] = -1 for pairs whose id is outside 0..experts (they add
// nothing, as on the host). Needs experts <= blockDim and max_tiles >= the tiles made.
extern "C" __global__ void __launch_bounds__(1024) dsk_moe_sort_plan(
    const int *__restrict__ ids, int pairs, int experts, int tile_rows, int max_tiles,
    int4 *__restrict__ tiles, int *__restrict__ ends, int *__restrict__ tokens,
    int *__restrict__ slots) {
    dsk_pdl_entry();
    __shared__ int count[MOE_SORT_MAX_EXPERTS], row0[MOE_SORT_MAX_EXPERTS];
    __shared__ int tile0[MOE_SORT_MAX_EXPERTS + 1];
    __shared__ int warp_rows[32], warp_tiles[32], valid;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    for (int e = tid; e < MOE_SORT_MAX_EXPERTS; e += blockDim.x) count[e] = 0;
    __syncthreads();
    // Every lane runs every pass (the match needs the whole warp).
    for (long long base = 0; base < pairs; base += 4LL * blockDim.x) {
        const long long p = base + 4LL * tid;
        const int4 v = moe_ids4(ids, p, pairs);
        const int four[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int e = four[q];
            const bool in = e >= 0 && e < experts;
            if (!in && p + q < pairs) slots[p + q] = -1;
            // Lanes without an expert group under -1 and add nothing.
            const unsigned int peers = __match_any_sync(0xffffffffu, in ? e : -1);
            if (in && lane == __ffs(peers) - 1) atomicAdd(&count[e], __popc(peers));
        }
    }
    __syncthreads();
    const int c = tid < experts ? count[tid] : 0;
    const int t = c / tile_rows + (c % tile_rows != 0);
    const int rs = moe_warp_scan(c, lane), ts = moe_warp_scan(t, lane);
    if (lane == 31) {
        warp_rows[warp] = rs;
        warp_tiles[warp] = ts;
    }
    __syncthreads();
    if (warp == 0) {
        // The warps' totals to exclusive offsets.
        const int wr = lane < warps ? warp_rows[lane] : 0, wt = lane < warps ? warp_tiles[lane] : 0;
        const int ir = moe_warp_scan(wr, lane), it = moe_warp_scan(wt, lane);
        if (lane < warps) {
            warp_rows[lane] = ir - wr;
            warp_tiles[lane] = it - wt;
        }
    }
    __syncthreads();
    const int row_end = warp_rows[warp] + rs, tile_end = warp_tiles[warp] + ts;
    if (tid < experts) {
        row0[tid] = row_end - c;
        tile0[tid] = tile_end - t;
        ends[tid] = row_end;
    }
    if (tid == experts - 1) {
        tile0[experts] = tile_end;
        valid = row_end;
    }
    __syncthreads();
    const int total = tile0[experts];
    for (int i = tid; i < max_tiles; i += blockDim.x) {
        int4 tile = make_int4(0, 0, 0, 0);
        if (i < total) {
            // The last expert whose first tile is at or before i: an empty expert shares its
            // successor's first tile, so that one has rows.
            int lo = 0, hi = experts - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (tile0[mid] <= i) lo = mid;
                else hi = mid - 1;
            }
            const int at = (i - tile0[lo]) * tile_rows;
            tile = make_int4(lo, row0[lo] + at, min(tile_rows, count[lo] - at), 0);
        }
        tiles[i] = tile;
    }
    for (int r = valid + tid; r < pairs; r += blockDim.x) tokens[r] = -1;
}

// The sort's scatter, block e for expert e (after the plan): its pairs in pair order (stable, as
// on the host) at sorted rows ends[e - 1] (0 for e = 0) on: slots[p] = row, tokens[row] =
// p / topk. A pass takes blockDim * 16 consecutive pairs, 16 a thread, and an exclusive scan of
// the threads' match counts gives each match its row, so the order needs no atomics. A block
// stops once its expert's rows are placed (an empty expert's at once); every block reads the
// ids, which stay in L2.
extern "C" __global__ void __launch_bounds__(256) dsk_moe_sort_scatter(
    const int *__restrict__ ids, int pairs, int topk, const int *__restrict__ ends,
    int *__restrict__ tokens, int *__restrict__ slots) {
    dsk_pdl_entry();
    __shared__ int warp_sum[32];
    const int e = blockIdx.x;
    const int first = e ? ends[e - 1] : 0, count = ends[e] - first;
    if (count == 0) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    int placed = 0;
    for (long long base = 0; base < pairs && placed < count;
         base += (long long)MOE_SCATTER_ITEMS * blockDim.x) {
        const long long p = base + (long long)MOE_SCATTER_ITEMS * tid;
        unsigned int mine = 0;
#pragma unroll
        for (int q = 0; q < MOE_SCATTER_ITEMS / 4; ++q) {
            const int4 v = moe_ids4(ids, p + 4 * q, pairs);
            mine |= ((unsigned int)(v.x == e) | (unsigned int)(v.y == e) << 1 |
                     (unsigned int)(v.z == e) << 2 | (unsigned int)(v.w == e) << 3)
                    << (4 * q);
        }
        const int n = __popc(mine), incl = moe_warp_scan(n, lane);
        if (lane == 31) warp_sum[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            const int w = lane < warps ? warp_sum[lane] : 0;
            const int iw = moe_warp_scan(w, lane);
            if (lane < warps) warp_sum[lane] = iw;
        }
        __syncthreads();
        int row = first + placed + (warp ? warp_sum[warp - 1] : 0) + incl - n;
        while (mine) {
            const int pair = (int)(p + __ffs(mine) - 1);
            mine &= mine - 1;
            slots[pair] = row;
            tokens[row] = pair / topk;
            ++row;
        }
        placed += warp_sum[warps - 1];
        __syncthreads(); // every thread has read warp_sum before the next pass writes it
    }
}
