#!/usr/bin/env bash
# Ahead-of-time build of the kernels (used by the Docker image): one cubin per kernel source and
# target, named <name>.<arch>.<srchash>.cubin, where srchash is the first 16 hex digits of
# sha256(common.cuh ++ <name>.cu) -- the same hash the loader computes over its embedded sources,
# so a stale cubin is never loaded. Usage: kernels/build.sh OUT_DIR [ARCH...]
# (default archs: sm_90a sm_121). Point DSPARK_KERNEL_PREBUILT at OUT_DIR at run time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR [ARCH...]}"
shift
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(sm_90a sm_121)
mkdir -p "$out"
NVCC="${NVCC:-nvcc}"
for src in "$here"/*.cu; do
    name="$(basename "$src" .cu)"
    hash="$(cat "$here/common.cuh" "$src" | sha256sum | cut -c1-16)"
    for arch in "${archs[@]}"; do
        compute="compute_${arch#sm_}"
        "$NVCC" -cubin -O3 -std=c++17 -include "$here/common.cuh" \
            "-gencode=arch=${compute},code=${arch}" \
            -o "$out/${name}.${arch}.${hash}.cubin" "$src"
        echo "built $out/${name}.${arch}.${hash}.cubin"
    done
done
