#!/usr/bin/env bash
# Train a `danqing train base` config on one GPU, from the repo root:
#   [RUN_DIR=runs/gpu] [OUT_DIR=$RUN_DIR/out] scripts/train_gpu.sh CONFIG DATA_SEED [INIT_FROM] [--set key=value ...]
# Starts a fresh run in RUN_DIR with data seed DATA_SEED, optionally from the weights of an earlier
# model (INIT_FROM: a model name, diffusers folder or single file). While it trains, the latest
# fp16 export (run.export_every), the log and the newest sample grid are copied to OUT_DIR every
# 15 s, so a run that stops at run.max_minutes, or is killed, still leaves its model there.
# Needs danqing installed with the CUDA build of torch (PYTHON, default python3, runs it).
set -uo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: scripts/train_gpu.sh CONFIG DATA_SEED [INIT_FROM] [--set key=value ...]" >&2
  exit 2
fi
python=${PYTHON:-python3}
run=${RUN_DIR:-runs/gpu}
out=${OUT_DIR:-$run/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
config=$1 seed=$2; shift 2
init=()
if [[ $# -gt 0 && $1 != --set ]]; then init=(--set "model.init_from=\"$1\""); shift; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
copy_out() {
  cp -f "$run/latest.safetensors" "$run/log.jsonl" "$out/" 2>/dev/null
  cp -f "$run/summary.json" "$out/" 2>/dev/null
  cp -f "$(ls -1 "$run"/samples/*.png 2>/dev/null | tail -1)" "$out/samples.png" 2>/dev/null
}
( while sleep 15; do copy_out; done ) &
copier=$!
"$python" -m danqing.cli train base --config "$config" --fresh --set "run.output_dir=\"$run\"" \
  --set "data.seed=$seed" "${init[@]}" "$@" 2>&1 | tee "$out/train.log"
rc=${PIPESTATUS[0]}
kill $copier
copy_out
exit $rc
