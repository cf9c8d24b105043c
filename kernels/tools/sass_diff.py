#!/usr/bin/env python3
"""Whether a kernel compiles to the same SASS from two versions of its source, without a GPU
(sass_count.py's NVRTC build and cuobjdump; $ARCH, default sm_90a). Prints the resource usage
of each and the first differing lines; exit status 0 when identical. E.g. the 64-row tiled
indexer against the commit before its 16-row form:

  git show 19c0af5:kernels/attention.cu > /tmp/old/attention.cu; cp kernels/common.cuh /tmp/old/
  /work/pyenv/bin/python kernels/tools/sass_diff.py /tmp/old/attention.cu kernels/attention.cu \
      dsk_indexer_scores_tiled_f32
"""
import difflib
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_count  # noqa: E402


def sass(src, name):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(sass_count.cubin(src))
        f.flush()
        out = subprocess.run([sass_count.CUOBJDUMP, "-sass", "-fun", name, f.name],
                             capture_output=True, text=True, check=True).stdout
        res = subprocess.run([sass_count.CUOBJDUMP, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"Function %s:\s*\n\s*(.*)" % re.escape(name), res)
    return (m.group(1) if m else "?"), [i.group(1).strip() for i in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", out)]


def main():
    a, b, name = sys.argv[1:4]
    (ua, sa), (ub, sb) = sass(a, name), sass(b, name)
    print(f"{a}: {ua}, {len(sa)} instructions\n{b}: {ub}, {len(sb)} instructions")
    if sa == sb:
        print(f"{name}: identical SASS ({sass_count.ARCH})")
        return 0
    print(f"{name}: SASS differs ({sass_count.ARCH})")
    for line in list(difflib.unified_diff(sa, sb, lineterm="", n=1))[:40]:
        print(line)
    return 1


if __name__ == "__main__":
    sys.exit(main())
