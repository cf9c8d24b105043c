#!/usr/bin/env bash
# A prompt long enough for GEMM steps (prefill chunks over 64 rows), served at TP=2 over NCCL on
# two GPUs: there the ranks split each chunk's rows (hyper-connections, the replicated
# projections, the router) and gather the projections' outputs on two streams, which the
# five-token prompt of cuda-checks.sh never reaches. With f32 GEMMs (DSPARK_GEMM_TF32=0) the
# greedy text must equal the CPU backend's and CUDA TP=1's, in one chunk and in chunks of 256
# tokens (each reading the KV the earlier ones wrote). Run from the repository root with
# DSPARK_SERVER_BIN set; cuda-checks.sh calls it on machines with two GPUs. Exit 1 on a mismatch.
set -uo pipefail
server=${DSPARK_SERVER_BIN:?set DSPARK_SERVER_BIN}
# shellcheck source=tests/gpu/serve-lib.sh
source "$(dirname "$0")/serve-lib.sh"
fail=0
export DSPARK_GEMM_TF32=0
prompt=$(python3 -c "print(' '.join(f'Item {i} weighs {i * 7 % 13} kg and costs {i * 11 % 17} euros.' for i in range(60)))")
step "server: a long prompt at TP=2 with f32 GEMMs: CPU, CUDA TP=1, CUDA TP=2 (one chunk, chunks of 256)"
serve 8121 cpu 1 && want=$(complete 8121 "$prompt"); stop 8121
serve 8122 cuda 1 && got1=$(complete 8122 "$prompt"); stop 8122
serve 8123 cuda 2 && got2=$(complete 8123 "$prompt"); stop 8123
serve 8124 cuda 2 --max-num-batched-tokens 256 && got3=$(complete 8124 "$prompt"); stop 8124
echo "cpu                   : $want"
echo "cuda tp1              : $got1"
echo "cuda tp2              : $got2"
echo "cuda tp2, 256 a chunk : $got3"
[[ -n "$want" && "$want" == "$got1" ]] || { echo "MISMATCH long prompt, cuda tp1"; fail=1; }
[[ "$want" == "$got2" ]] || { echo "MISMATCH long prompt, cuda tp2"; fail=1; }
[[ "$want" == "$got3" ]] || { echo "MISMATCH long prompt, cuda tp2 in chunks"; fail=1; }
exit $fail
