"""Procedural microtubule-like volumes: the default dataset when the user has none.

Each volume holds a random number of long, gently curving 3D filaments (some crossing),
rendered with a gaussian point-spread onto the voxel grid, intensities 0..255 (uint8) like
the original PyTorch project's voxelised point clouds. A volume depends only on (seed,
split, index), so every host and worker regenerates the same volume for the same index.

Rendering: a unit-peak gaussian stamp (the point-spread, sigma = the filament's width) is
added every ~1.2 sigma along each curve, all summed with one np.bincount. This touches only
voxels near filaments, so it is faster than splatting then blurring the whole grid, and
every filament keeps its own width.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

_STEP = 0.5  # voxels between points of the generated curve
_SPACING = 1.2  # stamps every _SPACING * sigma voxels (ripple along the line < 1e-5)
_TRUNCATE = 3.0  # gaussian kernel radius in sigmas
_BRIGHTNESS = (0.4, 1.0)  # peak intensity of a filament, fraction of 255
_LENGTH = (0.7, 1.5)  # filament length, fraction of the largest volume side
_CORRELATION = 40.0  # voxels over which the tangent's wobble is correlated
_WOBBLE = (0.1, 0.35)  # amplitude of tangent wobble (gentle curves)
_BEND = (0.0, 0.8)  # extra steady bend over the whole filament


def _curve(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """Points (N, 3) along one smooth random curve passing through the volume."""
    from scipy.ndimage import gaussian_filter1d

    smax = float(shape.max())
    length = rng.uniform(*_LENGTH) * smax
    n = max(2, int(length / _STEP))
    # Thin axes (e.g. Z=64 of 256x256x64) get flatter filaments, like a cell's thin slab.
    flat = np.minimum(1.0, 2.0 * shape / smax)
    d0 = rng.normal(size=3) * flat
    d0 /= np.linalg.norm(d0) + 1e-12
    n0 = np.cross(d0, rng.normal(size=3) * flat)
    n0 /= np.linalg.norm(n0) + 1e-12
    corr = _CORRELATION / _STEP
    wobble = gaussian_filter1d(rng.normal(size=(n, 3)), corr, axis=0, mode="reflect")
    wobble /= wobble.std() + 1e-12
    s = np.linspace(-0.5, 0.5, n)[:, None]
    tangent = (
        d0
        + rng.uniform(*_WOBBLE) * wobble * flat
        + rng.uniform(*_BEND) * s * n0
    )
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    pts = np.cumsum(tangent * _STEP, axis=0)
    centre = rng.uniform(0.1, 0.9, size=3) * (shape - 1)
    return pts - pts[n // 2] + centre


def _stamp(pts: np.ndarray, sigma: float, weight: float, shape: tuple):
    """(flat indices, values) of a unit-peak gaussian of `sigma` at each point, within `shape`."""
    r = int(math.ceil(_TRUNCATE * sigma))
    offs = np.arange(-r, r + 1)
    centre = np.rint(pts).astype(np.int64)
    coords = centre[:, :, None] + offs  # (n, 3, K)
    g = np.exp(-((coords - pts[:, :, None]) ** 2) / (2.0 * sigma**2)).astype(np.float32)
    for ax, n in enumerate(shape):
        outside = (coords[:, ax] < 0) | (coords[:, ax] >= n)
        g[:, ax][outside] = 0.0  # drop voxels outside the grid (clip keeps indices valid)
        coords[:, ax] = np.clip(coords[:, ax], 0, n - 1)
    vals = (
        g[:, 0, :, None, None] * g[:, 1, None, :, None] * g[:, 2, None, None, :]
    ) * np.float32(weight)
    idx = (
        coords[:, 0, :, None, None] * shape[1] + coords[:, 1, None, :, None]
    ) * shape[2] + coords[:, 2, None, None, :]
    return idx.ravel(), vals.ravel()


def _ranges(num_filaments, width):
    nmin, nmax = (int(num_filaments), int(num_filaments)) if np.isscalar(num_filaments) else map(int, num_filaments)
    wmin, wmax = (float(width), float(width)) if np.isscalar(width) else map(float, width)
    if nmin < 0 or nmax < nmin:
        raise ValueError(f"data.num_filaments must be (min, max) with 0 <= min <= max, got {num_filaments}")
    if wmin <= 0 or wmax < wmin:
        raise ValueError(f"data.filament_width must be (min, max) with 0 < min <= max, got {width}")
    return nmin, nmax, wmin, wmax


def filament_curves(
    shape: Sequence[int],
    rng: np.random.Generator,
    num_filaments: Sequence[int] = (8, 24),
    width: Sequence[float] = (0.8, 2.0),
):
    """Yields (points (N, 3) in voxel coordinates, sigma in voxels, peak 0..255) per filament.

    Points are 0.5 voxel apart along the curve, voxel k's centre at coordinate k, kept
    within 3 sigma of the volume. `render_filaments` draws these curves (same rng, same
    order); ldm_jax.data.synthetic.smlm places localisations along them.
    """
    nmin, nmax, wmin, wmax = _ranges(num_filaments, width)
    dims = np.array([int(s) for s in shape], np.float64)
    for _ in range(int(rng.integers(nmin, nmax + 1))):
        sigma = float(rng.uniform(wmin, wmax))
        pts = _curve(rng, dims)
        r = _TRUNCATE * sigma
        pts = pts[np.all((pts > -r) & (pts < dims - 1 + r), axis=1)]
        if not len(pts):
            continue
        yield pts, sigma, rng.uniform(*_BRIGHTNESS) * 255.0


def render_filaments(
    shape: Sequence[int],
    *,
    seed: int,
    index: int,
    split: int = 0,
    num_filaments: Sequence[int] = (8, 24),
    width: Sequence[float] = (0.8, 2.0),
    noise: float = 0.0,
) -> np.ndarray:
    """One (X, Y, Z) uint8 volume of filaments, deterministic in (seed, split, index).

    num_filaments: (min, max) count per volume; width: (min, max) gaussian sigma in voxels;
    noise: std of additive gaussian noise in 0..255 units (0 = clean background).
    """
    shape = tuple(int(s) for s in shape)
    _ranges(num_filaments, width)
    rng = np.random.default_rng([int(seed), int(split), int(index)])
    idx_parts, val_parts = [], []
    for pts, sigma, brightness in filament_curves(shape, rng, num_filaments, width):
        # Stamps every ~1.2 sigma sum to a smooth line (ripple < 1e-5 of the peak).
        every = max(1, int(_SPACING * sigma / _STEP))
        pts = pts[::every]
        # Unit-peak gaussians spaced h along a line sum to sqrt(2 pi) sigma / h on its axis.
        weight = brightness * every * _STEP / (math.sqrt(2.0 * math.pi) * sigma)
        i, v = _stamp(pts, sigma, weight, shape)
        idx_parts.append(i)
        val_parts.append(v)
    size = int(np.prod(shape))
    if idx_parts:
        out = np.bincount(np.concatenate(idx_parts), np.concatenate(val_parts), minlength=size)
    else:
        out = np.zeros(size)
    out = out.reshape(shape)
    if noise > 0:
        out += rng.normal(0.0, noise, size=shape)
    np.clip(out, 0, 255, out=out)
    return np.rint(out, out=out).astype(np.uint8)
