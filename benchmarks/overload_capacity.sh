#!/usr/bin/env bash
# Issue 6, overload: the scaled Azure conversation lengths as Poisson arrivals at 1x, 2x and 4x slo's capacity
# under Sarathi-Serve's condition (CAPACITY, req/s, from benchmarks/capacity_sarathi.sh), each request promised
# TTFT 3 s and a TBT of SLO_TBT_MS (500); slo beside fcfs and sarathi with a fixed BUDGET (128) on the same load
# (slo alone at 1x, for its peak). DTYPE (float32, the Xeon-era runs; bfloat16 is what `auto` picks on a CPU with
# AVX-512 BF16), MULTIPLES, NUM_REQUESTS, SEED and TAG (a suffix for repeated runs) pick the run; SLO_ONLY=1 runs
# slo alone at every multiple (repeats for a median).
# Results: benchmarks/out/overload_cap_*. Run alone (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
: "${CAPACITY:?set CAPACITY to the measured slo capacity in req/s}"
DTYPE=${DTYPE:-float32}
SLO_TBT_MS=${SLO_TBT_MS:-500}
BUDGET=${BUDGET:-128}
PREFIX=benchmarks/out/overload_cap
[ "$DTYPE" = float32 ] || PREFIX=benchmarks/out/overload_cap_${DTYPE}_tbt${SLO_TBT_MS}
for multiple in ${MULTIPLES:-1 2 4}; do
  rate=$(python3 -c "print($CAPACITY * $multiple)")
  others=()
  if [ "$multiple" != 1 ] && [ -z "${SLO_ONLY:-}" ]; then
    others=(--schedulers fcfs --config "sarathi$BUDGET=--scheduler sarathi --max-num-batched-tokens $BUDGET")
  fi
  $PACER bench compare "${others[@]}" --config "slo=--scheduler slo" \
    --server-args "--dtype $DTYPE --threads 2 --kv-cache-memory 2GiB" --arrival poisson --rate "$rate" \
    --seed "${SEED:-0}" --lengths trace --trace "${TRACE:-benchmarks/data/azure2023_conv.csv}" \
    --length-scale 0.25 --max-model-len 2048 --num-requests "${NUM_REQUESTS:-120}" --slo-ttft-ms 3000 \
    --slo-tbt-ms "$SLO_TBT_MS" --out "${PREFIX}_${multiple}x${TAG:-}.json"
done
