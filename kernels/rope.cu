// Interleaved RoPE (DeepSeek-V4) on the trailing `rope_dim` channels of each head, in place, bf16.
// Pair i = channels (2i, 2i+1) of the rope slice rotates by angle pos * inv_freq[i]:
//   y0 = x0 * c - x1 * s,  y1 = x1 * c + x0 * s,
// with c, s = bf16(cos * mscale), bf16(sin * mscale) (transformers casts cos/sin to the activation
// dtype before rotating; the angle is an f32 product, as there). `inverse` rotates by -angle.
// x: [T, H, D] with token stride ld_token and head stride ld_head (elements); positions [T] i32;
// inv_freq [rope_dim / 2] f32. rope_dim % 8 == 0 and 16-byte aligned slices: one thread rotates
// 4 pairs with one 16-byte load and store.

extern "C" __global__ void __launch_bounds__(256) dsk_rope_interleaved_bf16(
    unsigned short *__restrict__ x, const int *__restrict__ positions,
    const float *__restrict__ inv_freq, int T, int H, int D, int rope_dim, long ld_token,
    long ld_head, float mscale, int inverse) {
    dsk_pdl_entry();
    const int groups = rope_dim >> 3;
    const long g = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= (long)T * H * groups) return;
    const int q = (int)(g % groups);
    const long th = g / groups;
    const int hd = (int)(th % H), t = (int)(th / H);
    uint4 *p = reinterpret_cast<uint4 *>(x + t * ld_token + hd * ld_head + (D - rope_dim) + q * 8);
    uint4 v = *p;
    unsigned int ws[4] = {v.x, v.y, v.z, v.w};
    const float pos = (float)positions[t];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float ang = __fmul_rn(pos, inv_freq[q * 4 + j]);
        float s, c;
        sincosf(ang, &s, &c);
        c = dsk_bf16_to_f32(dsk_f32_to_bf16(c * mscale));
        s = dsk_bf16_to_f32(dsk_f32_to_bf16(s * mscale));
        if (inverse) s = -s;
        const float x0 = dsk_bf16lo(ws[j]), x1 = dsk_bf16hi(ws[j]);
        const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        const float y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
        ws[j] = (unsigned int)dsk_f32_to_bf16(y0) | ((unsigned int)dsk_f32_to_bf16(y1) << 16);
    }
    *p = make_uint4(ws[0], ws[1], ws[2], ws[3]);
}
