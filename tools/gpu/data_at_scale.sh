#!/bin/bash
# On a lent GPU machine (tools/gpu/README.md), carrying .devcarry/ from tools/gpu/pack.py (its wheels and MiniLM's
# config and tokenizer): tools/gpu/data_at_scale.py, IMAGES synthetic images (default 600,000: what fits the
# machine's 15 minutes beside the other steps); the summary and logs go to $OUT/scale.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/devout}
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .devcarry/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONPATH=$SITE python3 tools/gpu/data_at_scale.py "$OUT/scale" --images "${IMAGES:-600000}" \
  --train-minutes "${TRAIN_MIN:-1}" --sd-batch "${SD_BATCH:-32}"
