"""The main job: stem /2 for memory, one level /2 more: a 4x latent of 8 channels (8 input
voxels per latent value), Adam 5e-4 with b1 0.9, cosine decay over train.num_steps.

Why: the original PyTorch project's 16x latent of 3 channels (configs/balanced.py, 1,365
voxels per value) cannot hold sparse filaments: it reconstructs a blank volume
(benchmarks/QUALITY.md, "Levers"). The strided stem keeps the training step's peak memory
at 256x256x64 below 2 GB (README configs table). The decaying learning rate raises
the end-of-run PSNR (benchmarks/QUALITY.md, "Schedule").
"""

from configs import default


def get_config():
    config = default.get_config()
    ae = config.autoencoder
    ae.num_channels = (32, 64)
    ae.attention_levels = (False, False)
    ae.initial_downsample_factor = 2
    ae.downsample_factors = (2,)
    ae.latent_channels = 8
    ae.upsample_head = "subpixel"
    config.train.learning_rate = 5e-4
    config.train.b1 = 0.9
    config.train.schedule = "cosine"
    config.data.volume_size = (256, 256, 64)
    return config
