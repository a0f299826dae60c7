"""Distances between voxel intensity distributions.

**Intensity distances**: Wasserstein-1 between the voxel intensity distributions of all
real and all generated voxels (scipy.stats.wasserstein_distance, in intensity units; a
seeded subsample of at most `max_voxels` voxels per set), and the histogram
intersection sum(min(p, q)) over 256 bins spanning both sets (1 = identical histograms).
They see only the marginal intensity distribution, no structure.
"""

from __future__ import annotations

import numpy as np

HIST_BINS = 256


def _subsample(values: np.ndarray, max_values: int, rng) -> np.ndarray:
    if max_values and values.size > max_values:
        return values[rng.choice(values.size, int(max_values), replace=False)]
    return values


def intensity_distances(real, fake, *, bins: int = HIST_BINS, max_voxels: int = 2_000_000,
                        seed: int = 0) -> dict:
    """Voxel intensity distances between two sets of volumes (any shapes, same units).

    Returns {"wasserstein1": W1 in intensity units (scipy.stats.wasserstein_distance on a
    seeded subsample of <= max_voxels voxels per set; all voxels when fewer),
    "histogram_intersection": sum(min(p, q)) in [0, 1] over `bins` bins spanning both sets,
    "real": {"mean", "std"}, "samples": {"mean", "std"}, "voxels_used": [real, samples]}.
    """
    from scipy.stats import wasserstein_distance

    r = np.asarray(real, np.float32).ravel()
    f = np.asarray(fake, np.float32).ravel()
    rs = _subsample(r, max_voxels, np.random.default_rng([seed, 0]))
    fs = _subsample(f, max_voxels, np.random.default_rng([seed, 1]))
    lo, hi = float(min(r.min(), f.min())), float(max(r.max(), f.max()))
    if hi <= lo:
        hi = lo + 1.0
    p, _ = np.histogram(r, bins=bins, range=(lo, hi))
    q, _ = np.histogram(f, bins=bins, range=(lo, hi))
    inter = float(np.minimum(p / p.sum(), q / q.sum()).sum())
    return {
        "wasserstein1": float(wasserstein_distance(rs, fs)),
        "histogram_intersection": inter,
        "bins": int(bins),
        "range": [lo, hi],
        "real": {"mean": float(r.mean()), "std": float(r.std())},
        "samples": {"mean": float(f.mean()), "std": float(f.std())},
        "voxels_used": [int(rs.size), int(fs.size)],
    }
