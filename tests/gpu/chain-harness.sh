#!/usr/bin/env bash
# The decode chain's kernel harnesses (kernels/tools/*_bench.cu: a chain of 43 launches in a CUDA
# graph with PDL, nothing in L2 when a launch starts), built with nvcc and run in one go:
#   tests/gpu/chain-harness.sh [MODE...]
# MODE: `stream` (what reading 2-32 MB costs a kernel, stream_bench.cu), or one of
# proj_chain_bench.cu's: `proj` (the FP8 GEMV and the f16 skinny GEMM against that floor), `plans`,
# `gemv`, `early`. Default: all of them (about a minute and a half on an H200, nvcc included).
# docs/PERFORMANCE.md (session 34) has what they showed.
set -eu
modes=("$@")
(( ${#modes[@]} )) || modes=(stream proj plans gemv early)
arch=${CUDA_ARCH:-sm_90a}
out=${TMPDIR:-/tmp}
for mode in "${modes[@]}"; do
  case $mode in
    stream)
      [[ -x $out/stream_bench ]] || nvcc -O3 -std=c++17 -arch="$arch" -o "$out/stream_bench" kernels/tools/stream_bench.cu
      echo "== stream"; "$out/stream_bench" ;;
    proj | plans | gemv | early)
      [[ -x $out/proj_chain_bench ]] || nvcc -O3 -std=c++17 -arch="$arch" -include kernels/common.cuh \
        -o "$out/proj_chain_bench" kernels/tools/proj_chain_bench.cu
      echo "== $mode"; if [[ $mode == proj ]]; then "$out/proj_chain_bench"; else "$out/proj_chain_bench" "$mode"; fi ;;
    *) echo "chain-harness.sh: unknown mode $mode (stream, proj, plans, gemv, early)" >&2; exit 2 ;;
  esac
done
