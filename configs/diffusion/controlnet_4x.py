"""A ControlNet on the frozen UNet of `configs/diffusion/balanced_4x.py`'s run (MONAI's
ControlNet tutorial in 3D): conditions are the foreground masks (> 0.1) of the training
volumes, on the volume grid (conditioning embedding (16, 32, 64): 4x the 64x64x16
latent, the 4x autoencoder's own grid); the UNet, scheduler and latents are that run's.

    python train.py --config configs/diffusion/balanced_4x.py --workdir runs/ldm       # stage 2
    python train.py --config configs/diffusion/controlnet_4x.py --workdir runs/controlnet
    ldm-jax sample --workdir runs/controlnet --condition MASKS/ --output samples/
"""

from configs.diffusion import balanced_4x


def get_config():
    config = balanced_4x.get_config()
    cn = config.controlnet
    cn.unet_workdir = "runs/ldm"  # the stage-2 run whose UNet is frozen
    cn.conditioning_embedding_num_channels = (16, 32, 64)  # 2^(3-1) = 4x the latent
    cn.condition.kind = "foreground_mask"  # computed on the fly from each volume
    cn.condition.threshold = 0.1
    config.train.learning_rate = 2.5e-5  # MONAI's ControlNet tutorial (Adam 2.5e-5)
    return config
