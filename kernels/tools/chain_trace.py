#!/usr/bin/env python3
"""What each kernel adds to a graph replay's span, from tools/cupti_trace.cpp's CSV.

A decode step is a CUDA graph replayed once a step; under PDL a kernel's blocks start early and
wait, so its start says little, and CUPTI reports a graph's branches on streams of its own. So
the replay's span is swept in time: each moment goes to the kernel running then that finishes
first (under PDL the one the others wait on: a successor that started early ends later), and a
moment with no kernel running is idle. On the chain of launches that gives each kernel
end[i] - end[i-1]; a kernel on the second stream that finishes inside a longer one takes part of
that one's time, so read the totals with the listing. `ncu` cannot say this: it times kernels
one at a time.

usage: chain_trace.py TRACE.csv [--graph-min-kernels 50] [--last 5] [--sequence 90] [--top 40]
"""
import argparse
import collections
import csv
import heapq
import statistics
import sys


def load(path):
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                dict(
                    start=int(r["start_ns"]),
                    end=int(r["end_ns"]),
                    stream=int(r["stream"]),
                    corr=int(r["correlation"]),
                    graph=int(r["graph"]),
                    grid=(int(r["grid_x"]), int(r["grid_y"]), int(r["grid_z"])),
                    block=(int(r["block_x"]), int(r["block_y"])),
                    name=r["name"],
                )
            )
    return rows


def sweep(ks, per_name):
    """Gives each moment of a replay to the running kernel that ends first (per_name[name][1],
    in us); returns the ns with no kernel running."""
    order = sorted(ks, key=lambda k: k["start"])
    running, idle, i = [], 0, 0
    t = order[0]["start"]
    while i < len(order) or running:
        while i < len(order) and order[i]["start"] <= t:
            heapq.heappush(running, (order[i]["end"], i))
            i += 1
        while running and running[0][0] <= t:
            heapq.heappop(running)
        if not running:
            if i < len(order):
                idle += order[i]["start"] - t
                t = order[i]["start"]
            continue
        end, j = running[0]
        nxt = min(end, order[i]["start"]) if i < len(order) else end
        per_name[order[j]["name"]][1] += (nxt - t) / 1e3
        t = nxt
    return idle


def short(name):
    return name if len(name) <= 44 else name[:41] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--graph-min-kernels", type=int, default=50)
    ap.add_argument("--last", type=int, default=5, help="replays of each graph to average")
    ap.add_argument("--sequence", type=int, default=90, help="kernels of one replay to list")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    rows = load(args.trace)
    replays = collections.defaultdict(list)
    for r in rows:
        if r["graph"]:
            replays[(r["graph"], r["corr"])].append(r)
    by_graph = collections.defaultdict(list)
    for (graph, corr), ks in replays.items():
        if len(ks) >= args.graph_min_kernels:
            by_graph[graph].append((min(k["start"] for k in ks), ks))
    if not by_graph:
        sys.exit(f"no graph replay of {args.graph_min_kernels}+ kernels in {args.trace}")

    print(f"{len(rows)} kernel records, {len(by_graph)} graphs of {args.graph_min_kernels}+ kernels")
    for graph, reps in sorted(by_graph.items()):
        reps.sort(key=lambda t: t[0])
        chosen = [ks for _, ks in reps[-args.last :]]
        n = len(chosen)
        spans, idle = [], 0.0
        per_name = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for ks in chosen:
            t0 = min(k["start"] for k in ks)
            spans.append((max(k["end"] for k in ks) - t0) / 1e3)
            for k in ks:
                entry = per_name[k["name"]]
                entry[0] += 1
                entry[2] += (k["end"] - k["start"]) / 1e3
            idle += sweep(ks, per_name) / 1e3
        streams = len({k["stream"] for k in chosen[-1]})
        print(
            f"\n== graph {graph}: {len(reps)} replays, {len(chosen[-1])} kernels a replay on "
            f"{streams} streams; span {statistics.mean(spans):.1f} us (min {min(spans):.1f}) over "
            f"the last {n}, of it {idle / n:.1f} us with no kernel running"
        )
        print(f"{'kernel':44} {'a replay':>8} {'adds us':>9} {'us each':>8} {'runs us':>8} {'share':>6}")
        total = statistics.mean(spans)
        for name, (count, adds, runs) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(
                f"{short(name):44} {count / n:8.1f} {adds / n:9.1f} {adds / count:8.2f} "
                f"{runs / count:8.2f} {100 * adds / n / total:5.1f}%"
            )
        if args.sequence:
            ks = sorted(chosen[-1], key=lambda k: k["start"])
            t0 = ks[0]["start"]
            print(f"\nfirst {args.sequence} kernels of the last replay by start (us from its start)")
            print(f"{'kernel':44} {'start':>8} {'end':>8} {'grid':>14} {'block':>6}")
            for k in ks[: args.sequence]:
                g = "x".join(str(v) for v in k["grid"])
                print(
                    f"{short(k['name']):44} {(k['start'] - t0) / 1e3:8.2f} "
                    f"{(k['end'] - t0) / 1e3:8.2f} {g:>14} {k['block'][0]:6}"
                )


if __name__ == "__main__":
    main()
