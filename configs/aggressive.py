"""512x512x128, stem /4 then /4 and /2 -> 32x, latent 16x16x4x3."""

from configs import default


def get_config():
    config = default.get_config()
    config.autoencoder.num_channels = (16, 32, 64)
    config.autoencoder.norm_num_groups = 16
    config.autoencoder.initial_downsample_factor = 4
    config.autoencoder.downsample_factors = (4, 2)
    config.data.volume_size = (512, 512, 128)
    return config
