"""Point clouds and volume files: NIfTI in micrometres, model inputs, round-trip scores.

NIfTI units: NIfTI can say meter, mm or micron (xyzt_units), not nm. Volumes made from
point clouds are written with units "micron" and the affine in micrometres (a 20 nm voxel
is 0.02): viewers show true sizes, and positions read back (x 1000) agree with the nm
positions to float32 precision of the header (< 0.01 nm over a 100 um field).
Reading, a NIfTI without spatial units (e.g. written by `ldm-jax reconstruct`) is taken as
micrometres, the unit ldm_jax writes.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from ldm_jax.data.pointcloud import io as pio
from ldm_jax.data.pointcloud.grid import triple
from ldm_jax.data.pointcloud.io import CloudRef
from ldm_jax.data.pointcloud.sample import sample_points
from ldm_jax.data.pointcloud.spec import CloudSpec
from ldm_jax.data.synthetic.smlm import SMLMParams, simulate_localisations
from ldm_jax.errors import BadFileError, DataError
from ldm_jax.metrics.pointcloud import chamfer_distance, emd_approx

NIFTI_UNITS = "micron"
NM_PER_UNIT = {"meter": 1e9, "mm": 1e6, "micron": 1e3, "nm": 1.0}
# What ldm-jax reconstruct adds to a point cloud's metrics row.
SCORE_KEYS = ("points", "chamfer_nm", "chamfer_floor_nm", "emd_nm", "emd_floor_nm")
# Listed from a directory next to volumes (.txt only by glob or file name: too common;
# .npy is listed with the volumes already).
LIST_PATTERNS = tuple(p for p in pio.CLOUD_PATTERNS if p not in ("*.txt", "*.npy"))


# --------------------------------------------------------------------------------------
# Affines and NIfTI files (units).
# --------------------------------------------------------------------------------------


def to_nifti_affine(affine_nm) -> np.ndarray:
    """nm affine -> the micrometre affine ldm_jax stores in NIfTI files."""
    a = np.array(affine_nm, np.float64)
    a[:3] /= NM_PER_UNIT[NIFTI_UNITS]
    return a


def from_nifti_affine(affine, units: str = NIFTI_UNITS) -> np.ndarray:
    """A NIfTI affine in `units` ("meter" | "mm" | "micron" | "nm") -> nm."""
    if units not in NM_PER_UNIT:
        raise DataError(f"units must be one of {list(NM_PER_UNIT)}, got {units!r}.")
    a = np.array(affine, np.float64)
    a[:3] *= NM_PER_UNIT[units]
    return a


def write_volume(path: str, volume, affine_nm, description: str = "") -> None:
    """float32 NIfTI at `path` (directly) with the affine in micrometres and xyzt_units
    "micron"; `affine_nm`: 4x4 in nm."""
    import nibabel as nib

    aff = to_nifti_affine(affine_nm)
    img = nib.Nifti1Image(np.asarray(volume, np.float32), aff)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units(xyz=NIFTI_UNITS)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    if description:
        img.header["descrip"] = description[:79].encode()
    nib.save(img, path)


def save_volume(path: str, volume, affine_nm, description: str = "") -> None:
    """`write_volume`, atomically (a temporary name, then a rename)."""
    from ldm_jax import outputs as vf
    vf.atomic_write(path, lambda tmp: write_volume(tmp, volume, affine_nm, description))


def read_volume_nm(path: str, units: str = "auto", voxel_size=None):
    """A volume file -> ((X, Y, Z) or (X, Y, Z, C) array, 4x4 affine in nm, note or "").

    NIfTI: the header's affine, in its xyzt_units (`units="auto"`; no units: micrometres,
    said in the note) or in `units`. .npy: no affine; voxel_size (nm, number or triple)
    with the origin at 0 (default 1 nm: positions in voxels, said in the note).
    Raises BadFileError when unreadable.
    """
    note = ""
    if str(path).endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise BadFileError(f"{path}: cannot read as .npy ({type(e).__name__}: {e}).") from e
        v = triple(voxel_size, "--voxel_size")
        if v is None:
            v, note = (1.0, 1.0, 1.0), "no affine in .npy: positions in voxels (set --voxel_size in nm)"
        a = np.diag([*v, 1.0])
        a[:3, 3] = 0.5 * np.asarray(v)  # voxel (0, 0, 0) covers [0, v)
        return arr, a, note
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as e:
        raise BadFileError(f"{path}: cannot read as NIfTI ({type(e).__name__}: {e}).") from e
    if units == "auto":
        units = img.header.get_xyzt_units()[0]
        if units not in NM_PER_UNIT:
            units, note = NIFTI_UNITS, "no spatial units in the NIfTI header: read as micrometres (--units)"
    return arr, from_nifti_affine(img.affine, units), note


# --------------------------------------------------------------------------------------
# Inputs for reconstruction: volume files and point clouds side by side.
# --------------------------------------------------------------------------------------


def list_inputs(input: str, config) -> tuple:
    """(entries, output names) for a directory / glob / file of volumes and point clouds.

    An entry is a volume path (str) or a CloudRef (one per cloud in a file).
    """
    from ldm_jax import outputs as vf
    from ldm_jax.data import io

    files = io.list_volume_files(input, io.ALL_PATTERNS + LIST_PATTERNS)
    spec = CloudSpec.from_config(config)
    entries, names = [], []
    for f in files:
        if pio.is_cloud_file(f):
            refs = pio.list_clouds([f], spec.dataset)
            entries += refs
            names += [r.name for r in refs]
        else:
            entries.append(f)
            names.append(vf.stem(f))
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"several inputs would write the output {sorted(dup)[0]!r}; rename them "
                        f"or run them into different --output directories.")
    return entries, names


def is_cloud(entry) -> bool:
    return isinstance(entry, CloudRef)


def entry_path(entry) -> str:
    return entry.path if is_cloud(entry) else str(entry)


def load_input(entry, config, frame="config"):
    """((X, Y, Z, C) float32 model input, affine) of a volume file or a point cloud.

    `frame` picks the frame of a 4D volume file (see `pipeline.load_volume`). Clouds are
    voxelised with config.data.pointcloud_* and preprocessed like training volumes; their
    affine is in micrometres (what ldm_jax writes into NIfTI files).
    """
    from ldm_jax.data.pipeline import load_volume
    from ldm_jax.data.transforms import Prep, preprocess

    if not is_cloud(entry):
        return load_volume(entry, config, frame)
    spec = CloudSpec.from_config(config)
    vol, grid, _ = spec.voxelize(spec.read(entry), str(entry))
    out, _ = preprocess(vol[..., None], Prep.from_config(config), str(entry), resample=False)
    return out, to_nifti_affine(grid.affine)


def signal(vol, data_cfg) -> np.ndarray:
    """Model intensities -> weights proportional to localisations per voxel (the window
    a_min..a_max -> b_min..b_max undone up to a scale, background 0, negatives 0)."""
    x = np.asarray(vol, np.float64)
    if data_cfg.get("invert", False):
        x = float(data_cfg.b_max) + float(data_cfg.b_min) - x
    return np.clip(x - float(data_cfg.b_min), 0, None)


def round_trip_scores(entry: CloudRef, vol, recon, affine, config, *, points_path=None,
                      seed: int = 0, emd_points: int = 1000) -> dict:
    """Scores a cloud against points sampled back from its reconstruction, and against
    points sampled back from its voxelisation alone (the floor: what voxelising loses).

    vol / recon: (X, Y, Z, 1) model input / output; affine: load_input's (micrometres).
    Both samples have as many points as the cloud has inside the grid. Returns
    {"points", "chamfer_nm", "chamfer_floor_nm", "emd_nm", "emd_floor_nm"}; writes the
    reconstruction's points to `points_path` (CSV, nm) when given.
    """
    spec = CloudSpec.from_config(config)
    pts = spec.read(entry)
    aff = from_nifti_affine(affine)
    grid = spec.grid(pts, str(entry))
    pts = pts[grid.inside(pts)]
    rng = np.random.default_rng([int(seed), zlib.crc32(str(entry).encode())])
    out = {"points": int(len(pts))}
    for key, v in (("", recon), ("_floor", vol)):
        back = sample_points(signal(v, config.data), aff, len(pts), rng=rng, name=str(entry))
        out[f"chamfer{key}_nm"] = chamfer_distance(pts, back)["chamfer"]
        out[f"emd{key}_nm"] = emd_approx(pts, back, emd_points, rng)
        if key == "" and points_path:
            pio.write_csv(points_path, back)
    return out


# --------------------------------------------------------------------------------------
# Built-in clouds as files.
# --------------------------------------------------------------------------------------

DEMO_SPLIT = 2  # never used for training (0) or validation (1)


def write_demo_clouds(output: str, num: int, shape, voxel_size, *, seed: int = 0,
                      params: SMLMParams = SMLMParams(), overwrite: bool = False) -> list:
    """Writes `num` built-in SMLM-like clouds as OUTPUT/smlm_NNN.csv (nm); returns the
    paths written (existing files are kept unless overwrite)."""
    from ldm_jax import outputs as vf
    out = vf.prepare_output_dir(output)
    v = triple(voxel_size, "--voxel_size")
    written = []
    for i in range(int(num)):
        path = os.path.join(out, f"smlm_{i:03d}.csv")
        if os.path.exists(path) and not overwrite:
            continue
        pts = simulate_localisations(shape, v, seed=seed, index=i, split=DEMO_SPLIT, params=params)
        pio.write_csv(path, pts)
        written.append(path)
    return written
