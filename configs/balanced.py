"""The original PyTorch project's recommended setup: 256x256x64, stem /2 then levels /4
and /2 -> latent 16x16x4x3 (16x)."""

from configs import default


def get_config():
    config = default.get_config()
    config.autoencoder.num_channels = (32, 64, 64)
    config.autoencoder.initial_downsample_factor = 2
    config.autoencoder.downsample_factors = (4, 2)
    config.autoencoder.latent_channels = 3
    config.autoencoder.upsample_head = "subpixel"  # measured: benchmarks/QUALITY.md
    config.data.volume_size = (256, 256, 64)
    return config
