// Collectives over peer memory: the two ranks of a tensor-parallel pair map a buffer of each
// other's GPU (NVLink P2P, in one process or through CUDA IPC), so a small all-reduce is one
// kernel of a few microseconds where NCCL's takes ~12 (a decode step runs two a layer).

// Blocks of every launch (DSK_PEER_BLOCKS in launch/collective.rs): fixed, so each block index
// takes part in every call and the ranks' per-block call counters stay equal.
#define DSK_PEER_BLOCKS 32

#ifndef DSK_EMU
__device__ __forceinline__ void dsk_st_release_sys(unsigned int *p, unsigned int v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned int dsk_ld_acquire_sys(const unsigned int *p) {
    unsigned int v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
#endif

// out = in (this rank's) + the peer's in, over n f32; both ranks get the same bits (a sum of two
// is commutative). `in` and `out` may be the same buffer.
//
// Each rank owns, in memory the peer maps, two receive halves of `cap` f32 and two rows of
// DSK_PEER_BLOCKS flags; `epochs` (DSK_PEER_BLOCKS counters, local) counts this rank's calls.
// Call e uses half and flag row e & 1: block b pushes its share of `in` into the peer's half,
// raises its flag there to e (release, system scope: the pushes are visible first), waits for
// the peer's block b to raise its flag here to e, and adds the peer's share from its own half.
//
// The index map (which block moves which values) depends on n alone (vec4: n % 4 == 0, the
// halves are 16-byte aligned), never on this rank's pointers, so the ranks agree on it even where
// one rank's `in` / `out` are 16-byte aligned (`aligned`: moved as float4) and the other's not.
//
// Why one barrier a call suffices: the peer writes half e & 1 again only at call e + 2, which
// needs this rank's flag of call e + 1, raised after this kernel (all of call e's reads) ended.
// A flag slot holds e - 2 or e when read, never e + 2, for the same reason.
extern "C" __global__ void __launch_bounds__(256) dsk_peer_all_reduce2_f32(
    const float *in, float *out, long long n, int vec4, int aligned, float *peer_recv,
    unsigned int *peer_flags, const float *own_recv, const unsigned int *own_flags,
    unsigned int *epochs, long long cap, int system_fence) {
    dsk_pdl_entry();
    // Every thread reads the block's count; thread 0 stores the new one after the barrier below,
    // once all have read it.
    const unsigned int epoch = epochs[blockIdx.x] + 1;
    const long long half = (epoch & 1) ? cap : 0;
    float *push = peer_recv + half;
    const float *pulled = own_recv + half;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // The same index map on both ranks: block b reads here what the peer's block b pushed.
    if (vec4) {
        const long long n4 = n >> 2;
        for (long long i = first; i < n4; i += stride)
            reinterpret_cast<float4 *>(push)[i] = aligned ? reinterpret_cast<const float4 *>(in)[i]
                                                          : make_float4(in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]);
    } else {
        for (long long i = first; i < n; i += stride)
            push[i] = in[i];
    }
    __syncthreads();
    const int slot = (int)(epoch & 1) * DSK_PEER_BLOCKS + blockIdx.x;
    if (threadIdx.x == 0) {
        epochs[blockIdx.x] = epoch;
        // The release below already orders the pushes the barrier put before it; the full fence
        // is the conservative form, kept switchable (DSPARK_PEER_FENCE) until timed.
        if (system_fence)
            __threadfence_system();
        dsk_st_release_sys(peer_flags + slot, epoch);
        while (dsk_ld_acquire_sys(own_flags + slot) != epoch) {
        }
    }
    __syncthreads();
    // The peer wrote the half through this GPU's L2; read it there, past any stale L1 line.
    if (vec4) {
        const long long n4 = n >> 2;
        for (long long i = first; i < n4; i += stride) {
            const float4 b = __ldcg(reinterpret_cast<const float4 *>(pulled) + i);
            if (aligned) {
                const float4 a = reinterpret_cast<const float4 *>(in)[i];
                reinterpret_cast<float4 *>(out)[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
            } else {
                const float a0 = in[4 * i], a1 = in[4 * i + 1], a2 = in[4 * i + 2], a3 = in[4 * i + 3];
                out[4 * i] = a0 + b.x;
                out[4 * i + 1] = a1 + b.y;
                out[4 * i + 2] = a2 + b.z;
                out[4 * i + 3] = a3 + b.w;
            }
        }
    } else {
        for (long long i = first; i < n; i += stride)
            out[i] = in[i] + __ldcg(pulled + i);
    }
}
