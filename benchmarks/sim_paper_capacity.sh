#!/usr/bin/env bash
# Sarathi-Serve's capacity claim in `pacer sim`: Yi-34B on two A100s (Sarathi-Serve's own measurements), ShareGPT
# lengths, Poisson arrivals; capacity = highest rate with P99 TBT <= SLO and median scheduling delay <= 2 s.
# strict: TBT 0.2 s, sarathi budget 512; relaxed: TBT 1.0 s, budget 2048; batch cap 128 for all (as the paper).
set -euo pipefail
OUT=${OUT:-benchmarks/out/sim_paper}
N=${N:-2000}
mkdir -p "$OUT"
COMMON=(--profile benchmarks/data/profiles/sarathi-a100 --lengths trace
        --trace benchmarks/data/sharegpt_8k_llama2_lengths.csv --num-requests "$N" --max-model-len 8192
        --max-num-seqs 128 --condition p99_tbt --min-rate 0.05 --max-rate 0.4 --tolerance 0.02 --max-trials 16)
for setting in "strict 200 512" "relaxed 1000 2048"; do
  read -r name tbt budget <<<"$setting"
  for policy in fcfs sarathi slo; do
    extra=()
    [[ $policy == sarathi ]] && extra=(--max-num-batched-tokens "$budget")
    .venv/bin/pacer --log-level WARNING sim capacity "${COMMON[@]}" --scheduler "$policy" "${extra[@]}" \
      --slo-tbt-ms "$tbt" --out "$OUT/${name}_${policy}.json" | grep "^capacity" | sed "s/^/$name $policy: /"
  done
done
