// Routed experts over many tokens (prefill): the (token, slot) pairs are sorted by expert on the
// host, each expert's FP4 matrices are widened to f32 once per step, and cuBLAS multiplies every
// expert's contiguous run of rows. These kernels are the glue around those GEMMs.
//
//   dsk_fp4_dequant_experts_f32: FP4 (e2m1 + one E8M0 scale per 32 values along K) matrices of
//       the listed experts to f32, back to back: exact (an e2m1 value times a power of two).
//   dsk_gather_rows_f32:         dst[i, :] = src[idx[i], :] (activations into expert order).
//   dsk_moe_combine_sorted_f32:  out[t, :] = sum_j w[t, j] * y[pos[t, j], :], slots in order (as
//       the decode kernels sum them); pos < 0 adds nothing.
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

// dst[i, c] = f16(src[idx[i], c]).
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32_to_f16(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const long long total = (long long)n * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        dst[i] = moe_f16(src[(long long)idx[r] * width + c]);
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

// dst[i, c] = src[idx[i], c] for i < n, c < width.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    float *__restrict__ dst) {
    dsk_pdl_entry();
    const long long total = (long long)n * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / width, c = i % width;
        dst[i] = src[(long long)idx[r] * width + c];
    }
}

// out[t, c] = sum over j < topk (in order) of weights[t * topk + j] * y[pos[t * topk + j], c].
extern "C" __global__ void __launch_bounds__(256) dsk_moe_combine_sorted_f32(
    const float *__restrict__ y, const int *__restrict__ pos, const float *__restrict__ weights,
    int tokens, int topk, int hidden, float *__restrict__ out) {
    dsk_pdl_entry();
    const long long total = (long long)tokens * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / hidden, c = i % hidden;
        float acc = 0.0f;
        for (int j = 0; j < topk; ++j) {
            const int p = pos[t * topk + j];
            if (p >= 0) acc += weights[t * topk + j] * y[(long long)p * hidden + c];
        }
        out[i] = acc;
    }
}

// dsk_gather_rows_f32_to_f16 into "k8 order" for the grouped FP4 kernels (fp4_moe.cu): every 8
// values of a row stored as 0 4 1 5 2 6 3 7. One thread per 8 values (two 16-byte loads, one
// 16-byte store); width % 8 == 0.
extern "C" __global__ void __launch_bounds__(256) dsk_gather_rows_f32_to_f16_k8(
    const float *__restrict__ src, const int *__restrict__ idx, int n, int width,
    unsigned short *__restrict__ dst) {
    dsk_pdl_entry();
    const int per_row = width >> 3;
    const long long total = (long long)n * per_row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / per_row, c = i % per_row;
        const float4 *s = reinterpret_cast<const float4 *>(src + (long long)idx[r] * width) + 2 * c;
        const float4 a = s[0], b = s[1];
        const unsigned int p0 = moe_f16(a.x) | ((unsigned int)moe_f16(b.x) << 16);
        const unsigned int p1 = moe_f16(a.y) | ((unsigned int)moe_f16(b.y) << 16);
        const unsigned int p2 = moe_f16(a.z) | ((unsigned int)moe_f16(b.z) << 16);
        const unsigned int p3 = moe_f16(a.w) | ((unsigned int)moe_f16(b.w) << 16);
        reinterpret_cast<uint4 *>(dst)[i] = make_uint4(p0, p1, p2, p3);
    }
}
