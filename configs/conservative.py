"""No stem downsampling: levels /4 and /2 -> 8x, latent 32x32x8x3 at 256x256x64."""

from configs import default


def get_config():
    config = default.get_config()
    config.autoencoder.num_channels = (32, 64, 64)
    config.autoencoder.initial_downsample_factor = 1
    config.autoencoder.downsample_factors = (4, 2)
    config.data.volume_size = (256, 256, 64)
    return config
