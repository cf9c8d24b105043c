// bf16 RMSNorm, rounding exactly where transformers' DeepseekV4RMSNorm does:
//   y = bf16( w * bf16( x * rsqrt(mean(x^2) + eps) ) ), statistics in f32.
// x [rows, D] with row stride ldx, out [rows, D] with row stride ldo, w [D]; D % 8 == 0 and
// 16-byte aligned rows. One block per row; 16-byte loads; the second pass re-reads x from L1/L2.

extern "C" __global__ void __launch_bounds__(256) dsk_rmsnorm_bf16(
    const unsigned short *__restrict__ x, const unsigned short *__restrict__ w,
    unsigned short *__restrict__ out, int D, long ldx, long ldo, float eps) {
    dsk_pdl_entry();
    __shared__ float red[8];
    const int row = blockIdx.x;
    const uint4 *xr = reinterpret_cast<const uint4 *>(x + row * ldx);
    const uint4 *wr = reinterpret_cast<const uint4 *>(w);
    uint4 *orow = reinterpret_cast<uint4 *>(out + row * ldo);
    const int V = D >> 3;
    float ss = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const uint4 q = __ldg(xr + v);
        const unsigned int ws[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float a = dsk_bf16lo(ws[j]), b = dsk_bf16hi(ws[j]);
            ss = fmaf(a, a, ss);
            ss = fmaf(b, b, ss);
        }
    }
    ss = dsk_warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
        v = dsk_warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float r = rsqrtf(red[0] / (float)D + eps);
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const uint4 q = __ldg(xr + v), g = __ldg(wr + v);
        const unsigned int xs[4] = {q.x, q.y, q.z, q.w}, gs[4] = {g.x, g.y, g.z, g.w};
        unsigned int o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float lo = dsk_bf16_to_f32(dsk_f32_to_bf16(dsk_bf16lo(xs[j]) * r)) * dsk_bf16lo(gs[j]);
            const float hi = dsk_bf16_to_f32(dsk_f32_to_bf16(dsk_bf16hi(xs[j]) * r)) * dsk_bf16hi(gs[j]);
            o[j] = (unsigned int)dsk_f32_to_bf16(lo) | ((unsigned int)dsk_f32_to_bf16(hi) << 16);
        }
        orow[v] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}
