"""MONAI's 3D LDM tutorial autoencoder: 96x96x64, factors 2, attention at the last level."""

from configs import default


def get_config():
    config = default.get_config()
    config.autoencoder.num_channels = (32, 64, 64)
    config.autoencoder.latent_channels = 3
    config.autoencoder.num_res_blocks = 1
    config.autoencoder.norm_num_groups = 16
    config.autoencoder.attention_levels = (False, False, True)
    config.autoencoder.initial_downsample_factor = 1
    config.autoencoder.downsample_factors = (2, 2)
    config.data.volume_size = (96, 96, 64)
    return config
