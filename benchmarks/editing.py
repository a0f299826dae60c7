r"""Does a trained ControlNet follow its masks? Paired Dice against the plain model.

    python -m benchmarks.editing --controlnet_workdir runs/quick_controlnet --out runs/editing
    python -m benchmarks.editing --controlnet_workdir runs/quick_controlnet --num 16 --steps 50

Masks: the foreground (above `--threshold`; default the run's
`controlnet.condition.threshold`, what it was trained on) of the autoencoder's validation
volumes (`ldm_jax.data.make_eval_batches`: held out from training), resampled to the
condition grid as training does. For mask i both models draw from fold_in(PRNGKey(seed),
i): the ControlNet run with mask i, and its frozen UNet (the plain model: the same
checkpoint, no ControlNet) without. Score: Dice between mask i and the decoded sample
thresholded at the same threshold, both on the volume grid. Prints one line per mask and
writes `editing_controlnet.json`: per mask both scores, their means, the mean paired
difference and how many pairs the ControlNet wins (issue 29's bar: Dice >= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def dice(mask: np.ndarray, sample: np.ndarray, threshold: float) -> float:
    """Hard Dice of mask > 0.5 vs sample > threshold ((X, Y, Z[, C]); both empty: 1)."""
    a = np.asarray(mask).reshape(mask.shape[:3] + (-1,)).max(-1) > 0.5
    b = np.asarray(sample).reshape(sample.shape[:3] + (-1,)).max(-1) > threshold
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def held_out_masks(pipe, num: int, threshold: float) -> np.ndarray:
    """(num, X, Y, Z, 1) float32 foreground masks of the autoencoder's validation volumes."""
    from ldm_jax import data as data_lib
    from ldm_jax.diffusion.condition import foreground_mask

    batches = data_lib.make_eval_batches(pipe.autoencoder.config, batch_size=1)
    masks = []
    for b in batches:
        masks.append(foreground_mask(np.asarray(b["image"], np.float32), threshold)[0])
        if len(masks) == num:
            break
    if len(masks) < num:
        raise SystemExit(f"only {len(masks)} validation volumes; lower --num")
    return np.stack(masks)


def controlnet_dice(controlnet_workdir, *, num=8, steps=50, seed=0, threshold=None,
                    step="best", log=print) -> dict:
    """The paired comparison (module docstring) as a dict (`rows`, means, wins)."""
    import jax

    import ldm_jax
    from ldm_jax.diffusion.condition import resample

    cn = ldm_jax.load_pipeline(controlnet_workdir, step)
    if cn.controlnet is None:
        raise SystemExit(f"{controlnet_workdir} is not a ControlNet run")
    plain = ldm_jax.load_pipeline(cn.unet_checkpoint["workdir"], cn.unet_checkpoint["step"])
    thr = float(cn.config.controlnet.condition.threshold if threshold is None else threshold)
    masks = held_out_masks(cn, num, thr)
    grid = cn.condition_grid()
    rng = jax.random.PRNGKey(int(seed))
    rows = []
    for i, m in enumerate(masks):
        a = cn.decode(cn.sample_batch(rng, i, 1, steps=steps, condition=resample(m, grid)))[0]
        b = plain.decode(plain.sample_batch(rng, i, 1, steps=steps))[0]
        rows.append({"mask": i, "foreground": float(m.mean()),
                     "dice_controlnet": dice(m, a, thr), "dice_plain": dice(m, b, thr)})
        log(f"mask {i}: foreground {rows[-1]['foreground']:.3f}, Dice ControlNet "
            f"{rows[-1]['dice_controlnet']:.3f}, plain {rows[-1]['dice_plain']:.3f}")
    d_cn = np.array([r["dice_controlnet"] for r in rows])
    d_plain = np.array([r["dice_plain"] for r in rows])
    out = {"controlnet_workdir": os.path.abspath(controlnet_workdir), "step": cn.step,
           "unet_checkpoint": cn.unet_checkpoint, "num_masks": int(num), "steps": int(steps),
           "seed": int(seed), "threshold": thr, "rows": rows,
           "mean_dice_controlnet": float(d_cn.mean()), "mean_dice_plain": float(d_plain.mean()),
           "mean_paired_difference": float((d_cn - d_plain).mean()),
           "controlnet_wins": int((d_cn > d_plain).sum())}
    log(f"mean Dice: ControlNet {out['mean_dice_controlnet']:.3f}, plain "
        f"{out['mean_dice_plain']:.3f} (paired difference {out['mean_paired_difference']:+.3f},"
        f" ControlNet better on {out['controlnet_wins']} of {num})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controlnet_workdir", required=True)
    p.add_argument("--step", default="best")
    p.add_argument("--num", type=int, default=8, help="held-out masks")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--out", default="runs/editing")
    a = p.parse_args(argv)
    out = controlnet_dice(a.controlnet_workdir, num=a.num, steps=a.steps, seed=a.seed,
                          threshold=a.threshold, step=a.step)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "editing_controlnet.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
