"""An inpainting UNet on `configs/balanced_4x.py`'s latents: the stage-2 UNet of
`configs/diffusion/balanced_4x.py` with the condition of diffusers' inpainting UNets
concatenated to its input: each training volume with a random box set to 0, and the box
(`conditioning.aligned = "inpainting"`, folded into 2 x 4^3 channels on the 4x latent
grid). Latents are encoded on the fly (the boxes are drawn on the volumes). The
condition is dropped to zeros (no known region) in 10 % of the steps
(`conditioning.drop_prob`, the default), so the same model samples unconditionally and
takes `--guidance_scale`.

    python train.py --config configs/balanced_4x.py --workdir runs/balanced_4x    # stage 1
    python train.py --config configs/diffusion/inpainting_4x.py --workdir runs/inpaint
    ldm-jax edit --workdir runs/inpaint --mode inpaint --input VOLS --box 8:24,8:24,8:24 \\
        --output filled/
"""

from configs.diffusion import balanced_4x


def get_config():
    config = balanced_4x.get_config()
    cond = config.conditioning
    cond.aligned = "inpainting"
    cond.inpainting.box_fraction = (0.25, 0.75)
    return config
