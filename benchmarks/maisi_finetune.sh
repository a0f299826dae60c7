#!/usr/bin/env bash
# docs/maisi.md, "Fine-tuning": the CPU-sized commands, run as written. Tiny RANDOM MAISI
# networks written by MONAI's own classes stand in for the released files (the commands
# are the same with autoencoder_v1.pt / diff_unet_3d_rflow-ct.pt and the configs' sizes).
# Step 5 then checks exact resume from the command line: both stages again in new
# workdirs, stopped halfway (train.num_steps) and resumed; their last checkpoints must
# equal the uninterrupted runs' array for array.
#   bash benchmarks/maisi_finetune.sh [OUT]     (default runs/maisi_tiny)
set -euo pipefail
OUT=${1:-runs/maisi_tiny}
mkdir -p "$OUT"
# 1. weight files in MAISI's layouts (stand-ins; copy the released ones instead)
python - "$OUT" <<'PY'
import sys, torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
out = sys.argv[1]
ae = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                        num_channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4,
                        attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
                        with_decoder_nonlocal_attn=False, norm_float16=True, num_splits=1)
torch.save({"unet_state_dict": ae.state_dict()}, f"{out}/autoencoder_tiny.pt")
unet = DiffusionModelUNetMaisi(spatial_dims=3, in_channels=4, out_channels=4, num_channels=(8, 16),
                               attention_levels=(False, True), num_head_channels=(0, 8),
                               num_res_blocks=1, norm_num_groups=4, resblock_updown=True,
                               include_fc=True, include_spacing_input=True, num_class_embeds=128)
torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.0)},
           f"{out}/diff_unet_tiny.pt")
PY
# 2. stage 1: the autoencoder from its file, on built-in filaments (32^3, 200 steps)
AE_FLAGS=(--config.autoencoder.init_from="$OUT/autoencoder_tiny.pt" \
  --config.autoencoder.num_channels='(8,16,16)' --config.autoencoder.num_res_blocks='(1,1,1)' \
  --config.autoencoder.norm_num_groups=4 --config.discriminator.num_channels=8 \
  --config.data.source=synthetic_filaments --config.data.a_min=0 --config.data.a_max=255 \
  --config.data.volume_size='(32,32,32)' --config.data.num_train_volumes=16 \
  --config.data.num_val_volumes=2 --config.loss.adv_warmup_steps=100 \
  --config.train.learning_rate=1e-3 \
  --config.train.eval_every_steps=100 --config.train.save_every_steps=100)
python train.py --config configs/maisi_finetune.py --workdir "$OUT/ae" --noprogress \
  "${AE_FLAGS[@]}" --config.train.num_steps=200
# 3. stage 2: the diffusion UNet from its file, latents encoded on the fly (100 steps)
LDM_FLAGS=(--config.latents.autoencoder_workdir="$OUT/ae" --config.latents.scale_num_volumes=4 \
  --config.unet.init_from="$OUT/diff_unet_tiny.pt" \
  --config.unet.num_channels='(8,16)' --config.unet.attention_levels='(False,True)' \
  --config.unet.num_head_channels='(0,8)' --config.unet.num_res_blocks=1 \
  --config.unet.norm_num_groups=4 \
  --config.train.eval_every_steps=50 --config.train.save_every_steps=50 \
  --config.eval.num_samples=1 --config.eval.sampling_steps=5)
python train.py --config configs/diffusion/maisi_finetune.py --workdir "$OUT/ldm" --noprogress \
  "${LDM_FLAGS[@]}" --config.train.num_steps=100
# 4. samples, decoded by the fine-tuned MAISI autoencoder
ldm-jax sample --workdir "$OUT/ldm" --num_samples 2 --num_inference_steps 10 \
  --output "$OUT/samples"
# 5. exact resume: each stage again, stopped halfway and resumed to the same step
for n in 100 200; do
  python train.py --config configs/maisi_finetune.py --workdir "$OUT/ae_resumed" --noprogress \
    "${AE_FLAGS[@]}" --config.train.num_steps=$n
done
for n in 50 100; do
  python train.py --config configs/diffusion/maisi_finetune.py --workdir "$OUT/ldm_resumed" \
    --noprogress "${LDM_FLAGS[@]}" --config.train.num_steps=$n
done
python - "$OUT" <<'PY'
import sys
import numpy as np
import jax
from ldm_jax import checkpoint as ckpt
out = sys.argv[1]
for whole, resumed, step in (("ae", "ae_resumed", 200), ("ldm", "ldm_resumed", 100)):
    a = ckpt.make_manager(f"{out}/{whole}", read_only=True)
    b = ckpt.make_manager(f"{out}/{resumed}", read_only=True)
    keys = sorted(ckpt._state_metadata(a, step))
    n = 0
    for key in keys:
        x, y = (jax.tree.leaves(ckpt.restore_state_item(m, step, key)) for m in (a, b))
        assert len(x) == len(y), key
        for u, v in zip(x, y):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=key)
        n += len(x)
    print(f"{resumed} step {step} == {whole} step {step}: {n} arrays of "
          f"{', '.join(keys)} equal exactly")
PY
