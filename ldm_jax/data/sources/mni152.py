"""The ICBM152 T1 template shipped inside nilearn, as an offline brain-MRI source.

`nilearn.datasets.load_mni152_template` reads a file inside the installed package (no
download; tests/data/test_data.py checks it with the network blocked); we read that
same file directly (see `_load_nilearn`). One template
becomes many training samples through random small affines, crops and intensity jitter.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import numpy as np

from ldm_jax.data.transforms import Prep, preprocess
from ldm_jax.errors import DataError

_TEMPLATE_FILE = ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def _template_path():
    """The template file inside the installed nilearn package (None if not found)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], *_TEMPLATE_FILE)
    return path if os.path.isfile(path) else None


def _load_nilearn(resolution: int):
    """Same template and grid as nilearn.datasets.load_mni152_template(resolution).

    Reading the file with nibabel avoids importing nilearn.datasets (slow, and paid again
    in every grain worker). nilearn rescales to 0..1 (by the 1 mm maximum) and, for 2 mm,
    samples the 1 mm grid at every second voxel (identical to vol[::2, ::2, ::2], checked
    in tests); we do the same. Falls back
    to nilearn's function if the file moves in a future nilearn.
    """
    path = _template_path()
    if path is None:
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=resolution)
        return img.get_fdata(dtype=np.float32), np.asarray(img.affine, np.float64)
    import nibabel as nib

    img = nib.load(path)
    vol = img.get_fdata(dtype=np.float32)
    vol /= vol.max()  # before subsampling, like nilearn
    affine = np.asarray(img.affine, np.float64)
    if resolution == 2:
        vol = np.ascontiguousarray(vol[::2, ::2, ::2])
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    return vol, affine


@functools.lru_cache(maxsize=2)
def load_template(resolution: int = 1):
    """(volume (X, Y, Z) float32 scaled to 0..255, affine, zooms) of the MNI152 T1 template.

    Scaled to 0..255 (nilearn gives 0..1) so the default window a_min=0, a_max=255 -> 0..1
    that suits the uint8 microscopy volumes suits the brain too.
    """
    if resolution not in (1, 2):
        from ldm_jax.errors import DataError

        raise DataError(f"data.mni152_resolution must be 1 or 2 (mm), got {resolution!r}.")
    vol, affine = _load_nilearn(resolution)  # 0..1 like nilearn
    vol = np.asarray(vol, np.float32) * np.float32(255.0)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return vol, affine, zooms


def foreground_bounds(vol: np.ndarray, fraction: float = 0.1):
    """(lo, hi) voxel bounds of where `vol` (X, Y, Z, C) exceeds `fraction` of its range."""
    v = vol[..., 0]
    mask = v > v.min() + fraction * (v.max() - v.min())
    if not mask.any():
        return np.zeros(3), np.array(v.shape, np.float64) - 1
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    return np.array([i[0] for i in idx], np.float64), np.array([i[-1] for i in idx], np.float64)


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine_crop(
    vol: np.ndarray,
    size: Sequence[int],
    rng: np.random.Generator,
    *,
    max_rotation_deg: float,
    max_scale: float,
    pad_value: float,
    centre_bounds=None,
) -> np.ndarray:
    """Sample a `size` crop of (X, Y, Z, C) `vol` through a random small rotation + zoom.

    One trilinear resampling (scipy.ndimage.affine_transform) does rotation, zoom and the
    random crop together, evaluated only on the output grid. Where the crop is larger than
    the volume, the centre is kept near the middle and the outside is `pad_value`.
    centre_bounds=(lo, hi) (input voxels, e.g. the brain's bounding box) further limits
    the crop centre so small crops land on the object rather than on the background.
    """
    from scipy.ndimage import affine_transform

    size = np.array([int(s) for s in size], np.float64)
    shape = np.array(vol.shape[:3], np.float64)
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    zoom = 1.0 + rng.uniform(-max_scale, max_scale, size=3)
    matrix = _rotation(angles) @ np.diag(1.0 / zoom)
    # Crop centre in input voxels: anywhere the (unrotated) crop fits, else near the middle.
    half = (size - 1) / 2
    lo = np.where(size <= shape, half, (shape - 1) / 2 - 0.05 * shape)
    hi = np.where(size <= shape, shape - 1 - half, (shape - 1) / 2 + 0.05 * shape)
    if centre_bounds is not None:
        b_lo, b_hi = (np.asarray(b, np.float64) for b in centre_bounds)
        new_lo, new_hi = np.maximum(lo, b_lo), np.minimum(hi, b_hi)
        ok = new_lo <= new_hi
        lo, hi = np.where(ok, new_lo, lo), np.where(ok, new_hi, hi)
    centre = rng.uniform(lo, hi)
    offset = centre - matrix @ half  # input = matrix @ output + offset
    out = np.empty(tuple(int(s) for s in size) + (vol.shape[3],), np.float32)
    for c in range(vol.shape[3]):
        out[..., c] = affine_transform(
            vol[..., c], matrix, offset=offset, output_shape=out.shape[:3],
            order=1, mode="constant", cval=pad_value,
        )
    return out


def intensity_jitter(vol: np.ndarray, rng: np.random.Generator, amount: float, bg: float, fg: float):
    """Random gamma and contrast of about +-`amount`; the background `bg` stays put.

    Works in unit space (bg -> 0, fg -> 1), so an inverted window (bg > fg) works too.
    """
    if amount <= 0 or fg == bg:
        return vol
    unit = np.clip((vol - bg) / (fg - bg), 0.0, 1.0)
    gamma = math.exp(rng.uniform(-amount, amount) * 2.0)
    contrast = 1.0 + rng.uniform(-amount, amount)
    unit = np.clip(np.power(unit, gamma) * contrast, 0.0, 1.0)
    return (bg + unit * (fg - bg)).astype(np.float32)


class MNI152Source:
    """`num` records of the (preprocessed) MNI152 template; augmentation makes them differ."""

    def __init__(self, num: int, prep: Prep):
        if prep.channels != 1:
            raise DataError(
                f"data.source='mni152' is a 1-channel T1 template but autoencoder.in_channels="
                f"{prep.channels}; set in_channels=1."
            )
        self._num, self._prep = int(num), prep

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        return f"MNI152Source(num={self._num}, resolution={self._prep.mni152_resolution})"

    def template(self) -> np.ndarray:
        return _preprocessed_template(self._prep)[0]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._num:
            raise IndexError(index)
        vol, (lo, hi) = _preprocessed_template(self._prep)
        return {"image": vol, "name": "mni152", "fg_lo": lo, "fg_hi": hi}


_TEMPLATE_CACHE: dict = {}


_TEMPLATE_LOCK = threading.Lock()  # grain reads records from several threads


def _preprocessed_template(prep: Prep):
    """(template after preprocessing (read-only), brain bounds), once per process."""
    with _TEMPLATE_LOCK:
        return _template_locked(prep)


def _template_locked(prep: Prep):
    if prep not in _TEMPLATE_CACHE:
        vol, affine, zooms = load_template(prep.mni152_resolution)
        out, _ = preprocess(vol[..., None], prep, "mni152", zooms, affine)
        bounds = foreground_bounds(out if not prep.invert else -out)
        out.setflags(write=False)
        _TEMPLATE_CACHE[prep] = (out, bounds)
    return _TEMPLATE_CACHE[prep]
