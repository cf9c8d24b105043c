# syntax=docker/dockerfile:1.7
# dspark image: dspark-server + dspark-operator + the tiny demo model.
#   docker build -t ghcr.io/dspark-dev/dspark:0.1.0 .
# The tag matches the Helm chart's appVersion, which is the chart's default image tag.

# ---- build ---------------------------------------------------------------------------------
# Debian bookworm (glibc 2.36): the binaries also run on the newer glibc of the runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependency layer first, so source edits do not rebuild every crate.
COPY Cargo.toml Cargo.lock ./
COPY operator/Cargo.toml operator/Cargo.toml
COPY server/Cargo.toml server/Cargo.toml
COPY server/bench/Cargo.toml server/bench/Cargo.toml
COPY kernels/Cargo.toml kernels/Cargo.toml
RUN for d in operator server server/bench kernels; do \
      mkdir -p $d/src && echo 'fn main() {}' > $d/src/main.rs && touch $d/src/lib.rs; \
    done && \
    cargo fetch --locked
COPY . .
# cudarc loads libcuda / NVRTC / cuBLAS(Lt) / NCCL with dlopen at run time (feature
# dynamic-loading), so no CUDA toolkit is needed to build.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dspark-server -p dspark-operator && \
    mkdir -p /out && \
    cp target/release/dspark-server target/release/dspark-operator /out/

# ---- kernels -------------------------------------------------------------------------------
# Ahead-of-time cubins for H100/H200 (sm_90a) and GB10 / DGX Spark (sm_121). The server loads
# them from DSPARK_KERNEL_PREBUILT; on any other GPU it compiles with NVRTC at start-up and
# caches the result (docs/KERNELS.md).
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS kernels
COPY kernels /src/kernels
RUN /src/kernels/build.sh /out/kernels sm_90a sm_121

# ---- runtime -------------------------------------------------------------------------------
# The CUDA runtime image carries what the CUDA backend dlopens: NVRTC, cuBLAS, cuBLASLt and
# NCCL (libcuda itself comes from the node's driver through the NVIDIA container toolkit).
# On CPU-only clusters (tiny-cpu example) the same image runs with --device cpu.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG UID=10001
RUN apt-get update && \
    apt-get install -y --no-install-recommends ca-certificates tini && \
    rm -rf /var/lib/apt/lists/* && \
    groupadd --system --gid ${UID} dspark && \
    useradd --system --uid ${UID} --gid ${UID} --home-dir /tmp --shell /usr/sbin/nologin dspark
COPY --from=build /out/dspark-server /out/dspark-operator /usr/local/bin/
COPY server/assets/tiny-dsv4 /opt/dspark/models/tiny-dsv4
COPY --from=kernels /out/kernels /opt/dspark/kernels
# Pods run with a read-only root filesystem; /tmp is an emptyDir there (kernel cache, scratch).
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    DSPARK_KERNEL_PREBUILT=/opt/dspark/kernels \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER ${UID}:${UID}
EXPOSE 8000 29500 8080
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dspark-server", "serve", "--help"]
