#!/usr/bin/env python3
"""SASS instruction counts of kernels as the loader builds them, without a GPU.

Compiles kernels/<name>.cu (common.cuh prepended, the loader's NVRTC options) to a cubin with
libnvrtc, disassembles it with cuobjdump, and prints per kernel: registers, spills, the static
instruction count and an opcode histogram of the largest loop (the body between the longest
backward branch and its target: the streaming loop of the FP4/FP8 kernels).

  /work/pyenv/bin/python kernels/tools/sass_count.py kernels/fp4_moe.cu \
      dsk_fp4_moe_gate_up dsk_fp4_moe_gate_up_v2 dsk_fp4_moe_down dsk_fp4_moe_down_v2

NVRTC: $NVRTC_LIB (default: the venv's nvidia/cu13 libnvrtc.so.13); cuobjdump: $CUOBJDUMP
(default: the one triton ships). Arch: $ARCH (default sm_90a).
"""
import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

SITE = "/work/pyenv/lib/python3.11/site-packages"
NVRTC = os.environ.get("NVRTC_LIB", f"{SITE}/nvidia/cu13/lib/libnvrtc.so.13")
CUOBJDUMP = os.environ.get("CUOBJDUMP", f"{SITE}/triton/backends/nvidia/bin/cuobjdump")
ARCH = os.environ.get("ARCH", "sm_90a")


def cubin(src_path):
    root = os.path.dirname(os.path.abspath(src_path))
    src = open(os.path.join(root, "common.cuh")).read() + "\n" + open(src_path).read()
    lib = ctypes.CDLL(NVRTC)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={ARCH}".encode(), b"-std=c++17"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    if rc != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def main():
    src, wanted = sys.argv[1], set(sys.argv[2:])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin(src))
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", res))
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n")[0].strip()
        if wanted and name not in wanted:
            continue
        ins = []
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", block):
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            ins.append((int(m.group(1), 16), body.split()[0] if body else "", body))
        loops = []
        for addr, op, body in ins:
            t = re.search(r"0x([0-9a-f]+)", body) if op.startswith("BRA") else None
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
        print(f"{name}: {usage.get(name, '?')}, {len(ins)} instructions")
        if loops:
            lo, hi = max(loops, key=lambda l: l[1] - l[0])
            ops = [op.split(".")[0] for a, op, _ in ins if lo <= a <= hi]
            hist = collections.Counter(ops)
            print(f"  largest loop: {len(ops)} instructions; LDG {hist.get('LDG', 0)}")
            print("   ", ", ".join(f"{k} {v}" for k, v in hist.most_common()))


if __name__ == "__main__":
    main()
