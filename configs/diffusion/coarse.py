"""Voxel-space diffusion conditioned on a coarse volume: coarse -> fine
(docs/conditioning.md). configs/diffusion/projection.py's model and data, conditioned on
each training volume's 4x block mean (8x8x4 for 32x32x16), repeated to the UNet's grid and
concatenated to its input.

    python train.py --config configs/diffusion/coarse.py --workdir runs/coarse
    ldm-jax sample --workdir runs/coarse --condition coarse.npy --num_samples 4 \
        --output samples/
"""

from configs.diffusion import projection


def get_config():
    config = projection.get_config()
    cond = config.conditioning
    cond.aligned = "coarse"
    cond.coarse.factor = 4
    cond.coarse.noise = 0.0
    return config
