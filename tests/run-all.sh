#!/usr/bin/env bash
# The whole dspark test suite: Rust unit/integration tests, the end-to-end suite against the real
# server binary with the official `openai` client, and the manifest checks (helm lint/template,
# kubernetes-validate, examples against the CRD). Installs its Python tools into a local venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
venv=${DSPARK_TEST_VENV:-$root/.venv}

step() { printf '\n==> %s\n' "$*"; }

step "python tools (venv: $venv)"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt
export PATH="$venv/bin:$PATH"

# One build for the binaries and the tests, with one feature set: a plain `cargo build --bins`
# resolves features without dev-dependencies and would compile much of the tree a second time.
step "cargo build (tests, and the binaries the end-to-end tests use)"
cargo build --workspace --bins --tests
export DSPARK_OPERATOR_BIN="$CARGO_TARGET_DIR/debug/dspark-operator"

step "cargo test"
cargo test --workspace --no-fail-fast

# No GPU is needed to compile the kernels: NVRTC from PyPI compiles every CUDA source for sm_90a
# and sm_121 (the test is a skip without the library; here it must run).
step "kernels: every CUDA source compiles with NVRTC (libnvrtc from PyPI, no GPU)"
"$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-nvrtc>=13,<14"
nvrtc_lib=$(python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" DSPARK_REQUIRE_NVRTC=1 \
  cargo test -p dspark-kernels --lib all_sources_compile_with_nvrtc

# The two-rank peer all-reduce is a protocol between GPUs; its CPU emulation runs the kernel source
# with both ranks' blocks as threads, skewed at random, and checks every sum bit for bit.
step "kernels: the peer all-reduce's protocol, emulated on the CPU"
g++ -std=c++20 -O2 -pthread -w -o "$CARGO_TARGET_DIR/peer_reduce_emu" kernels/tools/peer_reduce_emu.cpp
"$CARGO_TARGET_DIR/peer_reduce_emu" 1000

# The FP4 experts' CUDA-core kernels run as one of several forms per call (rows a warp, with or
# without the prefetch), all of which must give v1's bits: the emulation runs the kernel source
# (the tensor-core part cut off) over every form and checks them bit for bit (~1 minute).
step "kernels: the FP4 experts' CUDA-core forms, emulated on the CPU (bit-identical to v1)"
sed '/^\/\/ mma2: tensor-core kernels/,$d' kernels/fp4_moe.cu > "$CARGO_TARGET_DIR/fp4_moe_cc.cu"
g++ -std=c++20 -O2 -pthread -w -I kernels/tools -DFP4_SRC="\"$CARGO_TARGET_DIR/fp4_moe_cc.cu\"" \
  -o "$CARGO_TARGET_DIR/fp4_moe_emu" kernels/tools/fp4_moe_emu.cpp
"$CARGO_TARGET_DIR/fp4_moe_emu"

# A decode step's hyper-connection seam (one site's post and the next site's pre in one launch)
# and the Sinkhorn after it: the emulation runs the kernel source for one-block clusters and checks
# the new streams against the post kernel's bits, the comb against the host order's, the rest
# against f64 references (seconds).
step "kernels: the hyper-connection seam, emulated on the CPU"
g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -I kernels/tools \
  -o "$CARGO_TARGET_DIR/hc_pre_emu" kernels/tools/hc_pre_emu.cpp
"$CARGO_TARGET_DIR/hc_pre_emu" --seam

# The MoE router on one warp a token (DSPARK_ROUTE_KERNEL=warp): the emulation runs both router
# kernels from the source and checks the warp one against the block one and both against a port of
# the host's router, bit for bit, ties and NaN included (seconds).
step "kernels: the one-warp router, emulated on the CPU (bit-identical to the block router)"
g++ -std=c++20 -O2 -pthread -w -ffp-contract=off -I kernels/tools \
  -o "$CARGO_TARGET_DIR/route_emu" kernels/tools/route_emu.cpp
"$CARGO_TARGET_DIR/route_emu"

step "end-to-end + reliability: the real server with the official openai client"
DSPARK_SERVER_BIN="$CARGO_TARGET_DIR/debug/dspark-server" python -m pytest -q tests/e2e tests/reliability tests/tools

step "manifests: helm lint/template, kubernetes-validate, examples vs CRD"
bash tests/k8s/check-manifests.sh
