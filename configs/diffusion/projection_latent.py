"""Latent diffusion conditioned on a 2D projection (docs/conditioning.md): the projection
of configs/diffusion/projection.py on `configs/balanced_4x.py`'s latents. The 2D image is
folded into channels over the latent grid (4x4 pixels per latent voxel: 16 channels) plus
the z coordinate, and concatenated to the UNet's input (MONAI's 3D LDM tutorial UNet).
Latents are encoded on the fly (each condition is computed from its volume); with
measured images, extract the latents and pair one file per latent instead
(`--config.latents.dir=L --config.conditioning.aligned_dir=D`, docs/conditioning.md).

    python train.py --config configs/balanced_4x.py --workdir runs/balanced_4x      # stage 1
    python train.py --config configs/diffusion/projection_latent.py --workdir runs/proj_ldm
    ldm-jax sample --workdir runs/proj_ldm --condition runs/proj_ldm/conditions/val_0000.png \
        --num_samples 4 --output samples/
"""

from configs import balanced_4x
from configs.diffusion import default


def get_config():
    config = default.paired(default.get_config(), balanced_4x.get_config(),
                            "runs/balanced_4x", "configs/balanced_4x.py")
    cond = config.conditioning
    cond.aligned = "projection"
    cond.projection.psf = "astigmatic"
    # Voxels, for a 32-deep volume (the quick CPU run's 32^3): configs/diffusion/projection.py's
    # cue scaled with the depth, focused below the volume (benchmarks/CONDITIONING.md).
    cond.projection.psf_sigma = 0.7
    cond.projection.astigmatism = 6.0
    cond.projection.depth_of_focus = 6.0
    cond.projection.focal_plane = -20.0
    cond.projection.noise = 0.02
    config.latents.dir = None  # on the fly: conditions are computed from the volumes
    config.train.batch_size = 4
    config.train.learning_rate = 2.5e-4
    return config
