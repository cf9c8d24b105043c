#!/usr/bin/env bash
# A/B on the bench, inside one call on one machine (machine pairs differ by a few percent, more
# than many changes: compare only within a call). Runs the bench's cases with A and B
# alternating, A B A B, and prints each run's table; the spread between the A runs is the noise
# to compare a difference against. Either one setting (A: unset, B: set) or two builds:
#   tests/gpu/bench-ab.sh "DSPARK_CUSTOM_ALL_REDUCE=1" [bench arguments...]
#   tests/gpu/bench-ab.sh --builds BASE_BIN NEW_BIN [bench arguments...]
# Defaults: the conditions at full depth on two GPUs (43 layers, TP=2, dummy weights,
# FP8 KV records written at random) and the decode cases at 8K and 1M plus a K=5 verify step.
# DSPARK_SERVER_BIN names the binary of a setting's A/B (default target/release/dspark-server);
# ROUNDS the number of A B pairs (default 2).
set -uo pipefail
usage="usage: bench-ab.sh VAR=VALUE [bench arguments...] | bench-ab.sh --builds A_BIN B_BIN [bench arguments...]"
if [[ ${1:-} == --builds ]]; then
  (( $# >= 3 )) || { echo "$usage" >&2; exit 2; }
  bin_a=$2 bin_b=$3 setting=""
  shift 3
else
  setting=${1:?$usage}
  [[ $setting == *=* ]] || { echo "$usage" >&2; exit 2; }
  shift
  bin_a=${DSPARK_SERVER_BIN:-target/release/dspark-server} bin_b=$bin_a
fi
for b in "$bin_a" "$bin_b"; do
  [[ -x $b ]] || { echo "bench-ab.sh: $b is not an executable" >&2; exit 2; }
done
rounds=${ROUNDS:-2}
if (( $# == 0 )); then
  set -- --device cuda --world-size 2 --config-json server/tests/fixtures/v4-flash-config.json \
    --kv-fill random --kv-cache-dtype fp8 --iters 10 --warmup 3 \
    --cases decode:1:8192,decode:16:8192,verify:1:8192:5,decode:1:1048448
fi
fail=0
name=${setting%%=*}
for round in $(seq 1 "$rounds"); do
  for side in A B; do
    log="/tmp/bench-ab-$round-$side.log"
    if [[ -z $setting ]]; then
      bin=$bin_a; [[ $side == B ]] && bin=$bin_b
      echo "== round $round, $side: $bin"
      "$bin" bench "$@" 2> "$log" || { fail=1; tail -5 "$log"; }
    elif [[ $side == B ]]; then
      echo "== round $round, B: $setting"
      env "$setting" "$bin_b" bench "$@" 2> "$log" || { fail=1; tail -5 "$log"; }
    else
      echo "== round $round, A: $name unset"
      env -u "$name" "$bin_a" bench "$@" 2> "$log" || { fail=1; tail -5 "$log"; }
    fi
  done
done
exit $fail
