"""Measured sample quality of generated 3D volumes against real ones: reading both sets,
computing every metric, and the report (`evaluate`, `format_table`).

The metrics, each with its limits, live in their own modules: `frechet` (2.5D slice
features and latents), `diversity` (MS-SSIM among pairs), `intensity` (voxel intensity
distributions); `evaluate` returns them all as one dict.

Inputs: volumes are compared as stored: values are not rescaled or windowed (a reference
config, below, windows its reference like training data); `value_range` only sets the
[-1, 1] mapping for the feature nets and MS-SSIM's data range. Every volume of both sets
must have the same (X, Y, Z, C): volumes are not resampled or cropped here. A reference
config (.py) gives its validation volumes (ldm_jax.data.make_eval_batches: synthetic
filaments / MNI152 / the val split of a folder, preprocessed and cropped to
data.volume_size), and then value_range defaults to (data.b_min, data.b_max); a reference
folder may be preprocessed the same way with `config` (load_volume, then a centre crop to
data.volume_size). Without a config, value_range defaults to the reference's min and max.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ldm_jax.errors import ConfigError
from ldm_jax.metrics.diversity import fit_ms_ssim_scales, ms_ssim_weights, pairwise_ms_ssim
from ldm_jax.metrics.frechet import (
    FEATURE_LAYER,
    FEATURE_NETS,
    latent_distances,
    make_feature_fn,
    slice_features,
    slice_frechet,
    slice_positions,
)
from ldm_jax.metrics.intensity import intensity_distances

LATENTS_JSON = "latents.json"


# ----------------------------------------------------------------------------------------
# Fréchet distance.


# ----------------------------------------------------------------------------------------
# 2.5D slice features.


# ----------------------------------------------------------------------------------------
# MS-SSIM diversity.


# ----------------------------------------------------------------------------------------
# Intensity distributions.


# ----------------------------------------------------------------------------------------
# Latents.


def read_sample_latents(folder: str, scale_factor: float = 1.0) -> list:
    """(x, y, z, C) float32 arrays of folder/*.npy, each divided by scale_factor."""
    from ldm_jax import outputs as vf
    from ldm_jax.data import list_volume_files

    paths = list_volume_files(folder, patterns=("*.npy",))
    return [vf.read_latent(p)[0] / np.float32(scale_factor) for p in paths]


def read_reference_latents(folder: str) -> tuple[list, dict]:
    """(latents, latents.json content): the latents that latents.json in `folder` lists
    (ldm-jax extract's output; the .npy of each file when there is one).

    Raises:
        FileNotFoundError: no latents.json, or a listed file is missing.
    """
    import json

    from ldm_jax import outputs as vf
    path = os.path.join(folder, LATENTS_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--reference_latents {folder} has no {LATENTS_JSON}; pass the --output folder "
            "of `ldm-jax extract`")
    with open(path) as f:
        meta = json.load(f)
    out = []
    for name, entry in sorted(meta.get("files", {}).items()):
        names = entry.get("outputs") or [name + ".npy"]
        pick = next((n for n in names if n.endswith(".npy")), names[0])
        p = os.path.join(folder, pick)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} lists {pick}, which is missing from {folder}; "
                                    "re-run ldm-jax extract")
        out.append(vf.read_latent(p)[0])
    if not out:
        raise FileNotFoundError(f"{path} lists no latents")
    return out, meta


# ----------------------------------------------------------------------------------------
# Reading volumes.


def _read_stored(path: str) -> np.ndarray:
    """A volume file as stored -> (X, Y, Z, C) float32; channels from a 4th axis."""
    from ldm_jax.data import NonFiniteError, io

    info = io.read_header(path)
    io.check_dtype(info)
    extra = [s for s in info.shape[3:] if s != 1]
    arr = np.asarray(io.read_array(info, None, extra[0] if extra else 1), np.float32)
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{path}: contains NaN or Inf voxels; fix or remove the file")
    return arr


def _stack(vols: list, names: list, what: str) -> np.ndarray:
    shapes = {v.shape for v in vols}
    if len(shapes) > 1:
        first = vols[0].shape
        other = next(i for i, v in enumerate(vols) if v.shape != first)
        from ldm_jax.data import VolumeShapeError
        raise VolumeShapeError(
            f"{what} volumes differ in shape: {names[0]} is {first}, {names[other]} is "
            f"{vols[other].shape}; all volumes must share one (X, Y, Z, C) (crop or resample "
            "them, or give a config that crops them to data.volume_size)")
    return np.stack(vols).astype(np.float32, copy=False)


def read_volumes(path: str, *, config=None, max_volumes: int = 0,
                 what: str = "--samples") -> tuple[np.ndarray, list]:
    """A folder / glob / file of .nii, .nii.gz, .npy volumes -> ((N, X, Y, Z, C) float32,
    names). As stored, or with `config` through ldm_jax.data.load_volume (the validation
    preprocessing) and a centre crop / pad to data.volume_size. The first `max_volumes`
    files (sorted) when > 0.

    Raises:
        NoFilesError: no such path, or no volumes in it. VolumeShapeError: shapes differ.
        BadFileError / NonFiniteError: an unreadable file, NaN/Inf voxels.
    """
    from ldm_jax import outputs as vf
    from ldm_jax.data import NoFilesError, list_volume_files, load_volume
    from ldm_jax.data.transforms import Prep, crop_or_pad

    where = os.path.expanduser(str(path))
    if not os.path.exists(where) and not any(ch in where for ch in "*?["):
        raise NoFilesError(f"{what} {path} does not exist; pass a folder of volumes "
                           "(.nii, .nii.gz, .npy)")
    try:
        paths = list_volume_files(where)
    except NoFilesError:
        raise NoFilesError(f"{what} {path} holds no volumes (.nii, .nii.gz, .npy files "
                           "directly in it)") from None
    if max_volumes and max_volumes > 0:
        paths = paths[:max_volumes]
    vols = []
    if config is None:
        vols = [_read_stored(p) for p in paths]
    else:
        prep = Prep.from_config(config)
        for p in paths:
            vol, _ = load_volume(p, config)
            vols.append(np.ascontiguousarray(
                crop_or_pad(vol, prep.volume_size, None, prep.background, p)))
    names = [vf.stem(p) for p in paths]
    return _stack(vols, names, what), names


def reference_from_config(config, max_volumes: int = 0) -> tuple[np.ndarray, list]:
    """The validation volumes of `config` (ldm_jax.data.make_eval_batches) as
    ((N, X, Y, Z, C) float32, names); the first max_volumes when > 0."""
    from ldm_jax.data import make_eval_batches

    if "data" not in config:
        raise ConfigError("the reference config has no data section; pass a config whose "
                          "data section describes the real volumes (e.g. configs/default.py)")
    batches = make_eval_batches(config, batch_size=1)
    n = batches.num_volumes if not max_volumes else min(max_volumes, batches.num_volumes)
    vols, names = [], []
    for i in range(n):
        v = batches.volume(i)
        if v is not None:
            vols.append(np.asarray(v, np.float32))
            names.append(f"val[{i}]")
    if not vols:
        raise ConfigError("the reference config yields no readable validation volumes")
    return _stack(vols, names, "reference"), names


def is_config_path(path: str) -> bool:
    return str(path).endswith(".py")


# ----------------------------------------------------------------------------------------
# Everything together.


def _load_sets(samples, reference, config, max_volumes):
    """(generated (N, X, Y, Z, C), reference (M, X, Y, Z, C), reference kind, config or None)."""
    from ldm_jax.config import load_config

    fake, _ = read_volumes(samples, max_volumes=max_volumes, what="--samples")
    if is_config_path(reference):
        if config is not None:
            raise ConfigError("--config preprocesses a reference folder; with a config as "
                              "--reference, drop --config")
        cfg = load_config(reference)
        real, _ = reference_from_config(cfg, max_volumes)
        kind = "config validation volumes"
    else:
        cfg = load_config(config) if config is not None else None
        real, _ = read_volumes(reference, config=cfg, max_volumes=max_volumes,
                               what="--reference")
        kind = "folder" + (" preprocessed with --config" if cfg is not None else "")
    if fake.shape[1:] != real.shape[1:]:
        from ldm_jax.data import VolumeShapeError
        raise VolumeShapeError(
            f"--samples volumes are {fake.shape[1:]} (X, Y, Z, C) but the reference volumes "
            f"are {real.shape[1:]}; both must have the same shape (evaluate against the "
            "config the model was trained with, whose validation volumes are cropped to "
            "data.volume_size, or crop/resample one set)")
    return fake, real, kind, cfg


def _value_range(value_range, cfg, real) -> tuple[float, float, str]:
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ConfigError(f"--range {lo},{hi} is empty; give LO,HI with LO < HI")
        return lo, hi, "--range"
    if cfg is not None:
        return float(cfg.data.b_min), float(cfg.data.b_max), "config data.b_min, data.b_max"
    lo, hi = float(real.min()), float(real.max())
    return lo, (hi if hi > lo else lo + 1.0), "reference min and max"


def _frechet_section(fake, real, features, k, value_range, log) -> dict:
    from ldm_jax.models.lpips import MIN_SLICE_SIZE

    need = MIN_SLICE_SIZE[features]
    if min(fake.shape[1:4]) < need:
        hint = "; try --features vgg16" if features == "alexnet" else ""
        return {"skipped": f"{features} needs slice sides >= {need}, volumes are "
                           f"{fake.shape[1:4]}{hint}"}
    fn = make_feature_fn(features)
    log(f"Slice features ({features}, {k} slices per axis)...")
    fd = slice_frechet(slice_features(real, fn, k, value_range),
                       slice_features(fake, fn, k, value_range))
    fd.update(net=features, layer=FEATURE_LAYER[features] + ", spatial mean",
              slices_per_axis=[int(len(slice_positions(n, k))) for n in fake.shape[1:4]],
              num={"samples": fd["num"][0], "reference": fd["num"][1]})
    return fd


def _ms_ssim_section(fake, real, kernel, num_scales, data_range, max_pairs, seed,
                     log) -> dict:
    from ldm_jax.metrics.image import MS_SSIM_WEIGHTS, ms_ssim_min_size

    fit = fit_ms_ssim_scales(fake.shape[1:4], kernel)
    scales = fit if num_scales is None else int(num_scales)
    if not 1 <= scales <= fit:
        msg = (f"MS-SSIM with window {kernel} and {max(scales, 1)} scale(s) needs >= "
               f"{ms_ssim_min_size(kernel, max(scales, 1))} voxels per axis, volumes are "
               f"{fake.shape[1:4]}")
        fix = f"--ms_ssim_scales <= {fit}" if fit else "a smaller --ms_ssim_kernel"
        if num_scales is not None:
            raise ConfigError(f"{msg}; use {fix}")
        return {"skipped": f"{msg}; use {fix}"}
    weights = ms_ssim_weights(scales)
    log(f"MS-SSIM among pairs (window {kernel}, {scales} scale(s))...")
    kw = dict(data_range=data_range, kernel=kernel, weights=weights, max_pairs=max_pairs,
              seed=seed)
    out = {"samples": pairwise_ms_ssim(fake, **kw), "reference": pairwise_ms_ssim(real, **kw),
           "kernel_size": int(kernel), "sigma": 1.5, "num_scales": scales,
           "weights": list(weights)}
    if scales < len(MS_SSIM_WEIGHTS):
        out["note"] = (f"{scales} of MONAI's {len(MS_SSIM_WEIGHTS)} scales (volumes "
                       f"{fake.shape[1:4]}, window {kernel}); weights renormalised")
    return out


def _latent_section(samples, latents, reference_latents, scale_factor) -> dict:
    lat_dir = latents or os.path.join(samples, "latents")
    if not os.path.isdir(lat_dir):
        return {"skipped": f"no generated latents ({lat_dir} is not a folder)"}
    if reference_latents is None:
        return {"skipped": "no --reference_latents (a folder with latents.json from "
                           "ldm-jax extract)"}
    ref, meta = read_reference_latents(reference_latents)
    out = latent_distances(read_sample_latents(lat_dir, scale_factor), ref)
    ref_scale = meta.get("scale_factor")
    out.update(samples_path=os.path.abspath(lat_dir),
               reference_path=os.path.abspath(reference_latents),
               scale_factor_divided=float(scale_factor), reference_scale_factor=ref_scale)
    # Generated latents still multiplied by scale_factor have ~scale_factor times the
    # reference's spread: say so rather than report a meaningless distance silently.
    # "~": nearer scale_factor than 1 on a log scale (with scale_factor 1.25 a spread
    # ratio of 1.02 is unscaled latents, not scaled ones).
    ratio = out["samples"]["std"] / max(out["reference"]["std"], 1e-12)
    log_ratio = np.log(max(ratio, 1e-12))
    if ref_scale and abs(ref_scale - 1) > 0.25 and (
            abs(log_ratio - np.log(ref_scale)) < 0.5 * abs(log_ratio)):
        out["note"] = (f"generated latents spread {ratio:.3g}x the reference's, about its "
                       f"scale_factor {ref_scale:.3g}: they look scaled; pass "
                       f"--latent_scale_factor {ref_scale:.6g}")
    return out


def evaluate(samples: str, reference: str, *, config: Optional[str] = None,
             features: str = "vgg16", num_slices: int = 16, seed: int = 0,
             value_range: Optional[Sequence[float]] = None, ms_ssim_kernel: int = 4,
             ms_ssim_num_scales: Optional[int] = None, max_pairs: int = 1000,
             latents: Optional[str] = None, reference_latents: Optional[str] = None,
             latent_scale_factor: float = 1.0, max_volumes: int = 0,
             max_voxels: int = 2_000_000, log: Callable[[str], Any] = print) -> dict:
    """All metrics of this module for a folder of generated volumes against a reference.

    Args:
        samples: folder (or glob) of generated .nii/.nii.gz/.npy volumes (X, Y, Z[, C]).
        reference: a folder of real volumes, or a config .py (its validation volumes).
        config: a config .py to preprocess a reference folder like validation data.
        features: "vgg16" | "alexnet". num_slices: K slices per axis and volume.
        value_range: (lo, hi) of the volumes' intensities; default: the config's
            (data.b_min, data.b_max), else the reference's (min, max).
        ms_ssim_kernel / ms_ssim_num_scales: MS-SSIM window, number of scales (None: as many
            of MONAI's 5 as fit). max_pairs: MS-SSIM pairs per set at most.
        latents: folder of generated latents (default SAMPLES/latents when it exists);
            reference_latents: a folder with latents.json; latent_scale_factor divides the
            generated latents (1 when they are already unscaled).
        max_volumes: use at most this many volumes per set (0: all).
        max_voxels: voxels per set for the Wasserstein distance (a seeded subsample).
    Returns:
        The result dict (JSON-ready; see the module docstring for each number); "notes"
        lists warnings and skipped metrics.
    Raises:
        ConfigError / DataError (ValueErrors) / FileNotFoundError with one-line messages.
    """
    if features not in FEATURE_NETS:
        raise ConfigError(f"--features {features!r} is not supported; use one of "
                          f"{list(FEATURE_NETS)}")
    if int(num_slices) < 1:
        raise ConfigError(f"--num_slices must be >= 1, got {num_slices}")
    if not float(latent_scale_factor) > 0:
        raise ConfigError(f"--latent_scale_factor must be > 0, got {latent_scale_factor}")
    for flag, folder in (("--latents", latents), ("--reference_latents", reference_latents)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder} is not a folder")
    fake, real, kind, cfg = _load_sets(samples, reference, config, max_volumes)
    log(f"{len(fake)} generated and {len(real)} reference volume(s) of shape "
        f"{fake.shape[1:]}.")
    lo, hi, range_from = _value_range(value_range, cfg, real)
    # MS-SSIM before the slice features: a bad --ms_ssim_scales fails before the slow part.
    ms_ssim = _ms_ssim_section(fake, real, int(ms_ssim_kernel), ms_ssim_num_scales, hi - lo,
                               max_pairs, seed, log)
    result = {
        "samples": {"path": os.path.abspath(samples), "num_volumes": len(fake),
                    "shape": list(fake.shape[1:])},
        "reference": {"path": os.path.abspath(reference), "kind": kind,
                      "num_volumes": len(real), "shape": list(real.shape[1:])},
        "value_range": [lo, hi], "value_range_from": range_from, "seed": int(seed),
        "frechet": _frechet_section(fake, real, features, int(num_slices), (lo, hi), log),
        "ms_ssim": ms_ssim,
        "intensity": intensity_distances(real, fake, max_voxels=max_voxels, seed=seed),
        "latent": _latent_section(samples, latents, reference_latents, latent_scale_factor),
    }
    notes = []
    for key, label in (("frechet", "slice FD"), ("ms_ssim", "MS-SSIM"), ("latent", "latent FD")):
        sec = result[key]
        for field in ("skipped", "warning", "note", "fd_volume_warning"):
            if field in sec:
                notes.append(f"{label}: {'skipped: ' if field == 'skipped' else ''}"
                             f"{sec[field]}")
    result["notes"] = notes
    return result


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) \
            else f"{v:.{digits}f}"
    return str(v)


def format_table(result: dict) -> str:
    """The result dict as a fixed-width table: metric | samples | reference | detail."""
    rows = [("metric", "samples", "reference", "detail")]
    fd = result.get("frechet", {})
    if "fd" in fd:
        rows.append((f"FD {fd['net']} slices (lower better)", _fmt(fd["fd"]), "",
                     f"N {fd['num']['samples']}/{fd['num']['reference']}, D {fd['dim']}, "
                     "per axis " + " ".join(f"{a}={_fmt(v, 2)}"
                                            for a, v in fd["per_axis"].items())))
    else:
        rows.append(("FD slices", "skipped", "", fd.get("skipped", "")))
    ms = result.get("ms_ssim", {})
    if "samples" in ms:
        s, r = ms["samples"], ms["reference"]
        rows.append(("MS-SSIM pairs (lower=diverse)", _fmt(s["mean"]), _fmt(r["mean"]),
                     f"pairs {s['num_pairs']}/{r['num_pairs']}, window "
                     f"{ms['kernel_size']}, {ms['num_scales']} scale(s)"))
    else:
        rows.append(("MS-SSIM pairs", "skipped", "", ms.get("skipped", "")))
    it = result["intensity"]
    rows.append(("intensity W1 (lower better)", _fmt(it["wasserstein1"]), "",
                 "intensity units"))
    rows.append(("histogram intersection (1=same)", _fmt(it["histogram_intersection"]), "",
                 f"{it['bins']} bins"))
    rows.append(("intensity mean / std", f"{_fmt(it['samples']['mean'])} / "
                 f"{_fmt(it['samples']['std'])}", f"{_fmt(it['real']['mean'])} / "
                 f"{_fmt(it['real']['std'])}", ""))
    lat = result.get("latent", {})
    if "fd_voxel" in lat:
        rows.append(("latent FD per voxel", _fmt(lat["fd_voxel"]), "",
                     f"latents {lat['num'][0]}/{lat['num'][1]}, C {lat['channels']}"))
        rows.append(("latent FD per volume", _fmt(lat["fd_volume"]), "",
                     lat.get("fd_volume_note", "")))
    else:
        rows.append(("latent FD", "skipped", "", lat.get("skipped", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
