"""Distances between two point clouds (positions in nm): Chamfer and an Earth Mover's
approximation, for scoring a cloud against its reconstruction.

- Chamfer (symmetric, not squared): the mean of the two directed mean nearest-neighbour
  distances, (mean_a min_b |a - b| + mean_b min_a |b - a|) / 2, with
  scipy.spatial.cKDTree. In nm.
- EMD approximation: equal-size random subsamples of both clouds (`num_points` each, or
  the smaller cloud's size), matched one-to-one by scipy.optimize.linear_sum_assignment
  on Euclidean distances; the mean matched distance in nm. linear_sum_assignment is
  O(n^3), so `num_points` stays in the low thousands.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ldm_jax.errors import DataError


def _check(a, b) -> tuple:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, x in (("first", a), ("second", b)):
        if x.ndim != 2 or x.shape[1] != 3:
            raise DataError(f"the {name} cloud must be (N, 3) positions, got shape {x.shape}.")
        if not len(x):
            raise DataError(f"the {name} cloud is empty; distances need points in both clouds.")
    return a, b


def chamfer_distance(a, b) -> dict:
    """{"chamfer": symmetric mean distance, "a_to_b", "b_to_a": directed means}, in the
    clouds' units (nm). a: (N, 3), b: (M, 3). Raises DataError for empty / bad shapes."""
    from scipy.spatial import cKDTree

    a, b = _check(a, b)
    ab = float(cKDTree(b).query(a)[0].mean())
    ba = float(cKDTree(a).query(b)[0].mean())
    return {"chamfer": 0.5 * (ab + ba), "a_to_b": ab, "b_to_a": ba}


def emd_approx(a, b, num_points: Optional[int] = 1000,
               rng: Optional[np.random.Generator] = None) -> float:
    """Mean distance of an optimal one-to-one matching of equal-size random subsamples
    (min(num_points, len(a), len(b)) points each) of a (N, 3) and b (M, 3)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    a, b = _check(a, b)
    rng = rng if rng is not None else np.random.default_rng(0)
    n = min(len(a), len(b), int(num_points) if num_points else len(a))
    sa = a[rng.choice(len(a), n, replace=False)]
    sb = b[rng.choice(len(b), n, replace=False)]
    cost = cdist(sa, sb)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


__all__ = ["chamfer_distance", "emd_approx"]
