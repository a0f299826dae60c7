#!/usr/bin/env bash
# The conditioning benchmark of benchmarks/CONDITIONING.md (issue 27), end to end on the
# built-in filaments at a CPU-trainable size (the configs' 32x32x16 voxels):
#   bash benchmarks/conditioning.sh [OUT=runs/conditioning]
# trains every model (voxel space, STEPS steps each) into OUT/models/NAME, then measures
# them with benchmarks/conditioning.py on the same held-out volumes, conditions and seeds:
#   projection -> 3D: concat with the depth cue (configs/diffusion/projection.py), concat
#     without it (NOCUE_ARGS), the original's pooled embedding, unconditional; baselines
#     back-projection (scales fitted on training volumes) and the truth;
#   coarse -> fine: concat (configs/diffusion/coarse.py), pooled is projection-only,
#     unconditional (the same model); baselines trilinear upsampling and the truth.
# Writes OUT/conditioning_{projection,coarse}.{json,md,png}. Rerunning skips the models
# that finished training (OUT/models/NAME/trained) and the rows already scored
# (OUT/TASK/rows/NAME.json; delete one to redo it).
# Environment: PY (python), STEPS (training steps per model, 3000), TRAIN_ARGS (more
# train.py overrides for every model), NOCUE_ARGS (what makes the no-cue model: a
# depth-independent blur of the in-focus width: psf none, blur 1.0), NUM (held-out
# volumes, 8), SAMPLES (per condition, 4), SEED (0), SAMPLE_STEPS (50), SCHEDULER (ddim), GUIDANCE (1.0), TASKS ("projection
# coarse"; "smlm": the depth-cue projection model on voxelised built-in SMLM clouds,
# SMLM_ARGS, scored into OUT/smlm), CUE_GUIDANCE (2.0: the depth-cue model is scored once
# more at this classifier-free guidance scale; empty: not), EVAL_ARGS (more benchmarks/conditioning.py flags, e.g. --condition_noise),
# BASELINE_ARGS (baseline-part flags, e.g. --regress_steps 1500: the supervised 2D CNN),
# JAX_COMPILATION_CACHE_DIR (OUT/jit_cache).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/conditioning}
PY=${PY:-python}
STEPS=${STEPS:-3000}
NUM=${NUM:-8}
SAMPLES=${SAMPLES:-4}
SEED=${SEED:-0}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
SCHEDULER=${SCHEDULER:-ddim}
GUIDANCE=${GUIDANCE:-1.0}
TASKS=${TASKS:-projection coarse}
CUE_GUIDANCE=${CUE_GUIDANCE-2.0}
SMLM_ARGS=${SMLM_ARGS:---config.data.source=synthetic_smlm --config.data.pointcloud_voxel_size=20.0 --config.data.pointcloud_sigma=20.0 --config.data.a_max=1.0}
NOCUE_ARGS=${NOCUE_ARGS:---config.conditioning.projection.psf=none --config.conditioning.projection.blur=1.0}
mkdir -p "$OUT/models"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jit_cache}
M=$OUT/models

train() {  # NAME CONFIG [overrides...]
  local name=$1 config=$2
  shift 2
  [ -f "$M/$name/trained" ] && return 0
  echo "== training $name ($config $*), $STEPS steps"
  # shellcheck disable=SC2086
  $PY train.py --config "$config" --workdir "$M/$name" --config.train.num_steps="$STEPS" \
    "$@" ${TRAIN_ARGS:-}
  date > "$M/$name/trained"
}

for task in $TASKS; do
  case $task in
    projection)
      train proj_cue configs/diffusion/projection.py
      # shellcheck disable=SC2086
      train proj_nocue configs/diffusion/projection.py $NOCUE_ARGS
      train proj_pooled configs/diffusion/projection.py --config.conditioning.aligned_mode=pooled
      train uncond configs/diffusion/projection.py --config.conditioning.aligned=''
      MODELS=(--model "concat, depth cue=$M/proj_cue" --model "concat, no cue=$M/proj_nocue"
              --model "pooled (original)=$M/proj_pooled" --model "unconditional=$M/uncond")
      # Baselines from both conditions (rows tagged proj_cue / proj_nocue); the first one
      # is also the condition the unconditional model is scored against.
      REF=(--reference "$M/proj_cue" --reference "$M/proj_nocue")
      ORDER=(--order "concat, depth cue" --order "concat, depth cue, guidance $CUE_GUIDANCE"
             --order "concat, no cue" --order "pooled (original)"
             --order "unconditional" --versus "back-projection, Dice-fitted scale (proj_cue)")
      ;;
    coarse)
      train coarse configs/diffusion/coarse.py
      train uncond configs/diffusion/projection.py --config.conditioning.aligned=''
      MODELS=(--model "concat=$M/coarse" --model "unconditional=$M/uncond")
      REF=(--reference "$M/coarse")
      ORDER=(--order "concat" --order "unconditional")
      ;;
    smlm)  # projection -> 3D on voxelised SMLM clouds (configs/smlm_4x.py's rendering)
      # shellcheck disable=SC2086
      train proj_smlm configs/diffusion/projection.py $SMLM_ARGS
      MODELS=(--model "concat, depth cue=$M/proj_smlm")
      REF=(--reference "$M/proj_smlm")
      ORDER=(--order "concat, depth cue" --order "concat, depth cue, guidance $CUE_GUIDANCE"
             --versus "back-projection, Dice-fitted scale")
      ;;
    *) echo "unknown task $task (projection | coarse | smlm)" >&2; exit 2 ;;
  esac
  EVAL_OUT=$OUT
  [ "$task" = smlm ] && { EVAL_OUT=$OUT/smlm; task=projection; }
  COMMON=(--task "$task" --out "$EVAL_OUT" --num "$NUM" --samples "$SAMPLES" --seed "$SEED"
          --steps "$SAMPLE_STEPS" --scheduler "$SCHEDULER" --guidance "$GUIDANCE")
  # shellcheck disable=SC2086
  $PY -m benchmarks.conditioning sample "${COMMON[@]}" "${MODELS[@]}" "${REF[@]}" ${EVAL_ARGS:-}
  if [ -n "$CUE_GUIDANCE" ] && [ "$task" = projection ]; then
    cue=${MODELS[1]#*=}
    # shellcheck disable=SC2086
    $PY -m benchmarks.conditioning sample "${COMMON[@]}" --guidance "$CUE_GUIDANCE" \
      --model "concat, depth cue, guidance $CUE_GUIDANCE=$cue" "${REF[@]}" ${EVAL_ARGS:-}
  fi
  # shellcheck disable=SC2086
  $PY -m benchmarks.conditioning baseline "${COMMON[@]}" "${REF[@]}" ${EVAL_ARGS:-} \
    ${BASELINE_ARGS:-}
  $PY -m benchmarks.conditioning tables "${COMMON[@]}" "${ORDER[@]}"
  $PY -m benchmarks.conditioning picture "${COMMON[@]}"
done
