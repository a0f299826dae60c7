"""A small PNG plot of bench rows with Pillow: peak memory against total factor, per head.

Why Pillow: it is already a runtime dependency (image grids); matplotlib is not, and one
scatter/line chart does not justify adding it.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

COLORS = {"nearest_conv": (214, 39, 40), "subpixel": (31, 119, 180), "seed claim": (120, 120, 120)}


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def memory_series(rows, volume=(256, 256, 64), key="peak_memory_bytes"):
    """{series name: [(total factor, GB, label)]} for rows at `volume`.

    Rows with stem factor 1 have no head to choose and go into both head series; the seed's
    claims (rows' seed_claim_gb) form a third series.
    """
    series = {"nearest_conv": [], "subpixel": [], "seed claim": []}
    seen_claims = set()
    for r in rows:
        if "params" not in r or list(r.get("volume", [])) != list(volume):
            continue
        value = r.get(key)
        if value is None:
            continue
        f = r["total_factor"][0] * r["total_factor"][1] * r["total_factor"][2]
        f = round(f ** (1 / 3)) if len(set(r["total_factor"])) == 1 else f
        label = r["name"].split(" ")[0]
        heads = ([r["upsample_head"]] if r["initial_factor"] != [1, 1, 1]
                 else ["nearest_conv", "subpixel"])
        for h in heads:
            series.setdefault(h, []).append((f, value / 1e9, label))
        claim = r.get("seed_claim_gb")
        if claim is not None and label not in seen_claims:
            seen_claims.add(label)
            series["seed claim"].append((f, float(claim), label))
    return {k: sorted(v) for k, v in series.items() if v}


def plot_memory(rows, path, title, note="", volume=(256, 256, 64), key="peak_memory_bytes"):
    """Writes a PNG: x = total downsampling factor (log2 axis), y = peak memory in GB (log)."""
    series = memory_series(rows, volume, key)
    if not series:
        raise ValueError(f"no rows at volume {volume} with {key} to plot")
    w, h, left, right, top, bottom = 900, 560, 90, 190, 60, 90
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f_small, f_mid = font(14), font(17)
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    x0, x1 = math.log2(min(xs)) - 0.5, math.log2(max(xs)) + 0.5
    # Log memory axis: rows differ by 20x, and ratios are what a reader compares.
    y0, y1 = math.log10(min(ys)) - 0.15, math.log10(max(ys)) + 0.15

    def px(x, y):
        return (left + (math.log2(x) - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (math.log10(y) - y0) / (y1 - y0) * (h - top - bottom))

    d.text((left, 18), title, fill="black", font=f_mid)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in _log_ticks(10 ** y0, 10 ** y1):
        _, py = px(min(xs), y)
        d.line([left, py, w - right, py], fill=(225, 225, 225))
        d.text((left - 10, py), f"{y:g}", fill="black", font=f_small, anchor="rm")
    for f in sorted(set(xs)):
        pxx, _ = px(f, min(ys))
        d.line([pxx, top, pxx, h - bottom], fill=(235, 235, 235))
        d.text((pxx, h - bottom + 8), f"{f}x", fill="black", font=f_small, anchor="mt")
    d.text(((left + w - right) / 2, h - bottom + 30), "total downsampling factor per axis",
           fill="black", font=f_small, anchor="mt")
    d.text((20, (top + h - bottom) / 2), "GB (log)", fill="black", font=f_small, anchor="lm")
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name, (44, 160, 44))
        offset = (i - 1) * 6  # keep coincident points visible
        coords = [px(x, y) for x, y, _ in pts]
        coords = [(cx + offset, cy) for cx, cy in coords]
        for (cx, cy), (_, _, label) in zip(coords, pts):
            r = 5
            if name == "seed claim":
                d.rectangle([cx - r, cy - r, cx + r, cy + r], outline=color, width=2)
            else:
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            d.text((cx + 8, cy - 8), label, fill=color, font=f_small)
        ly = top + 10 + 24 * i
        d.rectangle([w - right + 15, ly, w - right + 29, ly + 14], fill=color)
        d.text((w - right + 36, ly + 7), name, fill="black", font=f_small, anchor="lm")
    if note:
        d.text((left, h - 28), note, fill=(80, 80, 80), font=font(12))
    img.save(path)
    return path


def _log_ticks(lo, hi):
    """1-2-5 ticks between lo and hi."""
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                ticks.append(round(v, 6))
        e += 1
    return ticks
