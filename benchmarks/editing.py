r"""Issue 29's measurements of editing with a trained LDM (benchmarks/EDITING.md).

    python -m benchmarks.editing controlnet --controlnet_workdir runs/editing/controlnet
    python -m benchmarks.editing inpaint --workdir runs/ldm --out runs/editing
    python -m benchmarks.editing sdedit --workdir runs/ldm --out runs/editing
    python -m benchmarks.editing anomaly --workdir runs/ldm --out runs/editing
    python -m benchmarks.editing residual --workdir runs/ldm --out runs/editing
    python -m benchmarks.editing patched --workdir runs/inpaint_unet --out runs/editing
    python -m benchmarks.editing tables --out runs/editing     # Markdown of the JSONs
    bash benchmarks/editing.sh AE_WORKDIR LDM_WORKDIR [OUT]    # all of it, ControlNet trained

(Without a sub-command the arguments are `controlnet`'s.) Every part draws held-out
volumes of the autoencoder's built-in data (`held_out_volumes`: its validation volumes,
`data.num_val_volumes` raised to `--num`; they never occur in training), runs the
functions `ldm-jax edit` runs (`ldm_jax.diffusion.editing`), writes OUT/editing_PART.json
and OUT/editing_PART.png and prints its Markdown table.

- controlnet: does a trained ControlNet follow its masks? Masks: the foreground (above
  `--threshold`; default the run's `controlnet.condition.threshold`, what it was trained
  on) of the held-out volumes, resampled to the condition grid as training does. For mask
  i both models draw from fold_in(PRNGKey(seed), i): the ControlNet run with mask i, and
  its frozen UNet (the plain model: the same checkpoint, no ControlNet) without. Score:
  Dice between mask i and the decoded sample thresholded at the same threshold, both on
  the volume grid (issue 29's bar: Dice >= 0.6, above the plain model's).
- inpaint: a box hole (default the centre half of every axis) blanked (b_min) in each
  volume: the methods never see the truth inside it. Filled by replace-known-region and
  by RePaint (documented blend: `--blend_width 0` pastes the decoded voxels; 2 feathers
  the seam with the blanked input, computed from the same latents), and by two
  baselines: an unconditional sample pasted into the hole (`Pipeline.sample_batch`, the
  same seed) and the blurred border extension (`border_extension`). Scores: PSNR, L1 and
  foreground Dice of the hole against the truth, PSNR of the hole's 3-voxel border band,
  max |delta| outside the hole (the known region: 0 by construction); the autoencoder's
  reconstruction pasted into the hole is the reference (it sees the truth). An inpainting
  UNet as --workdir (`conditioning.aligned="inpainting"`, configs/diffusion/
  inpainting_4x.py) fills with its condition (the blanked input and the hole) in the
  replace-known and RePaint rows, and its null condition (zeros) draws the unconditional
  fill; `--draws K` adds the mean of K of its replace-known fills.
- sdedit: the volumes at each `--strengths`; distance (PSNR, L1) to the input's
  reconstruction (strength 0), to the input, and to the strength-1 output (the model's
  unconditional sample from the same seed), and the foreground fraction against the
  data's; monotone means PSNR to the reconstruction never rises and PSNR to the sample
  never falls with the strength.
- anomaly: `--spheres` solid balls of radius 3-5 voxels (`--radii`) at the volume's
  largest intensity (the filaments') inserted at random into each volume
  (`insert_spheres`); per-voxel AUROC (`auroc`) of the likelihood map (MONAI's bound,
  `editing.likelihood`, all T timesteps unless `--likelihood_steps`) for the sphere
  voxels, and of the same map without its t = 0 term (`decoder_term=False`), against the
  autoencoder's own reconstruction error |AE(x) - x| (the trivial baseline); per volume
  and pooled over all voxels. With `--clean_scores` also total_kl of the volumes without
  spheres.
- residual: the same volumes with the same spheres; per-voxel AUROC of the
  reconstruction-based map (`editing.anomaly`, `ldm-jax edit --mode anomaly`: |mean of
  `--repeats` SDEdits - input|) at each `--strengths`, and of one SDEdit alone, against
  the autoencoder's reconstruction error.
- patched: the same volumes with the same spheres, an inpainting model as --workdir
  (configs/diffusion/inpainting_4x.py): per-voxel AUROC of the inpainting-based map
  (`editing.patched_anomaly`: every `--patches` box every `--stride` voxels inpainted
  from the rest, |fill - input|) against the reconstruction error and the intensity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

PARTS = ("controlnet", "inpaint", "sdedit", "anomaly", "residual", "patched")


# ----------------------------------------------------------------------------------------
# Pure functions (tests/benchmarks/test_editing.py).

def dice(mask: np.ndarray, sample: np.ndarray, threshold: float) -> float:
    """Hard Dice of mask > 0.5 vs sample > threshold ((X, Y, Z[, C]); both empty: 1)."""
    a = np.asarray(mask).reshape(mask.shape[:3] + (-1,)).max(-1) > 0.5
    b = np.asarray(sample).reshape(sample.shape[:3] + (-1,)).max(-1) > threshold
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def foreground_dice(truth, volume, threshold: float, where=None) -> float:
    """Dice of the foregrounds (any channel above `threshold`) of two (X, Y, Z[, C])
    volumes over the voxels `where` ((X, Y, Z) bool; all when None); both empty: 1."""
    def fg(v):
        v = np.asarray(v)
        f = (v.max(-1) if v.ndim == 4 else v) > threshold
        return f if where is None else f[np.asarray(where, bool)]
    a, b = fg(truth), fg(volume)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for the positives `labels` (any shapes, same
    size): the probability that a random positive scores above a random negative, ties
    counting one half (Mann-Whitney U from average ranks). NaN without both classes."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sphere_centres(shape, radii, rng, attempts: int = 1000) -> list:
    """Random integer centres, one per radius, each ball inside the volume (a margin of its
    radius) and not touching the balls before it. Raises ValueError when they do not fit."""
    shape = tuple(int(s) for s in shape)
    out = []
    for r in radii:
        for _ in range(attempts):
            c = np.array([rng.integers(math.ceil(r), s - math.ceil(r)) for s in shape])
            if all(np.linalg.norm(c - c2) > r + r2 + 1 for c2, r2 in out):
                out.append((c, float(r)))
                break
        else:
            raise ValueError(f"{len(radii)} balls of radii {list(radii)} do not fit in {shape}")
    return [(tuple(int(v) for v in c), r) for c, r in out]


def insert_spheres(volume, balls, value: float):
    """(volume with solid balls set to `value`, (X, Y, Z) bool mask of their voxels).
    volume: (X, Y, Z[, C]); balls: [((cx, cy, cz), radius)] in voxels; a voxel belongs to
    a ball when its centre is within the radius of the ball's centre."""
    v = np.array(volume, np.float32, copy=True)
    grid = np.indices(v.shape[:3]).transpose(1, 2, 3, 0)
    mask = np.zeros(v.shape[:3], bool)
    for c, r in balls:
        mask |= np.linalg.norm(grid - np.asarray(c), axis=-1) <= float(r)
    v[mask] = float(value)
    return v, mask


def border_extension(volume, mask, sigma: float = 2.0):
    """The blurred border extension of the known voxels into `mask` (the baseline fill):
    inside the mask, the normalised Gaussian convolution of the known voxels,
    G*(x (1-m)) / G*(1-m) (per channel, `sigma` voxels); where no known voxel is within
    reach (weight < 1e-6), the nearest known voxel's value. Outside the mask the volume
    is returned unchanged. volume (X, Y, Z[, C]), mask (X, Y, Z) bool."""
    from scipy import ndimage

    v = np.asarray(volume, np.float64)
    m = np.asarray(mask, bool)
    vv = v if v.ndim == 4 else v[..., None]
    known = (~m).astype(np.float64)
    w = ndimage.gaussian_filter(known, sigma, mode="constant")
    idx = ndimage.distance_transform_edt(m, return_distances=False, return_indices=True)
    out = vv.copy()
    for c in range(vv.shape[-1]):
        num = ndimage.gaussian_filter(vv[..., c] * known, sigma, mode="constant")
        nearest = vv[..., c][tuple(idx)]
        fill = np.where(w > 1e-6, num / np.maximum(w, 1e-12), nearest)
        out[..., c] = np.where(m, fill, vv[..., c])
    out = out if v.ndim == 4 else out[..., 0]
    return out.astype(np.float32)


def psnr(a, b, data_range: float, where=None) -> float:
    """PSNR (dB) of `b` against `a` over the voxels `where` ((X, Y, Z) bool; all when
    None), inf when equal there."""
    d = np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if where is not None:
        d = d[np.asarray(where, bool)]
    mse = float(d.mean())
    return math.inf if mse == 0 else 10.0 * math.log10(float(data_range) ** 2 / mse)


def border_band(mask, width: int = 3):
    """The voxels of `mask` (bool) within `width` voxels (Euclidean) of its border."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    return m & (ndimage.distance_transform_edt(m) <= float(width))


def monotone(values, decreasing: bool) -> bool:
    """Whether `values` (None = +inf) never rise (decreasing) or never fall."""
    v = [math.inf if x is None else float(x) for x in values]
    pairs = list(zip(v, v[1:]))
    return all(b <= a for a, b in pairs) if decreasing else all(b >= a for a, b in pairs)


def finite(x):
    """x for JSON: None for inf / NaN."""
    return float(x) if x is not None and math.isfinite(x) else None


def centre_box(shape, factor) -> str:
    """'x0:x1,y0:y1,z0:z1': the centre half of every axis, its ends on multiples of the
    autoencoder's `factor` (so the hole is whole latent voxels)."""
    out = []
    for s, f in zip(shape, factor):
        s, f = int(s), max(1, int(f))
        a = int(round(s / 4 / f)) * f
        b = int(round(3 * s / 4 / f)) * f
        out.append(f"{a}:{max(b, a + f)}")
    return ",".join(out)


# ----------------------------------------------------------------------------------------
# Data and models.

def held_out_volumes(ae_config, num: int) -> np.ndarray:
    """(num, X, Y, Z, C) float32: the autoencoder's validation volumes (preprocessed as in
    training; `data.num_val_volumes` raised to `num`: they never occur in training)."""
    import copy

    from ldm_jax import data as data_lib

    cfg = copy.deepcopy(ae_config)
    cfg.data.num_val_volumes = max(int(num), int(cfg.data.get("num_val_volumes", 0) or 0))
    batches = data_lib.make_eval_batches(cfg, batch_size=1)
    vols = []
    for b in batches:
        vols.append(np.asarray(b["image"], np.float32)[0])
        if len(vols) == num:
            break
    if len(vols) < num:
        raise SystemExit(f"only {len(vols)} held-out volumes; lower --num")
    return np.stack(vols)


def held_out_masks(pipe, num: int, threshold: float) -> np.ndarray:
    """(num, X, Y, Z, 1) float32 foreground masks of the held-out volumes."""
    from ldm_jax.diffusion.condition import foreground_mask

    return foreground_mask(held_out_volumes(pipe.autoencoder.config, num), threshold)


def _data_range(pipe):
    d = pipe.autoencoder.config.data
    return float(d.b_min), float(d.b_max)


def _threshold(pipe, threshold):
    """Foreground threshold in model units: given, or 0.1 of the data range (training's)."""
    if threshold is not None:
        return float(threshold)
    lo, hi = _data_range(pipe)
    return lo + 0.1 * (hi - lo)


def _batches(n, size):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _picture(volumes, names, path, title, value_range=(0.0, 1.0)):
    from ldm_jax.visualize import samples_image

    samples_image(volumes, names, value_range, title=title).save(path)


def _save(out_dir, part, record):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"editing_{part}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def _settings(pipe, workdir, a):
    return {"workdir": os.path.abspath(workdir), "step": pipe.step,
            "autoencoder_workdir": pipe.autoencoder.workdir,
            "autoencoder_step": pipe.autoencoder.step, "num": int(a.num),
            "steps": int(a.steps), "seed": int(a.seed)}


# ----------------------------------------------------------------------------------------
# Parts.

def controlnet_dice(controlnet_workdir, *, num=8, steps=50, seed=0, threshold=None,
                    step="best", log=print, keep=0) -> dict:
    """The paired comparison (module docstring) as a dict (`rows`, means, wins); with
    `keep` > 0 also `volumes`: [(mask, ControlNet sample, plain sample)] of the first
    `keep` masks (not JSON)."""
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
    rows, kept = [], []
    for i, m in enumerate(masks):
        a = cn.decode(cn.sample_batch(rng, i, 1, steps=steps, condition=resample(m, grid)))[0]
        b = plain.decode(plain.sample_batch(rng, i, 1, steps=steps))[0]
        rows.append({"mask": i, "foreground": float(m.mean()),
                     "dice_controlnet": dice(m, a, thr), "dice_plain": dice(m, b, thr)})
        if i < keep:
            kept.append((m, a, b))
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
    if keep:
        out["volumes"] = kept
    return out


def inpaint_part(pipe, workdir, a, log=print) -> dict:
    """Inpainting (module docstring): per volume and method, the scores of the hole."""
    import jax

    from ldm_jax.diffusion import editing
    from ldm_jax.diffusion.inpainting import blend, box_mask

    lo, hi = _data_range(pipe)
    thr = _threshold(pipe, a.threshold)
    vols = held_out_volumes(pipe.autoencoder.config, a.num)
    factor = [s // t for s, t in zip(vols.shape[1:4], pipe.latent_shape[:3])]
    box = a.box or centre_box(vols.shape[1:4], factor)
    hole = box_mask(vols.shape[1:4], box)
    band = border_band(hole, 3)
    rng = jax.random.PRNGKey(int(a.seed))
    # An inpainting UNet as --workdir (conditioning.aligned="inpainting"): its fills are
    # the replace-known and RePaint rows; its null condition (zeros) the unconditional.
    pre = "inpainting UNet, " if pipe.aligned == "inpainting" else ""
    null = (np.zeros((*vols.shape[1:4], vols.shape[-1] + 1), np.float32) if pre else None)
    fills = {k: [] for k in (pre + "replace-known", pre + "replace-known, blend 2",
                             pre + "RePaint", pre + "RePaint, blend 2", "unconditional fill",
                             "border extension", "reconstruction (sees the truth)")}
    # The methods see the volume with the hole blanked (b_min): the truth inside it is
    # never an input (not to the encoder, not to the blend's seam).
    holed = vols.copy()
    holed[:, hole] = lo
    draw_pipe, draw_name = (pipe, "inpainting UNet") if pre else (None, None)
    if getattr(a, "inpainting_controlnet", None):
        import ldm_jax
        draw_pipe = ldm_jax.load_pipeline(a.inpainting_controlnet, a.inpainting_controlnet_step)
        if editing.controlnet_kind(draw_pipe) != "inpainting":
            raise SystemExit(f"--inpainting_controlnet {a.inpainting_controlnet} is not an "
                             "inpainting ControlNet run (controlnet.condition.kind)")
        draw_name = "inpainting ControlNet"
        fills = {draw_name: [], **fills}
    if draw_pipe is not None and int(a.draws) > 1:
        fills = {f"{draw_name}, mean of {int(a.draws)}": [], **fills}
    for k, b in enumerate(_batches(len(vols), a.batch_size)):
        v = holed[b]
        for name, jn in ((pre + "replace-known", 1), (pre + "RePaint", a.jump_n_sample)):
            out, lat = editing.inpaint(pipe, v, hole, rng, k, steps=a.steps,
                                       jump_length=a.jump_length, jump_n_sample=jn,
                                       blend_width=0.0, guidance_scale=a.guidance_scale)
            dec = pipe.decode(lat)
            fills[name] += list(out)
            fills[name + ", blend 2"] += [blend(d, x, hole, 2.0) for d, x in zip(dec, v)]
        if draw_pipe is not None:  # its condition: the blanked input and the hole
            def fill(n):  # n > 1: the mean of n fills (`edit --num_repeats`)
                return editing.inpaint(draw_pipe, v, hole, rng, k, steps=a.steps,
                                       jump_length=a.jump_length, jump_n_sample=1,
                                       blend_width=0.0, guidance_scale=a.guidance_scale,
                                       num_repeats=n)[0]
            if draw_pipe is not pipe:
                fills[draw_name] += list(fill(1))
            if int(a.draws) > 1:  # the posterior mean's estimate
                fills[f"{draw_name}, mean of {int(a.draws)}"] += list(fill(int(a.draws)))
        unc = pipe.decode(pipe.sample_batch(rng, k, len(b), steps=a.steps, condition=null))
        fills["unconditional fill"] += [blend(u, x, hole, 0.0) for u, x in zip(unc, v)]
        fills["border extension"] += [border_extension(x, hole, a.sigma) for x in v]
        rec = editing.sdedit(pipe, vols[b], rng, k, strength=0.0, steps=a.steps,
                             condition=null)[0]  # strength 0: the model is not called
        fills["reconstruction (sees the truth)"] += [blend(r, x, hole, 0.0)
                                                     for r, x in zip(rec, v)]
        log(f"inpaint: volumes {b[0]}..{b[-1]} done")
    rows, methods = [], {}
    for name, outs in fills.items():
        per = []
        for i, (o, x) in enumerate(zip(outs, vols)):  # outside the hole x is the input
            per.append({"volume": i, "psnr_hole": finite(psnr(x, o, hi - lo, hole)),
                        "l1_hole": float(np.abs(o - x)[hole].mean()),
                        "psnr_border_band": finite(psnr(x, o, hi - lo, band)),
                        "dice_hole": foreground_dice(x, o, thr, hole),
                        "max_abs_outside": float(np.abs(o - x)[~hole].max())})
        rows += [{"method": name, **r} for r in per]
        methods[name] = {k: float(np.mean([r[k] for r in per]))
                         for k in ("psnr_hole", "l1_hole", "psnr_border_band", "dice_hole")}
        methods[name]["max_abs_outside"] = float(max(r["max_abs_outside"] for r in per))
        methods[name]["psnr_hole_pooled"] = finite(psnr(np.stack(vols), np.stack(outs),
                                                        hi - lo, np.broadcast_to(
                                                            hole, vols.shape[:4])))
        log(f"inpaint {name:32s} PSNR hole {methods[name]['psnr_hole']:.2f} dB, band "
            f"{methods[name]['psnr_border_band']:.2f}, Dice {methods[name]['dice_hole']:.3f}, "
            f"max |delta| outside {methods[name]['max_abs_outside']:.3g}")
    for gen in [g for g in fills if g.startswith(("inpainting ", "replace-known", "RePaint"))
                and "blend" not in g]:
        for base in ("unconditional fill", "border extension"):
            methods[gen][f"wins_vs_{base}"] = int(sum(
                r1["psnr_hole"] > r2["psnr_hole"] for r1, r2 in zip(
                    [r for r in rows if r["method"] == gen],
                    [r for r in rows if r["method"] == base])))
    record = {**_settings(pipe, workdir, a), "box": box, "hole_voxels": int(hole.sum()),
              "hole_fraction": float(hole.mean()), "threshold": thr,
              "jump_length": int(a.jump_length), "jump_n_sample": int(a.jump_n_sample),
              "sigma": float(a.sigma), "guidance_scale": float(a.guidance_scale),
              "data_range": [lo, hi], "methods": methods, "rows": rows}
    if draw_pipe is not None and draw_pipe is not pipe:
        record["inpainting_controlnet"] = {"workdir": os.path.abspath(a.inpainting_controlnet),
                                           "step": int(draw_pipe.step)}
    if pre:
        record["inpainting_unet"] = {"workdir": os.path.abspath(workdir), "step": int(pipe.step),
                                     "unconditional": "the null condition (zeros)"}
    shown = min(2, len(vols))
    pics, names = [], []
    for i in range(shown):
        shown_fills = [m for m in ("inpainting ControlNet", pre + "replace-known",
                                   f"{draw_name}, mean of {int(a.draws)}", pre + "RePaint",
                                   "unconditional fill", "border extension") if m in fills]
        pics += [vols[i], holed[i]] + [fills[m][i] for m in shown_fills]
        names += [f"v{i} truth", f"v{i} input (hole {box})"] + [f"v{i} {m}"
                                                                for m in shown_fills]
    _picture(pics, names, os.path.join(a.out, "editing_inpaint.png"),
             "inpainting the box hole: truth, input, fills (blend width 0)", (lo, hi))
    return record


def sdedit_part(pipe, workdir, a, log=print) -> dict:
    """SDEdit strength sweep (module docstring)."""
    import jax

    from ldm_jax.diffusion import editing

    lo, hi = _data_range(pipe)
    thr = _threshold(pipe, a.threshold)
    vols = held_out_volumes(pipe.autoencoder.config, a.num)
    strengths = sorted({0.0, 1.0} | {float(s) for s in a.strengths.split(",")})
    rng = jax.random.PRNGKey(int(a.seed))
    outs = {}
    for s in strengths:
        parts = [editing.sdedit(pipe, vols[b], rng, k, strength=s, steps=a.steps)[0]
                 for k, b in enumerate(_batches(len(vols), a.batch_size))]
        outs[s] = np.concatenate(parts)
        log(f"sdedit: strength {s} done")
    rec, smp = outs[0.0], outs[1.0]
    real_fg = float(np.mean([(x.max(-1) > thr).mean() for x in vols]))
    sweep = []
    for s in strengths:
        o = outs[s]
        row = {"strength": s,
               "psnr_to_reconstruction": finite(float(np.mean(
                   [psnr(r, x, hi - lo) for r, x in zip(rec, o)]))),
               "l1_to_reconstruction": float(np.abs(o - rec).mean()),
               "psnr_to_input": finite(float(np.mean([psnr(v, x, hi - lo)
                                                       for v, x in zip(vols, o)]))),
               "psnr_to_sample": finite(float(np.mean([psnr(m, x, hi - lo)
                                                        for m, x in zip(smp, o)]))),
               "l1_to_sample": float(np.abs(o - smp).mean()),
               "foreground_fraction": float(np.mean([(x.max(-1) > thr).mean() for x in o]))}
        sweep.append(row)
        log(f"sdedit strength {s:.2f}: PSNR to reconstruction "
            f"{_f(row['psnr_to_reconstruction'])}, to input {_f(row['psnr_to_input'])}, "
            f"to sample {_f(row['psnr_to_sample'])}, "
            f"foreground {row['foreground_fraction']:.3f} (real {real_fg:.3f})")
    record = {**_settings(pipe, workdir, a), "threshold": thr, "data_range": [lo, hi],
              "strengths": strengths, "real_foreground_fraction": real_fg, "sweep": sweep,
              "monotone_psnr_to_reconstruction": monotone(
                  [r["psnr_to_reconstruction"] for r in sweep], decreasing=True),
              "monotone_l1_to_reconstruction": monotone(
                  [r["l1_to_reconstruction"] for r in sweep], decreasing=False),
              "monotone_psnr_to_sample": monotone([r["psnr_to_sample"] for r in sweep],
                                                  decreasing=False)}
    shown = min(2, len(vols))
    pics = [x for i in range(shown) for x in [vols[i]] + [outs[s][i] for s in strengths]]
    names = [n for i in range(shown) for n in [f"v{i} input"] +
             [f"v{i} strength {s:g}" for s in strengths]]
    _picture(pics, names, os.path.join(a.out, "editing_sdedit.png"),
             "SDEdit: input, then strength 0 (the reconstruction) to 1 (a sample)", (lo, hi))
    return record


def sphere_value(volume, how: str, threshold: float = 0.1) -> float:
    """The balls' intensity: "max" (the volume's largest) or "pNN" (the NN-th percentile of
    its voxels above `threshold`, the foreground; p50: a typical filament voxel, so that
    brightness alone does not give the balls away)."""
    if how == "max":
        return float(np.max(volume))
    if how.startswith("p") and how[1:].replace(".", "", 1).isdigit():
        fg = np.asarray(volume)[np.asarray(volume) > threshold]
        return float(np.percentile(fg, float(how[1:]))) if fg.size else float(np.max(volume))
    raise ValueError(f"--sphere_intensity {how!r}: 'max' or 'pNN' (a foreground percentile)")


def volumes_with_spheres(pipe, a):
    """The held-out volumes, the same with `a.spheres` balls each (seeded by `a.seed`), the
    ball masks and the balls: (vols, with_spheres, truth (N, X, Y, Z) bool, balls)."""
    vols = held_out_volumes(pipe.autoencoder.config, a.num)
    rs = np.random.default_rng(int(a.seed))
    r_lo, r_hi = (float(x) for x in a.radii.split(","))
    sph, truth, balls = [], [], []
    for v in vols:
        bs = sphere_centres(v.shape[:3], rs.uniform(r_lo, r_hi, a.spheres), rs)
        w, m = insert_spheres(v, bs, sphere_value(v, a.sphere_intensity))
        sph.append(w)
        truth.append(m)
        balls.append([{"centre": list(c), "radius": r} for c, r in bs])
    return vols, np.stack(sph), np.stack(truth), balls


def residual_part(pipe, workdir, a, log=print) -> dict:
    """Reconstruction-based anomaly maps of the anomaly part's volumes (module docstring)."""
    import jax

    from ldm_jax.diffusion import editing

    lo, hi = _data_range(pipe)
    vols, sph, truth, _ = volumes_with_spheres(pipe, a)
    rng = jax.random.PRNGKey(int(a.seed))
    strengths = [float(x) for x in a.strengths.split(",")]
    maps = {("intensity", 0): list(sph[..., 0]), ("AE", 0): []}
    maps.update({(s, n): [] for s in strengths for n in (1, a.repeats)})
    for k, b in enumerate(_batches(len(vols), a.batch_size)):
        rec = editing.sdedit(pipe, sph[b], rng, k, strength=0.0, steps=1)[0]
        maps[("AE", 0)] += list(np.abs(rec - sph[b]).sum(-1))
        for s in strengths:
            m1 = editing.anomaly(pipe, sph[b], rng, k, strength=s, num_repeats=1,
                                 steps=a.steps)[0]
            mn = editing.anomaly(pipe, sph[b], rng, k, strength=s, num_repeats=a.repeats,
                                 steps=a.steps)[0]
            maps[(s, 1)] += list(m1[..., 0])
            maps[(s, a.repeats)] += list(mn[..., 0])
        log(f"residual: volumes {b[0]}..{b[-1]} done")
    rows = []
    for (s, n), ms in maps.items():
        ms = np.stack(ms)
        per = [auroc(m, t) for m, t in zip(ms, truth)]
        rows.append({"strength": s if isinstance(s, float) else None, "repeats": n,
                     "method": {"AE": "autoencoder reconstruction error, abs(AE(x) - x)",
                                "intensity": "the input's intensity itself"}.get(
                                    s, f"diffusion residual, strength {s}, mean of {n}"),
                     "auroc_per_volume": per, "mean_auroc": float(np.mean(per)),
                     "pooled_auroc": auroc(ms, truth), "maps": ms})
        log(f"residual: {rows[-1]['method']}: AUROC {rows[-1]['mean_auroc']:.3f} (pooled "
            f"{rows[-1]['pooled_auroc']:.3f})")
    shown = min(2, len(vols))
    best = max(rows[2:], key=lambda r: r["mean_auroc"])
    pics, names = [], []
    for i in range(shown):
        pics += [(sph[i] - lo) / (hi - lo), truth[i].astype(np.float32)]
        pics += [np.clip(m / (float(np.percentile(m, 99.5)) or 1.0), 0, 1)
                 for m in (rows[1]["maps"][i], best["maps"][i])]
        names += [f"v{i} with spheres", f"v{i} sphere voxels", f"v{i} |AE(x) - x|",
                  f"v{i} residual s {best['strength']:g} x{best['repeats']}"]
    _picture(pics, names, os.path.join(a.out, "editing_residual.png"),
             "residual anomaly map: volume, truth, AE error, diffusion residual (/ 99.5th pct)")
    for r in rows:
        r.pop("maps")
    return {**_settings(pipe, workdir, a), "spheres_per_volume": int(a.spheres),
            "sphere_intensity": a.sphere_intensity,
            "radii": [float(x) for x in a.radii.split(",")],
            "sphere_fraction": float(truth.mean()), "repeats": int(a.repeats),
            "strengths": strengths, "rows": rows}


def anomaly_part(pipe, workdir, a, log=print) -> dict:
    """Anomaly maps of volumes with inserted spheres (module docstring)."""
    import jax

    from ldm_jax.diffusion import editing

    lo, hi = _data_range(pipe)
    vols, sph, truth, balls = volumes_with_spheres(pipe, a)
    r_lo, r_hi = (float(x) for x in a.radii.split(","))
    rng = jax.random.PRNGKey(int(a.seed))
    steps = a.likelihood_steps
    kl, kl1, total, total_clean, err = [], [], [], [], []
    for k, b in enumerate(_batches(len(vols), a.batch_size)):
        maps, _, tot = editing.likelihood(pipe, sph[b], rng, k, steps=steps)
        kl += list(maps[..., 0])
        total += list(tot)
        kl1 += list(editing.likelihood(pipe, sph[b], rng, k, steps=steps,
                                       decoder_term=False)[0][..., 0])
        if a.clean_scores:
            total_clean += list(editing.likelihood(pipe, vols[b], rng, k, steps=steps)[2])
        rec = editing.sdedit(pipe, sph[b], rng, k, strength=0.0, steps=1)[0]
        err += list(np.abs(rec - sph[b]).sum(-1))
        log(f"anomaly: volumes {b[0]}..{b[-1]} done")
    kl, kl1, err = np.stack(kl), np.stack(kl1), np.stack(err)
    rows = [{"volume": i, "sphere_voxels": int(t.sum()), "balls": balls[i],
             "auroc_likelihood": auroc(kl[i], t), "auroc_likelihood_t_ge_1": auroc(kl1[i], t),
             "auroc_reconstruction_error": auroc(err[i], t),
             "total_kl": float(total[i]),
             "total_kl_clean": float(total_clean[i]) if total_clean else None}
            for i, t in enumerate(truth)]
    mean = {k: float(np.mean([r[k] for r in rows]))
            for k in ("auroc_likelihood", "auroc_likelihood_t_ge_1",
                      "auroc_reconstruction_error")}
    record = {**_settings(pipe, workdir, a), "likelihood_steps": steps,
              "timesteps_evaluated": int(steps or pipe.config.scheduler.num_train_timesteps),
              "spheres_per_volume": int(a.spheres), "radii": [r_lo, r_hi],
              "sphere_intensity": a.sphere_intensity,
              "sphere_fraction": float(truth.mean()),
              "mean_auroc_likelihood": mean["auroc_likelihood"],
              "mean_auroc_likelihood_t_ge_1": mean["auroc_likelihood_t_ge_1"],
              "mean_auroc_reconstruction_error": mean["auroc_reconstruction_error"],
              "pooled_auroc_likelihood": auroc(kl, truth),
              "pooled_auroc_likelihood_t_ge_1": auroc(kl1, truth),
              "pooled_auroc_reconstruction_error": auroc(err, truth),
              "mean_total_kl": float(np.mean(total)),
              "mean_total_kl_clean": float(np.mean(total_clean)) if total_clean else None,
              "rows": rows}
    log(f"anomaly: per-voxel AUROC likelihood {record['mean_auroc_likelihood']:.3f} "
        f"(pooled {record['pooled_auroc_likelihood']:.3f}), without the t = 0 term "
        f"{record['mean_auroc_likelihood_t_ge_1']:.3f}, reconstruction error "
        f"{record['mean_auroc_reconstruction_error']:.3f} (pooled "
        f"{record['pooled_auroc_reconstruction_error']:.3f})")
    shown = min(2, len(vols))
    pics, names = [], []
    for i in range(shown):
        pics += [(sph[i] - lo) / (hi - lo), truth[i].astype(np.float32)]
        pics += [np.clip(m / (float(np.percentile(m, 99.5)) or 1.0), 0, 1)
                 for m in (kl[i], kl1[i], err[i])]
        names += [f"v{i} with spheres", f"v{i} sphere voxels", f"v{i} likelihood map",
                  f"v{i} likelihood, t >= 1", f"v{i} |AE(x) - x|"]
    _picture(pics, names, os.path.join(a.out, "editing_anomaly.png"),
             "anomaly: volume, truth, maps (each / its 99.5th percentile)")
    return record


def patched_part(pipe, workdir, a, log=print) -> dict:
    """Inpainting-based anomaly maps (`editing.patched_anomaly`) of the residual part's
    volumes and balls (the same seed), with an inpainting model as --workdir, against the
    autoencoder's reconstruction error and the input's intensity."""
    import jax

    from ldm_jax.diffusion import editing

    vols, sph, truth, _ = volumes_with_spheres(pipe, a)
    rng = jax.random.PRNGKey(int(a.seed))
    null = (np.zeros((*vols.shape[1:4], vols.shape[-1] + 1), np.float32)
            if pipe.aligned is not None else None)
    patches = [int(x) for x in a.patches.split(",")]
    maps = {"the input's intensity itself": list(sph[..., 0]),
            "autoencoder reconstruction error, abs(AE(x) - x)": []}
    names = {p: f"patched inpainting, box {p}, stride {a.stride}, mean of {a.repeats}"
             for p in patches}
    maps.update({names[p]: [] for p in patches})
    # z: the distance in units of the fills' spread (+ eps): misses where the model is
    # unsure (a filament may run there) count less than where it is sure (background).
    eps = [float(x) for x in a.z_eps.split(",")] if a.repeats > 1 else []
    znames = {(p, e): names[p] + f", z-scored (spread + {e:g})" for p in patches for e in eps}
    maps.update({n: [] for n in znames.values()})
    for k, b in enumerate(_batches(len(vols), a.batch_size)):
        rec = editing.sdedit(pipe, sph[b], rng, k, strength=0.0, steps=1, condition=null)[0]
        maps["autoencoder reconstruction error, abs(AE(x) - x)"] += list(
            np.abs(rec - sph[b]).sum(-1))
        for p in patches:
            m, healthy, _, spread = editing.patched_anomaly(
                pipe, sph[b], rng, k, patch=p, stride=a.stride, num_repeats=a.repeats,
                steps=a.steps, return_spread=True)
            maps[names[p]] += list(m[..., 0])
            for e in eps:
                maps[znames[(p, e)]] += list((np.abs(healthy - sph[b]) / (spread + e)).sum(-1))
        log(f"patched: volumes {b[0]}..{b[-1]} done")
    rows = []
    for method, ms in maps.items():
        ms = np.stack(ms)
        per = [auroc(m, t) for m, t in zip(ms, truth)]
        rows.append({"method": method, "auroc_per_volume": per, "mean_auroc": float(np.mean(per)),
                     "pooled_auroc": auroc(ms, truth), "maps": ms})
        log(f"patched: {method}: AUROC {rows[-1]['mean_auroc']:.3f} (pooled "
            f"{rows[-1]['pooled_auroc']:.3f})")
    lo, hi = _data_range(pipe)
    best = max(rows[2:], key=lambda r: r["mean_auroc"])
    pics, labels = [], []
    for i in range(min(2, len(vols))):
        pics += [(sph[i] - lo) / (hi - lo), truth[i].astype(np.float32)]
        pics += [np.clip(m / (float(np.percentile(m, 99.5)) or 1.0), 0, 1)
                 for m in (rows[1]["maps"][i], best["maps"][i])]
        labels += [f"v{i} with spheres", f"v{i} sphere voxels", f"v{i} |AE(x) - x|",
                   f"v{i} {best['method'].split(',', 1)[1].strip()[:28]}"]
    _picture(pics, labels, os.path.join(a.out, "editing_patched.png"),
             "patched inpainting anomaly map: volume, truth, AE error, map (/ 99.5th pct)")
    for r in rows:
        r.pop("maps")
    return {**_settings(pipe, workdir, a), "spheres_per_volume": int(a.spheres),
            "sphere_intensity": a.sphere_intensity,
            "radii": [float(x) for x in a.radii.split(",")],
            "sphere_fraction": float(truth.mean()), "repeats": int(a.repeats),
            "patches": patches, "stride": int(a.stride), "rows": rows}



# ----------------------------------------------------------------------------------------
# Tables.

def _f(x, digits=2):
    return "∞" if x is None else f"{x:.{digits}f}"


def tables(out_dir, parts=PARTS) -> str:
    """Markdown tables of the editing_PART.json in `out_dir` (those of `parts` that exist)."""
    def load(part):
        p = os.path.join(out_dir, f"editing_{part}.json")
        if part not in parts or not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    md = []
    c = load("controlnet")
    if c:
        md += [f"### ControlNet vs plain: Dice of the held-out mask and the thresholded sample "
               f"({c['num_masks']} masks, DDIM {c['steps']} steps, threshold {c['threshold']:g})",
               "", "| mask | foreground | Dice ControlNet | Dice plain |", "|---|---|---|---|"]
        md += [f"| {r['mask']} | {r['foreground']:.3f} | {r['dice_controlnet']:.3f} | "
               f"{r['dice_plain']:.3f} |" for r in c["rows"]]
        md += [f"| **mean** | | **{c['mean_dice_controlnet']:.3f}** | "
               f"**{c['mean_dice_plain']:.3f}** |", "",
               f"Paired difference {c['mean_paired_difference']:+.3f}; the ControlNet is "
               f"better on {c['controlnet_wins']} of {c['num_masks']} masks.", ""]
    p = load("inpaint")
    if p:
        md += [f"### Inpainting a box hole {p['box']} ({p['hole_fraction']:.1%} of the volume; "
               f"{p['num']} held-out volumes, DDIM {p['steps']} steps, RePaint jump length "
               f"{p['jump_length']} x {p['jump_n_sample']})", "",
               "| fill | PSNR hole (dB) | PSNR border band (dB) | L1 hole | Dice hole | "
               "max abs delta outside | PSNR wins vs unconditional / border ext. |",
               "|---|---|---|---|---|---|---|"]
        for name, m in p["methods"].items():
            wins = (f"{m['wins_vs_unconditional fill']} / {m['wins_vs_border extension']} "
                    f"of {p['num']}" if "wins_vs_border extension" in m else "")
            md.append(f"| {name} | {_f(m['psnr_hole'])} | {_f(m['psnr_border_band'])} | "
                      f"{m['l1_hole']:.4f} | {m['dice_hole']:.3f} | {m['max_abs_outside']:.3g} "
                      f"| {wins} |")
        md.append("")
    s = load("sdedit")
    if s:
        md += [f"### SDEdit strength sweep ({s['num']} held-out volumes, DDIM {s['steps']} "
               f"steps; real foreground fraction {s['real_foreground_fraction']:.3f})", "",
               "| strength | PSNR to reconstruction (dB) | L1 to reconstruction | "
               "PSNR to input (dB) | PSNR to strength-1 sample (dB) | foreground fraction |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['strength']:g} | {_f(r['psnr_to_reconstruction'])} | "
               f"{r['l1_to_reconstruction']:.4f} | {_f(r['psnr_to_input'])} | "
               f"{_f(r['psnr_to_sample'])} | {r['foreground_fraction']:.3f} |"
               for r in s["sweep"]]
        md += ["", f"Monotone: PSNR to the reconstruction falls "
               f"{'yes' if s['monotone_psnr_to_reconstruction'] else 'NO'}, L1 to it rises "
               f"{'yes' if s['monotone_l1_to_reconstruction'] else 'NO'}, PSNR to the sample "
               f"rises {'yes' if s['monotone_psnr_to_sample'] else 'NO'}.", ""]
    n = load("anomaly")
    if n:
        md += [f"### Anomaly: per-voxel AUROC for inserted spheres ({n['num']} held-out volumes,"
               f" {n['spheres_per_volume']} spheres of radius {n['radii'][0]:g}-"
               f"{n['radii'][1]:g} at intensity {n.get('sphere_intensity', 'max')}, "
               f"{n['sphere_fraction']:.1%} of the voxels; likelihood over "
               f"{n['timesteps_evaluated']} timesteps)", "",
               "| volume | sphere voxels | AUROC likelihood map (MONAI's) | AUROC likelihood, "
               "t >= 1 | AUROC reconstruction error | total_kl | total_kl without spheres |",
               "|---|---|---|---|---|---|---|"]
        md += [f"| {r['volume']} | {r['sphere_voxels']} | {r['auroc_likelihood']:.3f} | "
               f"{r['auroc_likelihood_t_ge_1']:.3f} | "
               f"{r['auroc_reconstruction_error']:.3f} | {r['total_kl']:.4g} | "
               f"{'' if r['total_kl_clean'] is None else format(r['total_kl_clean'], '.4g')} |"
               for r in n["rows"]]
        md += [f"| **mean** | | **{n['mean_auroc_likelihood']:.3f}** | "
               f"**{n['mean_auroc_likelihood_t_ge_1']:.3f}** | "
               f"**{n['mean_auroc_reconstruction_error']:.3f}** | | |",
               f"| pooled | | {n['pooled_auroc_likelihood']:.3f} | "
               f"{n['pooled_auroc_likelihood_t_ge_1']:.3f} | "
               f"{n['pooled_auroc_reconstruction_error']:.3f} | | |", ""]
    for part in ("residual", "patched"):
        r = load(part)
        if not r:
            continue
        what = "reconstruction-based" if part == "residual" else "inpainting-based"
        md += [f"### Anomaly: {what} maps of the same volumes ({r['num']} held-out"
               f" volumes, {r['spheres_per_volume']} spheres each at intensity "
               f"{r.get('sphere_intensity', 'max')}, DDIM {r['steps']} steps)", "",
               "| map | mean per-volume AUROC | pooled AUROC | lowest volume |",
               "|---|---|---|---|"]
        md += [f"| {x['method']} | {x['mean_auroc']:.3f} | {x['pooled_auroc']:.3f} | "
               f"{min(x['auroc_per_volume']):.3f} |" for x in r["rows"]]
        md.append("")
    return "\n".join(md)


# ----------------------------------------------------------------------------------------
# Command line.

def _common(p, workdir=True):
    if workdir:
        p.add_argument("--workdir", required=True, help="stage-2 run")
    p.add_argument("--step", default="best")
    p.add_argument("--num", type=int, default=8, help="held-out volumes")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground threshold (default 0.1 of the data range)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="runs/editing")


def parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.editing",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    c = sub.add_parser("controlnet", help="ControlNet vs plain: paired mask Dice")
    c.add_argument("--controlnet_workdir", required=True)
    _common(c, workdir=False)
    i = sub.add_parser("inpaint", help="box-hole inpainting against two baselines")
    _common(i)
    i.add_argument("--box", default=None, help="x0:x1,y0:y1,z0:z1 (default the centre half)")
    i.add_argument("--jump_length", type=int, default=10)
    i.add_argument("--jump_n_sample", type=int, default=10)
    i.add_argument("--sigma", type=float, default=2.0, help="border extension's blur, voxels")
    i.add_argument("--inpainting_controlnet", default=None,
                   help="an inpainting ControlNet run on --workdir's UNet: one more fill")
    i.add_argument("--inpainting_controlnet_step", default="best")
    i.add_argument("--guidance_scale", type=float, default=1.0,
                   help="classifier-free guidance of the inpainting model's fills (an "
                   "inpainting UNet trained with condition dropout)")
    i.add_argument("--draws", type=int, default=1,
                   help="inpainting ControlNet (or inpainting UNet, as --workdir) draws; "
                   "> 1 adds the row of their mean")
    s = sub.add_parser("sdedit", help="SDEdit strength sweep")
    _common(s)
    s.add_argument("--strengths", default="0,0.1,0.25,0.5,0.75,1")
    n = sub.add_parser("anomaly", help="likelihood maps of inserted spheres: AUROC")
    _common(n)
    n.add_argument("--spheres", type=int, default=2, help="balls per volume")
    n.add_argument("--radii", default="3,5", help="radius range, voxels")
    n.add_argument("--sphere_intensity", default="max", help="'max' or 'pNN' (sphere_value)")
    n.add_argument("--likelihood_steps", type=int, default=None,
                   help="timesteps evaluated (default all T, MONAI's)")
    n.add_argument("--clean_scores", action="store_true",
                   help="also total_kl of the volumes without spheres (one more pass)")
    r = sub.add_parser("residual", help="reconstruction-based anomaly maps: AUROC")
    _common(r)
    r.add_argument("--spheres", type=int, default=2, help="balls per volume")
    r.add_argument("--radii", default="3,5", help="radius range, voxels")
    r.add_argument("--sphere_intensity", default="max", help="'max' or 'pNN' (sphere_value)")
    r.add_argument("--strengths", default="0.5,0.75,0.9")
    r.add_argument("--repeats", type=int, default=4, help="SDEdits averaged")
    q = sub.add_parser("patched", help="inpainting-based anomaly maps (an inpainting model)")
    _common(q)
    q.add_argument("--spheres", type=int, default=2, help="balls per volume")
    q.add_argument("--radii", default="3,5", help="radius range, voxels")
    q.add_argument("--sphere_intensity", default="max", help="'max' or 'pNN' (sphere_value)")
    q.add_argument("--patches", default="16", help="box sides, voxels (comma-separated)")
    q.add_argument("--stride", type=int, default=8, help="box stride, voxels")
    q.add_argument("--repeats", type=int, default=1, help="fills averaged per box")
    q.add_argument("--z_eps", default="0.02,0.05,0.1",
                   help="with --repeats > 1: z-scored maps, |mean - x| / (spread + eps)")
    t = sub.add_parser("tables", help="print the Markdown tables of OUT's JSONs")
    t.add_argument("--out", default="runs/editing")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["controlnet"] + argv  # the earlier form: controlnet's arguments alone
    a = parser().parse_args(argv)
    if a.part == "tables":
        md = tables(a.out)
        print(md)
        with open(os.path.join(a.out, "editing_tables.md"), "w") as f:
            f.write(md + "\n")
        return md
    os.makedirs(a.out, exist_ok=True)
    if a.part == "controlnet":
        out = controlnet_dice(a.controlnet_workdir, num=a.num, steps=a.steps, seed=a.seed,
                              threshold=a.threshold, step=a.step, keep=3)
        kept = out.pop("volumes")
        pics = [x for trio in kept for x in trio]
        names = [n for i in range(len(kept)) for n in (f"mask {i}", f"ControlNet {i}",
                                                        f"plain {i}")]
        _picture(pics, names, os.path.join(a.out, "editing_controlnet.png"),
                 "held-out mask, the ControlNet's sample, the plain model's (same seed)")
    else:
        import ldm_jax

        pipe = ldm_jax.load_pipeline(a.workdir, a.step)
        fn = {"inpaint": inpaint_part, "sdedit": sdedit_part, "anomaly": anomaly_part,
              "residual": residual_part, "patched": patched_part}[a.part]
        out = fn(pipe, a.workdir, a)
    _save(a.out, a.part, out)
    print(tables(a.out, (a.part,)))
    return out


if __name__ == "__main__":
    main()
