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
