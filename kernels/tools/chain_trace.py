#!/usr/bin/env python3
"""What each kernel adds to a graph replay's chain, from tools/cupti_trace.cpp's CSV.

A decode step is a CUDA graph replayed once a step. Its main stream's kernels run one after
another (under PDL a kernel's blocks start early and wait), so the step's time is the sum, over
the main stream's kernels in order, of how far each moved the chain's end: end[i] - end[i-1].
That sum, grouped by kernel name, says where a step's time goes as the GPU ran it, waits on
the side stream included (they land on the kernel that waited). `ncu` cannot say this: it times
kernels one at a time.

usage: chain_trace.py TRACE.csv [--graph-min-kernels 50] [--last 5] [--sequence 90]
"""
import argparse
import collections
import csv
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
        streams = collections.Counter(k["stream"] for k in chosen[-1])
        main_stream = streams.most_common(1)[0][0]
        spans, per_name = [], collections.defaultdict(lambda: [0, 0.0, 0.0])
        side_busy = []
        for ks in chosen:
            t0 = min(k["start"] for k in ks)
            spans.append((max(k["end"] for k in ks) - t0) / 1e3)
            chain = sorted((k for k in ks if k["stream"] == main_stream), key=lambda k: k["start"])
            prev_end = t0
            for k in chain:
                entry = per_name[k["name"]]
                entry[0] += 1
                entry[1] += (k["end"] - prev_end) / 1e3
                entry[2] += (k["end"] - k["start"]) / 1e3
                prev_end = max(prev_end, k["end"])
            side_busy.append(sum(k["end"] - k["start"] for k in ks if k["stream"] != main_stream) / 1e3)
        n = len(chosen)
        print(
            f"\n== graph {graph}: {len(reps)} replays, {len(chosen[-1])} kernels a replay "
            f"({streams[main_stream]} on the main stream, {len(streams)} streams); "
            f"replay span {statistics.mean(spans):.1f} us (min {min(spans):.1f}) over the last {n}; "
            f"side streams busy {statistics.mean(side_busy):.1f} us a replay"
        )
        print(f"{'kernel (main stream)':44} {'a replay':>8} {'chain us':>9} {'us each':>8} {'own us':>8} {'share':>6}")
        total = sum(v[1] for v in per_name.values()) / n
        for name, (count, chain_us, own_us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
            print(
                f"{short(name):44} {count / n:8.1f} {chain_us / n:9.1f} {chain_us / count:8.2f} "
                f"{own_us / count:8.2f} {100 * chain_us / n / total:5.1f}%"
            )
        print(f"{'main stream total':44} {'':8} {total:9.1f}")
        side = collections.defaultdict(lambda: [0, 0.0])
        for ks in chosen:
            for k in ks:
                if k["stream"] != main_stream:
                    side[k["name"]][0] += 1
                    side[k["name"]][1] += (k["end"] - k["start"]) / 1e3
        if side:
            print(f"{'kernel (other streams)':44} {'a replay':>8} {'own us':>9}")
            for name, (count, own_us) in sorted(side.items(), key=lambda kv: -kv[1][1])[:15]:
                print(f"{short(name):44} {count / n:8.1f} {own_us / n:9.1f}")
        if args.sequence:
            ks = sorted(chosen[-1], key=lambda k: k["start"])
            t0 = ks[0]["start"]
            prev_end = t0
            print(f"\nfirst {args.sequence} kernels of the last replay (us from its start; 'adds' on the main stream)")
            print(f"{'kernel':44} {'start':>8} {'end':>8} {'adds':>6} {'grid':>14} {'block':>6} s")
            for k in ks[: args.sequence]:
                on_main = k["stream"] == main_stream
                adds = (k["end"] - prev_end) / 1e3 if on_main else float("nan")
                if on_main:
                    prev_end = max(prev_end, k["end"])
                g = "x".join(str(v) for v in k["grid"])
                print(
                    f"{short(k['name']):44} {(k['start'] - t0) / 1e3:8.2f} {(k['end'] - t0) / 1e3:8.2f} "
                    f"{adds:6.2f} {g:>14} {k['block'][0]:6} {'m' if on_main else 's'}"
                )


if __name__ == "__main__":
    main()
