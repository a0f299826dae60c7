"""Stage 2 of MONAI's 3D LDM tutorial on `configs/monai_3d_ldm.py`'s latents (24x24x16 x 3):
the tutorial's UNet (channels (32, 64, 64), attention (F, T, T), heads (0, 64, 64), one
res block: 2,974,051 parameters), DDPM scaled_linear_beta 0.0015 -> 0.0195 over 1000
steps, Adam 1e-4, MSE on the noise.

    python train.py --config configs/monai_3d_ldm.py --workdir runs/monai_3d_ldm
    python train.py --config configs/diffusion/monai_3d_ldm.py --workdir runs/ldm_monai
"""

from configs import monai_3d_ldm
from configs.diffusion import default


def get_config():
    config = default.get_config()
    config.scheduler.prediction_type = "epsilon"  # the tutorial's (default.py predicts v)
    return default.paired(config, monai_3d_ldm.get_config(), "runs/monai_3d_ldm",
                          "configs/monai_3d_ldm.py")
