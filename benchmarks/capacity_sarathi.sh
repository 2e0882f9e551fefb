#!/usr/bin/env bash
# Issue 6: capacity under Sarathi-Serve's condition (P99 TBT <= SLO, median scheduling delay <= 2 s) for
# slo against sarathi's default budget (512) and its best fixed one (128), on the scaled Azure conversation trace.
# The condition has no TTFT SLO, so the requests carry only the TBT SLO (--slo-tbt-ms, no --slo-ttft-ms): slo
# plans its chunks with it and, promised no TTFT, refuses nothing. Results: benchmarks/out/capacity_tbt_*.
# Run alone (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
OUT=benchmarks/out
PORT=8123
declare -A CONFIGS=([slo]="--scheduler slo" [sarathi]="--scheduler sarathi" \
                    [sarathi128]="--scheduler sarathi --max-num-batched-tokens 128")
for name in ${NAMES:-slo sarathi128 sarathi}; do
  $PACER serve --port $PORT --dtype float32 --threads 2 --kv-cache-memory 2GiB ${CONFIGS[$name]} \
    > $OUT/capacity_tbt_$name.server.log 2>&1 &
  server=$!
  until curl -sf http://127.0.0.1:$PORT/health > /dev/null; do kill -0 $server; sleep 1; done
  $PACER bench capacity --base-url http://127.0.0.1:$PORT --condition sarathi --slo-tbt-ms 500 \
    --arrival poisson --lengths trace --trace ../shared/data/traces/azure2023_conv.csv --length-scale 0.25 \
    --max-model-len 2048 --num-requests 80 --min-rate 0.5 --max-rate 1 --tolerance 0.1 --max-trials 6 \
    --out $OUT/capacity_tbt_$name.json 2>&1 | tee $OUT/capacity_tbt_$name.log
  kill $server; wait $server || true
done
