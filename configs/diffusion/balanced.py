"""Stage 2 on `configs/balanced.py`'s latents (16x16x4 x 3 at 256x256x64): the MONAI 3D
LDM tutorial UNet and DDPM schedule (scaled_linear_beta 0.0015 -> 0.0195, 1000 steps),
predicting v (configs/diffusion/default.py says why).

    python train.py --config configs/balanced.py --workdir runs/balanced        # stage 1
    python train.py --config configs/diffusion/balanced.py --workdir runs/ldm    # stage 2
"""

from configs import balanced
from configs.diffusion import default


def get_config():
    config = default.get_config()
    return default.paired(config, balanced.get_config(), "runs/balanced",
                          "configs/balanced.py")
