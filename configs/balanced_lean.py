"""balanced.py with a subpixel decoder head: no wide conv at full resolution."""

from configs import balanced


def get_config():
    config = balanced.get_config()
    config.autoencoder.upsample_head = "subpixel"
    return config
