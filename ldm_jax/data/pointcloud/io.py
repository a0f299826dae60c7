"""Reading and writing point clouds (localisation tables): CSV, .npy / .npz, HDF5.

Formats (one cloud per file unless said otherwise):
  .csv/.tsv/.txt  a header row (optional) and one localisation per row; delimiter from
                  the first row (tab, comma, semicolon, else whitespace). Header names are
                  matched after dropping quotes, case and a unit suffix: thunderSTORM's
                  `"x [nm]"`, `x (nm)`, `x_nm`, SMAP's `xnm` and plain `x` all mean x.
  .npy            an (N, C) array (columns by index) or a structured array (by field name).
  .npz            every array is one cloud, or only `dataset` if given.
  .h5/.hdf5       (h5py) `dataset` names a dataset (one cloud) or a group (every dataset
                  below it is a cloud); by default Picasso's `locs` if present, else every
                  dataset in the file. Datasets are (N, C) arrays or structured arrays
                  (Picasso: fields frame, x, y, z, photons, lpx, ...).
Units: positions are scaled by `scale` (nm per file unit, per axis) into nm. Picasso
stores x and y in camera pixels and z in nm: use scale=(pixel size nm, pixel size nm, 1).

A cloud inside a file is named by a `CloudRef` (path, key); clouds are read lazily.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import warnings
from typing import Optional, Sequence

import numpy as np

from ldm_jax.errors import BadFileError, DataError

CLOUD_SUFFIXES = (".csv", ".tsv", ".txt", ".npy", ".npz", ".h5", ".hdf5")
CLOUD_PATTERNS = tuple("*" + s for s in CLOUD_SUFFIXES)
CSV_HEADER = ("x [nm]", "y [nm]", "z [nm]")
_UNIT = re.compile(r"(\s*[\[\(]\s*(nm|px|pix|pixels?|um|µm|μm)\s*[\]\)]|[\s_]?(nm|px))$")


@dataclasses.dataclass(frozen=True)
class CloudRef:
    """One cloud: a file and, for files holding several, the dataset / array key."""

    path: str
    key: Optional[str] = None
    name: str = ""

    def __str__(self) -> str:
        return self.path if self.key is None else f"{self.path}::{self.key}"


def suffix(path: str) -> str:
    return os.path.splitext(str(path))[1].lower()


def is_cloud_file(path: str) -> bool:
    """A point-cloud file by suffix; a .npy only when it holds a 2D or structured array."""
    ext = suffix(path)
    if ext not in CLOUD_SUFFIXES:
        return False
    if ext != ".npy":
        return True
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # unreadable: let the volume reader report it
        return False
    return arr.ndim == 2 or (arr.ndim == 1 and arr.dtype.names is not None)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(str(path)))[0]


def _hdf5_keys(path: str, dataset: Optional[str]) -> list:
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is in requirements.txt
        raise DataError(f"{path}: reading HDF5 needs h5py (pip install h5py).") from None
    try:
        with h5py.File(path, "r") as f:
            found = []
            f.visititems(lambda k, o: found.append(k) if isinstance(o, h5py.Dataset) else None)
            if dataset:
                obj = f.get(dataset)
                if obj is None:
                    raise DataError(f"{path}: no HDF5 dataset or group {dataset!r} (datasets: "
                                    f"{sorted(found)[:20]}); set data.pointcloud_dataset / --dataset.")
                if isinstance(obj, h5py.Dataset):
                    return [obj.name.lstrip("/")]
                prefix = obj.name.strip("/")
                return sorted(k for k in found if k.startswith(prefix + "/") or not prefix)
            if isinstance(f.get("locs"), h5py.Dataset):
                return ["locs"]
            return sorted(found)
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError / KeyError for corrupt files
        raise BadFileError(f"{path}: cannot read as HDF5 ({type(e).__name__}: {e}).") from e


def _npz_keys(path: str, dataset: Optional[str]) -> list:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
    except Exception as e:
        raise BadFileError(f"{path}: cannot read as .npz ({type(e).__name__}: {e}).") from e
    if dataset:
        if dataset not in keys:
            raise DataError(f"{path}: no array {dataset!r} (arrays: {keys[:20]}); set "
                            f"data.pointcloud_dataset / --dataset.")
        return [dataset]
    return sorted(keys)


def list_clouds(paths: Sequence[str], dataset: Optional[str] = None) -> list:
    """One CloudRef per cloud in `paths` (files holding several give several), with unique
    names: the file stem, plus `_key` for files holding more than one cloud."""
    refs = []
    for path in paths:
        ext = suffix(path)
        keys = (_hdf5_keys(path, dataset) if ext in (".h5", ".hdf5")
                else _npz_keys(path, dataset) if ext == ".npz" else [None])
        if not keys:
            raise DataError(f"{path}: holds no datasets / arrays to read as point clouds.")
        for key in keys:
            if len(keys) == 1:
                name = _stem(path)
            else:
                name = f"{_stem(path)}_{re.sub(r'[^A-Za-z0-9.-]+', '_', key.strip('/'))}"
            refs.append(CloudRef(str(path), None if ext in (".csv", ".tsv", ".txt", ".npy")
                                 else key, name))
    seen = {}
    for r in refs:
        if r.name in seen:
            raise DataError(f"two point clouds would get the same name {r.name!r}: {seen[r.name]} "
                            f"and {r}; rename one of the files.")
        seen[r.name] = str(r)
    return refs


def normalise_name(name: str) -> str:
    """'"X [nm]"' -> 'x': no quotes, lower case, no unit suffix."""
    n = str(name).strip().strip("\"'").strip().lower()
    return _UNIT.sub("", n).strip() or n


def _csv_layout(path: str) -> tuple:
    """(header names or None, delimiter, rows to skip, number of columns) from the first
    non-empty line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            skip = 0
            for line in f:
                if line.strip():
                    break
                skip += 1
            else:
                return None, ",", skip, 0
    except (OSError, UnicodeDecodeError) as e:
        raise BadFileError(f"{path}: cannot read as text ({type(e).__name__}: {e}).") from e
    line = line.strip().lstrip("#").strip()
    delim = next((d for d in ("\t", ",", ";") if d in line), None)
    fields = next(csv.reader([line], delimiter=delim)) if delim else line.split()
    try:
        [float(x) for x in fields]
        return None, delim, skip, len(fields)
    except ValueError:
        return [x.strip() for x in fields], delim, skip + 1, len(fields)


def _array_layout(arr) -> tuple:
    """(names or None, number of columns) of a plain (N, C) or a structured array."""
    if arr.dtype.names is not None:
        return list(arr.dtype.names), len(arr.dtype.names)
    if arr.ndim != 2:
        raise DataError(f"shape {arr.shape} is not a table of localisations; expected (N, C) "
                        f"with C >= 3 columns or a structured array")
    return None, int(arr.shape[1])


def _open_array(ref: CloudRef):
    """The stored array (lazily for .npy / HDF5); the caller closes the returned handle."""
    ext = suffix(ref.path)
    try:
        if ext == ".npy":
            return np.load(ref.path, mmap_mode="r", allow_pickle=False), None
        if ext == ".npz":
            z = np.load(ref.path, allow_pickle=False)
            return z[ref.key], z
        import h5py

        f = h5py.File(ref.path, "r")
        return f[ref.key], f
    except Exception as e:
        raise BadFileError(f"{ref}: cannot read ({type(e).__name__}: {e}).") from e


def _resolve(ref: CloudRef, names: Optional[list], ncols: int, columns) -> list:
    """Indices (plain arrays / CSV) or field names (structured) of the x, y, z columns."""
    found = names if names is not None else f"{ncols} unnamed columns"
    hint = ("set data.pointcloud_columns / --columns to the x, y, z column names or 0-based "
            "indices")
    if columns is None:
        if names is None:
            if ncols < 3:
                raise DataError(f"{ref}: {ncols} column(s), need x, y, z; a 2D table needs a z "
                                f"column (e.g. zeros).")
            return [0, 1, 2]
        norm = [normalise_name(n) for n in names]
        out = []
        for axis in "xyz":
            hits = [i for i, n in enumerate(norm) if n == axis]
            if not hits:
                raise DataError(f"{ref}: no {axis} column among {names}; {hint}.")
            nm = [i for i in hits if "nm" in names[i].lower()]
            out.append((nm or hits)[0])
        columns = out
    if len(columns) != 3:
        raise DataError(f"{ref}: columns must name exactly 3 columns (x, y, z), got {columns!r}.")
    out = []
    for c in columns:
        if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.strip().lstrip("-").isdigit()):
            i = int(c)
            if not -ncols <= i < ncols:
                raise DataError(f"{ref}: column index {i} is out of range for {ncols} columns "
                                f"({found}); {hint}.")
            out.append(i % ncols)
        else:
            if names is None:
                raise DataError(f"{ref}: the table has no column names ({found}); give the "
                                f"columns as 0-based indices, e.g. 0,1,2.")
            # The exact name, else the name without quotes / case / unit ('x' finds 'x [nm]').
            matches = ([i for i, n in enumerate(names) if n == c]
                       or [i for i, n in enumerate(names) if normalise_name(n) == normalise_name(c)])
            if not matches:
                raise DataError(f"{ref}: no column {c!r}; columns found: {names}; {hint}.")
            out.append(matches[0])
    return out


def check_columns(ref: CloudRef, columns=None) -> list:
    """Resolves the x, y, z columns from the header only (cheap; for a scan before training)."""
    if suffix(ref.path) in (".csv", ".tsv", ".txt"):
        names, _, _, ncols = _csv_layout(ref.path)
        return _resolve(ref, names, ncols, columns)
    arr, handle = _open_array(ref)
    try:
        names, ncols = _array_layout(arr)
    except DataError as e:
        raise DataError(f"{ref}: {e}.") from None
    finally:
        if handle is not None:
            handle.close()
    return _resolve(ref, names, ncols, columns)


def read_cloud(ref: CloudRef, columns=None, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Positions (N, 3) float64 in nm (file units times `scale`).

    columns: None (auto: x, y, z by name, else the first three) or three names / 0-based
    indices. Raises DataError (naming the file and the columns found) for missing columns,
    an empty cloud or NaN/Inf positions; BadFileError when the file cannot be read.
    """
    if suffix(ref.path) in (".csv", ".tsv", ".txt"):
        names, delim, skip, ncols = _csv_layout(ref.path)
        cols = _resolve(ref, names, ncols, columns)
        try:
            with warnings.catch_warnings():  # an empty table is reported below, by name
                warnings.simplefilter("ignore", UserWarning)
                xyz = np.loadtxt(ref.path, delimiter=delim, skiprows=skip, usecols=cols,
                                 ndmin=2, dtype=np.float64, encoding="utf-8-sig")
        except (ValueError, OSError) as e:
            raise BadFileError(f"{ref}: cannot parse the localisation table ({e}).") from e
    else:
        arr, handle = _open_array(ref)
        try:
            names, ncols = _array_layout(arr)
            cols = _resolve(ref, names, ncols, columns)
            table = np.asarray(arr[...])
            if names is not None:
                xyz = np.stack([table[names[i]] for i in cols], axis=1).astype(np.float64)
            else:
                xyz = table[:, cols].astype(np.float64)
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(str(ref)) else f"{ref}: {e}.") from None
        finally:
            if handle is not None:
                handle.close()
    xyz = xyz.reshape(-1, 3) * np.asarray(scale, np.float64)
    check_points(xyz, str(ref))
    return xyz


def check_points(xyz: np.ndarray, name: str) -> None:
    """DataError for an empty cloud or NaN / Inf positions."""
    if not len(xyz):
        raise DataError(f"{name}: the point cloud is empty (0 localisations); remove the file "
                        f"or check the columns / dataset read.")
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        raise DataError(f"{name}: {int(bad.sum())} of {len(xyz)} localisation(s) have NaN/Inf "
                        f"coordinates (first: row {int(np.argmax(bad))}); drop them before "
                        f"voxelising.")


def write_csv(path: str, points: np.ndarray) -> None:
    """Writes (N, 3) nm positions as CSV with the header `x [nm],y [nm],z [nm]` (atomic)."""
    from ldm_jax import outputs as vf
    pts = np.asarray(points, np.float64).reshape(-1, 3)

    def write(tmp):
        np.savetxt(tmp, pts, fmt="%.3f", delimiter=",", header=",".join(CSV_HEADER),
                   comments="")
    vf.atomic_write(path, write)


__all__ = ["CLOUD_PATTERNS", "CLOUD_SUFFIXES", "CSV_HEADER", "CloudRef", "check_columns",
           "check_points", "is_cloud_file", "list_clouds", "normalise_name", "read_cloud",
           "write_csv"]
