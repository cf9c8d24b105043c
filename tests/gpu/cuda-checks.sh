#!/usr/bin/env bash
# GPU checks of the CUDA backend (not part of CI: CI has no GPU). Run on a machine with one or
# two NVIDIA GPUs from the repository root, after building:
#   cargo build -p dspark-server --bins
#   cargo test -p dspark-server --test model_cuda --test backend_kv_cuda --no-run
#   DSPARK_SERVER_BIN=target/debug/dspark-server DSPARK_MODEL_CUDA_BIN=target/debug/deps/model_cuda-<hash> \
#     DSPARK_BACKEND_KV_CUDA_BIN=target/debug/deps/backend_kv_cuda-<hash> \
#     DSPARK_LAYER_STACK_CUDA_BIN=target/debug/deps/layer_stack_cuda-<hash> \
#     DSPARK_RANKS_NCCL_BIN=target/debug/deps/ranks_nccl-<hash> \
#     DSPARK_KERNEL_TEST_BINS="target/debug/deps/layer_ops_gpu-<hash> ..." tests/gpu/cuda-checks.sh
# 1. the engine fixture tests on the CUDA backend (transformers references, CUDA vs CPU, TP=2 in
#    one process) and the KV pool kernels against the CPU backend; 2. compute-sanitizer memcheck
#    over the fixture runs and the KV kernel checks (if installed);
# 3. the server on --device cuda at TP=1 (also with the pool sized from --gpu-memory-utilization)
#    and, with two GPUs, TP=2 over NCCL (and with DSpark): greedy completions must equal the CPU
#    backend's; with --kv-cache-dtype fp8 on both, CUDA (TP=1, TP=2, and TP=2 with the indexer's
#    rows split between the ranks at every context) must equal the CPU too; a 780-token prompt
#    at TP=2 (split prefill steps) with f32 GEMMs must equal the CPU and TP=1 (long-prompt-tp2.sh);
# 4. a minute of mixed load on CUDA with a pool that preempts (tests/gpu/mixed-load.py).
set -uo pipefail
server=${DSPARK_SERVER_BIN:?set DSPARK_SERVER_BIN}
tests=${DSPARK_MODEL_CUDA_BIN:?set DSPARK_MODEL_CUDA_BIN}
fail=0
# shellcheck source=tests/gpu/serve-lib.sh
source "$(dirname "$0")/serve-lib.sh"

kv_tests=${DSPARK_BACKEND_KV_CUDA_BIN:-}
stack_tests=${DSPARK_LAYER_STACK_CUDA_BIN:-}
# Optional: the kernels crate's GPU test binaries (layer_ops_gpu, paged_gpu, fp8_grouped_gpu, moe_sorted_gpu,
# fp4_grouped_gpu, dense_gemv_gpu, gpu_smoke, attention_heads_gpu, kv_record_gpu, indexer_mma_gpu),
# space-separated; the grouped FP4 experts' and the indexer's also run under memcheck.
kernel_tests=${DSPARK_KERNEL_TEST_BINS:-}

for k in $kernel_tests; do
  step "kernel test $(basename "$k")"
  "$k" --test-threads 1 || fail=1
done

step "model_cuda fixture tests"
DSPARK_TEST_CUDA=1 "$tests" --test-threads 1 --nocapture || fail=1
if [[ -n "$kv_tests" ]]; then
  step "backend_kv_cuda: KV pool kernels against the CPU backend"
  DSPARK_TEST_CUDA=1 "$kv_tests" --test-threads 1 --nocapture || fail=1
fi
if [[ -n "$stack_tests" ]]; then
  step "layer_stack_cuda: the device layer stack against the op-by-op forward (TP=1, TP=2)"
  DSPARK_TEST_CUDA=1 "$stack_tests" --test-threads 1 --nocapture || fail=1
fi
# Optional: the ranks_nccl test binary (two processes over NCCL, and the peer all-reduce between
# them over CUDA IPC); needs two GPUs.
if [[ -n "${DSPARK_RANKS_NCCL_BIN:-}" ]] && (( $(nvidia-smi -L 2>/dev/null | wc -l) >= 2 )); then
  step "ranks_nccl: NCCL and the peer all-reduce between two processes"
  DSPARK_TEST_NCCL=1 "$DSPARK_RANKS_NCCL_BIN" --test-threads 1 --nocapture || fail=1
fi

if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck (fixture runs on CUDA, KV pool kernels)"
  DSPARK_TEST_CUDA=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$tests" --test-threads 1 2>&1 | tail -5
  [[ ${PIPESTATUS[0]} == 0 ]] || fail=1
  if [[ -n "$kv_tests" ]]; then
    DSPARK_TEST_CUDA=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$kv_tests" --test-threads 1 2>&1 | tail -3
    [[ ${PIPESTATUS[0]} == 0 ]] || fail=1
  fi
  for k in $kernel_tests; do
    case "$(basename "$k")" in
      fp4_grouped_gpu* | indexer_mma_gpu*)
        compute-sanitizer --tool memcheck --error-exitcode 9 "$k" --test-threads 1 2>&1 | tail -3
        [[ ${PIPESTATUS[0]} == 0 ]] || fail=1 ;;
    esac
  done
  if [[ -n "$stack_tests" ]]; then
    # The in-process tests only: under memcheck NCCL's own peer-memory setup is reported (102
    # records on two H200s, none in our kernels: the same binary's in-process tests are clean).
    DSPARK_TEST_CUDA=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$stack_tests" --test-threads 1 --skip over_nccl 2>&1 | tail -3
    [[ ${PIPESTATUS[0]} == 0 ]] || fail=1
  fi
else
  step "compute-sanitizer not installed: memcheck skipped"
fi

step "server: CPU reference, CUDA TP=1"
serve 8101 cpu 1 && want=$(complete 8101); stop 8101
serve 8102 cuda 1 && got=$(complete 8102); stop 8102
echo "cpu : $want"; echo "cuda: $got"
[[ -n "$want" && "$want" == "$got" ]] || { echo "MISMATCH cuda tp1"; fail=1; }
grep -m1 "CUDA backend ready" /tmp/dspark-8102.log

step "server: CUDA TP=1 without --kv-pool-tokens (pool from --gpu-memory-utilization)"
"$server" serve --device cuda --port 8105 --control-port 8205 > /tmp/dspark-8105.log 2>&1 &
echo $! > /tmp/dspark-8105.pid
for _ in $(seq 1 240); do curl -sf http://127.0.0.1:8105/ready >/dev/null && break; sleep 0.5; done
got_mem=$(complete 8105); stop 8105
grep -m1 "sized from --gpu-memory-utilization" /tmp/dspark-8105.log
[[ "$want" == "$got_mem" ]] || { echo "MISMATCH cuda pool from memory"; fail=1; }

gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if (( gpus >= 2 )); then
  step "server: CUDA TP=2 over NCCL"
  serve 8103 cuda 2 && got2=$(complete 8103); stop 8103
  echo "cuda tp2: $got2"
  grep -m2 "NCCL communicator ready" /tmp/dspark-8103.log
  [[ "$want" == "$got2" ]] || { echo "MISMATCH cuda tp2"; fail=1; }
  step "server: CUDA TP=2 with DSpark speculative decoding"
  serve 8104 cuda 2 --speculative-method dspark && got3=$(complete 8104); stop 8104
  echo "cuda tp2 dspark: $got3"
  [[ "$want" == "$got3" ]] || { echo "MISMATCH cuda tp2 dspark"; fail=1; }
  # A prompt long enough for the split prefill steps, which the five-token one never reaches.
  bash "$(dirname "$0")/long-prompt-tp2.sh" || fail=1
  # The opt-in peer all-reduce: the local launcher's two processes map each other's region over
  # CUDA IPC, and the text must not change (the sums are NCCL's bits).
  step "server: CUDA TP=2, decode all-reduces over peer memory (DSPARK_CUSTOM_ALL_REDUCE=1)"
  (export DSPARK_CUSTOM_ALL_REDUCE=1; serve 8112 cuda 2) && got4=$(complete 8112); stop 8112
  echo "cuda tp2 peer all-reduce: $got4"
  grep -m2 "NCCL communicator ready" /tmp/dspark-8112.log
  grep -q "CUDA IPC" /tmp/dspark-8112.log || { echo "the ranks did not map each other's memory"; fail=1; }
  [[ "$want" == "$got4" ]] || { echo "MISMATCH cuda tp2 peer all-reduce"; fail=1; }
else
  step "one GPU: TP=2 over NCCL skipped"
fi

step "server: FP8 KV records (--kv-cache-dtype fp8): CPU, CUDA TP=1$( (( gpus >= 2 )) && echo ', TP=2')"
serve 8106 cpu 1 --kv-cache-dtype fp8 && want8=$(complete 8106); stop 8106
serve 8107 cuda 1 --kv-cache-dtype fp8 && got8=$(complete 8107); stop 8107
echo "cpu fp8 : $want8"; echo "cuda fp8: $got8"
[[ -n "$want8" && "$want8" == "$got8" ]] || { echo "MISMATCH cuda fp8 kv"; fail=1; }
if (( gpus >= 2 )); then
  serve 8108 cuda 2 --kv-cache-dtype fp8 && got8b=$(complete 8108); stop 8108
  echo "cuda tp2 fp8: $got8b"
  [[ "$want8" == "$got8b" ]] || { echo "MISMATCH cuda tp2 fp8 kv"; fail=1; }
  # The ranks split the indexer's rows only past 32K context by default: forced at every context
  # here, each rank scores its share, and the gathered candidates must select what TP=1 selects.
  (export DSPARK_INDEXER_SPLIT_ROWS=0; serve 8111 cuda 2 --kv-cache-dtype fp8) && got8c=$(complete 8111); stop 8111
  echo "cuda tp2 fp8, indexer rows split: $got8c"
  [[ "$want8" == "$got8c" ]] || { echo "MISMATCH cuda tp2 fp8 kv, indexer rows split"; fail=1; }
fi
step "server: a minute of mixed load (long shared-prefix prompts, preemption, abandoned streams)"
# f32 GEMMs: a greedy output must then not depend on the batch it ran in (tests/gpu/mixed-load.py).
DSPARK_GEMM_TF32=0 "$server" serve --device cuda --kv-cache-dtype fp8 --max-model-len 16384 \
  --max-num-seqs 16 --max-num-batched-tokens 4096 --kv-pool-tokens 24576 --port 8109 \
  --control-port 8209 > /tmp/dspark-8109.log 2>&1 &
echo $! > /tmp/dspark-8109.pid
for _ in $(seq 1 240); do curl -sf http://127.0.0.1:8109/ready >/dev/null && break; sleep 0.5; done
python3 "$(dirname "$0")/mixed-load.py" --base-url http://127.0.0.1:8109 --model tiny-dsv4 \
  --minutes 1 --clients 16 --replays 10 --strict || fail=1
curl -s http://127.0.0.1:8109/metrics | grep -E "^vllm:num_preemptions_total"
stop 8109

step "result: $([[ $fail == 0 ]] && echo PASS || echo FAIL)"
exit $fail
