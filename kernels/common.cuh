// Shared device helpers. Prepended to every kernel source (NVRTC) or force-included (nvcc -include),
// so the .cu files need no headers: no CUDA toolkit headers are required at run time.
// bf16 values travel as raw `unsigned short` bits; fp8/fp4/e8m0 as raw bytes.
#pragma once

#define DSK_WARP 32

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

// Two e4m3 bytes (low byte = lower address) to f32, exactly, with the sm_89+ converter.
__device__ __forceinline__ void dsk_e4m3x2_to_f32(unsigned int two_bytes, float &lo, float &hi) {
    unsigned int h2;
    asm("{\n\t.reg .b16 p;\n\tcvt.u16.u32 p, %1;\n\tcvt.rn.f16x2.e4m3x2 %0, p;\n\t}" : "=r"(h2) : "r"(two_bytes));
    dsk_f16x2_to_f32(h2, lo, hi);
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

__device__ __forceinline__ float dsk_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
