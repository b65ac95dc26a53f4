#!/bin/bash
# On a lent GPU machine (tools/gpu/README.md), carrying .devcarry/ from tools/gpu/pack.py: continue the shipped
# text-to-image default for T2I_MIN minutes, then fine-tune its inpainting variant for INP_MIN minutes, both with the
# project's own `accelerate launch train_ldm.py` commands; the slim exports, sample grids and logs go to $OUT as tars.
# T2I_MIN=0 skips the first stage and fine-tunes the shipped default itself; INP_MIN=0 skips the inpainting stage;
# LCM_MIN=M (default 0: off) then distils the (continued) text-to-image model into a consistency student for M minutes
# (configs/ldm/emoji-64-lcm.yaml; docs/distillation.md).
# LOCAL=1 runs it on this CPU as a dry run (with DATA outside data/emoji, so the real split's caches stay valid).
set -euo pipefail
export TQDM_MININTERVAL=15 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/devout}
mkdir -p "$OUT"
if [ -z "${LOCAL:-}" ]; then
  SITE=/tmp/site PY=python3
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .devcarry/wheels/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
  SITE=/tmp/site-local PY=python
fi
export PYTHONPATH=$SITE
DATA=${DATA:-data/emoji}
$PY tools/gpu/unpack.py $SITE "$DATA"
$PY -c "import torch, transformers, diffusers, datasets, accelerate; print('versions', torch.__version__, transformers.__version__, diffusers.__version__, datasets.__version__, accelerate.__version__, torch.cuda.is_available())"
L="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision ${MP:-bf16} --dynamo_backend no"
BS=${BS:-256}
INIT=pipelines/default_model
if [ "${T2I_MIN:-4}" != 0 ]; then
  $L train_ldm.py --config configs/ldm/emoji-64.yaml data="$DATA" init_from=pipelines/default_model \
    autoencoder=pipelines/default_model/vae output_dir=runs/gpu-t2i cache_dir=runs/gpu-cache batch_size=$BS \
    max_steps=200000 max_minutes=${T2I_MIN:-4} checkpoint_every=1000 sample_every=2000 log_every=100 2>&1 \
    | tr '\r' '\n' > "$OUT/t2i.log" || { tail -30 "$OUT/t2i.log"; exit 1; }
  $PY -m cli.main export --model runs/gpu-t2i/final --out runs/gpu-t2i-slim
  tar cf "$OUT/t2i.tar" --exclude=vae -C runs gpu-t2i-slim gpu-t2i/samples gpu-t2i/logs  # vae/: the shipped one
  INIT=runs/gpu-t2i-slim
fi
if [ "${LCM_MIN:-0}" != 0 ]; then
  $L train_ldm.py --config configs/ldm/emoji-64-lcm.yaml data="$DATA" init_from=$INIT output_dir=runs/gpu-lcm \
    cache_dir=runs/gpu-cache batch_size=$BS learning_rate=${LCM_LR:-2e-4} max_steps=200000 max_minutes=$LCM_MIN \
    checkpoint_every=1000 sample_every=1000 validation_every=1000 log_every=100 2>&1 \
    | tr '\r' '\n' > "$OUT/lcm.log" || { tail -30 "$OUT/lcm.log"; exit 1; }
  $PY -m cli.main export --model runs/gpu-lcm/final --out runs/gpu-lcm-slim
  tar cf "$OUT/lcm.tar" --exclude=vae -C runs gpu-lcm-slim gpu-lcm/samples gpu-lcm/logs
fi
if [ "${INP_MIN:-3}" = 0 ]; then ls -la "$OUT"; exit 0; fi
$L train_ldm.py --config configs/ldm/emoji-64-inpaint.yaml data="$DATA" init_from=$INIT \
  output_dir=runs/gpu-inpaint batch_size=$BS num_workers=8 learning_rate=${INP_LR:-5e-4} \
  max_steps=200000 max_minutes=${INP_MIN:-3} checkpoint_every=1000 sample_every=1000 log_every=100 2>&1 \
  | tr '\r' '\n' > "$OUT/inpaint.log" || { tail -30 "$OUT/inpaint.log"; exit 1; }
$PY -m cli.main export --model runs/gpu-inpaint/final --out runs/gpu-inpaint-slim
tar cf "$OUT/inpaint.tar" --exclude=vae -C runs gpu-inpaint-slim gpu-inpaint/samples gpu-inpaint/logs
ls -la "$OUT"
