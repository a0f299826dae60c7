r"""How much of a sparse volume a latent of a given size can hold: the best *linear* code.

    python -m benchmarks.block_pca --out runs/block_pca            # the table
    python -m benchmarks.block_pca --volume 64,64,32 --train 64 --val 8

A convolutional autoencoder with total factor f per axis and c latent channels gives each
f x f x f block of the input c numbers. This bench fits the linear code of that shape: PCA
over the training volumes' f^3-voxel blocks, keeping the c leading components per block,
and reconstructs held-out volumes block by block. It is the optimal linear encoder and
decoder with that bottleneck (Eckart-Young), without the context a convolutional decoder
sees across blocks: evidence of what a bottleneck can hold, not a bound on a nonlinear
decoder. Each row: foreground Dice at the validation threshold (0.1 of the range, as
`config.eval.fg_threshold`), PSNR beside a blank volume's, and the fraction of the
blocks' variance the code keeps. Same built-in filament volumes as `train.py`
(`configs/default.py`, data.seed 0: train split for the fit, validation split scored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import parse_ints

# (total factor per axis, latent channels) of the configs in benchmarks/QUALITY.md "Levers".
CODES = ((16, 3), (16, 8), (8, 3), (8, 8), (4, 3), (4, 8))


def volumes(split: str, num: int, size: tuple) -> np.ndarray:
    """(num, X, Y, Z) float32 in 0..1: the built-in filament volumes of a split."""
    from configs import default
    from ldm_jax.data.sources import build_source
    from ldm_jax.data.transforms import Prep

    config = default.get_config()
    config.data.volume_size = size
    config.data.num_train_volumes = num
    config.data.num_val_volumes = num
    src = build_source(config, Prep.from_config(config), split)
    return np.stack([src[i]["image"][..., 0] for i in range(num)]).astype(np.float32)


def blocks(vols: np.ndarray, f: int) -> np.ndarray:
    """(N, X, Y, Z) -> (N * X/f * Y/f * Z/f, f^3): non-overlapping f^3 blocks as rows."""
    n, x, y, z = vols.shape
    b = vols.reshape(n, x // f, f, y // f, f, z // f, f).transpose(0, 1, 3, 5, 2, 4, 6)
    return b.reshape(-1, f ** 3)


def unblocks(rows: np.ndarray, shape: tuple, f: int) -> np.ndarray:
    """Inverse of `blocks` for volumes of `shape` (N, X, Y, Z)."""
    n, x, y, z = shape
    b = rows.reshape(n, x // f, y // f, z // f, f, f, f).transpose(0, 1, 4, 2, 5, 3, 6)
    return b.reshape(shape)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over volumes of PSNR (data range 1)."""
    mse = ((x - y) ** 2).reshape(len(x), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def dice(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """Mean over volumes of the Dice of the foregrounds (> threshold); 1 where both empty."""
    a = (x > threshold).reshape(len(x), -1)
    b = (y > threshold).reshape(len(y), -1)
    inter, total = (a & b).sum(1), a.sum(1) + b.sum(1)
    return float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))


def linear_code(train: np.ndarray, val: np.ndarray, f: int, c: int) -> tuple:
    """PCA with c components over f^3 blocks of `train`; (val reconstruction, kept variance)."""
    rows = blocks(train, f)
    mean = rows.mean(0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    basis = vt[:c]
    kept = float((s[:c] ** 2).sum() / (s ** 2).sum())
    vrows = blocks(val, f) - mean
    recon = (vrows @ basis.T) @ basis + mean
    return np.clip(unblocks(recon, val.shape, f), 0.0, 1.0), kept


def measure(size: tuple, num_train: int, num_val: int, threshold: float = 0.1) -> list:
    """One row per `CODES` entry, plus the blank volume's."""
    train, val = volumes("train", num_train, size), volumes("val", num_val, size)
    blank = psnr(np.zeros_like(val), val)
    rows = []
    for f, c in CODES:
        recon, kept = linear_code(train, val, f, c)
        rows.append({"factor": f, "latent_channels": c, "voxels_per_value": f ** 3 / c,
                     "dice": dice(recon, val, threshold), "psnr": psnr(recon, val),
                     "psnr_blank": blank, "variance_kept": kept})
    return rows


def table(rows: list) -> str:
    lines = ["| factor | latent ch | voxels per value | Dice | PSNR dB (above blank) | variance kept |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['factor']}x | {r['latent_channels']} | {r['voxels_per_value']:.0f} "
                     f"| {r['dice']:.3f} | {r['psnr']:.2f} ({r['psnr'] - r['psnr_blank']:+.2f}) "
                     f"| {r['variance_kept']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip().splitlines()[0])
    p.add_argument("--volume", default="64,64,32", help="X,Y,Z of each volume")
    p.add_argument("--train", type=int, default=64, help="training volumes for the fit")
    p.add_argument("--val", type=int, default=8, help="held-out volumes scored")
    p.add_argument("--out", default=None, help="folder for rows.json and table.md")
    args = p.parse_args(argv)
    rows = measure(tuple(parse_ints(args.volume, "--volume", 3)), args.train, args.val)
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
