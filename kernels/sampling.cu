// Greedy argmax and top-k over f32 logit rows, in two launches so one row fills the GPU:
//   dsk_topk_stage1: grid (chunks, B). Each block keeps the top k of its chunk of the row.
//   dsk_topk_stage2: grid (B). One block merges the chunks * k candidates of a row.
// Output per row: k values sorted descending and their vocab indices (argmax is k = 1).
// Order: larger value first; equal values -> smaller index first (torch.argmax's first
// occurrence). NaN logits are not supported (their order is unspecified).
// Selection is k rounds of a block-wide arg-max over values held in registers: simple and exact;
// fine for the k of sampling (<= 64), not meant for large k.

#define TOPK_THREADS 256

struct TopkCand { float v; int i; };

__device__ __forceinline__ bool topk_better(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

// Block-wide top-k over n <= TOPK_THREADS * EPT values (vals/idx read from global with `stride`),
// writing k (value, index) pairs to ov/oi. Padding sorts last: -inf with index INT_MAX.
template <int EPT>
__device__ void block_topk(const float *__restrict__ vals, const int *__restrict__ idx, int base_index,
                           int n, int k, float *__restrict__ ov, int *__restrict__ oi) {
    __shared__ TopkCand warp_best[TOPK_THREADS / 32];
    __shared__ TopkCand winner;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float v[EPT];
    int ix[EPT];
#pragma unroll
    for (int r = 0; r < EPT; ++r) {
        const int e = r * TOPK_THREADS + tid;
        if (e < n) {
            v[r] = vals[e];
            ix[r] = idx ? idx[e] : base_index + e;
        } else {
            v[r] = -__int_as_float(0x7f800000);
            ix[r] = 0x7fffffff;
        }
    }
    for (int round = 0; round < k; ++round) {
        float bv = -__int_as_float(0x7f800000);
        int bi = 0x7fffffff;
#pragma unroll
        for (int r = 0; r < EPT; ++r)
            if (topk_better(v[r], ix[r], bv, bi)) { bv = v[r]; bi = ix[r]; }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov2 = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi2 = __shfl_xor_sync(0xffffffffu, bi, o);
            if (topk_better(ov2, oi2, bv, bi)) { bv = ov2; bi = oi2; }
        }
        if (lane == 0) warp_best[warp] = TopkCand{bv, bi};
        __syncthreads();
        if (tid == 0) {
            TopkCand b = warp_best[0];
            for (int w = 1; w < TOPK_THREADS / 32; ++w)
                if (topk_better(warp_best[w].v, warp_best[w].i, b.v, b.i)) b = warp_best[w];
            winner = b;
            ov[round] = b.v;
            oi[round] = b.i;
        }
        __syncthreads();
        const TopkCand wn = winner;
        // Remove the winner (indices are unique, so exactly one slot matches unless it is padding).
#pragma unroll
        for (int r = 0; r < EPT; ++r)
            if (ix[r] == wn.i && v[r] == wn.v) { v[r] = -__int_as_float(0x7f800000); ix[r] = 0x7fffffff; }
        __syncthreads();
    }
}

// logits [B, V] with row stride ld; chunk_len <= 2048; cand_* [B, chunks, k].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) dsk_topk_stage1(
    const float *__restrict__ logits, int V, long ld, int chunk_len, int k,
    float *__restrict__ cand_v, int *__restrict__ cand_i) {
    dsk_pdl_entry();
    const int chunk = blockIdx.x, b = blockIdx.y, chunks = gridDim.x;
    const int start = chunk * chunk_len;
    const int n = min(chunk_len, V - start);
    const long o = ((long)b * chunks + chunk) * k;
    block_topk<8>(logits + b * ld + start, nullptr, start, n, k, cand_v + o, cand_i + o);
}

// n = chunks * k <= 4096 candidates per row.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) dsk_topk_stage2(
    const float *__restrict__ cand_v, const int *__restrict__ cand_i, int n, int k,
    float *__restrict__ out_v, int *__restrict__ out_i) {
    dsk_pdl_entry();
    const int b = blockIdx.x;
    block_topk<16>(cand_v + (long)b * n, cand_i + (long)b * n, 0, n, k, out_v + (long)b * k,
                   out_i + (long)b * k);
}
