"""Voxelising point clouds (positions in nm) onto a 3D grid, and the grid's geometry.

A `Grid` is a box of voxels: `origin` is the lower corner of voxel (0, 0, 0) in nm and
voxel (i, j, k) covers origin + [i, i+1) * voxel_size (and so on per axis). Its 4x4
`affine` maps voxel indices to voxel centres in nm (the NIfTI convention), so a position
survives voxelise -> sample back to within its voxel.

Methods (`voxelize`):
  occupancy  1 where a voxel holds at least one point, else 0
  density    points per voxel (counts)
  gaussian   each point spread as a 3D gaussian of `sigma` nm (e.g. the localisation
             precision), integrated exactly over each voxel (erf differences, separable
             per axis); every point inside the grid adds exactly 1 (weight that would
             fall outside the grid is renormalised into it), so the volume sums to the
             number of points inside the grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from ldm_jax.errors import DataError

METHODS = ("occupancy", "density", "gaussian")
_TRUNCATE = 4.0  # gaussian splat radius in sigmas


def triple(value, name: str, positive: bool = True) -> Optional[tuple]:
    """None, one number or an (x, y, z) triple -> None or a float triple (DataError if bad)."""
    if value is None:
        return None
    vals = (value,) * 3 if np.isscalar(value) else tuple(value)
    try:
        vals = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be one number or an (x, y, z) triple, got {value!r}.") from None
    if len(vals) != 3 or (positive and any(not v > 0 for v in vals)):
        raise DataError(f"{name} must be one positive number or an (x, y, z) triple of them, "
                        f"got {value!r}.")
    return vals


@dataclasses.dataclass(frozen=True)
class Grid:
    """shape (X, Y, Z) voxels; origin = lower corner of voxel 0 and voxel_size, both nm."""

    shape: tuple
    origin: tuple
    voxel_size: tuple

    @property
    def affine(self) -> np.ndarray:
        """4x4: voxel index (i, j, k) -> centre of that voxel in nm."""
        a = np.diag([*self.voxel_size, 1.0])
        a[:3, 3] = np.asarray(self.origin) + 0.5 * np.asarray(self.voxel_size)
        return a

    @property
    def fov(self) -> tuple:
        """(lower corner, upper corner) in nm."""
        lo = np.asarray(self.origin)
        return tuple(lo), tuple(lo + np.asarray(self.shape) * np.asarray(self.voxel_size))

    def coordinates(self, points: np.ndarray) -> np.ndarray:
        """Points (N, 3) nm -> continuous voxel coordinates, voxel k covering [k, k+1)."""
        return (np.asarray(points, np.float64) - np.asarray(self.origin)) / np.asarray(self.voxel_size)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """(N,) bool: the point lies in the grid's field of view (upper faces included)."""
        u = self.coordinates(points)
        return np.all((u >= 0) & (u <= np.asarray(self.shape)), axis=1)

    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4  # float32 voxels


def make_grid(
    points: np.ndarray,
    *,
    voxel_size=None,
    shape: Optional[Sequence[int]] = None,
    fov=None,
    margin: float = 0.0,
    max_gib: float = 2.0,
    name: str = "cloud",
) -> Grid:
    """The grid a cloud is voxelised on.

    Args:
      points: (N, 3) float positions in nm (already checked finite and non-empty).
      voxel_size: nm, one number or (x, y, z); None only together with `shape`.
      shape: (X, Y, Z) voxels. With voxel_size: a box of that size centred on the cloud's
        bounds. Without: the cloud's bounds (+ margin) fitted into `shape` with cubic
        voxels (the largest size needed on any axis).
      fov: fixed field of view ((x0, y0, z0), (x1, y1, z1)) in nm, the same for every
        cloud; with voxel_size the shape is ceil(extent / voxel_size) (the box grows to
        a whole number of voxels), with shape the voxel size is extent / shape.
      margin: nm added on every side of the cloud's bounds (per-cloud bounds only).
      max_gib: refuse grids whose float32 voxels would need more than this.
      name: the cloud's name, for messages.
    With neither shape nor fov the grid covers the cloud's bounds (+ margin), its origin a
    multiple of the voxel size (clouds voxelised separately share one lattice).
    Raises DataError for inconsistent settings or a grid over `max_gib`.
    """
    v = triple(voxel_size, "voxel size")
    if shape is not None:
        shape = tuple(int(s) for s in (shape if not np.isscalar(shape) else (shape,) * 3))
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"grid shape must be 3 positive ints (X, Y, Z), got {shape!r}.")
    if v is None and shape is None:
        raise DataError("point-cloud voxelisation needs a voxel size (nm) or a grid shape; "
                        "set data.pointcloud_voxel_size or --voxel_size, or a shape.")
    pts = np.asarray(points, np.float64)
    if fov is not None:
        try:
            lo, hi = (np.asarray(c, np.float64).reshape(3) for c in fov)
        except (TypeError, ValueError):
            raise DataError(f"field of view must be ((x0, y0, z0), (x1, y1, z1)) in nm, got {fov!r}.") from None
        if not np.all(hi > lo):
            raise DataError(f"field of view {fov!r} is empty: every upper corner must exceed the lower one.")
        if v is not None and shape is not None:
            raise DataError("give two of field of view, voxel size and grid shape, not all three "
                            "(the third follows).")
        if v is None:
            v = tuple((hi - lo) / np.asarray(shape))
        else:
            shape = tuple(int(s) for s in np.maximum(1, np.ceil((hi - lo) / np.asarray(v) - 1e-9)))
        grid = Grid(shape, _floats(lo), _floats(v))
    else:
        lo, hi = pts.min(axis=0) - margin, pts.max(axis=0) + margin
        if shape is not None:
            if v is None:
                extent = np.maximum(hi - lo, 1e-9)
                v = (float((extent / np.asarray(shape)).max()) * (1 + 1e-9),) * 3
            centre = 0.5 * (lo + hi)
            origin = centre - 0.5 * np.asarray(shape) * np.asarray(v)
            grid = Grid(shape, _floats(origin), _floats(v))
        else:
            va = np.asarray(v)
            origin = np.floor(lo / va) * va
            shape = tuple(int(s) for s in np.floor((hi - origin) / va) + 1)
            grid = Grid(shape, _floats(origin), _floats(v))
    limit = float(max_gib) * 2**30
    if grid.nbytes() > limit:
        ext = np.asarray(grid.shape) * np.asarray(grid.voxel_size)
        raise DataError(
            f"{name}: a {grid.shape} grid ({' x '.join(f'{e:.0f}' for e in ext)} nm at voxel size "
            f"{_fmt(grid.voxel_size)} nm) would need {grid.nbytes() / 2**30:.2f} GiB, over the "
            f"limit of {max_gib:g} GiB; use a larger voxel size, a field of view (data.pointcloud_fov"
            f" / --fov; far outliers widen a cloud's bounds) or raise data.pointcloud_max_gib / "
            f"--max_gib.")
    return grid


def _floats(v) -> tuple:
    return tuple(float(x) for x in v)


def _fmt(v) -> str:
    return f"{v[0]:g}" if len(set(v)) == 1 else "(" + ", ".join(f"{x:g}" for x in v) + ")"


def voxelize(points: np.ndarray, grid: Grid, method: str = "density", sigma=None) -> tuple:
    """Points (N, 3) nm -> (volume (X, Y, Z) float32, number of points inside the grid).

    Points outside the grid's field of view are left out (the count says how many are
    in). `sigma` (nm, number or triple) is needed by the "gaussian" method only.
    Raises DataError for an unknown method or a missing sigma.
    """
    if method not in METHODS:
        raise DataError(f"voxelisation method {method!r} is not one of {list(METHODS)}.")
    shape = tuple(grid.shape)
    u = grid.coordinates(points)[grid.inside(points)]
    n_in = int(len(u))
    size = int(np.prod(shape, dtype=np.int64))
    if method == "gaussian":
        s = triple(sigma, "gaussian sigma (nm)")
        if s is None:
            raise DataError("the 'gaussian' voxelisation needs a sigma in nm "
                            "(data.pointcloud_sigma / --sigma).")
        out = _splat(u, shape, np.asarray(s) / np.asarray(grid.voxel_size))
    else:
        idx = np.minimum(np.floor(u).astype(np.int64), np.asarray(shape) - 1)
        flat = np.ravel_multi_index(idx.T, shape) if n_in else np.zeros(0, np.int64)
        out = np.bincount(flat, minlength=size).astype(np.float32)
        if method == "occupancy":
            out = (out > 0).astype(np.float32)
    return out.reshape(shape).astype(np.float32, copy=False), n_in


def _axis_weights(u: np.ndarray, n: int, s: float, r: int):
    """(indices (P, K), weights (P, K)) of voxels along one axis, each row summing to 1."""
    from scipy.special import ndtr  # standard normal CDF

    base = np.floor(u).astype(np.int64)[:, None] + np.arange(-r, r + 1)
    w = ndtr((base + 1 - u[:, None]) / s) - ndtr((base - u[:, None]) / s)
    w[(base < 0) | (base >= n)] = 0.0
    total = w.sum(axis=1, keepdims=True)
    # A point on the grid's edge with its mass outside (tiny sigma): put it in its voxel.
    empty = total[:, 0] <= 0
    if empty.any():
        w[empty] = 0.0
        w[empty, r] = 1.0
        total[empty] = 1.0
    return np.clip(base, 0, n - 1), w / total


def _splat(u: np.ndarray, shape: tuple, s: np.ndarray) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    out = np.zeros(size, np.float64)
    if not len(u):
        return out
    radii = [max(1, int(math.ceil(_TRUNCATE * si))) for si in s]
    k3 = np.prod([2 * r + 1 for r in radii])
    chunk = max(1, (1 << 22) // int(k3))  # ~4M splat values (~100 MB) at a time
    u = np.minimum(u, np.asarray(shape) - 1e-9)  # a point on the upper face: last voxel
    for start in range(0, len(u), chunk):
        part = u[start:start + chunk]
        (ix, wx), (iy, wy), (iz, wz) = (
            _axis_weights(part[:, a], shape[a], float(s[a]), radii[a]) for a in range(3))
        idx = (ix[:, :, None, None] * shape[1] + iy[:, None, :, None]) * shape[2] + iz[:, None, None, :]
        w = wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]
        out += np.bincount(idx.ravel(), w.ravel(), minlength=size)
    return out


__all__ = ["Grid", "METHODS", "make_grid", "triple", "voxelize"]
