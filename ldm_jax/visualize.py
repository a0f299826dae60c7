"""PNG views of volumes: three orthogonal mid-slices plus a maximum-intensity projection.

A 3D volume cannot be looked at directly; these four panels show what the model sees
(mid-slices for texture, the MIP for thin structures such as filaments).
"""

import numpy as np
from PIL import Image


def _to_uint8(img, lo, hi):
    img = (np.asarray(img, np.float32) - lo) / max(hi - lo, 1e-8)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _pad_to(img, h, w):
    out = np.zeros((h, w), img.dtype)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def orthoview(volume, lo=None, hi=None):
    """(X, Y, Z) or (X, Y, Z, C) -> one 2D uint8 strip: XY, XZ, YZ mid-slices and XY MIP."""
    v = np.asarray(volume, np.float32)
    if v.ndim == 4:
        v = v[..., 0]
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    x, y, z = v.shape
    panels = [v[:, :, z // 2], v[:, y // 2, :], v[x // 2, :, :], v.max(axis=2)]
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    gap = np.full((h, 2), 255, np.uint8)
    row = []
    for p in panels:
        row += [_pad_to(_to_uint8(p, lo, hi), h, w), gap]
    return np.concatenate(row[:-1], axis=1)


def save_grid(rows, path):
    """Stacks 2D uint8 strips vertically (padded to equal width) and writes a PNG."""
    w = max(r.shape[1] for r in rows)
    gap = np.full((2, w), 255, np.uint8)
    parts = []
    for r in rows:
        parts += [_pad_to(r, r.shape[0], w), gap]
    Image.fromarray(np.concatenate(parts[:-1], axis=0)).save(path)


def comparison_rows(inputs, recons, data_range=(0.0, 1.0), max_volumes=4):
    """Rows `input | reconstruction | |error|` for up to `max_volumes` volumes."""
    lo, hi = data_range
    rows = []
    for x, r in list(zip(inputs, recons))[:max_volumes]:
        err = np.abs(np.asarray(r, np.float32) - np.asarray(x, np.float32))
        strips = [orthoview(x, lo, hi), orthoview(r, lo, hi), orthoview(err, 0.0, hi - lo)]
        gap = np.full((strips[0].shape[0], 6), 255, np.uint8)
        rows.append(np.concatenate([strips[0], gap, strips[1], gap, strips[2]], axis=1))
    return rows
