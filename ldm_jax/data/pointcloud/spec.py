"""How point clouds are read and voxelised for a config: `CloudSpec` from config.data.

Lengths are in nm; the fields are data.pointcloud_* and data.smlm_* (configs/default.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ldm_jax.data.pointcloud import io as pio
from ldm_jax.data.pointcloud.grid import Grid, make_grid, triple, voxelize
from ldm_jax.data.pointcloud.io import CloudRef
from ldm_jax.data.synthetic.smlm import SMLMParams
from ldm_jax.errors import DataError


def parse_columns(value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",")]
    cols = tuple(int(c) if isinstance(c, (int, np.integer)) else str(c) for c in value)
    # "3 names or indices": x, y, z in that order.
    if len(cols) != 3:
        raise DataError(f"data.pointcloud_columns must be 3 names or 0-based indices (x, y, z), "
                        f"got {value!r}.")
    return cols


def parse_fov(value) -> Optional[tuple]:
    if value is None:
        return None
    flat = np.asarray(value, np.float64).reshape(-1)
    if flat.size != 6:
        raise DataError(f"data.pointcloud_fov must be ((x0, y0, z0), (x1, y1, z1)) in nm, got {value!r}.")
    return tuple(flat[:3]), tuple(flat[3:])


@dataclasses.dataclass(frozen=True)
class CloudSpec:
    """How clouds are read and voxelised (lengths in nm); see configs/default.py."""

    voxel_size: Optional[tuple] = (20.0, 20.0, 20.0)
    shape: Optional[tuple] = None
    fov: Optional[tuple] = None
    margin: float = 0.0
    method: str = "gaussian"
    sigma: Optional[tuple] = (10.0, 10.0, 10.0)
    columns: Optional[tuple] = None
    scale: tuple = (1.0, 1.0, 1.0)
    dataset: Optional[str] = None
    max_gib: float = 2.0
    smlm: SMLMParams = SMLMParams()

    @classmethod
    def from_config(cls, config) -> "CloudSpec":
        """From config.data (fields missing in older configs take the defaults above)."""
        d, c = config.data, cls()
        shape = d.get("pointcloud_shape")
        return cls(
            voxel_size=triple(d.get("pointcloud_voxel_size", c.voxel_size), "data.pointcloud_voxel_size"),
            shape=None if shape is None else tuple(int(s) for s in shape),
            fov=parse_fov(d.get("pointcloud_fov")),
            margin=float(d.get("pointcloud_margin", c.margin)),
            method=str(d.get("pointcloud_method", c.method)),
            sigma=triple(d.get("pointcloud_sigma", c.sigma), "data.pointcloud_sigma"),
            columns=parse_columns(d.get("pointcloud_columns")),
            scale=triple(d.get("pointcloud_scale", c.scale), "data.pointcloud_scale"),
            dataset=d.get("pointcloud_dataset") or None,
            max_gib=float(d.get("pointcloud_max_gib", c.max_gib)),
            smlm=SMLMParams(
                label_density=float(d.get("smlm_label_density", c.smlm.label_density)),
                precision=triple(d.get("smlm_precision", c.smlm.precision), "data.smlm_precision", False),
                blinks=float(d.get("smlm_blinks", c.smlm.blinks)),
                blink_dist=str(d.get("smlm_blink_dist", c.smlm.blink_dist)),
                background=float(d.get("smlm_background", c.smlm.background)),
                radius=float(d.get("smlm_radius", c.smlm.radius)),
            ),
        )

    def grid(self, points: np.ndarray, name: str = "cloud") -> Grid:
        return make_grid(points, voxel_size=self.voxel_size, shape=self.shape, fov=self.fov,
                         margin=self.margin, max_gib=self.max_gib, name=name)

    def voxelize(self, points: np.ndarray, name: str = "cloud", grid: Optional[Grid] = None):
        """(N, 3) nm -> (volume (X, Y, Z) float32, Grid, points inside the grid)."""
        pio.check_points(np.asarray(points, np.float64).reshape(-1, 3), name)
        grid = grid or self.grid(points, name)
        vol, n_in = voxelize(points, grid, self.method, self.sigma)
        return vol, grid, n_in

    def read(self, ref: CloudRef) -> np.ndarray:
        return pio.read_cloud(ref, self.columns, self.scale)
