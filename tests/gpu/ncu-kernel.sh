#!/usr/bin/env bash
# Nsight Compute on a few launches of one kernel inside the bench's decode graphs: where its time
# goes (speed of light, occupancy, issue slots, warp stalls, memory), for a kernel the timeline
# (chain-trace.sh) names as large. On Firecracker machines only (KINDS.md: gVisor has no counters);
# the clocks are left alone (METHOD.md).
#   tests/gpu/ncu-kernel.sh REGEX OUT_PREFIX [bench arguments...]
# REGEX matches kernel names (e.g. 'dsk_fp4_moe_gate_up_mma2'); ncu skips the first LAUNCH_SKIP
# matches (default 200: past the warm-up's captures) and profiles LAUNCH_COUNT (default 3).
# Writes OUT_PREFIX.ncu-rep and prints the details page. Defaults: one TP=2 rank's shapes on one
# GPU, 43 layers, FP8 KV, batch 16 at 8K, two timed steps (each profiled launch replays the
# kernel once a metric pass, so keep the bench short). A kernel launched fewer times than
# LAUNCH_SKIP in the run (43 a step: the experts') needs a smaller LAUNCH_SKIP.
# NCU_SET=full collects every section with PC sampling (warp stall reasons by instruction) and
# also writes OUT_PREFIX.source.csv, the SASS with its stall samples.
set -eu
usage="usage: ncu-kernel.sh REGEX OUT_PREFIX [bench arguments...]"
regex=${1:?$usage}
out=${2:?$usage}
shift 2
bin=${DSPARK_SERVER_BIN:-target/release/dspark-server}
skip=${LAUNCH_SKIP:-200}
if (( $# == 0 )); then
  set -- --device cuda --world-size 1 --config-json server/tests/fixtures/v4-flash-tp2-rank-config.json \
    --kv-fill random --kv-cache-dtype fp8 --iters 2 --warmup 1 --cases decode:16:8192
fi
if [[ ${NCU_SET:-} == full ]]; then
  sections=(--set full)
else
  sections=(--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats
    --section WarpStateStats --section MemoryWorkloadAnalysis)
fi
ncu --clock-control none --graph-profiling node --kernel-name "regex:$regex" \
  --launch-skip "$skip" --launch-count "${LAUNCH_COUNT:-3}" "${sections[@]}" \
  -f -o "$out" "$bin" bench "$@" > "$out.bench.log" 2>&1 || { tail -20 "$out.bench.log"; exit 1; }
[[ -f $out.ncu-rep ]] || { echo "ncu-kernel.sh: no launch of '$regex' past the first $skip" >&2; exit 1; }
ncu --import "$out.ncu-rep" --page details
if [[ ${NCU_SET:-} == full ]]; then
  ncu --import "$out.ncu-rep" --page source --csv --print-source sass > "$out.source.csv"
fi
