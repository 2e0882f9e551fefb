#!/usr/bin/env bash
# The engine in a process of its own (--engine-process) against the engine thread beside the HTTP front end, with
# sarathi's engine thread as the reference, in one `pacer bench compare` (benchmarks/log/2026-11-27-gpu-h200.md,
# "The engine in a process of its own"). Uniform lengths (prompts 16-256, outputs 16-128), Poisson arrivals, TTFT 1 s, TBT 100 ms:
# the GPU checks' load. fp32, one thread, a latency profile measured first.
#   MODEL=DIR DEVICE=cuda PY=python3 benchmarks/engine_process.sh       # on a GPU
#   MODEL=DIR DEVICE=cpu THREADS=2 RATE=2 benchmarks/engine_process.sh  # here
set -euo pipefail
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:?set MODEL, a model directory or GGUF}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-1}
RATE=${RATE:-10}
N=${N:-250}
OUT=${OUT:-benchmarks/out/engine_process}
mkdir -p "$OUT"
$PY -m pacer.cli --log-level WARNING profile --model "$MODEL" --device "$DEVICE" --dtype float32 \
  --threads "$THREADS" --out "$OUT/profile.json"
$PY -m pacer.cli bench compare \
  --config "slo-thread=--scheduler slo --no-engine-process" \
  --config "slo-process=--scheduler slo --engine-process" \
  --config "sarathi-thread=--scheduler sarathi --no-engine-process" \
  --server-args "--model $MODEL --device $DEVICE --dtype float32 --threads $THREADS --num-blocks 4096 \
--max-num-seqs 64 --latency-profile $OUT/profile.json" \
  --tokenizer "$MODEL" --arrival poisson --rate "$RATE" --num-requests "$N" --lengths uniform \
  --prompt-tokens 256 --prompt-tokens-min 16 --output-tokens 128 --output-tokens-min 16 \
  --slo-ttft-ms 1000 --slo-tbt-ms 100 --out "$OUT/compare.json" 2>&1 | tr '\r' '\n' | grep -v '^bench:'
for f in "$OUT"/compare-*.metrics.txt; do  # mean iteration as each server measured it
  awk -v name="$(basename "$f" .metrics.txt)" '/^pacer:iteration_time_seconds_sum/ {s=$2}
    /^pacer:iteration_time_seconds_count/ {c=$2} END {printf "%s: %d iterations, mean %.1f ms\n", name, c, 1000*s/c}' "$f"
done
