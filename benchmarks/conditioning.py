r"""Issue 27's measurements of generation conditioned on aligned images
(benchmarks/CONDITIONING.md): 2D projection -> 3D and coarse -> fine, on held-out volumes.

    python -m benchmarks.conditioning sample --task projection --out runs/conditioning \
        --model "concat, depth cue=runs/conditioning/models/proj_cue" \
        --model "unconditional=runs/conditioning/models/uncond" \
        --reference runs/conditioning/models/proj_cue
    python -m benchmarks.conditioning baseline --task projection --out runs/conditioning \
        --reference runs/conditioning/models/proj_cue
    python -m benchmarks.conditioning tables --task projection --out runs/conditioning
    python -m benchmarks.conditioning picture --task projection --out runs/conditioning
    python -m benchmarks.conditioning all ...          # the four above, in that order
    bash benchmarks/conditioning.sh [OUT]              # trains every model, then all of it

Held-out volumes: the first `--num` validation volumes of the models' data (its
`data.num_val_volumes` raised to `--num`: they never occur in training), preprocessed as
in training; written once to OUT/TASK/volumes.npz and checked by every later part, so
every row is scored on the same volumes (paired).

- sample: for each `--model NAME=WORKDIR[@STEP]`, for held-out volume i its condition
  c_i = compute_condition(volume_i, the model's own `conditioning`) (noise-free unless
  `--condition_noise`: then the config's noise drawn from fold_in(PRNGKey(seed + 1), i)),
  and `--samples` K samples `pipe.sample(K, fold_in(PRNGKey(seed), i), condition=c_i)`:
  the same key for every model (paired). An unconditional model is sampled with no
  condition and scored against the condition of `--reference` (a run whose
  `conditioning` defines the task's condition). Writes OUT/TASK/rows/NAME.json and
  OUT/TASK/samples/NAME.npz; a NAME whose JSON exists is skipped (`--force` redoes it).
- baseline: deterministic predictions from the condition of `--reference` (and of each
  further `--reference`): projection: `back_projection` (the condition smeared along its
  axis) at two scales fitted on `--fit_volumes` TRAINING volumes (least squares: the
  best PSNR; best mean Dice), coarse: `trilinear_upsample` of the condition; and the truth
  itself ("truth": the ceiling of consistency under noise); with `--regress_steps N`
  (projection) a 2D CNN trained N steps with MSE to predict the volume from its
  condition (`benchmarks.condition_regression`: about E[volume | image], what the
  condition can say). Same files.
- tables: OUT/conditioning_TASK.json (every row) and OUT/conditioning_TASK.md: the table
  of means over the volumes, and the paired table against `--versus` (a row name;
  default the first back-projection / trilinear row): mean difference and wins per volume.
- picture: OUT/conditioning_TASK.png for held-out volume `--volume`: its condition
  (a projection smeared along its axis, a coarse volume repeated to the grid), the truth,
  the first baseline row of each condition, and per model sample 0, the mean of the K
  samples and sample 0's own condition (`ldm_jax.visualize.samples_image`: three
  mid-slices and the max over Z).

Scores (ldm_jax.metrics.conditioning; per volume, then the mean over volumes, NaNs left
out and counted):
(a) consistency: Pearson r and PSNR with both min-max normalised to [0, 1] (dB) between
    compute_condition(sample) (noise-free) and the condition, mean over the K samples (a
    blank sample, whose condition is constant, counts r = 0);
(b) agreement with the truth: PSNR (dB, the data's range), foreground Dice (above
    `--threshold`), depth error (voxels; nm at `--voxel_nm`) of the depth centroid of
    each column along the projection axis (z for coarse) over the true foreground
    columns the sample also covers, and that coverage; of single samples (mean over K)
    and of the mean of the K samples ("mean of K" columns);
(c) diversity among the K samples of one condition: the per-voxel std over the samples
    averaged over all voxels and over the foreground, mean pairwise PSNR and Dice.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys

import numpy as np

TASKS = ("projection", "coarse")
PARTS = ("sample", "baseline", "tables", "picture")
KIND_ORDER = {"model": 0, "baseline": 1, "truth": 2}

# (key, header, format); "±" columns are the mean over volumes.
COLUMNS = (
    ("cons_r", "r (cond.)", "{:.3f}"),
    ("cons_psnr", "PSNR mm (cond.)", "{:.2f}"),
    ("psnr", "PSNR", "{:.2f}"),
    ("dice", "Dice", "{:.3f}"),
    ("depth_vox", "depth err (vox)", "{:.2f}"),
    ("depth_nm", "depth err (nm)", "{:.0f}"),
    ("depth_cov", "covered", "{:.2f}"),
    ("psnr_mean", "PSNR mean of K", "{:.2f}"),
    ("dice_mean", "Dice mean of K", "{:.3f}"),
    ("depth_vox_mean", "depth err mean of K (vox)", "{:.2f}"),
    ("depth_cov_mean", "covered mean of K", "{:.2f}"),
    ("div_std", "voxel std", "{:.4f}"),
    ("div_fg_std", "fg voxel std", "{:.3f}"),
    ("div_psnr", "pairwise PSNR", "{:.2f}"),
    ("div_dice", "pairwise Dice", "{:.3f}"),
)
# Paired comparisons: (key, higher is better).
PAIRED = (("cons_r", True), ("psnr", True), ("dice", True), ("depth_vox", False),
          ("psnr_mean", True), ("dice_mean", True), ("depth_vox_mean", False))


# ----------------------------------------------------------------------------------------
# Pure functions (tests/benchmarks/test_conditioning.py).

def parse_model(spec: str, default_step="latest") -> tuple:
    """'NAME=WORKDIR[@STEP]' -> (name, workdir, step); WORKDIR alone names itself by its
    base name. STEP: 'latest' | 'best' | an int."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = "", spec
    workdir, step = rest, default_step
    if "@" in rest:
        workdir, _, step = rest.rpartition("@")
    step = int(step) if str(step).isdigit() else str(step)
    name = name.strip() or os.path.basename(os.path.normpath(workdir))
    if not workdir:
        raise ValueError(f"--model {spec!r}: give NAME=WORKDIR[@STEP]")
    return name, workdir, step


def slug(name: str) -> str:
    """A file name for a row name."""
    s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_")
    return s or "row"


def volumes_digest(volumes) -> str:
    """A short hash of the held-out volumes (the pairing check)."""
    return hashlib.sha256(np.ascontiguousarray(volumes, np.float32).tobytes()).hexdigest()[:16]


def score_volume(samples, truth, condition, cond_fn, *, axis: int, threshold: float,
                 data_range: float) -> dict:
    """The scores of the K predictions of one volume.

    samples (K, X, Y, Z, C); truth (X, Y, Z, C); condition (X', Y', Z', C) or None (no
    consistency); cond_fn: (B, X, Y, Z, C) -> (B, X', Y', Z', C) noise-free. Returns
    floats (see the module docstring); diversity is NaN for K = 1.
    """
    from ldm_jax.metrics import conditioning as cm

    s = np.asarray(samples, np.float32)
    k = s.shape[0]
    t = np.repeat(np.asarray(truth, np.float32)[None], k, axis=0)
    m = s.mean(axis=0, keepdims=True)
    out = {}
    if condition is not None:
        got = np.asarray(cond_fn(s), np.float32)
        want = np.repeat(np.asarray(condition, np.float32)[None], k, axis=0)
        # A sample whose condition is constant (blank) has no correlation: it counts 0.
        out["cons_r"] = float(np.mean(np.nan_to_num(cm.pearson(got, want), nan=0.0)))
        out["cons_psnr"] = float(np.mean(cm.psnr_minmax(got, want)))
    kw = dict(axis=axis, threshold=threshold)
    out["psnr"] = float(np.mean(cm.psnr(s, t, data_range)))
    out["dice"] = float(np.mean(cm.dice(s, t, threshold)))
    out["depth_vox"] = _nanmean(cm.depth_error(s, t, **kw))
    out["depth_cov"] = float(np.mean(cm.depth_coverage(s, t, **kw)))
    out["psnr_mean"] = float(cm.psnr(m, t[:1], data_range)[0])
    out["dice_mean"] = float(cm.dice(m, t[:1], threshold)[0])
    out["depth_vox_mean"] = float(cm.depth_error(m, t[:1], **kw)[0])
    out["depth_cov_mean"] = float(cm.depth_coverage(m, t[:1], **kw)[0])
    d = cm.diversity(s, threshold=threshold, data_range=data_range)
    out.update(div_std=d["voxel_std"], div_fg_std=d["fg_voxel_std"],
               div_psnr=d["pairwise_psnr"], div_dice=d["pairwise_dice"])
    return out


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def summarise(per_volume: list, voxel_nm: float) -> dict:
    """[{key: float} per volume] -> {key: {"mean", "std", "n", "nan"}} over volumes (NaN
    values left out and counted; infinities kept), with depth_nm / depth_nm_mean added
    from the voxel errors."""
    keys = sorted({k for d in per_volume for k in d})
    out = {}
    for k in keys:
        v = np.array([d.get(k, np.nan) for d in per_volume], np.float64)
        ok = v[~np.isnan(v)]
        with np.errstate(invalid="ignore"):  # the std of infinities (identical volumes)
            std = float(ok.std()) if ok.size else float("nan")
        out[k] = {"mean": float(ok.mean()) if ok.size else float("nan"),
                  "std": std,
                  "n": int(ok.size), "nan": int(v.size - ok.size)}
    for src, dst in (("depth_vox", "depth_nm"), ("depth_vox_mean", "depth_nm_mean")):
        if src in out:
            out[dst] = {f: (out[src][f] * voxel_nm if f in ("mean", "std") else out[src][f])
                        for f in out[src]}
    return out


def _fmt(v, fmt) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return fmt.format(v)


def markdown_table(rows: list) -> str:
    """Rows {"name", "summary": summarise(...)} -> one Markdown table of the means
    (columns absent from every row are left out; '–' where a row lacks one)."""
    cols = [c for c in COLUMNS if any(c[0] in r["summary"] for r in rows)]
    head = "| row | " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [head, sep]
    for r in rows:
        cells = [_fmt(r["summary"].get(k, {}).get("mean"), f) for k, _, f in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: list, versus: str) -> str:
    """Per row, against row `versus` on the same volumes: mean(row - versus) and the
    number of volumes where the row is better (ties count half) of those both have."""
    base = next((r for r in rows if r["name"] == versus), None)
    if base is None:
        return ""
    keys = [(k, hb) for k, hb in PAIRED if k in base["summary"]]
    lines = [f"Paired against **{versus}** (same volumes): mean difference (row - "
             f"{versus}), and on how many volumes the row is better.", "",
             "| row | " + " | ".join(f"{k} ({'higher' if hb else 'lower'} better)"
                                     for k, hb in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for r in rows:
        if r is base:
            continue
        cells = []
        for k, hb in keys:
            a = np.array([d.get(k, np.nan) for d in r["per_volume"]], np.float64)
            b = np.array([d.get(k, np.nan) for d in base["per_volume"]], np.float64)
            ok = np.isfinite(a) & np.isfinite(b)
            if len(a) != len(b) or not ok.any():
                cells.append("–")
                continue
            diff = a[ok] - b[ok]
            better = diff > 0 if hb else diff < 0
            wins = better.sum() + 0.5 * (diff == 0).sum()
            cells.append(f"{diff.mean():+.3g} ({wins:g}/{ok.sum()})")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def condition_on_grid(condition, grid, axis=None) -> np.ndarray:
    """A condition (X', Y', Z', C) shown on the volume grid (X, Y, Z): a projection (1 on
    `axis`) repeated along it, a coarse volume repeated per block (nearest)."""
    c = np.asarray(condition, np.float32)
    for ax, n in enumerate(grid):
        if c.shape[ax] != n:
            if n % c.shape[ax]:
                raise ValueError(f"condition {c.shape} does not tile the grid {tuple(grid)}")
            c = np.repeat(c, n // c.shape[ax], axis=ax)
    return c


# ----------------------------------------------------------------------------------------
# The parts.

def _data_config(pipe):
    """The stage-1-like config with the data section (voxel or latent space)."""
    ae = getattr(pipe, "autoencoder", None)
    cfg = getattr(ae, "config", None)
    if cfg is None or "data" not in cfg:
        cfg = pipe.config
    if "data" not in cfg:
        raise SystemExit("the run has no data section to draw held-out volumes from")
    return cfg


def held_out_volumes(data_cfg, num: int) -> tuple:
    """((num, X, Y, Z, C) float32, [names]): the first `num` validation volumes
    (`data.num_val_volumes` raised to `num`; they never occur in training)."""
    from ldm_jax import data as data_lib

    cfg = copy.deepcopy(data_cfg)
    cfg.data.num_val_volumes = max(int(num), int(cfg.data.get("num_val_volumes", 0) or 0))
    vols, names = [], []
    for b in data_lib.make_eval_batches(cfg, batch_size=1):
        vols.append(np.asarray(b["image"], np.float32)[0])
        names.append(str(b["name"][0]))
        if len(vols) == num:
            break
    if len(vols) < num:
        raise SystemExit(f"only {len(vols)} held-out volumes; lower --num")
    return np.stack(vols), names


def training_volumes(data_cfg, num: int, seed: int) -> np.ndarray:
    """(num, X, Y, Z, C) float32 training volumes (random crops/flips as in training), for
    fitting the baselines."""
    from ldm_jax import data as data_lib

    cfg = copy.deepcopy(data_cfg)
    cfg.data.num_workers = 0
    batch = next(iter(data_lib.make_train_loader(cfg, batch_size=int(num), seed=int(seed))))
    return np.asarray(batch["image"], np.float32)


def _task_dir(out, task):
    return os.path.join(out, task)


def _data_range(data_cfg) -> float:
    d = data_cfg.data
    return abs(float(d.get("b_max", 1.0)) - float(d.get("b_min", 0.0)))


def _cond_cfg_dict(cond_cfg) -> dict:
    return cond_cfg.to_dict() if hasattr(cond_cfg, "to_dict") else dict(cond_cfg)


def _is_conditioned(cond_cfg) -> bool:
    return bool(cond_cfg is not None and str(cond_cfg.get("aligned", "") or ""))


def _axis(task, cond_cfg) -> int:
    if task == "projection" and _is_conditioned(cond_cfg):
        return int(cond_cfg.projection.get("axis", 2))
    return 2


def _check_task(task, cond_cfg, what):
    kind = str(cond_cfg.get("aligned", "") or "")
    if kind != task:
        raise SystemExit(f"{what}: conditioning.aligned={kind!r}, but --task {task}")


def _conditions(volumes, cond_cfg, noise_seed):
    """Conditions (N, X', Y', Z', C) of the held-out volumes: noise-free, or with the
    config's noise from fold_in(PRNGKey(noise_seed), i)."""
    import jax

    from ldm_jax.diffusion.aligned import compute_condition

    out = []
    for i in range(len(volumes)):
        key = None if noise_seed is None else jax.random.fold_in(
            jax.random.PRNGKey(int(noise_seed)), i)
        out.append(np.asarray(compute_condition(volumes[i:i + 1], cond_cfg, key=key),
                              np.float32)[0])
    return np.stack(out)


def _cond_fn(cond_cfg):
    from ldm_jax.diffusion.aligned import compute_condition

    return lambda v: np.asarray(compute_condition(np.asarray(v, np.float32), cond_cfg,
                                                  key=None), np.float32)


def _volumes(a, data_cfg):
    """The held-out volumes: OUT/TASK/volumes.npz, made once (the pairing)."""
    path = os.path.join(_task_dir(a.out, a.task), "volumes.npz")
    if os.path.exists(path):
        z = np.load(path)
        vols = z["volumes"]
        if len(vols) < a.num:
            raise SystemExit(f"{path} holds {len(vols)} volumes, --num {a.num}: delete it "
                             "(and the rows) to redo with more")
        return vols[: a.num], [str(n) for n in z["names"][: a.num]]
    vols, names = held_out_volumes(data_cfg, a.num)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, volumes=vols, names=np.array(names))
    return vols, names


def _write_row(a, row, samples=None, conditions=None, own=None):
    d = _task_dir(a.out, a.task)
    os.makedirs(os.path.join(d, "rows"), exist_ok=True)
    with open(os.path.join(d, "rows", slug(row["name"]) + ".json"), "w") as f:
        json.dump(row, f, indent=1, default=str)
    if samples is not None:
        os.makedirs(os.path.join(d, "samples"), exist_ok=True)
        extra = {} if conditions is None else {"conditions": conditions}
        if own is not None:
            extra["own_condition"] = own
        np.savez_compressed(os.path.join(d, "samples", slug(row["name"]) + ".npz"),
                            samples=samples, **extra)
    s = row["summary"]
    brief = ", ".join(f"{k} {s[k]['mean']:.3g}" for k in ("cons_r", "psnr", "dice",
                                                           "depth_vox") if k in s)
    print(f"[{a.task}] {row['name']}: {brief}", flush=True)


def _row_exists(a, name):
    return os.path.exists(os.path.join(_task_dir(a.out, a.task), "rows",
                                       slug(name) + ".json")) and not a.force


def _reference(a):
    """[(workdir, cond_cfg, data_cfg)] of the --reference runs (each loaded once)."""
    import ldm_jax

    refs = []
    for spec in a.reference or []:
        _, workdir, step = parse_model(spec, a.step)
        pipe = ldm_jax.load_pipeline(workdir, step)
        cfg = pipe.config.conditioning
        _check_task(a.task, cfg, f"--reference {workdir}")
        refs.append((workdir, cfg, _data_config(pipe)))
    return refs


def sample_part(a):
    """Samples and scores of every --model (see the module docstring)."""
    import jax

    import ldm_jax

    refs = None
    for spec in a.model or []:
        name, workdir, step = parse_model(spec, a.step)
        if _row_exists(a, name):
            print(f"[{a.task}] {name}: done before (--force redoes it)")
            continue
        pipe = ldm_jax.load_pipeline(workdir, step)
        data_cfg = _data_config(pipe)
        cond_cfg = pipe.config.get("conditioning")
        conditioned = _is_conditioned(cond_cfg)
        if conditioned:
            _check_task(a.task, cond_cfg, f"--model {name}")
            score_cfg = cond_cfg
        else:
            if refs is None:
                refs = _reference(a)
            if not refs:
                raise SystemExit(f"--model {name} is unconditional: give --reference WORKDIR "
                                 "(a run whose conditioning defines the task's condition)")
            score_cfg = refs[0][1]
        vols, _ = _volumes(a, data_cfg)
        conds = _conditions(vols, score_cfg, a.seed + 1 if a.condition_noise else None)
        fn = _cond_fn(score_cfg)
        axis = _axis(a.task, score_cfg)
        rng = jax.random.PRNGKey(int(a.seed))
        per_volume, all_samples, own = [], [], []
        for i in range(len(vols)):
            kw = dict(steps=a.steps, scheduler=a.scheduler)
            if conditioned:
                kw.update(condition=np.repeat(conds[i:i + 1], a.samples, axis=0),
                          guidance_scale=a.guidance)
            s = np.asarray(pipe.sample(a.samples, jax.random.fold_in(rng, i), **kw),
                           np.float32)
            per_volume.append(score_volume(s, vols[i], conds[i], fn, axis=axis,
                                           threshold=a.threshold,
                                           data_range=_data_range(data_cfg)))
            all_samples.append(s)
            own.append(fn(s[:1])[0])
            print(f"  {name} volume {i}: " + ", ".join(
                f"{k} {per_volume[-1][k]:.3g}" for k in ("cons_r", "dice", "depth_vox")),
                flush=True)
        row = {"name": name, "kind": "model", "workdir": os.path.abspath(workdir),
               "step": getattr(pipe, "step", step), "conditioned": conditioned,
               "mode": str(cond_cfg.get("aligned_mode", "concat")) if conditioned else None,
               "condition": _cond_cfg_dict(score_cfg), "settings": _settings(a),
               "volumes_digest": volumes_digest(vols),
               "per_volume": per_volume, "summary": summarise(per_volume, a.voxel_nm)}
        _write_row(a, row, np.stack(all_samples), conds, np.stack(own))
        del pipe


def _settings(a) -> dict:
    return {k: getattr(a, k) for k in ("num", "samples", "seed", "steps", "scheduler",
                                       "guidance", "threshold", "voxel_nm",
                                       "condition_noise", "fit_volumes")
            if hasattr(a, k)}


def baseline_part(a):
    """Back-projection (projection) or trilinear (coarse) rows, and the truth row, for the
    condition of each --reference."""
    from ldm_jax.metrics import conditioning as cm

    refs = _reference(a)
    if not refs:
        raise SystemExit("baseline needs --reference WORKDIR (whose conditioning to use)")
    for j, (workdir, cond_cfg, data_cfg) in enumerate(refs):
        tag = "" if len(refs) == 1 else f" ({os.path.basename(os.path.normpath(workdir))})"
        vols, _ = _volumes(a, data_cfg)
        conds = _conditions(vols, cond_cfg, a.seed + 1 if a.condition_noise else None)
        fn = _cond_fn(cond_cfg)
        axis = _axis(a.task, cond_cfg)
        preds = {}
        if a.task == "projection":
            train = training_volumes(data_cfg, a.fit_volumes, a.seed + 2)
            tconds = _conditions(train, cond_cfg, a.seed + 3 if a.condition_noise else None)
            for obj, label in (("mse", "least-squares scale"), ("dice", "Dice-fitted scale")):
                scale = cm.fit_back_projection_scale(tconds, train, axis, objective=obj,
                                                     threshold=a.threshold)
                preds[f"back-projection, {label}{tag}"] = (cm.back_projection(
                    conds, axis, vols.shape[1 + axis], scale), {"scale": scale,
                                                                "objective": obj})
            name = f"regression (2D CNN, MSE){tag}"
            if a.regress_steps > 0 and not _row_exists(a, name):
                from benchmarks.condition_regression import train_regressor
                predict = train_regressor(data_cfg, cond_cfg, a.regress_steps, seed=a.seed)
                preds[name] = (predict(conds), {"steps": a.regress_steps})
        else:
            preds[f"trilinear{tag}"] = (cm.trilinear_upsample(conds, vols.shape[1:4]), {})
        preds[f"truth{tag}"] = (vols, {})
        for name, (pred, info) in preds.items():
            if _row_exists(a, name):
                print(f"[{a.task}] {name}: done before (--force redoes it)")
                continue
            per_volume = [score_volume(pred[i:i + 1], vols[i], conds[i], fn, axis=axis,
                                       threshold=a.threshold,
                                       data_range=_data_range(data_cfg))
                          for i in range(len(vols))]
            row = {"name": name, "kind": "truth" if name.startswith("truth") else "baseline",
                   "workdir": os.path.abspath(workdir), "conditioned": True,
                   "condition": _cond_cfg_dict(cond_cfg), "settings": _settings(a),
                   "volumes_digest": volumes_digest(vols), **info,
                   "per_volume": per_volume, "summary": summarise(per_volume, a.voxel_nm)}
            _write_row(a, row, pred[:, None], conds, fn(pred))


def load_rows(out, task) -> list:
    """The rows of OUT/TASK/rows, models first (in --order, else by name), then
    baselines, then the truth; raises SystemExit when they were scored on different
    volumes."""
    d = os.path.join(_task_dir(out, task), "rows")
    if not os.path.isdir(d):
        raise SystemExit(f"no rows in {d}: run the sample / baseline parts first")
    rows = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".json"):
            with open(os.path.join(d, f)) as fh:
                rows.append(json.load(fh))
    digests = {r.get("volumes_digest") for r in rows}
    if len(digests) > 1:
        raise SystemExit(f"the rows in {d} were scored on different held-out volumes "
                         f"({sorted(map(str, digests))}); redo them with the same --num")
    return sorted(rows, key=lambda r: KIND_ORDER.get(r.get("kind"), 3))


def _ordered_rows(a) -> list:
    rows = load_rows(a.out, a.task)
    rank = {n: i for i, n in enumerate(a.order or [])}
    return sorted(rows, key=lambda r: (KIND_ORDER.get(r["kind"], 3),
                                       rank.get(r["name"], len(rank))))


def tables_part(a) -> str:
    rows = _ordered_rows(a)
    versus = a.versus or next((r["name"] for r in rows if r["kind"] == "baseline"), None)
    s = rows[0]["settings"] if rows else {}
    md = [f"### {a.task}: {s.get('num')} held-out volumes, {s.get('samples')} samples per "
          f"condition ({s.get('scheduler') or 'default'} sampler, {s.get('steps')} steps, "
          f"guidance {s.get('guidance')}), seed {s.get('seed')}; foreground > "
          f"{s.get('threshold')}; depth along axis "
          f"{_axis(a.task, _as_cfg(rows[0]['condition'])) if rows else '?'}, "
          f"{s.get('voxel_nm')} nm per voxel", "",
          markdown_table(rows)]
    notes = [f"- {r['name']}: scale {r['scale']:.4g} ({r['objective']}, fitted on "
             f"{s.get('fit_volumes')} training volumes)" for r in rows if "scale" in r]
    nan = [f"{r['name']}: {k} {v['nan']}" for r in rows for k, v in r["summary"].items()
           if v.get("nan") and k in ("cons_r", "depth_vox", "depth_vox_mean")]
    if notes:
        md += [""] + notes
    if nan:
        md += ["", "Volumes left out (NaN: no foreground to compare): " + "; ".join(nan)]
    paired = paired_table(rows, versus) if versus else ""
    if paired:
        md += ["", paired]
    text = "\n".join(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"conditioning_{a.task}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, f"conditioning_{a.task}.json"), "w") as f:
        json.dump({"task": a.task, "versus": versus, "rows": rows}, f, indent=1, default=str)
    print(text)
    return text


def _as_cfg(d):
    import ml_collections

    return ml_collections.ConfigDict(d)


def picture_part(a):
    from ldm_jax import visualize

    d = _task_dir(a.out, a.task)
    z = np.load(os.path.join(d, "volumes.npz"))
    truth = z["volumes"][a.volume]
    rows = _ordered_rows(a)
    loaded = []
    for r in rows:
        npz = os.path.join(d, "samples", slug(r["name"]) + ".npz")
        if os.path.exists(npz):
            loaded.append((r, dict(np.load(npz))))
    # The condition shown: the first conditioned model's (else the first baseline's).
    ref = next((x for x in loaded if x[0]["kind"] == "model" and x[0].get("conditioned")),
               next((x for x in loaded if "conditions" in x[1]), None))
    vols, names = [truth], ["truth"]
    if ref is not None:
        vols.insert(0, condition_on_grid(ref[1]["conditions"][a.volume], truth.shape[:3]))
        names.insert(0, f"condition ({ref[0]['name']})")
    seen = set()
    for r, s in loaded:  # the baselines first, under the truth: one per condition
        key = json.dumps(r.get("condition"), sort_keys=True, default=str)
        if r["kind"] == "baseline" and key not in seen:
            seen.add(key)
            vols.append(s["samples"][a.volume][0])
            names.append(r["name"])
    for r, s in loaded:
        if r["kind"] != "model":
            continue
        samples = s["samples"][a.volume]
        vols += [samples[0], samples.mean(axis=0)]
        names += [f"{r['name']}: sample 0", f"{r['name']}: mean of {len(samples)}"]
        if "own_condition" in s:
            vols.append(condition_on_grid(s["own_condition"][a.volume], truth.shape[:3]))
            names.append(f"{r['name']}: sample 0's condition")
    title = (f"{a.task}: held-out volume {a.volume}; conditions repeated along the "
             "projection axis / per block")
    img = visualize.samples_image(vols, names, value_range=(0.0, 1.0), title=title)
    if img.size[1] > a.max_height:  # halve the enlargement rather than grow taller
        f = a.max_height / img.size[1]
        img = img.resize((max(1, int(img.size[0] * f)), a.max_height))
    path = os.path.join(a.out, f"conditioning_{a.task}.png")
    img.save(path)
    print(f"wrote {path} ({img.size[0]}x{img.size[1]})")


# ----------------------------------------------------------------------------------------
# Command line.

def parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.conditioning",
                                description=__doc__.splitlines()[0])
    p.add_argument("part", choices=PARTS + ("all",))
    p.add_argument("--task", choices=TASKS, default="projection")
    p.add_argument("--out", default="runs/conditioning")
    p.add_argument("--model", action="append", help="NAME=WORKDIR[@STEP], repeatable")
    p.add_argument("--reference", action="append",
                   help="WORKDIR[@STEP] whose conditioning defines the condition of the "
                        "baselines and of unconditional models; repeatable (baselines)")
    p.add_argument("--step", default="latest", help="checkpoint step when not given: "
                                                    "latest | best | N")
    p.add_argument("--num", type=int, default=8, help="held-out volumes")
    p.add_argument("--samples", type=int, default=4, help="samples per condition (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--scheduler", default="ddim", help="ddim | ddpm")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale")
    p.add_argument("--threshold", type=float, default=0.1, help="foreground threshold")
    p.add_argument("--voxel_nm", type=float, default=20.0, help="nm per voxel (depth)")
    p.add_argument("--condition_noise", action="store_true",
                   help="give the models conditions with the config's noise (fixed seeds)")
    p.add_argument("--fit_volumes", type=int, default=32,
                   help="training volumes the back-projection scales are fitted on")
    p.add_argument("--regress_steps", type=int, default=0,
                   help="projection: also train the supervised 2D CNN baseline "
                        "(benchmarks/condition_regression.py) for this many steps; 0: no")
    p.add_argument("--force", action="store_true", help="redo rows that exist")
    p.add_argument("--versus", default=None, help="the row of the paired table")
    p.add_argument("--order", action="append", help="row names in table order")
    p.add_argument("--volume", type=int, default=0, help="the picture's held-out volume")
    p.add_argument("--max_height", type=int, default=4000, help="picture pixels, at most")
    return p


def main(argv=None):
    a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if a.part == "sample" and not a.model:
        raise SystemExit("sample needs --model NAME=WORKDIR[@STEP]")
    if a.part == "baseline" and not a.reference:
        raise SystemExit("baseline needs --reference WORKDIR")
    if a.part in ("sample", "all") and a.model:
        sample_part(a)
    if a.part in ("baseline", "all") and a.reference:
        baseline_part(a)
    if a.part in ("tables", "all"):
        tables_part(a)
    if a.part in ("picture", "all"):
        picture_part(a)


if __name__ == "__main__":
    main()
