"""Diversity of a set of volumes: mean 3D MS-SSIM over pairs.

**MS-SSIM among pairs** (diversity), the quantity MONAI's LDM tutorials report: the mean
3D MS-SSIM (`ldm_jax.metrics.image.ms_ssim3d` = MONAI's MultiScaleSSIMMetric) over pairs of
generated volumes, and the same over pairs of real volumes as its reference. Lower =
more diverse; samples far above the real value suggest mode collapse, far below
suggest noise. Window `ms_ssim_kernel` (4 by default, the MONAI generative tutorials'
choice; MONAI's metric default 11 needs >= 176 voxels per axis), sigma 1.5, MONAI's
five scale weights; a volume needs ms_ssim_kernel * 2**(scales-1) voxels per axis (64 for
the defaults), otherwise fewer scales are used with MONAI's first weights renormalised
to sum 1 (reported). At most `max_pairs` pairs (a seeded random subset beyond that).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from ldm_jax.metrics.frechet import batched


def fit_ms_ssim_scales(shape: Sequence[int], kernel: int, max_scales: int = 5) -> int:
    """The most scales (<= max_scales) that MS-SSIM with window `kernel` can use on spatial
    `shape` (X, Y, Z); 0 when not even one window fits."""
    from ldm_jax.metrics.image import ms_ssim_min_size

    fits = [s for s in range(1, max_scales + 1) if min(shape) >= ms_ssim_min_size(kernel, s)]
    return max(fits, default=0)


def ms_ssim_weights(num_scales: int) -> tuple:
    """MONAI's MS-SSIM weights: all five, or the first `num_scales` renormalised to sum 1."""
    from ldm_jax.metrics.image import MS_SSIM_WEIGHTS

    if num_scales == len(MS_SSIM_WEIGHTS):
        return MS_SSIM_WEIGHTS
    w = np.asarray(MS_SSIM_WEIGHTS[:num_scales], np.float64)
    return tuple(float(v) for v in w / w.sum())


def pair_indices(n: int, max_pairs: int, seed: int) -> np.ndarray:
    """(P, 2) index pairs i < j of n items: all, or a seeded random max_pairs of them."""
    pairs = np.array(list(itertools.combinations(range(n), 2)), np.int64).reshape(-1, 2)
    if max_pairs and len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), int(max_pairs), replace=False)
        pairs = pairs[np.sort(keep)]
    return pairs


def pairwise_ms_ssim(volumes, *, data_range: float, kernel: int = 4, sigma: float = 1.5,
                     weights: Sequence[float], max_pairs: int = 1000, seed: int = 0,
                     batch_size: int = 4) -> dict:
    """MS-SSIM (ldm_jax.metrics.image.ms_ssim3d) over pairs of volumes (N, X, Y, Z, C).

    Returns {"mean", "std", "num_pairs"}; mean/std are None with fewer than 2 volumes.
    """
    from ldm_jax.metrics.image import ms_ssim3d

    v = np.asarray(volumes, np.float32)
    pairs = pair_indices(v.shape[0], max_pairs, seed)
    if len(pairs) == 0:
        return {"mean": None, "std": None, "num_pairs": 0}
    def fn(p):  # ms_ssim3d is jitted: one compile per batch shape
        return ms_ssim3d(v[p[:, 0]], v[p[:, 1]], data_range=data_range, win_size=kernel,
                         sigma=sigma, weights=tuple(weights))
    scores = batched(fn, pairs, min(batch_size, len(pairs)))
    return {"mean": float(scores.mean()), "std": float(scores.std()),
            "num_pairs": int(len(pairs))}
