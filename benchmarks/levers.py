r"""Which lever makes stage 1 learn sparse data: paired train.py runs, one lever at a time.

    python -m benchmarks.levers --out runs/levers --steps 600            # every variant
    python -m benchmarks.levers --out runs/levers --only base,s2_4x_c8   # some of them
    python -m benchmarks.levers --out runs/levers --report               # the table only

Every variant is `python train.py` on the same built-in data (data.seed 0: the same
training and validation volumes, the same order), the same steps and train.seed, from a
config file plus overrides (`VARIANTS`); only the named lever differs from its parent.
Each run's validation row at its last step (foreground Dice at eval.fg_threshold, PSNR
beside the PSNR of a blank volume on the same volumes, foreground PSNR) and its wall time
go to `<out>/<name>.json`; `<out>/table.md` gathers them. A rerun skips finished runs and
resumes unfinished ones (train.py resumes its workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT

# name -> (parent, config file, overrides, what the lever is). Architectures: stem factor,
# level factors -> total factor per axis, latent channels; "c/value": input voxels per
# latent value (total factor^3 / latent channels).
VARIANTS = {
    "base": (None, "configs/balanced.py", {},
             "balanced.py as shipped: stem 2, levels (4, 2): 16x, 3 latent channels "
             "(1365 voxels per latent value); Adam 1e-4, b1 0.5, L1"),
    "base_c8": ("base", "configs/balanced.py", {"autoencoder.latent_channels": 8},
                "16x with 8 latent channels (512 voxels per value)"),
    "s2_8x_c8": ("base", "configs/balanced.py",
                 {"autoencoder.downsample_factors": "(2,2)", "autoencoder.latent_channels": 8},
                 "stem 2, levels (2, 2): 8x, 8 channels (64 voxels per value)"),
    "s2_4x_c8": ("base", "configs/balanced.py",
                 {"autoencoder.num_channels": "(32,64)", "autoencoder.downsample_factors": "(2,)",
                  "autoencoder.attention_levels": "(False,False)",
                  "autoencoder.latent_channels": 8},
                 "stem 2, one level /2: 4x, 8 channels (8 voxels per value)"),
    "s2_4x_c8_lr": ("s2_4x_c8", "configs/balanced.py",
                    {"autoencoder.num_channels": "(32,64)",
                     "autoencoder.downsample_factors": "(2,)",
                     "autoencoder.attention_levels": "(False,False)",
                     "autoencoder.latent_channels": 8, "train.learning_rate": 5e-4,
                     "train.b1": 0.9},
                    "s2_4x_c8 with Adam 5e-4, b1 0.9"),
    "s2_4x_c8_lr_nearest": ("s2_4x_c8_lr", "configs/balanced.py",
                            {"autoencoder.num_channels": "(32,64)",
                             "autoencoder.downsample_factors": "(2,)",
                             "autoencoder.attention_levels": "(False,False)",
                             "autoencoder.latent_channels": 8, "train.learning_rate": 5e-4,
                             "train.b1": 0.9, "autoencoder.upsample_head": "nearest_conv"},
                            "s2_4x_c8_lr with the nearest_conv head instead of subpixel"),
    "s2_4x_c8_weighted": ("s2_4x_c8", "configs/balanced.py",
                          {"autoencoder.num_channels": "(32,64)",
                           "autoencoder.downsample_factors": "(2,)",
                           "autoencoder.attention_levels": "(False,False)",
                           "autoencoder.latent_channels": 8, "loss.recon": "weighted"},
                          "s2_4x_c8 with L1 weighted 10x above 0.1 (loss.recon=weighted)"),
    "base_lr": ("base", "configs/balanced.py", {"train.learning_rate": 5e-4, "train.b1": 0.9},
                "16x/3 channels with s2_4x_c8_lr's optimiser: Adam 5e-4, b1 0.9"),
    "base_lr_weighted": ("base", "configs/balanced.py",
                         {"train.learning_rate": 5e-4, "train.b1": 0.9,
                          "loss.recon": "weighted"},
                         "16x/3 channels with Adam 5e-4, b1 0.9 and weighted L1"),
}
KEYS = ("val_dice", "val_psnr", "val_psnr_blank", "val_psnr_fg", "val_ssim",
        "val_recon_fg_fraction", "val_fg_fraction")


def command(name: str, workdir: Path, steps: int, volume: str, eval_every: int) -> list:
    """The train.py command line of variant `name`."""
    _, config, overrides, _ = VARIANTS[name]
    args = [sys.executable, str(REPO_ROOT / "train.py"), f"--config={config}",
            f"--workdir={workdir}", f"--config.data.volume_size=({volume})",
            f"--config.train.num_steps={steps}", f"--config.train.eval_every_steps={eval_every}",
            f"--config.train.save_every_steps={eval_every}", "--config.train.log_every_steps=50",
            "--noprogress"]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def last_eval(workdir: Path) -> dict:
    """The last metrics.jsonl row with validation metrics ({} when none)."""
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    evals = [r for r in rows if "val_dice" in r]
    return evals[-1] if evals else {}


def run(name: str, out: Path, steps: int, volume: str, eval_every: int) -> dict:
    """Trains variant `name` (or resumes it) and writes `<out>/<name>.json`."""
    result_path = out / f"{name}.json"
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("steps") == steps and done.get("volume") == volume:
            return done
    workdir = out / name
    cmd = command(name, workdir, steps, volume, eval_every)
    t0 = time.time()
    with open(out / f"{name}.log", "a") as log:
        code = subprocess.call(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if code != 0:
        raise SystemExit(f"{name}: train.py exited with {code}; see {out / (name + '.log')}")
    row = last_eval(workdir)
    result = dict(name=name, parent=VARIANTS[name][0], lever=VARIANTS[name][3], steps=steps,
                  volume=volume, wall_s=round(time.time() - t0, 1), command=cmd[1:],
                  **{k: row.get(k) for k in KEYS + ("step",)})
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(results: list) -> str:
    """Markdown rows: variant, lever, Dice, PSNR (blank), PSNR above blank, fg PSNR, time."""
    lines = ["| variant | lever | Dice | PSNR (blank) dB | above blank dB | fg PSNR dB | "
             "recon fg % (input %) | wall min |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("val_dice") is None:
            continue
        lines.append(
            f"| `{r['name']}` | {r['lever']} | {r['val_dice']:.3f} | {r['val_psnr']:.2f} "
            f"({r['val_psnr_blank']:.2f}) | {r['val_psnr'] - r['val_psnr_blank']:+.2f} | "
            f"{r['val_psnr_fg']:.2f} | {100 * r['val_recon_fg_fraction']:.1f} "
            f"({100 * r['val_fg_fraction']:.1f}) | {r['wall_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/levers", help="output folder")
    p.add_argument("--steps", type=int, default=600, help="training steps per variant")
    p.add_argument("--volume", default="64,64,32", help="X,Y,Z crop")
    p.add_argument("--eval_every", type=int, default=200, help="validation cadence (steps)")
    p.add_argument("--only", default="", help="comma list of variants (default: all)")
    p.add_argument("--report", action="store_true", help="only gather finished runs")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    results = []
    for name in names:
        path = out / f"{name}.json"
        if a.report:
            if path.exists():
                results.append(json.loads(path.read_text()))
            continue
        results.append(run(name, out, a.steps, a.volume, a.eval_every))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
