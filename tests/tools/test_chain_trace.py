"""kernels/tools/chain_trace.py's sweep: each moment of a graph replay goes to the running
kernel that finishes first, moments with none running are idle, and the totals add up to the
replay's span (the attribution docs/PERFORMANCE.md's kernel timelines rest on)."""
import collections
import importlib.util
import pathlib
import subprocess
import sys

TOOL = pathlib.Path(__file__).resolve().parents[2] / "kernels" / "tools" / "chain_trace.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("chain_trace", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel(name, start, end, stream=1):
    return dict(start=start, end=end, stream=stream, corr=1, graph=7, grid=(1, 1, 1), block=(32, 1), name=name)


# A chain A -> B -> C -> D under PDL (each successor starts before its predecessor ends), a side
# kernel S that finishes inside A, and a gap with nothing running before C.
REPLAY = [
    kernel("A", 0, 10),
    kernel("B", 2, 15),
    kernel("S", 3, 8, stream=2),
    kernel("C", 17, 20),
    kernel("D", 18, 25),
]


def test_sweep_gives_each_moment_to_the_kernel_that_finishes_first():
    tool = load_tool()
    per_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
    idle = tool.sweep(REPLAY, per_name)
    adds = {name: v[1] * 1e3 for name, v in per_name.items()}  # us -> ns
    assert adds == {"A": 5.0, "S": 5.0, "B": 5.0, "C": 3.0, "D": 5.0}
    assert idle == 2
    assert sum(adds.values()) + idle == 25


def test_report_over_a_trace_file(tmp_path):
    trace = tmp_path / "k.csv"
    lines = ["start_ns,end_ns,stream,correlation,graph,grid_x,grid_y,grid_z,block_x,block_y,name"]
    for replay in range(3):
        t0 = replay * 1000
        for k in REPLAY:
            lines.append(f"{t0 + k['start']},{t0 + k['end']},{k['stream']},{replay + 1},7,1,1,1,32,1,{k['name']}")
    # A kernel outside any graph (the host's own launches) is left out.
    lines.append("5000,5010,1,99,0,1,1,1,32,1,eager")
    trace.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [sys.executable, str(TOOL), str(trace), "--graph-min-kernels", "5", "--sequence", "5"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "graph 7: 3 replays, 5 kernels a replay on 2 streams" in out
    assert "span 0.0 us" in out  # 25 ns a replay
    assert "eager" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1] in "ABCDS" and len(line.split()) == 6}
    assert set(rows) == {"A", "B", "C", "D", "S"}
    assert all(r[1] == "1.0" for r in rows.values())
