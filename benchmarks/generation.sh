#!/usr/bin/env bash
# The generation benchmark of benchmarks/GENERATION.md, end to end on the built-in filaments
# at 32^3 (CPU sizes): stage 1, extraction, stage 2, sampling, baselines, evaluation.
#   bash benchmarks/generation.sh [WORK=runs/gen] [STAGE1=runs/quick]
#   STEPS1=3000 ADV_WARMUP=4000 STEPS2=3000 SAMPLER=ddpm bash benchmarks/generation.sh runs/gen runs/q3k
# SAMPLER: ddim (50 steps, default) or ddpm (all 1000 steps, MONAI's tutorial; ~20x slower).
# TRAIN: training crops extracted for stage 2 (256; GENERATION.md's 2x row: TRAIN=1024
# STEPS2=18000 SAMPLER=ddpm).
# Every step is one of the README's commands; rerunning skips what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/gen}
AE=${2:-runs/quick}
PY=${PY:-python}
STEPS1=${STEPS1:-1000}
ADV_WARMUP=${ADV_WARMUP:-1000}
STEPS2=${STEPS2:-1250}
TRAIN=${TRAIN:-256}
mkdir -p "$W"

# 1. Stage 1: docs/training.md's quick CPU run (the main job's model, configs/balanced_4x.py,
#    at 32^3, cosine decay over STEPS1 steps, float32 compute, the discriminator from step
#    ADV_WARMUP: never at the defaults); resumes or skips what AE holds.
$PY train.py --config configs/balanced_4x.py --workdir "$AE" --noprogress \
  --config.data.volume_size='(32,32,32)' --config.train.num_steps="$STEPS1" \
  --config.loss.adv_warmup_steps="$ADV_WARMUP" --config.autoencoder.dtype=float32

# 2. Volumes on disk (TRAIN training crops in raw units, 16 held-out in model units), then
#    latents of the training ones.
[ -d "$W/data/val" ] || $PY -m benchmarks.generation_data --config configs/balanced_4x.py \
  --volume 32,32,32 --train "$TRAIN" --val 16 --out "$W/data"
[ -f "$W/latents/latents.json" ] || $PY -m ldm_jax extract --workdir "$AE" \
  --input "$W/data/train" --output "$W/latents" --step latest --noprogress

# 3. Stage 2: the MONAI tutorial UNet (float32 on a CPU) on the extracted 8x8x8x8 latents,
#    predicting v (PRED=epsilon for the tutorial's target; see GENERATION.md for why v).
PRED=${PRED:-v_prediction}
S2=(--config configs/diffusion/balanced_4x.py --config.scheduler.prediction_type="$PRED"
    --config.latents.autoencoder_workdir="$AE"
    --config.latents.autoencoder_step=latest --config.latents.dir="$W/latents"
    --config.unet.dtype=float32 --config.train.batch_size=8 --config.train.learning_rate=2.5e-4
    --config.train.log_every_steps=50 --config.train.eval_every_steps=500
    --config.train.save_every_steps=250 --noprogress)
$PY train.py "${S2[@]}" --workdir "$W/ldm" --config.train.num_steps="$STEPS2"
# Baseline: the untrained UNet (one step at learning rate 0 = the initial weights).
$PY train.py "${S2[@]}" --workdir "$W/ldm_untrained" --config.train.num_steps=1 \
  --config.train.learning_rate=0 --config.eval.num_samples=0

# 4. Samples: 8 volumes, each model's EMA weights, DDIM 50 steps or DDPM 1000 (SAMPLER).
case ${SAMPLER:-ddim} in
  ddim) SAMPLE=(--num_inference_steps 50) ;;
  ddpm) SAMPLE=(--scheduler ddpm --num_inference_steps 1000) ;;
  *) echo "SAMPLER=${SAMPLER}: ddim or ddpm" >&2; exit 2 ;;
esac
for run in ldm ldm_untrained; do
  [ -f "$W/samples_$run/samples.json" ] || $PY -m ldm_jax sample --workdir "$W/$run" \
    --num_samples 8 "${SAMPLE[@]}" --output "$W/samples_$run" --step latest --noprogress
done
# Baseline: Gaussian latents N(0, 1) / scale_factor, decoded.
[ -f "$W/samples_gauss/latents/sample_0007.npy" ] || $PY - "$W" <<'EOF'
import os, sys, json
import numpy as np
import ldm_jax
from ldm_jax import outputs as vf
w = sys.argv[1]
pipe = ldm_jax.load_pipeline(os.path.join(w, "ldm"), "latest")
z = np.random.default_rng(0).standard_normal((8, *pipe.latent_shape)).astype(np.float32)
z /= pipe.scale_factor
out = os.path.join(w, "samples_gauss")
os.makedirs(os.path.join(out, "latents"), exist_ok=True)
for i, (zi, v) in enumerate(zip(z, pipe.decode(z))):
    vf.save_npy(os.path.join(out, f"sample_{i:04d}.npy"), v)
    vf.save_npy(os.path.join(out, "latents", f"sample_{i:04d}.npy"), zi)
EOF

# 5. Evaluation against the 16 held-out volumes (and the training latents).
for s in ldm ldm_untrained gauss; do
  $PY -m ldm_jax evaluate --samples "$W/samples_$s" --reference "$W/data/val" \
    --reference_latents "$W/latents" --range 0,1 --features vgg16 --num_slices 8 \
    --output "$W/eval_$s.json" | tee "$W/eval_$s.txt"
done

# 6. At equal N, 8 against 8 (FD depends on N): the other 8 held-out volumes (real vs
#    real), stage 1's reconstructions of them (the best a sample can be), and the samples.
mkdir -p "$W/real_a" "$W/real_b"
for i in 0 1 2 3 4 5 6 7; do
  cp -n "$W/data/val/v000$i.npy" "$W/real_a/"
  j=$(printf '%04d' $((i + 8))); cp -n "$W/data/val/v$j.npy" "$W/real_b/"
done
# reconstruct applies the checkpoint's intensity window: give it real_a in raw units.
[ -d "$W/real_a_raw" ] || $PY - "$W" <<'PYEOF'
import glob, os, sys
import numpy as np
from ldm_jax.config import load_config
w, d = sys.argv[1], load_config("configs/balanced_4x.py").data
os.makedirs(os.path.join(w, "real_a_raw"))
for f in sorted(glob.glob(os.path.join(w, "real_a", "*.npy"))):
    v = (np.load(f) - d.b_min) / (d.b_max - d.b_min) * (d.a_max - d.a_min) + d.a_min
    np.save(os.path.join(w, "real_a_raw", os.path.basename(f)), v.astype(np.float32))
PYEOF
[ -f "$W/recon_a/metrics.json" ] || $PY -m ldm_jax reconstruct --workdir "$AE" \
  --input "$W/real_a_raw" --output "$W/recon_a" --step latest --noprogress
for s in real_a recon_a samples_ldm; do
  $PY -m ldm_jax evaluate --samples "$W/$s" --reference "$W/real_b" --range 0,1 \
    --features vgg16 --num_slices 8 --output "$W/eval8_$s.json" | tee "$W/eval8_$s.txt"
done

# 7. Picture: real volumes, stage-1 reconstructions and samples side by side (grey 0..1).
$PY - "$W" <<'PYEOF'
import glob, os, sys
import nibabel as nib
import numpy as np
from ldm_jax.visualize import samples_image
w = sys.argv[1]
def load(f):
    return np.asarray(nib.load(f).dataobj) if f.endswith(".nii.gz") else np.load(f)
rows = [("real (held out)", sorted(glob.glob(f"{w}/real_b/*.npy"))[:3]),
        ("stage-1 reconstruction", sorted(glob.glob(f"{w}/recon_a/*.nii.gz"))[:3]),
        ("LDM sample", sorted(glob.glob(f"{w}/samples_ldm/sample_*.nii.gz"))[:3])]
names = [f"{k} {os.path.basename(f).split('.')[0]}" for k, fs in rows for f in fs]
vols = [load(f) for _, fs in rows for f in fs]
samples_image(vols, names, (0.0, 1.0)).save(f"{w}/side_by_side.png")
PYEOF
