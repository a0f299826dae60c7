"""Stage 2 on `configs/balanced_4x.py`'s latents (64x64x16 x 8 at 256x256x64): the MONAI 3D
LDM tutorial UNet and DDPM schedule (scaled_linear_beta 0.0015 -> 0.0195, 1000 steps),
predicting v (configs/diffusion/default.py says why).

    python train.py --config configs/balanced_4x.py --workdir runs/balanced_4x    # stage 1
    python train.py --config configs/diffusion/balanced_4x.py --workdir runs/ldm  # stage 2
"""

from configs import balanced_4x
from configs.diffusion import default


def get_config():
    config = default.get_config()
    return default.paired(config, balanced_4x.get_config(), "runs/balanced_4x",
                          "configs/balanced_4x.py")
