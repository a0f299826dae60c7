"""An inpainting ControlNet on the frozen UNet of `configs/diffusion/balanced_4x.py`'s
run: the condition of each training volume is the volume with a random box set to 0 and
the box (2 channels, on the volume grid: conditioning embedding (16, 32, 64), 4x the
latent); the UNet, scheduler and latents are that run's. `ldm-jax edit --mode inpaint`
on this run builds the same condition from each input and its mask.

    python train.py --config configs/diffusion/balanced_4x.py --workdir runs/ldm       # stage 2
    python train.py --config configs/diffusion/controlnet_inpaint_4x.py --workdir runs/inpaint_cn
    ldm-jax edit --workdir runs/inpaint_cn --mode inpaint --input VOLS --box 8:24,8:24,8:24 \\
        --output filled/
"""

from configs.diffusion import controlnet_4x


def get_config():
    config = controlnet_4x.get_config()
    cn = config.controlnet
    cn.condition.kind = "inpainting"
    cn.conditioning_embedding_in_channels = 2  # the blanked volume and the box
    cn.condition.box_fraction = (0.25, 0.75)
    return config
