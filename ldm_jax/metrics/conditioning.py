"""Measures of generation conditioned on aligned images (issue 27), and its baselines.

Volumes are channels-last `(B, X, Y, Z, C)` (a trailing channel axis is optional where
stated), intensities in the data's units (the built-in data: [0, 1]); every function
returns numpy, one value per item (B,) unless stated. Foreground: voxels above
`threshold` (0.1 by default, the project's threshold for the built-in data).

- consistency with the condition: `pearson` (correlation over all voxels/pixels) and
  `psnr_minmax` (PSNR with both items min-max normalised to [0, 1], data range 1) between
  the condition computed from a sample and the condition it was given;
- agreement with the true volume: `psnr` and `dice` (thin wrappers of
  ldm_jax.metrics.image's PSNR and foreground Dice), and the depth of the structures
  under each projected line: `depth_centroid`, `depth_error` (voxels; `voxels_to_nm`),
  `depth_coverage` (the fraction of the true columns the error is taken over);
- `diversity` among the K samples of one condition;
- baselines: `back_projection` (a 2D condition smeared along its axis, times a scale
  fitted on training volumes by `fit_back_projection_scale`) and `trilinear_upsample`
  (a coarse condition resampled to the volume grid).
"""

from __future__ import annotations

import itertools

import numpy as np

DEFAULT_THRESHOLD = 0.1
DEFAULT_VOXEL_NM = 20.0  # configs/default.py: data.pointcloud_voxel_size


def _items(x) -> np.ndarray:
    """(B, ...) -> (B, N) float64."""
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1)


def _same_shape(a, b, name):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {a.shape} and {b.shape}")
    return a, b


# ----------------------------------------------------------------------------------------
# Consistency with the condition, agreement with the truth.

def pearson(a, b) -> np.ndarray:
    """Pearson correlation per item over all its elements: (B, ...) x (B, ...) -> (B,).

    Unitless, in [-1, 1]; NaN for an item where either array is constant (undefined:
    e.g. a blank sample's projection).
    """
    a, b = _same_shape(a, b, "pearson")
    a, b = _items(a), _items(b)
    const = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(a * b, axis=1) / den
    return np.where(const | ~(den > 0), np.nan, np.clip(r, -1.0, 1.0))


def minmax(x) -> np.ndarray:
    """Each item of (B, ...) mapped linearly to [0, 1] (its min to 0, max to 1), float64;
    a constant item becomes all zeros."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim))
    lo = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def _psnr_np(a, b, data_range: float) -> np.ndarray:
    mse = np.mean(np.square(_items(a) - _items(b)), axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


def psnr_minmax(a, b) -> np.ndarray:
    """PSNR in dB per item, (B, ...) x (B, ...) -> (B,), with both items min-max normalised
    to [0, 1] first (`minmax`) and data range 1: compares patterns, not intensity scales
    (a projection's sum grows with the depth). +inf when identical after normalising."""
    a, b = _same_shape(a, b, "psnr_minmax")
    return _psnr_np(minmax(a), minmax(b), 1.0)


def psnr(x, y, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB of (B, X, Y, Z, C) `x` against `y` per item, (B,) (ldm_jax.metrics.image.psnr;
    +inf when identical)."""
    from ldm_jax.metrics.image import psnr as _psnr

    return np.asarray(_psnr(*_same_shape(x, y, "psnr"), data_range=data_range), np.float64)


def dice(x, y, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Foreground Dice of (x > threshold) vs (y > threshold) per item, (B,) in [0, 1]
    (ldm_jax.metrics.image.dice_score: two empty masks score 1)."""
    from ldm_jax.metrics.image import dice_score

    return np.asarray(dice_score(*_same_shape(x, y, "dice"), threshold=threshold),
                      np.float64)


# ----------------------------------------------------------------------------------------
# Depth of the structures under each projected line.

def _scalar_volume(volumes) -> np.ndarray:
    """(B, X, Y, Z, C) -> (B, X, Y, Z) float64: the channels' maximum (no-op for 4D)."""
    v = np.asarray(volumes, np.float64)
    if v.ndim == 5:
        v = v.max(axis=-1)
    if v.ndim != 4:
        raise ValueError(f"expected volumes (B, X, Y, Z[, C]), got shape {v.shape}")
    return v


def depth_centroid(volumes, axis: int = 2, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Intensity-weighted mean position along spatial `axis` (0 = X, 1 = Y, 2 = Z) of the
    foreground of each column: (B, X, Y, Z[, C]) -> (B, <the two other spatial axes>),
    e.g. (B, X, Y) for axis 2, in voxels (voxel centres at 0, 1, ..., n - 1).

    Only voxels above `threshold` count (weights = their intensity; channels: their
    maximum), so the background does not pull every centroid to the middle. NaN where a
    column has no voxel above the threshold. A column crossing two structures at
    different depths gets their weighted mean depth (the filaments are sparse: rare).
    """
    v = np.moveaxis(_scalar_volume(volumes), 1 + int(axis), -1)
    w = np.where(v > threshold, v, 0.0)
    total = w.sum(axis=-1)
    pos = np.arange(v.shape[-1], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.sum(w * pos, axis=-1) / total
    return np.where(total > 0, c, np.nan)


def _depth_pairs(samples, truth, axis, threshold):
    s, t = _same_shape(samples, truth, "depth_error")
    cs = depth_centroid(s, axis, threshold)
    ct = depth_centroid(t, axis, threshold)
    true_cols = np.isfinite(ct)
    both = true_cols & np.isfinite(cs)
    return cs, ct, true_cols, both


def depth_error(samples, truth, axis: int = 2, threshold: float = DEFAULT_THRESHOLD
                ) -> np.ndarray:
    """Mean |depth centroid of the sample - that of the truth| in voxels per item, (B,),
    over the columns along `axis` where the TRUE volume has foreground (the projected
    lines) and the sample has foreground too.

    A true column where the sample has nothing has no depth to compare: it is left out
    here and counted by `depth_coverage` (report both: a sample that draws only the easy
    columns would otherwise look good). NaN for an item with no such column. A
    prediction constant along the axis (back-projection) has its centroids at the
    middle, (n - 1) / 2: its error is that of guessing the middle.
    """
    cs, ct, _, both = _depth_pairs(samples, truth, axis, threshold)
    err = np.where(both, np.abs(cs - ct), 0.0)
    n = both.reshape(both.shape[0], -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = err.reshape(err.shape[0], -1).sum(axis=1) / n
    return np.where(n > 0, out, np.nan)


def depth_coverage(samples, truth, axis: int = 2, threshold: float = DEFAULT_THRESHOLD
                   ) -> np.ndarray:
    """Fraction of the true volume's foreground columns (along `axis`) in which the sample
    has foreground too: the columns `depth_error` is taken over, per item (B,) in [0, 1];
    NaN for an item whose truth has no foreground."""
    _, _, true_cols, both = _depth_pairs(samples, truth, axis, threshold)
    n_true = true_cols.reshape(true_cols.shape[0], -1).sum(axis=1)
    n_both = both.reshape(both.shape[0], -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_true > 0, n_both / n_true, np.nan)


def voxels_to_nm(x, voxel_size: float = DEFAULT_VOXEL_NM) -> np.ndarray:
    """A length in voxels -> nm, at `voxel_size` nm per voxel along the measured axis
    (default 20 nm: the point-cloud data's data.pointcloud_voxel_size)."""
    return np.asarray(x, np.float64) * float(voxel_size)


# ----------------------------------------------------------------------------------------
# Diversity among the samples of one condition.

def diversity(samples, threshold: float = DEFAULT_THRESHOLD, data_range: float = 1.0
              ) -> dict:
    """How much the K samples of one condition, (K, X, Y, Z[, C]), differ from each other.

    Returns floats (NaN when K < 2):
      voxel_std: the per-voxel standard deviation over the K samples (ddof 0), averaged
        over all voxels (intensity units; 0 = identical samples);
      fg_voxel_std: the same averaged over the voxels where any sample is above
        `threshold` (the sparse structures; NaN if none is);
      pairwise_psnr: mean PSNR (dB, `data_range`) over the K(K-1)/2 pairs (higher = more
        alike; inf for identical samples);
      pairwise_dice: mean foreground Dice over the pairs (1 = same foreground).
    """
    s = np.asarray(samples, np.float64)
    k = s.shape[0]
    nan = float("nan")
    if k < 2:
        return {"voxel_std": nan, "fg_voxel_std": nan, "pairwise_psnr": nan,
                "pairwise_dice": nan, "num_samples": int(k)}
    std = s.std(axis=0)
    fg = (s > threshold).any(axis=0)
    pairs = np.array(list(itertools.combinations(range(k), 2)))
    a, b = s[pairs[:, 0]], s[pairs[:, 1]]
    return {"voxel_std": float(std.mean()),
            "fg_voxel_std": float(std[fg].mean()) if fg.any() else nan,
            "pairwise_psnr": float(np.mean(_psnr_np(a, b, data_range))),
            "pairwise_dice": float(np.mean(dice(a, b, threshold))),
            "num_samples": int(k)}


# ----------------------------------------------------------------------------------------
# Baselines.

def back_projection(condition, axis: int = 2, size: int = 1, scale: float = 1.0
                    ) -> np.ndarray:
    """The 2D condition smeared along spatial `axis`: (B, X', Y', Z', C) with size 1 on
    `axis` -> the same with `size` there, every voxel `scale` times its pixel (float32).
    `scale` from `fit_back_projection_scale`. Its depth centroids lie at the middle."""
    c = np.asarray(condition, np.float32)
    ax = 1 + int(axis)
    if c.ndim != 5 or c.shape[ax] != 1:
        raise ValueError(f"back_projection expects a (B, X, Y, Z, C) condition with size 1 "
                         f"on axis {axis}, got shape {c.shape}")
    reps = [1] * 5
    reps[ax] = int(size)
    return np.tile(c, reps) * np.float32(scale)


def fit_back_projection_scale(conditions, volumes, axis: int = 2, objective: str = "mse",
                              threshold: float = DEFAULT_THRESHOLD, num: int = 200) -> float:
    """The scale s of `back_projection` fitted on TRAINING volumes (B, X, Y, Z, C) and their
    conditions (B, ..., 1 on `axis`, ...), so the baseline is given its best constant.

    objective "mse": least squares, s = <b, v> / <b, b> with b the unscaled smear (the
    scale with the best PSNR); "dice": the scale of `num` log-spaced candidates from
    threshold / max(b) / 4 to 4 / max(b) with the best mean foreground Dice (the Dice of
    a smear depends only on where it crosses the threshold).
    """
    v = np.asarray(volumes, np.float64)
    b = back_projection(conditions, axis, v.shape[1 + int(axis)], 1.0).astype(np.float64)
    if b.shape != v.shape:
        raise ValueError(f"fit_back_projection_scale: the smeared conditions {b.shape} do "
                         f"not match the volumes {v.shape}")
    if objective == "mse":
        den = float(np.sum(b * b))
        return float(np.sum(b * v) / den) if den > 0 else 0.0
    if objective == "dice":
        top = float(b.max())
        if top <= 0:
            return 0.0
        cands = np.geomspace(threshold / top / 4.0, 4.0 / top, int(num))
        scores = [float(np.mean(dice(b * s, v, threshold))) for s in cands]
        return float(cands[int(np.argmax(scores))])
    raise ValueError(f"objective must be 'mse' or 'dice', got {objective!r}")


def trilinear_upsample(coarse, grid) -> np.ndarray:
    """A coarse volume (B, x, y, z, C) resampled to `grid` = (X, Y, Z) by trilinear
    interpolation (jax.image.resize 'trilinear': half-pixel centres, so coarse voxel i
    sits at the centre of fine block i, where block-mean downsampling puts it; beyond the
    outermost coarse centres the edge value is held). Float32 (B, X, Y, Z, C)."""
    import jax

    c = np.asarray(coarse, np.float32)
    if c.ndim != 5 or len(tuple(grid)) != 3:
        raise ValueError(f"trilinear_upsample expects (B, x, y, z, C) and a grid (X, Y, Z), "
                         f"got {c.shape} and {tuple(grid)}")
    shape = (c.shape[0], *(int(g) for g in grid), c.shape[-1])
    return np.asarray(jax.image.resize(c, shape, method="trilinear"), np.float32)


def block_mean(volumes, factor) -> np.ndarray:
    """Block-mean downsampling (B, X, Y, Z, C) -> (B, X/f, Y/f, Z/f, C) by integer `factor`
    (one or per axis; each size must divide). For tests and the coarse baseline's fit;
    the condition itself comes from ldm_jax.diffusion.aligned.compute_condition."""
    v = np.asarray(volumes, np.float32)
    f = (int(factor),) * 3 if np.isscalar(factor) else tuple(int(x) for x in factor)
    b, x, y, z, c = v.shape
    if x % f[0] or y % f[1] or z % f[2]:
        raise ValueError(f"block_mean: factor {f} does not divide {v.shape[1:4]}")
    v = v.reshape(b, x // f[0], f[0], y // f[1], f[1], z // f[2], f[2], c)
    return v.mean(axis=(2, 4, 6))
