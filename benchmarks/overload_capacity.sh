#!/usr/bin/env bash
# Issue 6, overload: the scaled Azure conversation lengths as Poisson arrivals at 1x, 2x and 4x slo's capacity
# under Sarathi-Serve's condition (CAPACITY, req/s, from benchmarks/capacity_sarathi.sh), each request promised
# TTFT 3 s and TBT 500 ms; slo beside fcfs and sarathi128 on the same load (slo alone at 1x, for its peak).
# Results: benchmarks/out/overload_cap_*. Run alone (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
: "${CAPACITY:?set CAPACITY to the measured slo capacity in req/s}"
for multiple in ${MULTIPLES:-1 2 4}; do
  rate=$(python3 -c "print($CAPACITY * $multiple)")
  others=()
  if [ "$multiple" != 1 ]; then
    others=(--schedulers fcfs --config "sarathi128=--scheduler sarathi --max-num-batched-tokens 128")
  fi
  $PACER bench compare "${others[@]}" --config "slo=--scheduler slo" \
    --server-args "--dtype float32 --threads 2 --kv-cache-memory 2GiB" --arrival poisson --rate "$rate" \
    --lengths trace --trace ../shared/data/traces/azure2023_conv.csv --length-scale 0.25 --max-model-len 2048 \
    --num-requests "${NUM_REQUESTS:-120}" --slo-ttft-ms 3000 --slo-tbt-ms 500 \
    --out "benchmarks/out/overload_cap_${multiple}x.json"
done
