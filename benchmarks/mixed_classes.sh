#!/usr/bin/env bash
# Issue 6, mixed SLO classes: the scaled Azure conversation lengths as 200 Poisson arrivals at RATE req/s, each
# request drawing a class: 30 % interactive (TTFT 2.5 s, TBT 500 ms), 70 % batch (TTFT 20 s, TBT 1 s).
# SCHEDULERS (default "sarathi slo") run one after the other on the same load; RUNS repeats slo alone.
# DTYPE (default float32, the Xeon-era runs; bfloat16 is what `auto` picks on a CPU with AVX-512 BF16).
# Results: benchmarks/out/classes_${RATE}/ (classes_${DTYPE}_${RATE}/ for another dtype; TAG is appended, to keep
# repeated runs apart). Run alone (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
RATE=${RATE:?set RATE, requests/s}
DTYPE=${DTYPE:-float32}
out=benchmarks/out/classes_${RATE}
[ "$DTYPE" = float32 ] || out=benchmarks/out/classes_${DTYPE}_${RATE}
out=$out${TAG:-}
mkdir -p "$out"
run() {  # NAME SCHEDULERS...
  local name=$1; shift
  $PACER bench compare --schedulers "$(IFS=,; echo "$*")" \
    --server-args "--dtype $DTYPE --threads 2 --kv-cache-memory 2GiB" --arrival poisson --rate "$RATE" \
    --lengths trace --trace benchmarks/data/azure2023_conv.csv --length-scale 0.25 --max-model-len 2048 \
    --num-requests 200 --slo-classes interactive:0.3:2500:500,batch:0.7:20000:1000 \
    --out "$out/$name.json" 2>&1 | tr '\r' '\n' | grep -v '^bench:' > "$out/$name.log"
}
read -r -a first <<< "${SCHEDULERS:-sarathi slo}"
run run1 "${first[@]}"
for i in $(seq 2 "${RUNS:-1}"); do run "run$i" slo; done
