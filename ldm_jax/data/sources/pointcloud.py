"""Grain sources of point clouds voxelised on the fly.

  pointcloud      clouds from files (data.train_dir: CSV / .npy / .npz / HDF5), each
                  voxelised with data.pointcloud_* (per-cloud bounds by default, so the
                  grid's size varies; training then crops data.volume_size from it)
  synthetic_smlm  built-in SMLM-like localisations (ldm_jax.data.synthetic.smlm) in a field of view
                  of data.volume_size voxels of data.pointcloud_voxel_size nm, voxelised
                  onto exactly that grid

Records are {"image": (X, Y, Z, 1) float32 after the intensity window, "name": str}, like
every source (see sources.py). The window applies to what the voxelisation gives
(localisations per voxel for density/gaussian, 0/1 for occupancy): set data.a_max to
about the densest voxels (the default 255 is for 8-bit images; ~2 suits the built-in
clouds with the gaussian method at 20 nm).
"""

from __future__ import annotations

import hashlib
import warnings

from ldm_jax.data.pointcloud import io as pio
from ldm_jax.data.pointcloud.grid import Grid
from ldm_jax.data.pointcloud.spec import CloudSpec
from ldm_jax.data.sources.files import split_files
from ldm_jax.data.sources.synthetic import TRAIN, VAL, num_records_check
from ldm_jax.data.transforms import Prep, preprocess
from ldm_jax.errors import BadFileError, DataError, DataWarning


def _one_channel(prep: Prep) -> None:
    if prep.channels != 1:
        raise DataError(f"data.source={prep.source!r} makes 1-channel volumes but "
                        f"autoencoder.in_channels={prep.channels}; set in_channels=1.")


class PointCloudSource:
    """Clouds from files, voxelised per record; unreadable ones become {"bad_file": ...}
    when data.skip_bad_files (like FileSource)."""

    def __init__(self, refs, prep: Prep, spec: CloudSpec, split: str = "train"):
        _one_channel(prep)
        self._refs, self._prep, self._spec = list(refs), prep, spec
        digest = hashlib.sha1("\n".join(map(str, self._refs)).encode()).hexdigest()[:12]
        self._repr = (f"PointCloudSource(split={split}, clouds={len(self._refs)}, "
                      f"refs_sha1={digest}, spec={spec!r})")

    @property
    def refs(self) -> list:
        return list(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return self._repr

    def __getitem__(self, index: int) -> dict:
        ref = self._refs[index]
        try:
            vol, _, _ = self._spec.voxelize(self._spec.read(ref), str(ref))
        except BadFileError as e:
            if not self._prep.skip_bad_files:
                raise
            warnings.warn(f"Skipping {ref}: {e}", DataWarning, stacklevel=2)
            return {"bad_file": str(ref)}
        out, _ = preprocess(vol[..., None], self._prep, str(ref), resample=False)
        return {"image": out, "name": str(ref)}


class SMLMSource:
    """`num` built-in SMLM-like clouds, record i depending only on (seed, split, i)."""

    def __init__(self, num: int, prep: Prep, spec: CloudSpec, seed: int, split: int):
        _one_channel(prep)
        if spec.voxel_size is None:
            raise DataError("data.source='synthetic_smlm' needs data.pointcloud_voxel_size (nm): "
                            "its field of view is data.volume_size voxels of that size.")
        self._num, self._prep, self._spec = int(num), prep, spec
        self._seed, self._split = int(seed), int(split)
        self.grid = Grid(tuple(prep.volume_size), (0.0, 0.0, 0.0), tuple(spec.voxel_size))

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        p = self._prep
        return (f"SMLMSource(num={self._num}, seed={self._seed}, split={self._split}, "
                f"size={p.volume_size}, filaments={p.num_filaments}, spec={self._spec!r})")

    def points(self, index: int):
        """Localisations (N, 3) nm of record `index`."""
        from ldm_jax.data.synthetic.smlm import simulate_localisations

        if not 0 <= index < self._num:
            raise IndexError(index)
        p = self._prep
        return simulate_localisations(
            p.volume_size, self._spec.voxel_size, seed=self._seed, index=index,
            split=self._split, num_filaments=p.num_filaments, width=p.filament_width,
            params=self._spec.smlm)

    def __getitem__(self, index: int) -> dict:
        name = f"smlm[{self._split}:{index}]"
        vol, _, _ = self._spec.voxelize(self.points(index), name, grid=self.grid)
        out, _ = preprocess(vol[..., None], self._prep, name, resample=False)
        return {"image": out, "name": name}


def scan_clouds(paths, prep: Prep, spec: CloudSpec, where: str) -> list:
    """CloudRefs of every cloud in `paths`, their x/y/z columns checked from the headers
    (so a wrong column fails before training); unreadable files skipped when
    data.skip_bad_files, with one warning."""
    refs, bad = [], []
    for path in paths:
        try:
            found = pio.list_clouds([path], spec.dataset)
            for ref in found:
                pio.check_columns(ref, spec.columns)
        except BadFileError as e:
            if not prep.skip_bad_files:
                raise
            bad.append(str(e))
            continue
        refs += found
    if bad:
        warnings.warn(f"Skipped {len(bad)} of {len(paths)} file(s) in {where} "
                      f"(data.skip_bad_files=True):\n  " + "\n  ".join(bad[:10]),
                      DataWarning, stacklevel=2)
    if not refs:
        raise BadFileError(f"No usable point clouds in {where}; fix the files or point "
                           f"data.train_dir / data.val_dir elsewhere.")
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise DataError(f"two point clouds in {where} share the name {dup!r}; rename one.")
    return refs


def build_cloud_source(config, prep: Prep, split: str):
    """The train or val source for data.source 'pointcloud' or 'synthetic_smlm'."""
    spec = CloudSpec.from_config(config)
    d = config.data
    if prep.source == "synthetic_smlm":
        num = d.num_train_volumes if split == "train" else d.num_val_volumes
        num_records_check(num, f"data.num_{split}_volumes")
        return SMLMSource(num, prep, spec, int(d.get("seed", 0)),
                          TRAIN if split == "train" else VAL)
    train, val = split_files(config, prep)
    paths = train if split == "train" else val
    where = d.train_dir if split == "train" or not d.get("val_dir") else d.val_dir
    return PointCloudSource(scan_clouds(paths, prep, spec, str(where)), prep, spec, split)


__all__ = ["PointCloudSource", "SMLMSource", "build_cloud_source", "scan_clouds"]
