"""Volume -> point cloud: points drawn with probability proportional to intensity.

Each point picks a voxel with probability proportional to max(I - threshold, 0) (a
multinomial draw over all voxels, so the expected count in a voxel is proportional to its
intensity above the threshold), then a position within that voxel: uniform over the
voxel (`jitter="uniform"`), gaussian around its centre (`"gaussian"`, sigma in voxels,
default 1/sqrt(12), the same spread as uniform), or exactly the centre (`"none"`).
Voxel coordinates go to nm through the volume's 4x4 affine (index -> voxel centre).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ldm_jax.errors import DataError, VolumeShapeError

JITTERS = ("uniform", "gaussian", "none")


def as_3d(volume, name: str = "volume") -> np.ndarray:
    """(X, Y, Z) or (X, Y, Z, 1) -> (X, Y, Z) float64; VolumeShapeError otherwise."""
    vol = np.asarray(volume)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise VolumeShapeError(f"{name}: shape {vol.shape} is not one 3D volume (X, Y, Z) or "
                               f"(X, Y, Z, 1); save one channel per file.")
    if vol.dtype.kind not in "biuf":
        raise VolumeShapeError(f"{name}: voxel type {vol.dtype} is not a real number.")
    return vol.astype(np.float64, copy=False)


def num_points_for(volume, *, num_points: Optional[int] = None,
                   points_per_unit: Optional[float] = None, threshold: float = 0.0,
                   name: str = "volume") -> int:
    """How many points to draw: `num_points`, or round(points_per_unit * sum of max(I - t, 0))."""
    if (num_points is None) == (points_per_unit is None):
        raise DataError("give exactly one of a number of points (--num_points) and points per "
                        "unit of intensity (--points_per_unit_intensity).")
    if num_points is not None:
        if int(num_points) < 1:
            raise DataError(f"the number of points must be >= 1, got {num_points}.")
        return int(num_points)
    if not float(points_per_unit) > 0:
        raise DataError(f"points per unit intensity must be > 0, got {points_per_unit}.")
    total = float(np.clip(as_3d(volume, name) - threshold, 0, None).sum())
    return int(round(float(points_per_unit) * total))


def sample_points(volume, affine, num_points: int, *, threshold: float = 0.0,
                  jitter: str = "uniform", jitter_sigma: Optional[float] = None,
                  rng: Optional[np.random.Generator] = None, name: str = "volume") -> np.ndarray:
    """Draws `num_points` points from a volume; returns (num_points, 3) float64 positions.

    Args:
      volume: (X, Y, Z) or (X, Y, Z, 1), any real dtype; NaN/Inf is an error.
      affine: 4x4, voxel index -> centre position (nm for ldm_jax's point clouds).
      threshold: intensities at or below it draw no points; weights are I - threshold.
      jitter: "uniform" | "gaussian" | "none" (see the module docstring);
        jitter_sigma: gaussian sigma in voxels (default 1/sqrt(12)).
    Raises DataError when nothing lies above the threshold or an argument is bad.
    """
    if jitter not in JITTERS:
        raise DataError(f"jitter must be one of {list(JITTERS)}, got {jitter!r}.")
    vol = as_3d(volume, name)
    if not np.isfinite(vol).all():
        raise DataError(f"{name}: {int((~np.isfinite(vol)).sum())} voxel(s) are NaN or Inf; "
                        f"fix the volume before sampling points from it.")
    w = np.clip(vol - float(threshold), 0, None).ravel()
    total = w.sum()
    if not total > 0:
        raise DataError(f"{name}: no voxel is above the threshold {threshold:g} (max "
                        f"{vol.max():g}); lower --threshold.")
    rng = rng if rng is not None else np.random.default_rng(0)
    n = int(num_points)
    nz = np.flatnonzero(w)
    counts = rng.multinomial(n, w[nz] / total) if n > 0 else np.zeros(len(nz), np.int64)
    flat = np.repeat(nz, counts)
    ijk = np.stack(np.unravel_index(flat, vol.shape), axis=1).astype(np.float64)
    if jitter == "uniform":
        ijk += rng.uniform(-0.5, 0.5, size=ijk.shape)
    elif jitter == "gaussian":
        s = 1.0 / math.sqrt(12.0) if jitter_sigma is None else float(jitter_sigma)
        ijk += rng.normal(0.0, s, size=ijk.shape)
    a = np.asarray(affine, np.float64)
    pts = ijk @ a[:3, :3].T + a[:3, 3]
    return pts[rng.permutation(len(pts))]  # no voxel order in the output


__all__ = ["JITTERS", "as_3d", "num_points_for", "sample_points"]
