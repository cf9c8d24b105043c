#!/usr/bin/env bash
# The kernel timeline of the bench's CUDA graphs, and what each kernel adds to a step's chain
# (kernels/tools/chain_trace.py), on machines without Nsight Systems. Builds the CUPTI
# injection library (kernels/tools/cupti_trace.cpp) and runs the bench under it:
#   tests/gpu/chain-trace.sh TRACE.csv [bench arguments...]
# Defaults: one TP=2 rank's shapes on one GPU, 43 layers, FP8 KV, batch 1 and 16 at 8K.
set -eu
trace=${1:?usage: chain-trace.sh TRACE.csv [bench arguments...]}
shift
bin=${DSPARK_SERVER_BIN:-target/release/dspark-server}
so=${CUPTI_TRACE_SO:-/tmp/cupti_trace.so}
if [[ ! -f $so ]]; then
  roots="/usr/local /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)"
  # find exits non-zero for a root that is missing; the first match is all we need
  header=$( (find $roots -name cupti.h -path '*include*' 2>/dev/null || true) | head -1)
  lib=$( (find $roots -name 'libcupti.so*' 2>/dev/null || true) | head -1)
  [[ -n $header && -n $lib ]] || { echo "chain-trace.sh: CUPTI (cupti.h, libcupti.so) not found" >&2; exit 2; }
  inc=$(dirname "$header")
  krec=$(grep -o 'CUpti_ActivityKernel[0-9]*;' "$inc/cupti_activity.h" | sort -V | tail -1 | tr -d ';')
  cuda_inc=$(dirname "$( (find /usr/local/cuda/include $roots -name cuda.h 2>/dev/null || true) | head -1)")
  g++ -O2 -shared -fPIC -I"$inc" -I"$cuda_inc" -DKREC="$krec" -o "$so" kernels/tools/cupti_trace.cpp \
    -L"$(dirname "$lib")" -l:"$(basename "$lib")" -Wl,-rpath,"$(dirname "$lib")"
fi
if (( $# == 0 )); then
  set -- --device cuda --world-size 1 --config-json server/tests/fixtures/v4-flash-tp2-rank-config.json \
    --kv-fill random --kv-cache-dtype fp8 --iters 10 --warmup 3 --cases decode:1:8192,decode:16:8192
fi
CUDA_INJECTION64_PATH=$so DSPARK_TRACE_OUT=$trace "$bin" bench "$@"
python3 kernels/tools/chain_trace.py "$trace"
