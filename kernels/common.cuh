// Shared device helpers. Prepended to every kernel source (NVRTC) or force-included (nvcc -include),
// so the .cu files need no headers: no CUDA toolkit headers are required at run time.
// bf16 values travel as raw `unsigned short` bits; fp8/fp4/e8m0 as raw bytes.
#pragma once

#define DSK_WARP 32

// A kernel's dynamic shared memory, as one array of `type` (the launch sizes it). The CPU
// emulators (tools/emu.h) define it as one static buffer per kernel, which a block's threads share.
#define DSK_DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]

__device__ __forceinline__ float dsk_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ unsigned short dsk_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Low and high bf16 of a 32-bit word as f32 (element at the lower address is the low half).
__device__ __forceinline__ float dsk_bf16lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float dsk_bf16hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }

// E8M0: 2^(s-127); 0xFF is NaN; s = 0 is 2^-127 (an f32 subnormal).
__device__ __forceinline__ float dsk_e8m0_to_f32(unsigned int s) {
    if (s == 0xffu) return __uint_as_float(0x7fc00000u);
    if (s == 0u) return __uint_as_float(0x00400000u);
    return __uint_as_float(s << 23);
}

// Two packed f16 (low half first) to f32.
__device__ __forceinline__ void dsk_f16x2_to_f32(unsigned int h2, float &lo, float &hi) {
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;\n\t}"
        : "=f"(lo), "=f"(hi) : "r"(h2));
}

// Two e4m3 bytes (the low 16 bits, low byte = lower address) as one f16x2 (low byte in the low
// half), exactly, with the sm_89+ converter.
__device__ __forceinline__ unsigned int dsk_e4m3x2_to_f16x2(unsigned int two_bytes) {
    unsigned int h2;
    asm("{\n\t.reg .b16 p;\n\tcvt.u16.u32 p, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, p;\n\t}" : "=r"(h2) : "r"(two_bytes));
    return h2;
}

// A word's four e4m3 bytes as two f16x2 (bytes 0-1 in `lo`, 2-3 in `hi`), exactly: the converter
// reads the word's halves in place, where two dsk_e4m3x2_to_f16x2 calls would mask and shift.
__device__ __forceinline__ void dsk_e4m3x4_to_f16x2(unsigned int w, unsigned int &lo, unsigned int &hi) {
    asm("{\n\t.reg .b16 a, b;\n\tmov.b32 {a, b}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, a;\n\tcvt.rn.f16x2.e4m3x2 %1, b;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(w));
}

// Two e4m3 bytes (low byte = lower address) to f32, exactly.
__device__ __forceinline__ void dsk_e4m3x2_to_f32(unsigned int two_bytes, float &lo, float &hi) {
    dsk_f16x2_to_f32(dsk_e4m3x2_to_f16x2(two_bytes), lo, hi);
}

// E2M1 -> f16 SCALED BY 2^-14: the three magnitude bits (e1 e0 m) go straight under the f16
// exponent/mantissa boundary (bits 9-11) and the sign to bit 15, so e>0 becomes 2^(e-15)(1+m/2)
// and e=0 the subnormal m*2^-15: exact for all 16 codes. Callers fold 2^14 into the block scale.

// Streaming 16-byte load that skips L1 (weights are read once; keep L1 for activations).
__device__ __forceinline__ uint4 dsk_ld_stream16(const void *p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// cp.async: a copy of N (4, 8 or 16) bytes global -> shared (16: through L2 only), the group
// commit, and the wait until at most N of this thread's groups are pending; the thread that
// issued a copy may read its slot after the wait with no barrier. The CPU emulators (tools/emu.h)
// define their own: copies land at once, or at the wait where a tool asks for it.
template <int N>
__device__ __forceinline__ void dsk_cp_async(void *dst, const void *src) {
#ifdef __CUDA_ARCH__
    const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
    if (N == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(d), "l"(src), "n"(N) : "memory");
#endif
}
__device__ __forceinline__ void dsk_cp_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void dsk_cp_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// f32 to TF32 (round to nearest, ties away from zero), as the 32-bit MMA operand (its top 19 bits).
__device__ __forceinline__ unsigned int dsk_f32_to_tf32(float x) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// d += A B on the TF32 tensor cores (sm_80+), one warp. Lane (g, tg) = (lane / 4, lane % 4) holds
// A (16 x 8, row-major) at (g, tg), (g + 8, tg), (g, tg + 4), (g + 8, tg + 4); B (8 x 8,
// column-major) at (tg, g), (tg + 4, g); C/D (16 x 8) at (g, 2 tg), (g, 2 tg + 1), (g + 8, 2 tg),
// (g + 8, 2 tg + 1).
__device__ __forceinline__ void dsk_mma_tf32_m16n8k8(float (&d)[4], unsigned int a0, unsigned int a1,
                                                     unsigned int a2, unsigned int a3, unsigned int b0,
                                                     unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d += A B on the f16 tensor cores (m16n8k16, f32 accumulate, sm_80+), one warp. Lane (g, tg)
// holds A (16 x 16, row-major) at rows g / g + 8, columns 2 tg, 2 tg + 1 (a0 / a1) and those + 8
// (a2 / a3), two f16 a register; B (16 x 8, column-major) at rows 2 tg, 2 tg + 1 (b0) and + 8
// (b1) of column g; C/D as dsk_mma_tf32_m16n8k8.
__device__ __forceinline__ void dsk_mma_f16_m16n8k16(float (&d)[4], unsigned int a0, unsigned int a1,
                                                     unsigned int a2, unsigned int a3, unsigned int b0,
                                                     unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d = A B with C = 0 (a chain's first step: no zeroed accumulators to set up).
__device__ __forceinline__ void dsk_mma_f16_m16n8k16_first(float (&d)[4], unsigned int a0, unsigned int a1,
                                                           unsigned int a2, unsigned int a3, unsigned int b0,
                                                           unsigned int b1) {
    const float z = 0.f;
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(z));
}

// (lo, hi) rounded to nearest f16 as one f16x2 (lo in the low half).
__device__ __forceinline__ unsigned int dsk_f32x2_to_f16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Several GEMVs over one activation row in one launch (the projections of a decode token that
// read the same normed x): segment i is the matrix w[i] (with scales s[i] where it has them) of
// n[i] rows, written to out[i], split along K by ksplit[i] warps, on blocks block_end[i - 1] ..
// block_end[i] (block_end[-1] = 0). Passed by value; the launcher (launch/multi_gemv.rs) lays out
// the same bytes.
#define DSK_GEMV_SEGMENTS 8
struct DskGemvSegments {
    unsigned long long w[DSK_GEMV_SEGMENTS];
    unsigned long long s[DSK_GEMV_SEGMENTS];
    unsigned long long out[DSK_GEMV_SEGMENTS];
    int n[DSK_GEMV_SEGMENTS];
    int ksplit[DSK_GEMV_SEGMENTS];
    int block_end[DSK_GEMV_SEGMENTS];
    int count;
};

// The segment block b belongs to, and b's index inside it.
__device__ __forceinline__ int dsk_gemv_segment(const DskGemvSegments &g, int b, int &local) {
    int i = 0;
    while (i + 1 < g.count && b >= g.block_end[i]) ++i;
    local = b - (i ? g.block_end[i - 1] : 0);
    return i;
}

// The cosine and sine (times the attention factor) of RoPE pair j at `pos`, as
// RopeTable::cos_sin: the angle is the f32 product inv_freq * pos, widened; cos/sin in double,
// rounded to f32, then times the attention factor. Kernels that rotate many rows at one position
// compute them once (dsk_rope_apply_f32 then gives dsk_rope_pair_f32's bits).
__device__ __forceinline__ void dsk_rope_cos_sin_f32(float inv_freq, int pos, float attention_factor, float &c,
                                                     float &s) {
    const double a = (double)__fmul_rn(inv_freq, (float)pos);
    c = __fmul_rn((float)cos(a), attention_factor);
    s = __fmul_rn((float)sin(a), attention_factor);
}

// (x0, x1) rotated by the angle whose cos_sin is (c, s), or by minus it with `inverse`.
__device__ __forceinline__ void dsk_rope_apply_f32(float x0, float x1, float c, float s, bool inverse, float &y0,
                                                   float &y1) {
    if (inverse) s = -s;
    y0 = __fadd_rn(__fmul_rn(x0, c), __fmul_rn(-x1, s));
    y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

// One interleaved RoPE pair (x0, x1) rotated by pos * inv_freq (by minus that with `inverse`).
// Every kernel applying RoPE to f32 rows goes through it or the two steps above, so fused and
// stand-alone launches give the same bits.
__device__ __forceinline__ void dsk_rope_pair_f32(float x0, float x1, float inv_freq, int pos,
                                                  float attention_factor, bool inverse, float &y0,
                                                  float &y1) {
    float c, s;
    dsk_rope_cos_sin_f32(inv_freq, pos, attention_factor, c, s);
    dsk_rope_apply_f32(x0, x1, c, s, inverse, y0, y1);
}

__device__ __forceinline__ float dsk_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// --- Thread-block clusters (sm_90+) ---
// Every thread of every block of the cluster arrives; shared-memory writes before it are visible
// to the cluster's reads after it (release / acquire).
__device__ __forceinline__ void dsk_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}

// The cluster's exit barrier, split: arrive once this block's last read of another block's shared
// memory has returned its value, wait before leaving (a block's shared memory must outlive the
// cluster's reads of it). Relaxed: what must precede the arrive are loads whose values the thread
// has already consumed, so no release fence is needed, and ptxas makes a release arrive a
// MEMBAR.ALL.GPU (about 5% of a 16-token skinny GEMM's samples under ncu, session 36).
__device__ __forceinline__ void dsk_cluster_exit_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void dsk_cluster_exit_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// This block's rank in its cluster and the cluster's index along x (a launch without clusters is
// clusters of one: blockIdx.x itself).
__device__ __forceinline__ unsigned int dsk_cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
#else
    return 0;
#endif
}
__device__ __forceinline__ unsigned int dsk_cluster_id_x() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int r;
    asm("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
#else
    return blockIdx.x;
#endif
}

// The f32 at `p` in the shared memory of cluster block `rank`.
__device__ __forceinline__ float dsk_ld_cluster(const float *p, unsigned int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
    unsigned int r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
#else
    return *p;
#endif
}

// --- KV pool row records (--kv-cache-dtype), bit-exact with kernels/src/kv_record.rs ---
// A row of `dim` values sits in 4-byte pool slots as little-endian bytes:
// - DSK_KV_F32: dim f32.  DSK_KV_BF16: dim bf16.
// - DSK_KV_FP8 (latent record): [nope = dim - rope e4m3][rope bf16][ceil(nope / 64) UE8M0 scale
//   bytes (e + 127)][zero pad to 4 bytes]; value = e4m3 * 2^e of its 64-group.
// - DSK_KV_FP8_INDEXER: [dim e4m3][f32 scale 2^e]; dim % 4 == 0, so the scale is slot dim / 4.
#define DSK_KV_F32 0
#define DSK_KV_BF16 1
#define DSK_KV_FP8 2
#define DSK_KV_FP8_INDEXER 3
#define DSK_KV_FP8_GROUP 64

// One e4m3 byte (the low byte of `byte`) to f32, exactly.
__device__ __forceinline__ float dsk_e4m3_to_f32(unsigned int byte) {
    float lo, hi;
    dsk_e4m3x2_to_f32(byte & 0xffu, lo, hi);
    return lo;
}

// Two f32 to two e4m3 bytes (lo at the lower address), round to nearest even, saturating to
// +-448, NaN to 0x7f. PTX cvt puts its first source operand in the UPPER byte.
__device__ __forceinline__ unsigned int dsk_f32x2_to_e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return (unsigned int)r;
}

__device__ __forceinline__ unsigned int dsk_f32_to_e4m3(float x) {
    return dsk_f32x2_to_e4m3x2(x, 0.f) & 0xffu;
}

// 2^e from its bits, for e in [-126, 127] (exact).
__device__ __forceinline__ float dsk_pow2(int e) { return __uint_as_float((unsigned int)(e + 127) << 23); }

// The exponent of the scale of a group whose largest magnitude is `amax`: the smallest e with
// amax <= 448 * 2^e, clamped to [-126, 126]; 0 for a zero (or NaN) group. 448 = 1.75 * 2^8:
// for amax = m * 2^E that is E - 8, or E - 7 when m > 1.75 (kv_record.rs fp8_scale_exponent).
__device__ __forceinline__ int dsk_fp8_scale_exponent(float amax) {
    if (!(amax > 0.f)) return 0;
    const unsigned int bits = __float_as_uint(amax);
    if (bits >= 0x7f800000u) return 126;  // inf
    const int field = (int)(bits >> 23);
    if (field == 0) return -126;  // subnormal
    const int e = field - 127 - 8 + ((bits & 0x7fffffu) > 0x600000u ? 1 : 0);
    return min(max(e, -126), 126);
}

__device__ __forceinline__ float dsk_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Value d of a stored row (`row` = its first slot) of `dim` values, any format.
__device__ __forceinline__ float dsk_kv_value(const float *row, int fmt, int dim, int rope, int d) {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(row);
    if (fmt == DSK_KV_F32) return row[d];
    if (fmt == DSK_KV_BF16) return dsk_bf16_to_f32(reinterpret_cast<const unsigned short *>(row)[d]);
    if (fmt == DSK_KV_FP8) {
        const int nope = dim - rope;
        if (d >= nope) return dsk_bf16_to_f32(*reinterpret_cast<const unsigned short *>(b + nope + 2 * (d - nope)));
        const unsigned int s = b[nope + 2 * rope + d / DSK_KV_FP8_GROUP];
        return dsk_e4m3_to_f32(b[d]) * __uint_as_float(s << 23);
    }
    return dsk_e4m3_to_f32(b[d]) * row[dim >> 2];
}

// Stores `row` (`dim` values in shared memory, written before a __syncthreads) as a record at
// `dst` (its first slot). Every thread of the block calls it (warps take whole 64-groups: the
// group's amax is a warp reduction); blockDim.x is a multiple of 32. Pad bytes are written zero.
__device__ __forceinline__ void dsk_kv_store_row(float *dst, int fmt, int dim, int rope, const float *row) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    unsigned char *b = reinterpret_cast<unsigned char *>(dst);
    if (fmt == DSK_KV_F32) {
        for (int i = tid; i < dim; i += blockDim.x) dst[i] = row[i];
    } else if (fmt == DSK_KV_BF16) {
        unsigned int *w = reinterpret_cast<unsigned int *>(dst);
        for (int p = tid; p < (dim >> 1); p += blockDim.x)
            w[p] = (unsigned int)dsk_f32_to_bf16(row[2 * p]) | ((unsigned int)dsk_f32_to_bf16(row[2 * p + 1]) << 16);
        if ((dim & 1) && tid == 0) reinterpret_cast<unsigned short *>(dst)[dim - 1] = dsk_f32_to_bf16(row[dim - 1]);
        const int nbytes = ((2 * dim + 3) >> 2) << 2;
        for (int i = 2 * dim + tid; i < nbytes; i += blockDim.x) b[i] = 0;
    } else if (fmt == DSK_KV_FP8) {
        const int nope = dim - rope, groups = (nope + DSK_KV_FP8_GROUP - 1) / DSK_KV_FP8_GROUP;
        const int scales_at = nope + 2 * rope;
        // A lane takes two neighbouring values of its warp's group (nope is even).
        for (int g = warp; g < groups; g += warps) {
            const int i = g * DSK_KV_FP8_GROUP + 2 * lane;
            const bool in = i < nope;
            const float x0 = in ? row[i] : 0.f, x1 = in ? row[i + 1] : 0.f;
            const float amax = dsk_warp_max(fmaxf(fabsf(x0), fabsf(x1)));
            const int e = dsk_fp8_scale_exponent(amax);
            const float inv = dsk_pow2(-e);
            if (in)
                *reinterpret_cast<unsigned short *>(b + i) =
                    (unsigned short)dsk_f32x2_to_e4m3x2(__fmul_rn(x0, inv), __fmul_rn(x1, inv));
            if (lane == 0) b[scales_at + g] = (unsigned char)(e + 127);
        }
        for (int i = tid; i < rope; i += blockDim.x)
            *reinterpret_cast<unsigned short *>(b + nope + 2 * i) = dsk_f32_to_bf16(row[nope + i]);
        const int nbytes = ((scales_at + groups + 3) >> 2) << 2;
        for (int i = scales_at + groups + tid; i < nbytes; i += blockDim.x) b[i] = 0;
    } else {  // DSK_KV_FP8_INDEXER: warp 0 does the row, 4 values (one word) a lane at a time
        if (warp == 0) {
            float amax = 0.f;
            for (int i = lane; i < dim; i += 32) amax = fmaxf(amax, fabsf(row[i]));
            const int e = dsk_fp8_scale_exponent(dsk_warp_max(amax));
            const float inv = dsk_pow2(-e);
            unsigned int *w = reinterpret_cast<unsigned int *>(dst);
            for (int p = lane; p < (dim >> 2); p += 32) {
                const float *x = row + 4 * p;
                w[p] = dsk_f32x2_to_e4m3x2(__fmul_rn(x[0], inv), __fmul_rn(x[1], inv)) |
                       (dsk_f32x2_to_e4m3x2(__fmul_rn(x[2], inv), __fmul_rn(x[3], inv)) << 16);
            }
            if (lane == 0) dst[dim >> 2] = dsk_pow2(e);
        }
    }
}

// Most 4-byte words of a record a lane of dsk_kv_decode_row_warp loads (rows of up to 256
// words: 512 bf16 values, any FP8 record of up to 512 values).
#define DSK_KV_DEC_WPL 8

// Decodes a stored row of `dim` (<= 512) values into `out` (shared memory, 16-byte aligned;
// out[d] = value d), one warp: every lane calls it. The record's value words (e4m3 words of 4
// values, then bf16 words of 2) are all loaded before any is decoded, so a row costs about one
// load latency; layouts whose parts are not word-aligned (not V4-Flash's) go value by value.
__device__ __forceinline__ void dsk_kv_decode_row_warp(const float *row, int fmt, int dim, int rope, float *out) {
    const int lane = threadIdx.x & 31;
    const unsigned char *b = reinterpret_cast<const unsigned char *>(row);
    const unsigned int *w = reinterpret_cast<const unsigned int *>(row);
    if (fmt == DSK_KV_F32) {
        for (int d = lane; d < dim; d += 32) out[d] = row[d];
        return;
    }
    int nope, n8, n16;  // e4m3 values, e4m3 words, bf16 words
    bool aligned;
    if (fmt == DSK_KV_BF16) {
        nope = 0, n8 = 0, n16 = dim >> 1, aligned = (dim & 1) == 0;
    } else if (fmt == DSK_KV_FP8) {
        nope = dim - rope, n8 = nope >> 2, n16 = rope >> 1;
        aligned = (nope & 3) == 0 && (rope & 1) == 0;
    } else {
        nope = dim, n8 = dim >> 2, n16 = 0, aligned = true;  // indexer rows: dim % 4 == 0
    }
    if (!aligned) {
        for (int d = lane; d < dim; d += 32) out[d] = dsk_kv_value(row, fmt, dim, rope, d);
        return;
    }
    // FP8 latent: lane g < groups holds group g's scale, the others take it by shuffle.
    float my_scale = 1.f;
    if (fmt == DSK_KV_FP8) {
        const int groups = (nope + DSK_KV_FP8_GROUP - 1) / DSK_KV_FP8_GROUP;
        my_scale = lane < groups ? __uint_as_float((unsigned int)b[nope + 2 * rope + lane] << 23) : 0.f;
    } else if (fmt == DSK_KV_FP8_INDEXER) {
        my_scale = row[dim >> 2];
    }
    unsigned int v[DSK_KV_DEC_WPL];
#pragma unroll
    for (int k = 0; k < DSK_KV_DEC_WPL; ++k) {
        const int p = lane + 32 * k;
        v[k] = p < n8 + n16 ? w[p] : 0u;
    }
#pragma unroll
    for (int k = 0; k < DSK_KV_DEC_WPL; ++k) {
        const int p = lane + 32 * k;
        float sc = my_scale;
        if (fmt == DSK_KV_FP8)  // uniform: every lane shuffles
            sc = __shfl_sync(0xffffffffu, my_scale, min((4 * p) / DSK_KV_FP8_GROUP, 31));
        if (p < n8) {
            float x0, x1, x2, x3;
            dsk_e4m3x2_to_f32(v[k] & 0xffffu, x0, x1);
            dsk_e4m3x2_to_f32(v[k] >> 16, x2, x3);
            *reinterpret_cast<float4 *>(out + 4 * p) = make_float4(x0 * sc, x1 * sc, x2 * sc, x3 * sc);
        } else if (p < n8 + n16) {
            *reinterpret_cast<float2 *>(out + nope + 2 * (p - n8)) = make_float2(dsk_bf16lo(v[k]), dsk_bf16hi(v[k]));
        }
    }
}

// Programmatic dependent launch (sm_90+; launch/submit.rs): every kernel calls it before its first
// read of anything an earlier kernel may write (in most, the first statement). Wait until the
// previous kernel of the stream has finished and its writes are visible (a no-op when the launch
// did not ask for PDL), then let the next kernel's blocks be scheduled while this one runs: they
// wait here in turn, so stream order holds for every read and write after this call. What may
// come before it: loads of model weights, which no kernel writes once the model is loaded (the
// GEMV and skinny GEMM kernels issue their first weight loads there, so under PDL they overlap
// the previous kernel's tail); and, read through L2 (__ldcg), what a kernel at least two launches
// back wrote: PDL starts this grid only once its predecessor has passed this wait, so everything
// before that predecessor has finished (the hyper-connection seam, layer_ops.cu, reads the
// streams and mix the previous seam left a sub-layer ago).
__device__ __forceinline__ void dsk_pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
