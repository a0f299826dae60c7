"""Aligned condition volumes for conditioned models: read, check, resample, hash.

One module for every model that takes a volume aligned with what it generates (a
ControlNet's mask or image; `--condition` of `ldm-jax sample` and `ldm-jax edit`; the
training conditions of a ControlNet run). A condition is float32, channels-last
(X, Y, Z, C), in the file's axis order (nibabel's), as volumes are.

Two grids: the *volume grid* (the autoencoder's `data.volume_size`) and the *condition
grid* (the latent shape times the model's condition factor; a ControlNet's is 2^(k-1),
k = len(conditioning_embedding_num_channels)). A condition on either grid is accepted.
One on the volume grid is resampled to the condition grid per axis by an integer factor
(`resample`): the mean over each block when the condition grid is coarser (a 0/1 mask
becomes the fraction of foreground voxels per cell), nearest (repeat) when it is finer.
Files: NIfTI (`.nii`, `.nii.gz`; 3D, or 4D with channels last) or `.npy` ((X, Y, Z) or
(X, Y, Z, C)); any numeric or boolean dtype, read as float32.

2D condition images (e.g. a widefield image, a projection of the volume): a 2D NIfTI or
`.npy`, or a greyscale image, `.png` (8- or 16-bit) or `.tif` / `.tiff` (8/16/32-bit
integer or float; a multi-page TIFF is read as (X, Y, pages)). `read_condition` returns
them as stored, 2D; suffixes match in any case. Axis order: an image's array
`np.asarray(PIL.Image.open(f))` is (rows, columns) and is taken as (X, Y) of the volume in
nibabel's order, as `.npy` is: rows are X, columns are Y. So a projection written from a
volume round-trips: `np.save("p.npy", vol.sum(axis=2))` or
`Image.fromarray(vol.sum(axis=2).astype(np.float32)).save("p.tif")` reads back as
`vol.sum(axis=2)` (a viewer shows X downwards, Y to the right). Colour (RGB, RGBA,
palette) images are refused: save the one channel that is the condition as a greyscale
image (or as `.npy`). In a folder, files with the same name and different suffixes
(NAME.npy and its NAME.png preview) count once: the first suffix of `SUFFIXES`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from ldm_jax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
SUFFIXES = (".nii.gz", ".nii", ".npy") + IMAGE_SUFFIXES
# PIL modes of a greyscale image (1-bit, 8-bit, 16-bit, 32-bit integer, 32-bit float).
_GREY = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;32", "I;32L", "I;32B",
         "F;32", "F;32B")


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import jax.numpy as jnp
    return jnp


def resample(c, grid: Sequence[int]):
    """(..., X, Y, Z, C) -> (..., *grid, C), per axis by an integer factor: block mean
    (grid smaller) or nearest repeat (grid larger); numpy or jax arrays (traceable).
    Raises ValueError when an axis and its target are not integer multiples."""
    grid = tuple(int(g) for g in grid)
    xp = _xp(c)
    lead = c.ndim - 4
    for i, g in enumerate(grid):
        ax = lead + i
        s = c.shape[ax]
        if s == g:
            continue
        if s % g == 0:
            k = s // g
            c = xp.mean(c.reshape(*c.shape[:ax], g, k, *c.shape[ax + 1:]), axis=ax + 1)
        elif g % s == 0:
            c = xp.repeat(c, g // s, axis=ax)
        else:
            raise ValueError(f"axis {i} of size {s} cannot be resampled to {g} by an integer "
                             "factor")
    return c


def foreground_mask(volumes, threshold: float):
    """(B, X, Y, Z, C) volumes -> (B, X, Y, Z, 1) float32: 1 where any channel is above
    `threshold` (the data's intensity units, after preprocessing), else 0. numpy or jax."""
    xp = _xp(volumes)
    return (xp.max(volumes, axis=-1, keepdims=True) > float(threshold)).astype(xp.float32)


def inpainting_condition(volumes, masks):
    """(B, X, Y, Z, C) volumes and (B, X, Y, Z[, 1]) masks (non-zero: the hole) ->
    (B, X, Y, Z, C + 1) float32: the volume with the hole set to 0, then the mask (the
    masked image and mask of diffusers' inpainting pipelines). numpy or jax (traceable)."""
    xp = _xp(volumes)
    m = (masks if masks.ndim == volumes.ndim else masks[..., None]) != 0
    m = m.astype(xp.float32)
    return xp.concatenate([volumes.astype(xp.float32) * (1.0 - m), m], axis=-1)


def random_boxes(rng, batch: int, grid: Sequence[int], min_fraction: float,
                 max_fraction: float):
    """(batch, *grid, 1) float32 jax masks, 1 inside one box per volume: per axis a side
    uniform in [min_fraction, max_fraction] of the axis (rounded, at least 1 voxel) at a
    uniform position inside the volume. Traceable; `rng` a jax PRNG key."""
    import jax
    import jax.numpy as jnp

    grid = tuple(int(g) for g in grid)
    k_size, k_pos = jax.random.split(rng)
    g = jnp.asarray(grid, jnp.float32)
    frac = jax.random.uniform(k_size, (batch, 3), minval=float(min_fraction),
                              maxval=float(max_fraction))
    size = jnp.clip(jnp.round(frac * g), 1, g)
    start = jnp.floor(jax.random.uniform(k_pos, (batch, 3)) * (g - size + 1))
    m = jnp.ones((batch, *grid), jnp.float32)
    for a, s in enumerate(grid):
        i = jnp.arange(s, dtype=jnp.float32)
        inside = (i >= start[:, a:a + 1]) & (i < start[:, a:a + 1] + size[:, a:a + 1])
        m = m * inside.reshape(batch, *[s if b == a else 1 for b in range(3)])
    return m[..., None]


def centre_box(grid: Sequence[int], fraction: float = 0.5) -> np.ndarray:
    """(*grid, 1) float32: 1 in the centred box of `fraction` of each axis (the
    validation hole of an inpainting ControlNet run)."""
    m = np.zeros(tuple(int(g) for g in grid), np.float32)
    sl = []
    for g in grid:
        n = max(1, int(round(float(fraction) * int(g))))
        lo = (int(g) - n) // 2
        sl.append(slice(lo, lo + n))
    m[tuple(sl)] = 1.0
    return m[..., None]


def to_grid(c: np.ndarray, *, volume_grid, condition_grid, channels: int, where: str,
            error=ConfigError) -> np.ndarray:
    """One condition (X, Y, Z[, C]) on the volume or the condition grid -> (*condition_grid,
    channels) float32. Raises `error` (one line naming `where`, what it is and what is
    expected) for another shape, another channel count or non-finite values."""
    c = np.asarray(c)
    if c.ndim == 3:
        c = c[..., None]
    vg, cg = tuple(int(s) for s in volume_grid), tuple(int(s) for s in condition_grid)
    grids = f"{cg}" + ("" if vg == cg else f" (the condition grid) or {vg} (the volume grid)")
    if c.ndim != 4 or c.shape[:3] not in (vg, cg):
        raise error(f"{where} has shape {tuple(np.shape(c))}; this model takes a condition of "
                    f"{grids} with {channels} channel(s), (X, Y, Z) or (X, Y, Z, C).")
    if c.shape[-1] != int(channels):
        raise error(f"{where} has {c.shape[-1]} channel(s); this model's condition has "
                    f"{channels} (controlnet.conditioning_embedding_in_channels).")
    if not (np.issubdtype(c.dtype, np.number) or c.dtype == bool):
        raise error(f"{where} holds {c.dtype} values; a condition is numeric.")
    c = c.astype(np.float32)
    if not np.isfinite(c).all():
        raise error(f"{where} holds NaN or Inf values; a condition must be finite.")
    return resample(c, cg)


def _read_image(path: str):
    """(array, None) of a greyscale image file (a multi-page TIFF: pages on the last
    axis), or (None, the PIL mode) of a colour image."""
    from PIL import Image
    with Image.open(path) as img:
        pages = []
        for i in range(getattr(img, "n_frames", 1)):
            img.seek(i)
            if img.mode not in _GREY:
                return None, img.mode
            pages.append(np.asarray(img))
    return (pages[0] if len(pages) == 1 else np.stack(pages, axis=-1)), None


def read_condition(path: str, flag: str = "--condition", error=ConfigError) -> np.ndarray:
    """The array of one condition file (NIfTI, .npy, or a greyscale .png / .tif / .tiff
    image), as stored: any number of axes (a 2D image is (X, Y), see the module's
    docstring). Raises `error` for a missing, unreadable, colour image or other kind of
    file (one line naming `flag` and the file)."""
    if not os.path.isfile(path):
        raise error(f"{flag}: {path} is not a file.")
    low, mode = path.lower(), None
    try:
        if low.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if low.endswith((".nii", ".nii.gz")):
            import nibabel as nib
            return np.asanyarray(nib.load(path).dataobj)
        if low.endswith(IMAGE_SUFFIXES):
            arr, mode = _read_image(path)
            if arr is not None:
                return arr
    except Exception as e:  # noqa: BLE001 -- any reader failure is a bad file
        raise error(f"{flag}: {path} is not a readable condition file ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}).") from None
    if mode is not None:
        raise error(f"{flag}: {path} is a colour ({mode}) image; a condition image is "
                    "greyscale: save the one channel that is the condition as a greyscale "
                    "PNG/TIFF (e.g. Image.open(f).convert('L')) or as .npy.")
    raise error(f"{flag}: {path} is not a condition file; use NIfTI (.nii, .nii.gz), .npy "
                f"or a greyscale image ({', '.join(IMAGE_SUFFIXES)}).")


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _in_folder(folder: str) -> list[str]:
    """The condition files in `folder` in name order, one per name: of NAME.npy and
    NAME.png (say), the first suffix in `SUFFIXES`."""
    best = {}  # stem -> (rank of the suffix, file name)
    for n in os.listdir(folder):
        rank = next((i for i, s in enumerate(SUFFIXES) if n.lower().endswith(s)), None)
        if rank is None or n.startswith("."):
            continue
        stem = n[:-len(SUFFIXES[rank])]
        if stem not in best or rank < best[stem][0]:
            best[stem] = (rank, n)
    return sorted(os.path.join(folder, n) for _, n in best.values())


def condition_files(path: str, *, count: int | None = None,
                    names: Sequence[str] | None = None, flag: str = "--condition",
                    error=ConfigError) -> list[str]:
    """The condition file of each of `count` outputs (or of each input in `names`).

    `path` a file: that file for all. A folder: with `names`, NAME + the first suffix of
    `SUFFIXES` found (NAME.nii.gz, NAME.nii, NAME.npy, NAME.png, ...) for each name
    (matched as inputs are); with `count`, its condition files in name order (one per
    name, `_in_folder`), the i-th for output i (at least `count` of them). Raises `error` naming
    the missing files or the count it has against the count it needs."""
    path = os.path.expanduser(str(path))
    n = len(names) if names is not None else int(count)
    if os.path.isfile(path):
        return [path] * n
    if not os.path.isdir(path):
        raise error(f"{flag}={path!r} is neither a condition file nor a folder of them.")
    if names is None:
        files = _in_folder(path)
        if len(files) < n:
            raise error(f"{flag}={path!r} holds {len(files)} condition file(s) "
                        f"({'/'.join(SUFFIXES)}); {n} are needed, one per sample in name "
                        "order (or give one file for all).")
        return files[:n]
    out, missing = [], []
    for name in names:
        found = [os.path.join(path, name + s) for s in SUFFIXES
                 if os.path.isfile(os.path.join(path, name + s))]
        (out.append(found[0]) if found else missing.append(name))
    if missing:
        raise error(f"{flag}={path!r} has no condition for {len(missing)} input(s), e.g. "
                    f"{missing[0]} ({'/'.join(SUFFIXES)}); give one file per input, named as "
                    "the input" + (" (or one file for all)." if flag == "--condition" else "."))
    return out


def load_conditions(files: Sequence[str], *, volume_grid, condition_grid, channels: int,
                    flag: str = "--condition", error=ConfigError) -> np.ndarray:
    """(n, *condition_grid, channels) float32 of the condition `files` (one per output; a
    file named several times is read once), each checked and resampled by `to_grid`.
    Raises `error` as `read_condition` and `to_grid`."""
    cache = {}
    for f in files:
        if f not in cache:
            cache[f] = to_grid(read_condition(f, flag, error), volume_grid=volume_grid,
                               condition_grid=condition_grid, channels=channels,
                               where=f"{flag} {f}", error=error)
    return np.stack([cache[f] for f in files])
