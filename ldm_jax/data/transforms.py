"""Numpy volume transforms on channels-last (X, Y, Z, C) float32 arrays.

Deterministic preprocessing (`preprocess`) is shared by training, validation and latent
extraction; the random part (`augment`: crop, flips, rot90) is training only. Resizing is
separable linear interpolation with half-voxel centres (like jax.image.resize "linear",
without antialiasing), so it needs no scipy and the output affine is exact.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import numpy as np

from ldm_jax import options
from ldm_jax.errors import BadFileError, DataError, DataWarning, NonFiniteError

# Names already warned about (per process), so each epoch does not repeat the warning.
_WARNED: set = set()


def warn_once(key, message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, DataWarning, stacklevel=3)


def to_float32(arr: np.ndarray, name: str, nan_to_num: bool, a_min: float, a_max: float):
    """Any real dtype -> float32; NaN/Inf is an error naming the file, or replaced if asked."""
    if arr.dtype.kind not in "biuf":
        raise BadFileError(f"{name}: voxel type {arr.dtype} is not a real number.")
    out = np.asarray(arr, dtype=np.float32)
    if out.dtype.kind == "f":
        finite = np.isfinite(out)
        if not finite.all():
            bad = int(out.size - np.count_nonzero(finite))
            if not nan_to_num:
                fix = options.setting("data.nan_to_num", True)
                raise NonFiniteError(
                    f"{name}: {bad} voxel(s) are NaN or Inf (or beyond float32 range). Fix the "
                    f"file" + (f", or set {fix} to replace NaN/-Inf by data.a_min and +Inf by "
                               f"data.a_max." if fix else ".")
                )
            warn_once(("nan", name), f"{name}: replaced {bad} NaN/Inf voxel(s) (data.nan_to_num=True).")
            out = np.nan_to_num(out, nan=a_min, posinf=a_max, neginf=a_min)
    return out


def _resize_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_in == n_out:
        return a
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0.0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (x - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1.0 - w) + np.take(a, i1, axis=axis) * w


def resize(vol: np.ndarray, shape: Sequence[int], affine: Optional[np.ndarray] = None):
    """Trilinear resize of (X, Y, Z, C) to spatial `shape`; returns (volume, new affine)."""
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"resize target {shape} must be positive")
    old = vol.shape[:3]
    out = vol
    for ax in range(3):
        out = _resize_axis(out, ax, shape[ax])
    new_affine = None
    if affine is not None:
        # new voxel i sits at old voxel (i + 0.5) * s - 0.5 (half-voxel centres).
        s = np.array(old, np.float64) / np.array(shape, np.float64)
        m = np.eye(4)
        m[:3, :3] = np.diag(s)
        m[:3, 3] = 0.5 * s - 0.5
        new_affine = np.asarray(affine, np.float64) @ m
    return out.astype(np.float32, copy=False), new_affine


def spacing_shape(shape: Sequence[int], zooms: Sequence[float], spacing: Sequence[float]):
    """Grid shape that covers the same field of view at voxel size `spacing`."""
    return tuple(
        max(1, int(round(n * z / s))) for n, z, s in zip(shape[:3], zooms[:3], spacing)
    )


def window(vol: np.ndarray, a_min, a_max, b_min, b_max, clip: bool) -> np.ndarray:
    """Linear intensity map a_min..a_max -> b_min..b_max (MONAI ScaleIntensityRanged)."""
    if a_max == a_min:
        raise ValueError(f"data.a_min == data.a_max == {a_min}: the intensity window is empty")
    scale = (b_max - b_min) / (a_max - a_min)
    out = (vol - np.float32(a_min)) * np.float32(scale) + np.float32(b_min)
    if clip:
        out = np.clip(out, min(b_min, b_max), max(b_min, b_max))
    return out.astype(np.float32, copy=False)


def background_value(data_cfg) -> float:
    """Value of 'no signal' after windowing (and inversion): used for padding."""
    return float(data_cfg.b_max if data_cfg.invert else data_cfg.b_min)


def crop_or_pad(
    vol: np.ndarray,
    size: Sequence[int],
    rng: Optional[np.random.Generator],
    pad_value: float,
    name: str = "volume",
) -> np.ndarray:
    """Crop (random with rng, centred without) and pad (centred, with a warning) to `size`."""
    size = tuple(int(s) for s in size)
    shape = vol.shape[:3]
    if any(n < s for n, s in zip(shape, size)):
        warn_once(
            ("pad", name, shape, size),
            f"{name}: shape {shape} after preprocessing is smaller than data.volume_size "
            f"{size}; padding with the background value {pad_value}. Lower data.volume_size "
            f"or set data.voxel_resize / data.spacing so volumes cover it.",
        )
        pads = [(max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(shape, size)]
        vol = np.pad(vol, pads + [(0, 0)], constant_values=pad_value)
        shape = vol.shape[:3]
    starts = []
    for n, s in zip(shape, size):
        if rng is None:
            starts.append((n - s) // 2)
        else:
            starts.append(int(rng.integers(0, n - s + 1)))
    sl = tuple(slice(a, a + s) for a, s in zip(starts, size))
    return vol[sl]


def flip_rot(vol: np.ndarray, rng: np.random.Generator, flip_prob: float, rot90_prob: float):
    """Random flips of each spatial axis and in-plane (X, Y) quarter turns."""
    for ax in range(3):
        if flip_prob > 0 and rng.random() < flip_prob:
            vol = np.flip(vol, axis=ax)
    if rot90_prob > 0 and rng.random() < rot90_prob:
        vol = np.rot90(vol, k=int(rng.integers(1, 4)), axes=(0, 1))
    return vol


# --------------------------------------------------------------------------------------
# Preprocessing settings, read once from config.data (a plain, picklable dataclass, so
# grain worker processes get it cheaply).
# --------------------------------------------------------------------------------------

SOURCES = ("synthetic_filaments", "nifti", "npy", "mni152", "pointcloud", "synthetic_smlm")


def _triple(value, name, cast=float, allow_none=True):
    if value is None:
        if allow_none:
            return None
        raise DataError(f"{name} must be set (an int or an (X, Y, Z) triple).")
    vals = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(vals) != 3:
        raise DataError(f"{name} must be one number or an (X, Y, Z) triple, got {value!r}.")
    try:
        vals = tuple(cast(v) for v in vals)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must contain numbers, got {value!r}.") from e
    if any(v <= 0 for v in vals):
        raise DataError(f"{name} must be positive, got {value!r}.")
    return vals


def _pair(value, name, cast):
    vals = (value, value) if np.isscalar(value) else tuple(value)
    if len(vals) != 2 or cast(vals[0]) > cast(vals[1]):
        raise DataError(f"{name} must be (min, max) with min <= max, got {value!r}.")
    return tuple(cast(v) for v in vals)


@dataclasses.dataclass(frozen=True)
class Prep:
    """Everything the data pipeline reads from the config, validated."""

    source: str
    channels: int
    volume_size: tuple
    spacing: Optional[tuple]
    voxel_resize: Optional[tuple]
    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool
    invert: bool
    frame: Optional[int]
    nan_to_num: bool
    skip_bad_files: bool
    flip_prob: float
    rot90_prob: float
    num_filaments: tuple
    filament_width: tuple
    filament_noise: float
    mni152_resolution: int
    mni152_rotation: float
    mni152_scale: float
    mni152_intensity_jitter: float

    @property
    def background(self) -> float:
        return float(self.b_max if self.invert else self.b_min)

    @property
    def foreground(self) -> float:
        return float(self.b_min if self.invert else self.b_max)

    @classmethod
    def from_config(cls, config) -> "Prep":
        d = config.data
        source = d.get("source") or "synthetic_filaments"
        if source not in SOURCES:
            raise DataError(
                f"data.source={source!r} is not one of {list(SOURCES)}. Use 'nifti' or 'npy' "
                f"with data.train_dir, or a built-in source."
            )
        for name in ("flip_prob", "rot90_prob"):
            p = float(d.get(name, 0.0))
            if not 0.0 <= p <= 1.0:
                raise DataError(f"data.{name} must be a probability in [0, 1], got {p}.")
        volume_size = tuple(int(v) for v in _triple(d.volume_size, "data.volume_size", int, False))
        if float(d.get("rot90_prob", 0.0)) > 0 and volume_size[0] != volume_size[1]:
            raise DataError(
                f"data.rot90_prob > 0 rotates in the (X, Y) plane, which needs a square crop, but "
                f"data.volume_size is {volume_size}. Set rot90_prob=0 or make X == Y."
            )
        if float(d.a_max) == float(d.a_min):
            raise DataError(f"data.a_min and data.a_max are both {d.a_min}: the intensity window is empty.")
        voxel_resize = _triple(d.get("voxel_resize"), "data.voxel_resize", int)
        channels = int(config.autoencoder.in_channels) if "autoencoder" in config else 1
        if channels < 1:
            raise DataError(f"autoencoder.in_channels must be >= 1, got {channels}.")
        return cls(
            source=source,
            channels=channels,
            volume_size=volume_size,
            spacing=_triple(d.get("spacing"), "data.spacing", float),
            voxel_resize=voxel_resize,
            a_min=float(d.a_min),
            a_max=float(d.a_max),
            b_min=float(d.b_min),
            b_max=float(d.b_max),
            clip=bool(d.get("clip", True)),
            invert=bool(d.get("invert", False)),
            frame=None if d.get("frame") is None else int(d.frame),
            nan_to_num=bool(d.get("nan_to_num", False)),
            skip_bad_files=bool(d.get("skip_bad_files", False)),
            flip_prob=float(d.get("flip_prob", 0.0)),
            rot90_prob=float(d.get("rot90_prob", 0.0)),
            num_filaments=_pair(d.get("num_filaments", (8, 24)), "data.num_filaments", int),
            filament_width=_pair(d.get("filament_width", (0.8, 2.0)), "data.filament_width", float),
            filament_noise=float(d.get("filament_noise", 0.0)),
            mni152_resolution=int(d.get("mni152_resolution", 1)),
            mni152_rotation=float(d.get("mni152_rotation", 10.0)),
            mni152_scale=float(d.get("mni152_scale", 0.1)),
            mni152_intensity_jitter=float(d.get("mni152_intensity_jitter", 0.1)),
        )


def preprocess(vol, prep: Prep, name: str, zooms=None, affine=None, resample: bool = True):
    """Deterministic per-volume preprocessing; returns ((X, Y, Z, C) float32, affine).

    Order: float32 (NaN/Inf check) -> resample to data.spacing (needs header voxel sizes)
    -> resize to data.voxel_resize -> intensity window -> optional inversion.
    """
    out = to_float32(vol, name, prep.nan_to_num, prep.a_min, prep.a_max)
    if affine is None:
        affine = np.eye(4)
    if resample and prep.spacing is not None:
        if zooms is None:
            resize_to = options.setting("data.voxel_resize", "'(X,Y,Z)'")
            raise DataError(
                f"{name}: data.spacing={prep.spacing} needs voxel sizes from a NIfTI header, "
                f"but .npy files have none. Save the volumes as NIfTI"
                + (f", or resize them with {resize_to} instead." if resize_to else ".")
            )
        out, affine = resize(out, spacing_shape(out.shape, zooms, prep.spacing), affine)
    if resample and prep.voxel_resize is not None:
        out, affine = resize(out, prep.voxel_resize, affine)
    out = window(out, prep.a_min, prep.a_max, prep.b_min, prep.b_max, prep.clip)
    if prep.invert:
        out = (np.float32(prep.b_max + prep.b_min) - out).astype(np.float32)
    return out, affine
