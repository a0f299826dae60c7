"""Sliding-window application of the encoder or decoder to volumes larger than a window.

Why: a checkpoint is trained on patches (data.volume_size), but users encode whole scans.
Encoding a large volume in one piece can run out of memory and also feeds the network
GroupNorm statistics and attention contexts it never saw in training; encoding windows the
size of the training patch and blending them does neither. Windows start on multiples of
the total downsampling factor, so each window's latent lands exactly on the latent grid,
and overlapping outputs are blended with gaussian weights at the OUTPUT resolution
(latent resolution when encoding), which down-weights window borders where the network
saw zero padding instead of context.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np


def tile_starts(size: int, window: int, overlap: float, multiple: int = 1) -> list[int]:
    """Window offsets covering [0, size): steps of window*(1-overlap) rounded down to a
    multiple of `multiple` (at least one multiple), the last window flush with the end."""
    if window >= size:
        return [0]
    stride = max(int(window * (1.0 - overlap)) // multiple * multiple, multiple)
    starts = list(range(0, size - window, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def gaussian_weights(shape: Sequence[int], sigma_scale: float = 0.125,
                     floor: float = 1e-6) -> np.ndarray:
    """Separable gaussian bump over a window (std = sigma_scale * size per axis), peak 1.

    The floor applies per axis, not to the product: clamping the product would give every
    window the same weight where all of them are near their borders (volume corners) and
    so discard the ranking between them. The product (>= 3e-11 at sigma_scale 0.125) is
    well within float32.
    """
    w = np.ones((), np.float64)
    for n in shape:
        d = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * np.square(d / max(sigma_scale * n, 1e-6)))
        w = np.multiply.outer(w, np.maximum(g / g.max(), floor))
    return w.astype(np.float32)


def tiles(shape: Sequence[int], window: Sequence[int], overlap: float,
          multiple: Sequence[int]) -> list[tuple[int, int, int]]:
    """All window start corners (raster order) for a 3D `shape`."""
    per_axis = [tile_starts(int(s), int(w), overlap, int(m))
                for s, w, m in zip(shape, window, multiple)]
    return list(itertools.product(*per_axis))


def sliding_apply(fn: Callable, x: np.ndarray, window: Sequence[int], *, overlap: float = 0.25,
                  batch_size: int = 1, scale: Sequence[tuple[int, int]] = ((1, 1),) * 3,
                  sigma_scale: float = 0.125):
    """Applies `fn` window by window to one volume `x` (X, Y, Z, C) and blends the outputs.

    `fn(batch)` takes (batch_size, wx, wy, wz, C) and returns one array or a tuple of arrays
    (batch_size, ox, oy, oz, C_k) with o = w * num / den per axis, `scale[a] = (num, den)`:
    (1, f) for an encoder with factor f, (f, 1) for a decoder. Window starts are multiples
    of den. `window` is clipped to the volume; every (clipped) window has the same shape,
    so `fn` compiles once; the last batch is filled up with repeats of its last window.
    Returns a tuple of blended float32 arrays (one per output of `fn`).
    """
    x = np.asarray(x)
    shape = x.shape[:3]
    nums = [int(n) for n, _ in scale]
    dens = [int(d) for _, d in scale]
    window = tuple(min(int(w), int(s)) for w, s in zip(window, shape))
    for a in range(3):
        if shape[a] % dens[a] or window[a] % dens[a]:
            raise ValueError(
                f"sliding window: volume {tuple(shape)} and window {window} must be multiples "
                f"of {tuple(dens)} on every axis (pad the volume first)")
    out_shape = tuple(s * n // d for s, n, d in zip(shape, nums, dens))
    out_window = tuple(w * n // d for w, n, d in zip(window, nums, dens))
    weights = gaussian_weights(out_window, sigma_scale)[..., None]
    corners = tiles(shape, window, overlap, dens)
    batch_size = max(int(batch_size), 1)

    acc, wsum = None, np.zeros(out_shape + (1,), np.float32)

    def _accumulate(chunk, outs):
        nonlocal acc
        outs = [np.asarray(o, np.float32) for o in (outs if isinstance(outs, tuple) else (outs,))]
        for o in outs:
            if o.shape[1:4] != out_window:
                raise ValueError(f"sliding window: fn returned spatial shape {o.shape[1:4]} for "
                                 f"window {window}; expected {out_window}")
        if acc is None:
            acc = [np.zeros(out_shape + (o.shape[-1],), np.float32) for o in outs]
        for k, corner in enumerate(chunk):
            sl = tuple(slice(c * n // d, c * n // d + ow)
                       for c, n, d, ow in zip(corner, nums, dens, out_window))
            for a, o in zip(acc, outs):
                a[sl] += o[k] * weights
            wsum[sl] += weights

    pending = None  # (chunk, device outputs): dispatch the next batch before reading back
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = np.stack([x[c[0]:c[0] + window[0], c[1]:c[1] + window[1], c[2]:c[2] + window[2]]
                          for c in padded])
        outs = fn(batch)
        if pending is not None:
            _accumulate(*pending)
        pending = (chunk, outs)
    _accumulate(*pending)
    return tuple(a / wsum for a in acc)
