#!/usr/bin/env bash
# Issue 6: capacity under Sarathi-Serve's condition (P99 TBT <= SLO, median scheduling delay <= 2 s) for
# slo against sarathi's default budget (512) and fixed ones (64, 128, 256: the best was 128 in fp32 at TBT 500 ms,
# 64 in bf16 at 175 ms), on the scaled Azure conversation trace.
# The condition has no TTFT SLO, so the requests carry only the TBT SLO (--slo-tbt-ms, no --slo-ttft-ms): slo
# plans its chunks with it and, promised no TTFT, refuses nothing. Results: benchmarks/out/capacity_tbt_*
# (capacity_${DTYPE}_tbt${SLO_TBT_MS}_* for another dtype). DTYPE (default float32, the Xeon-era runs; bfloat16 is
# what `auto` picks on a CPU with AVX-512 BF16), SLO_TBT_MS (500), MIN_RATE and MAX_RATE (0.5, 1: where the search
# starts), NAMES and TAG (a suffix for repeated searches) pick the run. Run alone (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
DTYPE=${DTYPE:-float32}
SLO_TBT_MS=${SLO_TBT_MS:-500}
PREFIX=benchmarks/out/capacity_tbt
[ "$DTYPE" = float32 ] || PREFIX=benchmarks/out/capacity_${DTYPE}_tbt${SLO_TBT_MS}
PREFIX=$PREFIX${TAG:-}  # TAG: keeps repeated searches apart, e.g. TAG=_2
PORT=8123
declare -A CONFIGS=([slo]="--scheduler slo" [sarathi]="--scheduler sarathi" \
                    [sarathi64]="--scheduler sarathi --max-num-batched-tokens 64" \
                    [sarathi128]="--scheduler sarathi --max-num-batched-tokens 128" \
                    [sarathi256]="--scheduler sarathi --max-num-batched-tokens 256")
for name in ${NAMES:-slo sarathi128 sarathi}; do
  $PACER serve --port $PORT --dtype $DTYPE --threads 2 --kv-cache-memory 2GiB ${CONFIGS[$name]} \
    > ${PREFIX}_$name.server.log 2>&1 &
  server=$!
  until curl -sf http://127.0.0.1:$PORT/health > /dev/null; do kill -0 $server; sleep 1; done
  $PACER bench capacity --base-url http://127.0.0.1:$PORT --condition p99_tbt --slo-tbt-ms $SLO_TBT_MS \
    --arrival poisson --lengths trace --trace ${TRACE:-benchmarks/data/azure2023_conv.csv} --length-scale 0.25 \
    --max-model-len 2048 --num-requests 80 --min-rate ${MIN_RATE:-0.5} --max-rate ${MAX_RATE:-1} --tolerance 0.1 \
    --max-trials 6 \
    --out ${PREFIX}_$name.json 2>&1 | tee ${PREFIX}_$name.log
  kill $server; wait $server || true
done
