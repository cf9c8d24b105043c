// Elementwise steps that keep a chain of GPU operations on the device.

// out[i] = silu(min(gate[i], limit)) * clamp(up[i], -limit, limit): the clipped SwiGLU of
// DeepSeek-V4's experts, in f32 as the CPU reference computes it (silu(x) = x / (1 + e^-x)).
extern "C" __global__ void __launch_bounds__(256) dsk_swiglu_clip_f32(
    const float *__restrict__ gate, const float *__restrict__ up, float *__restrict__ out,
    long long len, float limit) {
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
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < len;
         i += (long long)gridDim.x * blockDim.x)
        acc[i] += x[i];
}
