"""balanced.py with the "nearest_conv" decoder head (nearest upsample, then a conv at full
resolution), the original PyTorch project's head.

Kept for comparison: it reconstructs the brain worse than the subpixel head
(benchmarks/QUALITY.md, "Results (H100, 64×64×32, 1000 steps × batch 2)").
"""

from configs import balanced


def get_config():
    config = balanced.get_config()
    config.autoencoder.upsample_head = "nearest_conv"
    return config
