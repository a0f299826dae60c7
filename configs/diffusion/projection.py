"""Voxel-space diffusion conditioned on a 2D projection: from what the microscope sees to
3D (docs/conditioning.md). No autoencoder: the UNet works on the built-in filament volumes
(32x32x16, CPU-trainable) mapped to [-1, 1]; each training volume's sum projection along z
through an astigmatic point-spread focused below the volume (the depth cue of 3D SMLM;
every depth blurs differently) is broadcast along z, given
its z coordinate and concatenated to the UNet's input. The UNet is the original project's
voxel-space design (no attention in the levels, DDPM 1000 steps) at half its widths.

    python train.py --config configs/diffusion/projection.py --workdir runs/projection
    ldm-jax sample --workdir runs/projection --condition proj.png --num_samples 4 \
        --guidance_scale 2 --output samples/
"""

from configs import default as stage1
from configs.diffusion import default


def get_config():
    config = default.get_config()
    lat = config.latents
    lat.autoencoder_workdir = None  # voxel space (ldm_jax.diffusion.voxel_space)
    lat.scale_factor = 1.0
    data = config.data = stage1.get_config().data
    data.volume_size = (32, 32, 16)
    data.num_train_volumes = 256
    data.num_val_volumes = 8
    # Sparser fields than stage 1's default (8-24): where many filaments cross one line of
    # sight, no projection can say which depth is whose.
    data.num_filaments = (3, 8)

    unet = config.unet
    unet.in_channels = unet.out_channels = 1
    # The original's (16, 32, 64) runs at 3.7 s per batch-8 step on a 2-core CPU; half the
    # widths and batch 4 are 8x cheaper (benchmarks/CONDITIONING.md).
    unet.num_channels = (8, 16, 32)
    unet.attention_levels = (False, False, False)
    unet.num_head_channels = (0, 0, 32)  # the middle block's attention
    unet.norm_num_groups = 8
    unet.num_res_blocks = 1
    unet.dtype = "float32"  # CPU

    cond = config.conditioning
    cond.aligned = "projection"
    cond.aligned_mode = "concat"
    cond.projection.axis = 2
    cond.projection.psf = "astigmatic"
    # Focus below the volume: the blur grows with depth on both axes, so no plane above focus
    # looks like one below it (how much depth each cue carries: benchmarks/CONDITIONING.md).
    cond.projection.psf_sigma = 0.7
    cond.projection.astigmatism = 3.0
    cond.projection.depth_of_focus = 3.0
    cond.projection.focal_plane = -10.0
    cond.projection.noise = 0.02

    train = config.train
    train.num_steps = 3000
    train.batch_size = 4
    train.learning_rate = 2.5e-4
    train.log_every_steps = 50
    train.eval_every_steps = 500
    train.save_every_steps = 250
    config.eval.num_samples = 2
    return config
