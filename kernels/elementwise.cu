// Elementwise steps that keep a chain of GPU operations on the device.

// out[i] = silu(min(gate[i], limit)) * clamp(up[i], -limit, limit): the clipped SwiGLU of
// DeepSeek-V4's experts, in f32 as the CPU reference computes it (silu(x) = x / (1 + e^-x)).
extern "C" __global__ void __launch_bounds__(256) dsk_swiglu_clip_f32(
    const float *__restrict__ gate, const float *__restrict__ up, float *__restrict__ out,
    long long len, float limit) {
    dsk_pdl_entry();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = fminf(gate[i], limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

// acc[i] += x[i].
extern "C" __global__ void __launch_bounds__(256) dsk_add_f32(
    float *__restrict__ acc, const float *__restrict__ x, long long len) {
    dsk_pdl_entry();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x)
        acc[i] += x[i];
}

// FP8 e4m3 weight [rows, cols] with one E8M0 scale per 128x128 tile
// ([ceil(rows/128), ceil(cols/128)]) to f32, for GEMMs over many rows (prefill): the values are
// exact (an e4m3 value times a power of two), as the CPU reference widens them.
extern "C" __global__ void __launch_bounds__(256) dsk_fp8_dequant_f32(
    const unsigned char *__restrict__ w, const unsigned char *__restrict__ scales,
    float *__restrict__ out, int rows, int cols) {
    dsk_pdl_entry();
    const long long len = (long long)rows * cols;
    const int scale_cols = (cols + 127) >> 7;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        float v, unused;
        dsk_e4m3x2_to_f32((unsigned int)w[i], v, unused);
        out[i] = v * dsk_e8m0_to_f32(scales[(r >> 7) * scale_cols + (c >> 7)]);
    }
}

// The same FP8 weight to f16, every value times 2^-shift: exact for every tile whose E8M0 byte s
// has 112 <= s - shift <= 134 (the host checks the matrix's range: the smallest e4m3 step, 2^-9,
// then lands on f16's 2^-24 grid or above, and 448 * 2^7 stays below 65504), so the prefill
// projections can run on the f16 tensor cores with the exact weights (the GEMM multiplies 2^shift
// back). Eight values a thread: cols % 8 == 0 keeps them in one tile row.
extern "C" __global__ void __launch_bounds__(256) dsk_fp8_dequant_f16(
    const unsigned char *__restrict__ w, const unsigned char *__restrict__ scales,
    unsigned short *__restrict__ out, int rows, int cols, int shift) {
    dsk_pdl_entry();
    const long long groups = (long long)rows * cols / 8;
    const int scale_cols = (cols + 127) >> 7;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < groups;
         i += (long long)gridDim.x * blockDim.x) {
        const long long at = i * 8;
        const int r = (int)(at / cols), c = (int)(at % cols);
        const int e = (int)scales[(r >> 7) * scale_cols + (c >> 7)] - 127 - shift;
        // 2^e as f16 bits (a subnormal below 2^-14; the range check keeps e in [-15, 7]).
        unsigned int f = e >= -14 ? (unsigned int)(e + 15) << 10 : (e >= -24 ? 1u << (e + 24) : 0u);
        f |= f << 16;
        const uint2 v = *reinterpret_cast<const uint2 *>(w + at);
        uint4 o;
        unsigned int *op = reinterpret_cast<unsigned int *>(&o);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const unsigned int word = p < 2 ? v.x : v.y;
            const unsigned int h2 = dsk_e4m3x2_to_f16x2((word >> (16 * (p & 1))) & 0xffffu);
            asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(op[p]) : "r"(h2), "r"(f));
        }
        *reinterpret_cast<uint4 *>(out + at) = o;
    }
}

// Rows of f32 (row stride ld_x) to dense f16 rows [rows, cols], rounded to nearest even (the
// activations of an f16 GEMM: 11 significant bits, as TF32 keeps). Four values a thread.
extern "C" __global__ void __launch_bounds__(256) dsk_rows_f32_to_f16(
    const float *__restrict__ x, long long ld_x, unsigned short *__restrict__ out, int rows, int cols) {
    dsk_pdl_entry();
    const int quads = cols >> 2;
    const long long len = (long long)rows * quads;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / quads;
        const int q = (int)(i % quads);
        const float4 v = *reinterpret_cast<const float4 *>(x + r * ld_x + 4 * q);
        uint2 o;
        o.x = dsk_f32x2_to_f16x2(v.x, v.y);
        o.y = dsk_f32x2_to_f16x2(v.z, v.w);
        *reinterpret_cast<uint2 *>(out + r * cols + 4 * q) = o;
    }
}
