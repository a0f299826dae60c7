"""512x512x128, stem /8 then /4 and /2 -> 64x, latent 8x8x2x8 (more latent channels)."""

from configs import aggressive


def get_config():
    config = aggressive.get_config()
    config.autoencoder.initial_downsample_factor = 8
    config.autoencoder.latent_channels = 8
    return config
