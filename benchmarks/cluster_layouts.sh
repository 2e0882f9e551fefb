#!/usr/bin/env bash
# Scale-out on this machine (2 cores): what Ray costs, and how to split the cores.
#  1. front-end overhead: one replica through Ray (--ray-address local) against the same engine in-process,
#     light load (one request at a time: TTFT is the path's own latency) and saturating load (throughput);
#  2. 2 replicas x 1 thread against 1 replica x 2 threads on the scaled Azure conversation trace with SLOs.
# Results go to benchmarks/out/cluster_*; figures in benchmarks/log/2026-11-26-ray-scale-out.md. Run alone: 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PACER=${PACER:-.venv/bin/pacer}
OUT=benchmarks/out
COMMON="--dtype float32 --kv-cache-memory 2GiB"

$PACER bench compare --config "local=--threads 2" --config "ray-1x2=--ray-address local --threads-per-replica 2" \
  --server-args "$COMMON" --arrival concurrency --concurrency 1 --lengths fixed --prompt-tokens 128 \
  --output-tokens 32 --num-requests 40 --out $OUT/cluster_overhead_light.json

$PACER bench compare --config "local=--threads 2" --config "ray-1x2=--ray-address local --threads-per-replica 2" \
  --server-args "$COMMON" --arrival concurrency --concurrency 16 --lengths fixed --prompt-tokens 128 \
  --output-tokens 128 --num-requests 96 --out $OUT/cluster_overhead_saturated.json

# The path alone: short requests (16 prompt + 16 output tokens) one at a time, so TTFT is mostly the path, with
# 1 torch thread (a core left for the front end and Ray's own threads) and with 2 (none left).
$PACER bench compare --config "local-t1=--threads 1" --config "ray-t1=--ray-address local --threads-per-replica 1" \
  --config "local-t2=--threads 2" --config "ray-t2=--ray-address local --threads-per-replica 2" \
  --server-args "$COMMON" --arrival concurrency --concurrency 1 --lengths fixed --prompt-tokens 16 \
  --output-tokens 16 --num-requests 100 --out $OUT/cluster_overhead_path.json

# 2x1 against 1x2
$PACER bench compare --config "1x2=--scheduler slo --threads 2" \
  --config "2x1=--scheduler slo --replicas 2 --threads-per-replica 1" \
  --server-args "$COMMON" --arrival trace --lengths trace --trace benchmarks/data/azure2023_conv.csv \
  --length-scale 0.25 --time-scale 4.5 --num-requests 150 --max-model-len 2048 --slo-ttft-ms 3000 \
  --slo-tbt-ms 500 --out $OUT/cluster_layouts_azure.json
