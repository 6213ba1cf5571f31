#!/usr/bin/env bash
# One 10-minute call on a lent GPU machine (the workplace's `device` tool), from the repo root:
#   scripts/device_train.sh CONFIG DATA_SEED [INIT_FROM] [--set ...]
# Installs the carried wheels (.whl/) into /tmp/site, trains with CONFIG for run.max_minutes,
# and keeps copying the latest fp16 export, the log and the sample grid to $OUT as it goes, so a
# call stopped at its limit still returns the model.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
config=$1 seed=$2; shift 2
init=()
if [[ $# -gt 0 && $1 != --set ]]; then init=(--set "model.init_from=\"$1\""); shift; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run=/tmp/run
( while sleep 15; do
    cp -f $run/latest.safetensors $run/log.jsonl "$OUT/" 2>/dev/null
    cp -f "$(ls -1 $run/samples/*.png 2>/dev/null | tail -1)" "$OUT/samples.png" 2>/dev/null
  done ) &
copier=$!
python3 -m danqing.cli train base --config "$config" --fresh --set "run.output_dir=\"$run\"" \
  --set "data.seed=$seed" "${init[@]}" "$@" 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
kill $copier
cp -f $run/latest.safetensors $run/log.jsonl $run/summary.json "$OUT/" 2>/dev/null
cp -f "$(ls -1 $run/samples/*.png | tail -1)" "$OUT/samples.png" 2>/dev/null
exit $rc
