"""PNG views of volumes that a person can read: labelled orthogonal mid-slices and a MIP.

A 3D volume cannot be looked at directly; each one is shown as four panels: the XY slice
at mid Z, the XZ slice at mid Y, the YZ slice at mid X (X down the rows, one voxel per
pixel before enlarging) and the maximum-intensity projection over Z (thin structures
such as filaments). Panels are enlarged by an integer factor (nearest neighbour) so the
shortest panel side is at least `MIN_PANEL` pixels, and labelled with PIL's built-in
font. Grey levels span the stated value range; errors use a black-red-yellow-white
scale from 0 to the volume's largest error, shown in a colour bar.

`comparison_image` (training's images/step_N.png, reconstruct's NAME.png) and
`samples_image` (the data preview) return PIL images; `orthoview` / `save_grid` are the
plain unlabelled strips the benchmarks use.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_PANEL = 128  # pixels on a panel's short side, at least
MAX_HEIGHT = 3200  # a figure shows fewer volumes rather than grow taller than this
_PAD, _TEXT = 6, 18  # pixels between panels; of one text line
_BG, _FG = (255, 255, 255), (0, 0, 0)


def _to_uint8(img, lo, hi):
    img = (np.nan_to_num(np.asarray(img, np.float32)) - lo) / max(hi - lo, 1e-8)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _pad_to(img, h, w):
    out = np.zeros((h, w), img.dtype)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def _volume(v):
    v = np.asarray(v, np.float32)
    return v[..., 0] if v.ndim == 4 else v


def views(volume) -> list:
    """[(title, 2D float32 array)] of an (X, Y, Z) or (X, Y, Z, C) volume (first channel):
    the three mid-slices and the maximum over Z."""
    v = _volume(volume)
    x, y, z = v.shape
    return [(f"XY at z={z // 2}", v[:, :, z // 2]), (f"XZ at y={y // 2}", v[:, y // 2, :]),
            (f"YZ at x={x // 2}", v[x // 2, :, :]), ("max over Z", v.max(axis=2))]


def panel_scale(shape) -> int:
    """The integer enlargement that gives every panel of a volume of spatial `shape`
    a short side of at least MIN_PANEL pixels."""
    return max(1, math.ceil(MIN_PANEL / max(1, min(shape[:3]))))


def psnr(x, r, data_range: float) -> float:
    """10 log10(range^2 / MSE) of one volume in dB (inf when identical)."""
    mse = float(np.mean(np.square(np.asarray(r, np.float64) - np.asarray(x, np.float64))))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def dice_score(x, r, threshold: float) -> float:
    """Dice of (x > threshold) and (r > threshold) of one volume (1.0 when both empty)."""
    a, b = np.asarray(x) > threshold, np.asarray(r) > threshold
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _font():
    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _hot(t):
    """float array in [0, 1] -> uint8 RGB, black -> red -> yellow -> white."""
    t = np.clip(np.nan_to_num(t), 0.0, 1.0)
    rgb = [np.interp(t, [0, 1 / 3, 1], [0, 1, 1]), np.interp(t, [0, 1 / 3, 2 / 3, 1],
                                                             [0, 0, 1, 1]),
           np.interp(t, [0, 2 / 3, 1], [0, 0, 1])]
    return (np.stack(rgb, axis=-1) * 255).astype(np.uint8)


def _grey(img, lo, hi):
    return np.repeat(_to_uint8(img, lo, hi)[..., None], 3, axis=-1)


class _Figure:
    """Rows of labelled panels on a white canvas, drawn top to bottom."""

    def __init__(self):
        self.font = _font()
        self.items = []  # (x, y, PIL image | text)
        self.y = _PAD
        self.width = 0

    def text_width(self, text):
        return int(math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(
            text, font=self.font)))

    def text(self, x, text):
        self.items.append((x, self.y, text))
        self.width = max(self.width, x + self.text_width(text) + _PAD)

    def newline(self, height=_TEXT):
        self.y += height

    def row(self, x, label, label_w, panels, scale, bar=None):
        """One row: `label` on the left, then the RGB uint8 `panels` enlarged `scale`
        times; `bar` = (lo, hi) adds a colour bar of `_hot` with its end values."""
        self.items.append((_PAD, self.y + 2, label))
        x = x + label_w
        height = 0
        for p in panels:
            img = Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale),
                                            Image.NEAREST)
            self.items.append((x, self.y, img))
            x += img.size[0] + _PAD
            height = max(height, img.size[1])
        if bar is not None:
            ramp = _hot(np.linspace(1.0, 0.0, height)[:, None].repeat(12, axis=1))
            self.items.append((x, self.y, Image.fromarray(ramp)))
            lo, hi = bar
            self.items.append((x + 16, self.y, f"{hi:.3g}"))
            self.items.append((x + 16, self.y + height - _TEXT, f"{lo:.3g}"))
            x += 16 + self.text_width(f"{hi:.3g}")
        self.width = max(self.width, x + _PAD)
        self.y += height + _PAD

    def render(self) -> Image.Image:
        canvas = Image.new("RGB", (self.width, self.y + _PAD), _BG)
        draw = ImageDraw.Draw(canvas)
        for x, y, item in self.items:
            if isinstance(item, str):
                draw.text((x, y), item, fill=_FG, font=self.font)
            else:
                canvas.paste(item, (x, y))
        return canvas


def _headers(fig, x, titles, widths):
    for t, w in zip(titles, widths):
        fig.text(x, t)
        x += w + _PAD
    fig.newline()


def comparison_image(inputs, recons, names=None, data_range=(0.0, 1.0),
                     max_volumes=4, threshold=None) -> Image.Image:
    """Input / reconstruction / |error| rows for up to `max_volumes` volumes (fewer when
    they would make the image taller than MAX_HEIGHT), each titled with its name, PSNR,
    the PSNR of a blank volume and, with `threshold`, the foreground Dice.

    `inputs`, `recons`: sequences of (X, Y, Z[, C]) arrays; `names`: str per volume (file
    paths are shown by base name); `data_range` (lo, hi): the grey scale and PSNR range;
    `threshold`: foreground above it, in intensity units.
    """
    lo, hi = (float(v) for v in data_range)
    pairs = list(zip(inputs, recons))
    names = [os.path.basename(str(n)) for n in names] if names is not None else [
        f"volume {i}" for i in range(len(pairs))]
    fig = _Figure()
    label_w = fig.text_width("reconstruction") + 2 * _PAD
    for i, (x, r) in enumerate(pairs[:max_volumes]):
        x, r = _volume(x), _volume(r)
        scale = panel_scale(x.shape)
        block = 2 * _TEXT + 3 * (max(x.shape[:2]) * scale + _PAD)
        if i > 0 and fig.y + block > MAX_HEIGHT:
            break
        err = np.abs(r - x)
        emax = float(np.nanmax(err)) if np.isfinite(err).any() else 0.0
        blank = psnr(x, np.full_like(x, lo), hi - lo)
        dice = "" if threshold is None else f", Dice {dice_score(x, r, threshold):.3f}"
        fig.text(_PAD, f"{names[i]}: PSNR {psnr(x, r, hi - lo):.2f} dB (blank "
                       f"{blank:.2f}){dice}, shape "
                       f"{'x'.join(map(str, x.shape))}; grey {lo:g} (black) to {hi:g} "
                       f"(white), |error| 0 to {emax:.3g}")
        fig.newline()
        vx, vr, ve = views(x), views(r), views(err)
        _headers(fig, _PAD + label_w, [t for t, _ in vx], [a.shape[1] * scale for _, a in vx])
        fig.row(_PAD, "input", label_w, [_grey(a, lo, hi) for _, a in vx], scale)
        fig.row(_PAD, "reconstruction", label_w, [_grey(a, lo, hi) for _, a in vr], scale)
        fig.row(_PAD, "|error|", label_w,
                [_hot(a / max(emax, 1e-12)) for _, a in ve], scale, bar=(0.0, emax))
    return fig.render()


def samples_image(volumes, names=None, value_range=(0.0, 1.0), title=None) -> Image.Image:
    """One labelled row of four panels per (X, Y, Z[, C]) volume, grey over `value_range`."""
    lo, hi = (float(v) for v in value_range)
    fig = _Figure()
    if title:
        fig.text(_PAD, title)
        fig.newline()
    names = [os.path.basename(str(n)) for n in names] if names is not None else [
        f"sample {i}" for i in range(len(volumes))]
    label_w = max(fig.text_width(n) for n in names) + 2 * _PAD
    shape = None
    for name, vol in zip(names, volumes):
        v = _volume(vol)
        scale = panel_scale(v.shape)
        vs = views(v)
        if v.shape != shape:  # headers name the slice positions, which follow the shape
            _headers(fig, _PAD + label_w, [t for t, _ in vs], [a.shape[1] * scale for _, a in vs])
            shape = v.shape
        fig.row(_PAD, name, label_w, [_grey(a, lo, hi) for _, a in vs], scale)
    return fig.render()


# ----------------------------------------------------------------------------------------
# Plain strips (no labels), for the benchmarks' composite figures.

def orthoview(volume, lo=None, hi=None):
    """(X, Y, Z) or (X, Y, Z, C) -> one 2D uint8 strip: XY, XZ, YZ mid-slices and XY MIP."""
    v = _volume(volume)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    panels = [a for _, a in views(v)]
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
