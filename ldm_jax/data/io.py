"""Finding and reading volume files (NIfTI via nibabel, .npy via numpy) with clear errors.

Reading is split in two: `read_header` looks only at the header (cheap, done for every file
when a loader is built, so a wrong file fails before training starts) and `read_array`
reads the voxels (done per sample, inside grain workers).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Optional, Sequence

import numpy as np

from ldm_jax.data.errors import BadFileError, NoFilesError, VolumeShapeError

NIFTI_PATTERNS = ("*.nii", "*.nii.gz")
NPY_PATTERNS = ("*.npy",)
ALL_PATTERNS = NIFTI_PATTERNS + NPY_PATTERNS

_SKIP_HINT = "or set data.skip_bad_files=True to skip unreadable files with a warning"


def skipped_reason(err: Exception) -> str:
    """An error's message for a warning about skipping the file: without the hint to set
    data.skip_bad_files=True, which is already set when a file is skipped."""
    return str(err).replace(f", {_SKIP_HINT}", "")  # every BadFileError ends ", <hint>."


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_volume_files(
    dir_or_glob: str, patterns: Optional[Sequence[str]] = None, recursive: bool = False,
    option: Optional[str] = None,
) -> list:
    """Sorted volume paths in a directory (matching `patterns`), a glob, or a single file.

    Sorting makes the file order (and hence shards and splits) identical on every host.
    `option` names the command-line flag the path came from (e.g. "--input") for the
    NoFilesError messages; None: the path is data.train_dir / data.val_dir.
    """
    patterns = tuple(patterns or ALL_PATTERNS)
    path = os.path.expanduser(str(dir_or_glob))
    if _is_glob(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise NoFilesError(
                f"No files match the glob {path!r}"
                + (f" given as {option}" if option else "")
                + ". Check the pattern (quote it in the shell so it is not expanded) or "
                + (f"pass a directory as {option}." if option else
                   "point data.train_dir at a directory.")
            )
        return found
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        if option:
            raise NoFilesError(
                f"{option} {path!r} does not exist; pass a directory, a quoted glob or one "
                f"file of volumes ({', '.join(patterns)})."
            )
        raise NoFilesError(
            f"Data directory {path!r} does not exist. Set data.train_dir / data.val_dir to a "
            f"directory of volumes ({', '.join(patterns)}), or use data.source="
            f"'synthetic_filaments' to train without a dataset."
        )
    found = set()
    for pattern in patterns:
        pat = os.path.join(path, "**", pattern) if recursive else os.path.join(path, pattern)
        found.update(p for p in glob.glob(pat, recursive=recursive) if os.path.isfile(p))
    if not found:
        where = "in or below" if recursive else "directly in"
        hint = "" if recursive or option else " (set data.recursive=True to search subdirectories)"
        check = ("" if option else " Check data.source matches the file type ('nifti' for "
                 ".nii/.nii.gz, 'npy' for .npy).")
        raise NoFilesError(
            f"No volume files {where} {path!r}"
            + (f" ({option})" if option else "")
            + f": tried patterns {list(patterns)}{hint}.{check}"
        )
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    """What the header says: enough to validate a file without reading its voxels."""

    path: str
    shape: tuple  # full stored shape
    dtype: str
    zooms: Optional[tuple]  # voxel size per spatial axis (None for .npy)
    affine: np.ndarray


def _is_nifti(path: str) -> bool:
    return path.endswith(".nii") or path.endswith(".nii.gz")


def read_header(path: str) -> VolumeInfo:
    """Header of a .nii/.nii.gz/.npy file; BadFileError naming the file when unreadable."""
    if _is_nifti(path):
        import nibabel as nib

        try:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            dtype = str(img.get_data_dtype())
            zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as e:  # nibabel raises many types for corrupt files
            raise BadFileError(
                f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e}). Replace or "
                f"re-export the file, remove it from the data directory, {_SKIP_HINT}."
            ) from e
        return VolumeInfo(path, shape, dtype, zooms, affine)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise BadFileError(
                f"{path}: cannot read as a .npy array ({type(e).__name__}: {e}). Save volumes "
                f"with numpy.save(path, array) (a plain numeric array), {_SKIP_HINT}."
            ) from e
        return VolumeInfo(path, tuple(arr.shape), str(arr.dtype), None, np.eye(4))
    raise BadFileError(
        f"{path}: unsupported file type; expected .nii, .nii.gz or .npy. Convert it, or "
        f"narrow data.train_dir to a glob that matches only volumes."
    )


def check_dtype(info: VolumeInfo) -> None:
    """Numeric real voxels only (uint8, int16, float64, ... are converted to float32 later)."""
    dt = np.dtype(info.dtype)
    if dt.kind in "biuf":
        return
    if dt.kind == "c":
        raise BadFileError(
            f"{info.path}: complex-valued voxels ({dt}). Save the magnitude (numpy.abs) as a "
            f"real volume, {_SKIP_HINT}."
        )
    raise BadFileError(
        f"{info.path}: voxel type {dt} is not a plain number (RGB or structured NIfTI?). "
        f"Convert it to a single-channel numeric volume, {_SKIP_HINT}."
    )


def channel_layout(info: VolumeInfo, frame: Optional[int], channels: int) -> Optional[int]:
    """How to turn the stored shape into (X, Y, Z, channels); returns the frame to pick or None.

    3D volumes give one channel. 4D volumes (X, Y, Z, T) need either data.frame (one frame)
    or autoencoder.in_channels == T (all frames as channels). Singleton axes beyond the
    third (NIfTI's (X, Y, Z, 1, C) layout) are ignored.
    """
    shape = info.shape
    if len(shape) < 3:
        raise VolumeShapeError(
            f"{info.path}: shape {shape} is not a 3D volume. Every file must be at least "
            f"(X, Y, Z); stack 2D slices into one 3D file."
        )
    extra = [s for s in shape[3:] if s != 1]
    if len(extra) > 1:
        raise VolumeShapeError(
            f"{info.path}: shape {shape} has more than one non-singleton axis after the three "
            f"spatial ones; save it as (X, Y, Z) or (X, Y, Z, T)."
        )
    if not extra:
        if channels != 1:
            raise VolumeShapeError(
                f"{info.path}: 3D volume {shape} gives 1 channel but autoencoder.in_channels="
                f"{channels}. Set autoencoder.in_channels=1 or save (X, Y, Z, {channels}) files."
            )
        return None
    t = extra[0]
    if frame is not None:
        if not -t <= frame < t:
            raise VolumeShapeError(
                f"{info.path}: data.frame={frame} is out of range for a 4D volume {shape} with "
                f"{t} frames; choose 0..{t - 1}."
            )
        if channels != 1:
            raise VolumeShapeError(
                f"{info.path}: data.frame picks one frame (1 channel) but autoencoder."
                f"in_channels={channels}. Set in_channels=1, or unset data.frame to use all "
                f"{t} frames as channels (then in_channels must be {t})."
            )
        return frame % t
    if channels == t:
        return None
    raise VolumeShapeError(
        f"{info.path}: 4D volume {shape} with {t} frames/channels. Pick one with "
        f"--config.data.frame=K (K in 0..{t - 1}), or use all of them as channels with "
        f"--config.autoencoder.in_channels={t}."
    )


def read_array(info: VolumeInfo, frame: Optional[int], channels: int) -> np.ndarray:
    """Voxels as (X, Y, Z, C) in the stored dtype (scaled by the NIfTI slope/intercept)."""
    pick = channel_layout(info, frame, channels)
    try:
        if _is_nifti(info.path):
            import nibabel as nib

            img = nib.load(info.path)
            if pick is not None and len(info.shape) == 4:
                arr = np.asanyarray(img.dataobj[..., pick])  # read one frame only
            else:
                arr = np.asanyarray(img.dataobj)
        else:
            arr = np.load(info.path, allow_pickle=False)
        arr = np.asarray(arr)
    except Exception as e:  # truncated .gz: EOFError / zlib.error / OSError / ValueError
        raise BadFileError(
            f"{info.path}: the header is fine but the voxel data cannot be read "
            f"({type(e).__name__}: {e}); the file is probably truncated or corrupt. Replace it, "
            f"{_SKIP_HINT}."
        ) from e
    if arr.shape != info.shape and not (pick is not None and arr.shape == info.shape[:3]):
        raise BadFileError(f"{info.path}: read shape {arr.shape} != header shape {info.shape}.")
    x, y, z = info.shape[:3]
    if arr.ndim == 3:
        return arr[..., None]
    arr = arr.reshape(x, y, z, -1)
    if pick is not None:
        arr = arr[..., pick : pick + 1]
    return arr
