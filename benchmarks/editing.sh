#!/usr/bin/env bash
# The editing benchmark of benchmarks/EDITING.md (issue 29), end to end on a trained
# stage-2 run (its stage 1 is the autoencoder that run names):
#   bash benchmarks/editing.sh LDM_WORKDIR [OUT=runs/editing]
# trains an inpainting ControlNet (part 0), then the SDEdit sweep and anomaly maps on the plain LDM (parts 2-4), then trains a
# ControlNet on the frozen LDM (docs/editing.md's command; at most CN_STEPS steps and
# CN_MINUTES of wall clock: SIGTERM saves a checkpoint) and measures the paired mask Dice
# ControlNet vs plain (part 1); then the Markdown tables (OUT/editing_tables.md). Each
# part writes OUT/editing_PART.json and OUT/editing_PART.png; rerunning skips the parts
# whose JSON exists.
# Environment: PY (python), NUM (held-out volumes per part, 8), STEPS (DDIM steps, 50),
# STEP (LDM checkpoint, latest), CN_STEPS (2000), CN_MINUTES (12), CN_LR (1e-4),
# IN_MINUTES (20: the inpainting ControlNet's limit; CN_STEPS, CN_LR, CN_ARGS apply too),
# CN_ARGS (more train.py overrides, e.g. a tiny model's conditioning embedding),
# LIKELIHOOD_STEPS (timesteps of the likelihood; empty: all T, MONAI's),
# DRAWS (inpainting ControlNet draws averaged into one more row, 8),
# JUMP_LENGTH, JUMP_N_SAMPLE (RePaint's, 10 and 10), RADII (the balls' radius range, 3,5),
# SPHERES (balls per volume, 2), SPHERE_INTENSITY (max, or pNN: a foreground percentile),
# JAX_COMPILATION_CACHE_DIR (OUT/jit_cache).
# INPAINT_AE=AE_WORKDIR adds an inpainting UNet (configs/diffusion/inpainting_4x.py) on that
# stage-1 run, trained at most IU_MINUTES (95) / IU_STEPS (20000) steps, then its inpaint
# part (DRAWS) and its patched anomaly part (SPHERE_INTENSITY, PATCH_REPEATS 4) in
# OUT/inpaint_unet; LDM_WORKDIR "-" runs only that:
#   INPAINT_AE=runs/q3k bash benchmarks/editing.sh - runs/editing
set -euo pipefail
cd "$(dirname "$0")/.."
LDM=${1:?usage: bash benchmarks/editing.sh LDM_WORKDIR [OUT]}
OUT=${2:-runs/editing}
PY=${PY:-python}
NUM=${NUM:-8}
STEPS=${STEPS:-50}
STEP=${STEP:-latest}
CN_STEPS=${CN_STEPS:-2000}
CN_MINUTES=${CN_MINUTES:-12}
IN_MINUTES=${IN_MINUTES:-20}
DRAWS=${DRAWS:-8}
CN_LR=${CN_LR:-1e-4}
JUMP_LENGTH=${JUMP_LENGTH:-10}
JUMP_N_SAMPLE=${JUMP_N_SAMPLE:-10}
RADII=${RADII:-3,5}
SPHERES=${SPHERES:-2}
SPHERE_INTENSITY=${SPHERE_INTENSITY:-max}
mkdir -p "$OUT"
IU="$OUT/inpaint_unet"
if [ -n "${INPAINT_AE:-}" ] && [ ! -f "$IU/trained" ]; then
  rc=0
  timeout -s TERM "${IU_MINUTES:-95}m" $PY train.py --config configs/diffusion/inpainting_4x.py \
    --workdir "$IU" --config.latents.autoencoder_workdir="$INPAINT_AE" \
    --config.latents.autoencoder_step=latest --config.unet.dtype=float32 \
    --config.train.batch_size=8 --config.train.learning_rate=2.5e-4 \
    --config.train.num_steps="${IU_STEPS:-20000}" --config.train.log_every_steps=50 \
    --config.train.eval_every_steps=500 --config.train.save_every_steps=250 \
    --noprogress || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
  tail -n 1 "$IU/metrics.jsonl" > "$IU/trained"
fi
if [ -n "${INPAINT_AE:-}" ]; then
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jit_cache}
  [ -f "$IU/editing_inpaint.json" ] || $PY -m benchmarks.editing inpaint --workdir "$IU" \
    --step latest --draws "$DRAWS" --num "$NUM" --steps "$STEPS" --out "$IU"
  [ -f "$IU/editing_patched.json" ] || $PY -m benchmarks.editing patched --workdir "$IU" \
    --step latest --sphere_intensity "$SPHERE_INTENSITY" --repeats "${PATCH_REPEATS:-4}" \
    --num "$NUM" --steps "$STEPS" --out "$IU"
  $PY -m benchmarks.editing tables --out "$IU"
fi
[ "$LDM" != "-" ] || exit 0
# Compiled programs persist here: a rerun (or a run after a dry run of the same settings
# on another checkpoint of the same stage-2 run) skips compilation, most of a CPU run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jit_cache}
COMMON=(--num "$NUM" --steps "$STEPS" --out "$OUT")

# 0. An inpainting ControlNet on the frozen UNet (docs/editing.md's command: random boxes
#    of the built-in volumes blanked, encoded on the fly), at most IN_MINUTES.
if [ ! -f "$OUT/inpaint_cn/trained" ]; then
  rc=0
  timeout -s TERM "${IN_MINUTES}m" $PY train.py \
    --config configs/diffusion/controlnet_inpaint_4x.py --workdir "$OUT/inpaint_cn" \
    --config.controlnet.unet_workdir="$LDM" --config.controlnet.unet_step="$STEP" \
    --config.train.batch_size=8 --config.train.learning_rate="$CN_LR" \
    --config.train.num_steps="$CN_STEPS" --config.train.ema_decay=0.99 \
    --config.train.log_every_steps=50 --config.train.eval_every_steps=500 \
    --config.train.save_every_steps=250 --noprogress ${CN_ARGS:-} || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
  tail -n 1 "$OUT/inpaint_cn/metrics.jsonl" > "$OUT/inpaint_cn/trained"
fi

# 2-4. Inpainting (with the inpainting ControlNet as one more fill), SDEdit, anomaly maps
#    (likelihood, residual) on the plain LDM (first: they take minutes).
[ -f "$OUT/editing_inpaint.json" ] || $PY -m benchmarks.editing inpaint --workdir "$LDM" \
  --step "$STEP" --jump_length "$JUMP_LENGTH" --jump_n_sample "$JUMP_N_SAMPLE" \
  --inpainting_controlnet "$OUT/inpaint_cn" --inpainting_controlnet_step latest \
  --draws "$DRAWS" "${COMMON[@]}"
[ -f "$OUT/editing_sdedit.json" ] || $PY -m benchmarks.editing sdedit --workdir "$LDM" \
  --step "$STEP" --strengths 0,0.1,0.25,0.5,0.75,1 "${COMMON[@]}"
LS=()
[ -z "${LIKELIHOOD_STEPS:-}" ] || LS=(--likelihood_steps "$LIKELIHOOD_STEPS")
[ -f "$OUT/editing_anomaly.json" ] || $PY -m benchmarks.editing anomaly --workdir "$LDM" \
  --step "$STEP" --spheres "$SPHERES" --radii "$RADII" \
  --sphere_intensity "$SPHERE_INTENSITY" "${LS[@]}" "${COMMON[@]}"
[ -f "$OUT/editing_residual.json" ] || $PY -m benchmarks.editing residual --workdir "$LDM" \
  --step "$STEP" --spheres "$SPHERES" --radii "$RADII" \
  --sphere_intensity "$SPHERE_INTENSITY" "${COMMON[@]}"

# 1. ControlNet: docs/editing.md's training command on the frozen UNet (foreground masks of
#    the built-in volumes, encoded on the fly), then the paired Dice on held-out masks.
if [ ! -f "$OUT/controlnet/trained" ]; then
  rc=0
  timeout -s TERM "${CN_MINUTES}m" $PY train.py --config configs/diffusion/controlnet_4x.py \
    --workdir "$OUT/controlnet" --config.controlnet.unet_workdir="$LDM" \
    --config.controlnet.unet_step="$STEP" --config.train.batch_size=8 \
    --config.train.learning_rate="$CN_LR" --config.train.num_steps="$CN_STEPS" \
    --config.train.ema_decay=0.99 --config.train.log_every_steps=50 \
    --config.train.eval_every_steps=500 --config.train.save_every_steps=250 \
    --noprogress ${CN_ARGS:-} || rc=$?
  # 0: all CN_STEPS done; 124: stopped at CN_MINUTES (a checkpoint was saved on SIGTERM).
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
  tail -n 1 "$OUT/controlnet/metrics.jsonl" > "$OUT/controlnet/trained"
fi
[ -f "$OUT/editing_controlnet.json" ] || $PY -m benchmarks.editing controlnet \
  --controlnet_workdir "$OUT/controlnet" --step latest "${COMMON[@]}"

# 5. All tables (also in OUT/editing_tables.md).
$PY -m benchmarks.editing tables --out "$OUT"
