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

from ldm_jax import options
from ldm_jax.errors import BadFileError, NoFilesError, VolumeShapeError

NIFTI_PATTERNS = ("*.nii", "*.nii.gz")
NPY_PATTERNS = ("*.npy",)
ALL_PATTERNS = NIFTI_PATTERNS + NPY_PATTERNS


def _skip_hint() -> str:
    """", or <how to skip unreadable files>" in the running command's spelling ("" if it
    cannot skip them)."""
    fix = options.setting("data.skip_bad_files", True)
    return f", or {fix} to skip unreadable files" if fix else ""


def skipped_reason(err: Exception) -> str:
    """An error's message for a warning about skipping the file: without the hint to skip
    unreadable files, which is already in effect when a file is skipped."""
    hint = _skip_hint()
    return str(err).replace(hint, "") if hint else str(err)


def _input_setting(field: str = "data.train_dir") -> str:
    """How the running command takes a directory of volumes ("--input=DIR",
    "--config.data.train_dir=DIR", "data.train_dir=DIR")."""
    return options.setting(field, "DIR") or field


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_volume_files(
    dir_or_glob: str, patterns: Optional[Sequence[str]] = None, recursive: bool = False,
    option: Optional[str] = None, field: str = "data.train_dir",
) -> list:
    """Sorted volume paths in a directory (matching `patterns`), a glob, or a single file.

    Sorting makes the file order (and hence shards and splits) identical on every host.
    `option` names the command-line flag the path came from (e.g. "--input") for the
    NoFilesError messages; otherwise `field` is the setting it came from (data.train_dir /
    data.val_dir), named in errors in the running command's spelling (`ldm_jax.options`).
    Raises NoFilesError.
    """
    patterns = tuple(patterns or ALL_PATTERNS)
    path = os.path.expanduser(str(dir_or_glob))
    if _is_glob(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise NoFilesError(
                f"No files match the glob {path!r}"
                + (f" given as {option}" if option else "")
                + ". Check the pattern (quote it in the shell so it is not expanded), or "
                + (f"pass a directory: {option}=DIR." if option else
                   f"give a directory: {_input_setting(field)}.")
            )
        return found
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        if option:
            raise NoFilesError(
                f"{option} {path!r} does not exist; pass a directory ({option}=DIR), a "
                f"quoted glob or one file of volumes ({', '.join(patterns)})."
            )
        synthetic = options.setting("data.source", "synthetic_filaments")
        raise NoFilesError(
            f"Data directory {path!r} does not exist. Give a directory of volumes "
            f"({', '.join(patterns)}): {_input_setting(field)}"
            + (f", or set {synthetic} to train without a dataset." if synthetic else ".")
        )
    found = set()
    for pattern in patterns:
        pat = os.path.join(path, "**", pattern) if recursive else os.path.join(path, pattern)
        found.update(p for p in glob.glob(pat, recursive=recursive) if os.path.isfile(p))
    if not found:
        where = "in or below" if recursive else "directly in"
        if option:
            raise NoFilesError(
                f"No volume files {where} {path!r} ({option}): tried patterns "
                f"{list(patterns)}."
            )
        deeper = None if recursive else options.setting("data.recursive", True)
        hint = f" (set {deeper} to search subdirectories)" if deeper else ""
        nifti, npy = options.setting("data.source", "nifti"), options.setting("data.source", "npy")
        raise NoFilesError(
            f"No volume files {where} {path!r}: tried patterns {list(patterns)}{hint}."
            + (f" Check that data.source matches the file type ({nifti} for .nii/.nii.gz, "
               f"{npy} for .npy)." if nifti else "")
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
                f"re-export the file, or remove it from the data directory{_skip_hint()}."
            ) from e
        return VolumeInfo(path, shape, dtype, zooms, affine)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise BadFileError(
                f"{path}: cannot read as a .npy array ({type(e).__name__}: {e}). Save volumes "
                f"with numpy.save(path, array) (a plain numeric array){_skip_hint()}."
            ) from e
        return VolumeInfo(path, tuple(arr.shape), str(arr.dtype), None, np.eye(4))
    raise BadFileError(
        f"{path}: unsupported file type; expected .nii, .nii.gz or .npy. Convert it, or "
        f"give a glob that matches only volumes{_skip_hint()}."
    )


def nifti_codes(path: str) -> Optional[tuple[int, int]]:
    """(sform_code, qform_code) of a NIfTI file's header; None for .npy (no header).
    Raises BadFileError for an unreadable header."""
    if not _is_nifti(str(path)):
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        return int(header["sform_code"]), int(header["qform_code"])
    except Exception as e:  # nibabel raises many types for corrupt files
        raise BadFileError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e})."
                           ) from e


def check_dtype(info: VolumeInfo) -> None:
    """Numeric real voxels only (uint8, int16, float64, ... are converted to float32 later)."""
    dt = np.dtype(info.dtype)
    if dt.kind in "biuf":
        return
    if dt.kind == "c":
        raise BadFileError(
            f"{info.path}: complex-valued voxels ({dt}). Save the magnitude (numpy.abs) as a "
            f"real volume{_skip_hint()}."
        )
    raise BadFileError(
        f"{info.path}: voxel type {dt} is not a plain number (RGB or structured NIfTI?). "
        f"Convert it to a single-channel numeric volume{_skip_hint()}."
    )


def num_frames(info: VolumeInfo) -> Optional[int]:
    """Frames (or channels) of a 4D volume: the one non-singleton axis after the three
    spatial ones; None for a 3D volume (or one whose extra axes are all singletons)."""
    extra = [s for s in info.shape[3:] if s != 1]
    return extra[0] if len(extra) == 1 else None


def channel_layout(info: VolumeInfo, frame: Optional[int], channels: int) -> Optional[int]:
    """How to turn the stored shape into (X, Y, Z, channels); returns the frame to pick or None.

    3D volumes give one channel. 4D volumes (X, Y, Z, T) need either data.frame (one frame)
    or autoencoder.in_channels == T (all frames as channels). Singleton axes beyond the
    third (NIfTI's (X, Y, Z, 1, C) layout) are ignored. Fixes named in errors are those
    the running command offers (`ldm_jax.options`).
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
    one_channel = options.setting("autoencoder.in_channels", 1)
    if not extra:
        if channels != 1:
            raise VolumeShapeError(
                f"{info.path}: 3D volume {shape} gives 1 channel but the model takes "
                f"autoencoder.in_channels={channels}. Save (X, Y, Z, {channels}) files"
                + (f", or set {one_channel}." if one_channel else ".")
            )
        return None
    t = extra[0]
    pick = options.setting("data.frame", "K")
    if frame is not None:
        if not -t <= frame < t:
            raise VolumeShapeError(
                f"{info.path}: frame {frame} is out of range for a 4D volume {shape} with {t} "
                f"frames; choose " + (f"{pick} with K in 0..{t - 1}." if pick else
                                     f"0..{t - 1}.")
            )
        if channels != 1:
            no_frame = options.choice("data.frame", "none") or options.setting("data.frame",
                                                                                None)
            fix = options.fixes(one_channel and f"set {one_channel}",
                                no_frame and f"use all {t} frames as channels with {no_frame} "
                                f"(then in_channels must be {t})")
            raise VolumeShapeError(
                f"{info.path}: frame {frame} picks one frame (1 channel) but the model takes "
                f"autoencoder.in_channels={channels}." + (f" To fix: {fix}." if fix else "")
            )
        return frame % t
    if channels == t:
        return None
    each = options.choice("data.frame", "all")
    as_channels = options.setting("autoencoder.in_channels", t)
    fix = options.fixes(
        pick and f"Pick one with {pick} (K in 0..{t - 1})",
        each and f"{each} to treat each frame as its own volume",
        as_channels and f"use all of them as channels with {as_channels}")
    raise VolumeShapeError(
        f"{info.path}: 4D volume {shape} with {t} frames/channels, but the model takes "
        f"{channels} channel(s)." + (f" {fix}." if fix else "")
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
            f"({type(e).__name__}: {e}); the file is probably truncated or corrupt. Replace "
            f"it{_skip_hint()}."
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
