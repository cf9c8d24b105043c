#!/usr/bin/env python3
"""Registers, stack and spills of every kernel of a kernels/*.cu source, without a GPU.

Compiles the source as the loader does (common.cuh prepended, `loader::nvrtc_options`:
--gpu-architecture=ARCH -std=c++17) with NVRTC and ptxas's verbose report, and prints one line a
kernel. A kernel that needs more registers than its launch counts on loses blocks an SM, and one
capped by __launch_bounds__ may spill: session 34 found both in one-token GEMV forms this way
(docs/PERFORMANCE.md). NVRTC needs no driver: on a machine without CUDA,
    pip download --no-deps --only-binary=:all: nvidia-cuda-nvrtc -d /tmp/nvrtc
    (cd /tmp/nvrtc && unzip -q -o '*.whl')
and point NVRTC_LIB at /tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13 (or let the script find it there,
in site-packages or on the loader path).

    kernels/tools/nvrtc_regs.py kernels/fp8_gemv.cu [--arch sm_90a] [--match SUBSTRING]
"""
import argparse
import ctypes
import glob
import os
import re
import site
import sys


def load_nvrtc():
    candidates = [os.environ.get("NVRTC_LIB", "")]
    candidates += glob.glob("/tmp/nvrtc/nvidia/cu*/lib/libnvrtc.so*")
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        candidates += glob.glob(os.path.join(d, "nvidia", "cu*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(d, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    candidates += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for c in candidates:
        if not c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    sys.exit("libnvrtc not found: set NVRTC_LIB (see this script's header)")


def compile_report(lib, source, arch):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    if status:
        sys.exit(f"compilation failed:\n{text}")
    return text


def parse(log):
    """(kernel, registers, stack, spill stores, spill loads) in the log's order."""
    rows, current, frame = [], None, (0, 0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current, frame = m.group(1), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            frame = tuple(int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            rows.append((current, int(m.group(1))) + frame)
            current = None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a kernels/*.cu file")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--match", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    common = os.path.join(os.path.dirname(os.path.abspath(args.source)), "common.cuh")
    with open(common) as c, open(args.source) as s:
        source = c.read() + "\n" + s.read()
    rows = parse(compile_report(load_nvrtc(), source, args.arch))
    print(f"{'kernel':48} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9}")
    for name, regs, stack, st, ld in rows:
        if args.match in name:
            flag = "  <- spills" if st or ld else ""
            print(f"{name:48} {regs:5} {stack:6} {st:9} {ld:9}{flag}")


if __name__ == "__main__":
    main()
