"""SMLM-like localisations of microtubules: the built-in point clouds.

The filaments are the curves of ldm_jax.data.synthetic.filaments (same generator, same rng order:
cloud (seed, split, index) follows the filaments of `render_filaments` with the same
arguments), scaled from voxels to nm by the voxel size. Per filament:
  labels        Poisson(label_density * length) positions uniform along the curve, each
                offset perpendicular to it by `radius` nm in a random direction (labels
                sit on the tube's surface; 12.5 nm is a bare microtubule's radius);
  blinking      each label gives k localisations, k ~ geometric (mean `blinks`, k >= 1)
                or Poisson (mean `blinks`, k = 0 possible: a label never seen);
  precision     each localisation is its label + gaussian noise, sigma `precision` nm per
                axis (SMLM's z is usually 2-3x worse than x, y);
plus uniform background localisations, a fraction `background` of all of them. Only
localisations inside the field of view [0, shape * voxel_size) nm are kept.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ldm_jax.data.synthetic.filaments import _STEP, filament_curves
from ldm_jax.errors import DataError

BLINK_DISTRIBUTIONS = ("geometric", "poisson")


@dataclasses.dataclass(frozen=True)
class SMLMParams:
    """Localisation model; lengths in nm."""

    label_density: float = 0.1  # labels per nm of filament
    precision: tuple = (10.0, 10.0, 20.0)  # localisation sigma (x, y, z), nm
    blinks: float = 2.0  # mean localisations per label
    blink_dist: str = "geometric"
    background: float = 0.05  # fraction of localisations uniform in the field of view
    radius: float = 12.5  # labels' distance from the filament axis

    def __post_init__(self):
        if not self.label_density > 0:
            raise DataError(f"data.smlm_label_density must be > 0 labels per nm, got {self.label_density}.")
        if len(self.precision) != 3 or min(self.precision) < 0:
            raise DataError(f"data.smlm_precision must be 3 non-negative sigmas in nm, got {self.precision}.")
        if self.blink_dist not in BLINK_DISTRIBUTIONS:
            raise DataError(f"data.smlm_blink_dist must be one of {list(BLINK_DISTRIBUTIONS)}, "
                            f"got {self.blink_dist!r}.")
        if not (self.blinks >= 1 if self.blink_dist == "geometric" else self.blinks > 0):
            raise DataError(f"data.smlm_blinks (mean localisations per label) must be >= 1 for "
                            f"geometric, > 0 for poisson; got {self.blinks}.")
        if not 0 <= self.background < 1:
            raise DataError(f"data.smlm_background must be a fraction in [0, 1), got {self.background}.")
        if self.radius < 0:
            raise DataError(f"data.smlm_radius must be >= 0 nm, got {self.radius}.")


def _labels_on_curve(pts_nm: np.ndarray, n: int, radius: float, rng) -> np.ndarray:
    seg = np.diff(pts_nm, axis=0)
    length = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(length)])
    s = rng.uniform(0.0, cum[-1], size=n)
    pos = np.stack([np.interp(s, cum, pts_nm[:, a]) for a in range(3)], axis=1)
    if radius > 0:
        i = np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1)
        t = seg[i] / np.maximum(length[i], 1e-12)[:, None]
        r = rng.normal(size=(n, 3))
        r -= np.sum(r * t, axis=1, keepdims=True) * t
        r /= np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        pos += radius * r
    return pos


def simulate_localisations(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    *,
    seed: int,
    index: int,
    split: int = 0,
    num_filaments: Sequence[int] = (8, 24),
    width: Sequence[float] = (0.8, 2.0),
    params: SMLMParams = SMLMParams(),
) -> np.ndarray:
    """(N, 3) float64 localisations in nm inside [0, shape * voxel_size), deterministic in
    (seed, split, index). shape: the field of view in voxels (X, Y, Z); voxel_size: nm."""
    shape = tuple(int(s) for s in shape)
    v = np.asarray(voxel_size, np.float64).reshape(-1) * np.ones(3)
    fov = np.asarray(shape) * v
    curve_rng = np.random.default_rng([int(seed), int(split), int(index)])
    rng = np.random.default_rng([int(seed), int(split), int(index), 1])
    labels = []
    for pts, _, _ in filament_curves(shape, curve_rng, num_filaments, width):
        pts_nm = (pts + 0.5) * v  # voxel k's centre is at (k + 0.5) * voxel_size
        if len(pts_nm) < 2:
            continue
        length = (len(pts_nm) - 1) * _STEP * float(v.mean())
        n = int(rng.poisson(params.label_density * length))
        labels.append(_labels_on_curve(pts_nm, n, params.radius, rng))
    labels = np.concatenate(labels) if labels else np.zeros((0, 3))
    if params.blink_dist == "geometric":
        k = rng.geometric(1.0 / params.blinks, size=len(labels))
    else:
        k = rng.poisson(params.blinks, size=len(labels))
    locs = np.repeat(labels, k, axis=0)
    locs += rng.normal(size=locs.shape) * np.asarray(params.precision)
    locs = locs[np.all((locs >= 0) & (locs < fov), axis=1)]
    if params.background > 0:
        n_bg = int(rng.poisson(params.background / (1 - params.background) * max(len(locs), 1)))
        locs = np.concatenate([locs, rng.uniform(0, 1, size=(n_bg, 3)) * fov])
    return locs[rng.permutation(len(locs))]


__all__ = ["BLINK_DISTRIBUTIONS", "SMLMParams", "simulate_localisations"]
