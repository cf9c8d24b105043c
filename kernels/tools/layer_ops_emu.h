// layer_ops.cu compiled for the CPU emulations (hc_pre_emu, hc_rows_emu, route_emu): emu.h plus
// what layer_ops.cu uses beyond it (named barriers, __syncwarp, warp shuffles of 32 and 64 bits,
// __ldcg, the block counter), then the kernel source itself.
#pragma once
#include "emu.h"

#undef __launch_bounds__
#define __launch_bounds__(...)
#define DSK_EMU
thread_local std::barrier<> *g_named[4];
inline void lo_bar_sync(int id, int) { g_named[id]->arrive_and_wait(); }
inline void lo_bar_arrive(int id, int) { (void)g_named[id]->arrive(); }
inline void __syncwarp() { g_warp_bar->arrive_and_wait(); }
template <class T> inline T emu_shfl(T v, unsigned src_lane) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    float f;
    memcpy(&f, &v, 4);
    g_shfl[threadIdx.x] = f;
    g_warp_bar->arrive_and_wait();
    float r = g_shfl[(threadIdx.x & ~31u) + (src_lane & 31u)];
    g_warp_bar->arrive_and_wait();
    T out;
    memcpy(&out, &r, 4);
    return out;
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, (unsigned)src); }
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl(v, (threadIdx.x & 31u) ^ (unsigned)o); }
// The routers' 64-bit key maximum: two 32-bit shuffles, as the hardware splits it.
inline unsigned long long __shfl_xor_sync(unsigned, unsigned long long v, int o) {
    const unsigned src = (threadIdx.x & 31u) ^ (unsigned)o;
    const unsigned lo = emu_shfl((unsigned)v, src), hi = emu_shfl((unsigned)(v >> 32), src);
    return (unsigned long long)hi << 32 | lo;
}
template <class T> inline T __ldcg(const T *p) { return *p; }
inline unsigned lo_count_block(unsigned *p) { return __atomic_fetch_add(p, 1u, __ATOMIC_ACQ_REL); }
inline void dsk_pdl_entry() {}  // launches run one after another here
template <class... A> inline void dsk_rope_pair_f32(A &&...) { abort(); }  // kernels not run here
#include "../layer_ops.cu"
