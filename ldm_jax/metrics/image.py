"""Evaluation metrics on channels-last volumes `(B, X, Y, Z, C)`: one value per sample.

Pure jax (jittable; numpy inputs accepted), float32. SSIM follows MONAI's SSIMMetric
(`compute_ssim_and_cs`: gaussian window, valid region, no sample-covariance correction),
which with win_size=11 also equals skimage's structural_similarity(gaussian_weights=True,
sigma=1.5, use_sample_covariance=False). MS-SSIM follows MONAI's MultiScaleSSIMMetric
(`compute_ms_ssim`; Wang, Simoncelli & Bovik 2003).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _sample_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def mae(x, y) -> jax.Array:
    """Mean absolute error per sample, shape (B,)."""
    x, y = _f32(x), _f32(y)
    return jnp.mean(jnp.abs(x - y), axis=_sample_axes(x))


def psnr(x, y, data_range: float = 1.0) -> jax.Array:
    """10 log10(data_range^2 / MSE) per sample, shape (B,); +inf for identical samples."""
    x, y = _f32(x), _f32(y)
    mse = jnp.mean(jnp.square(x - y), axis=_sample_axes(x))
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def dice_score(x, y, threshold: float = 0.5) -> jax.Array:
    """Hard Dice of (x > threshold) vs (y > threshold) per sample, shape (B,).

    Two empty masks agree perfectly: 1.0 (not 0/0).
    """
    a = (_f32(x) > threshold).astype(jnp.float32)
    b = (_f32(y) > threshold).astype(jnp.float32)
    axes = _sample_axes(a)
    inter = jnp.sum(a * b, axis=axes)
    total = jnp.sum(a, axis=axes) + jnp.sum(b, axis=axes)
    return jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), 1.0)


def foreground_psnr(x, y, threshold: float, data_range: float = 1.0) -> jax.Array:
    """PSNR of `x` against `y` over the voxels where `y` > threshold, per sample, (B,).

    A reconstruction that is blank where the target has structure scores low here even
    when its whole-volume PSNR looks fine (sparse data). NaN for a sample whose target
    has no voxel above the threshold.
    """
    x, y = _f32(x), _f32(y)
    fg = (y > threshold).astype(jnp.float32)
    axes = _sample_axes(y)
    n = jnp.sum(fg, axis=axes)
    mse = jnp.sum(jnp.square(x - y) * fg, axis=axes) / jnp.maximum(n, 1.0)
    return jnp.where(n > 0, 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse), jnp.nan)


def constant_psnr(y, value=None, data_range: float = 1.0) -> jax.Array:
    """The PSNR a constant volume would score against `y`, per sample, (B,): `value`
    (e.g. the background, b_min: a blank output) or, with None, each sample's mean (the
    best constant: 10 log10(range^2 / variance))."""
    y = _f32(y)
    axes = _sample_axes(y)
    c = jnp.mean(y, axis=axes, keepdims=True) if value is None else jnp.float32(value)
    mse = jnp.mean(jnp.square(y - c), axis=axes)
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def foreground_fraction(x, threshold: float) -> jax.Array:
    """Fraction of voxels above `threshold`, per sample, (B,)."""
    return jnp.mean((_f32(x) > threshold).astype(jnp.float32), axis=_sample_axes(_f32(x)))


def gaussian_window(win_size: int, sigma: float) -> jax.Array:
    """Normalised 1D gaussian taps at offsets -(w-1)/2 .. (w-1)/2 (MONAI's gaussian_1d)."""
    d = jnp.arange(win_size, dtype=jnp.float32) - (win_size - 1) / 2.0
    g = jnp.exp(-0.5 * jnp.square(d / sigma))
    return g / jnp.sum(g)


def _filter_valid(x: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """Valid-region 1D correlation along `axis` as a weighted sum of shifted slices.

    Shifted slices (not a gather or an FFT) keep spatially sharded arrays sharded and
    fuse well; the window is small.
    """
    w = taps.shape[0]
    n = x.shape[axis] - w + 1
    out = taps[0] * jax.lax.slice_in_dim(x, 0, n, axis=axis)
    for i in range(1, w):
        out = out + taps[i] * jax.lax.slice_in_dim(x, i, i + n, axis=axis)
    return out


def ssim3d(x, y, data_range: float = 1.0, win_size: int = 7, sigma: float = 1.5,
           k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Mean 3D SSIM per sample, shape (B,), over channels and the valid region.

    Separable gaussian window (win_size taps, std sigma) over X, Y, Z. win_size=7 suits
    small volumes and latents; win_size=11 reproduces MONAI SSIMMetric's default.
    Every spatial size must be >= win_size.
    """
    x, y = _f32(x), _f32(y)
    if x.ndim != 5 or x.shape != y.shape:
        raise ValueError(
            f"ssim3d expects two (B, X, Y, Z, C) arrays of the same shape, got {x.shape} "
            f"and {y.shape}")
    if min(x.shape[1:4]) < win_size:
        raise ValueError(
            f"ssim3d window {win_size} is larger than the volume {x.shape[1:4]}; pass a "
            f"smaller odd win_size (e.g. 3)")
    return _ssim3d(x, y, float(data_range), int(win_size), float(sigma), float(k1),
                   float(k2))


def _ssim_cs_maps(x, y, data_range, win_size, sigma, k1, k2):
    """MONAI's compute_ssim_and_cs in channels-last: (ssim map, contrast-structure map),
    both over the valid region (each spatial size shrinks by win_size - 1)."""
    taps = gaussian_window(win_size, sigma)
    # One filtering pass over the five stacked statistics maps.
    stats = jnp.stack([x, y, x * x, y * y, x * y], axis=-1)
    for axis in (1, 2, 3):
        stats = _filter_valid(stats, taps, axis)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = (stats[..., i] for i in range(5))
    var_x = mu_xx - mu_x * mu_x
    var_y = mu_yy - mu_y * mu_y
    cov = mu_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    return ssim_map, cs_map


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _ssim3d(x, y, data_range, win_size, sigma, k1, k2):
    # Jitted so eager callers pay one compile, not one per shifted slice.
    ssim_map, _ = _ssim_cs_maps(x, y, data_range, win_size, sigma, k1, k2)
    return jnp.mean(ssim_map, axis=_sample_axes(ssim_map))


# MONAI MultiScaleSSIMMetric's default scale weights (Wang et al. 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_min_size(win_size: int, num_scales: int) -> int:
    """Smallest spatial size (voxels, every axis) that MS-SSIM with `num_scales` scales and
    a `win_size` window accepts: the coarsest scale, size // 2**(num_scales - 1), must hold
    one window. E.g. 5 scales: 16 * win_size (64 for win_size 4, 176 for MONAI's 11)."""
    return int(win_size) * 2 ** (int(num_scales) - 1)


def ms_ssim3d(x, y, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
              k1: float = 0.01, k2: float = 0.03, weights=MS_SSIM_WEIGHTS) -> jax.Array:
    """3D multi-scale SSIM per sample, shape (B,), float32, as MONAI's
    `MultiScaleSSIMMetric(spatial_dims=3, kernel_size=win_size, kernel_sigma=sigma,
    weights=weights)` in channels-last.

    At each of len(weights) scales the mean contrast-structure term (relu'd) is taken, then
    both volumes are 2x average-pooled (floor); the last scale uses the full SSIM instead.
    The result is prod(term_s ** weights[s]). Defaults are MONAI's (window 11, sigma 1.5,
    MONAI's five weights), which need every spatial size >= 176; smaller volumes need a
    smaller window or fewer weights (see ms_ssim_min_size).

    Raises:
        ValueError: different shapes, not 5D, or a spatial size below ms_ssim_min_size.
    """
    x, y = _f32(x), _f32(y)
    weights = tuple(float(w) for w in weights)
    if x.ndim != 5 or x.shape != y.shape:
        raise ValueError(
            f"ms_ssim3d expects two (B, X, Y, Z, C) arrays of the same shape, got {x.shape} "
            f"and {y.shape}")
    if not weights:
        raise ValueError("ms_ssim3d needs at least one scale weight")
    need = ms_ssim_min_size(win_size, len(weights))
    if min(x.shape[1:4]) < need:
        raise ValueError(
            f"MS-SSIM with {len(weights)} scales and window {win_size} needs every spatial "
            f"size >= {need}, got {x.shape[1:4]}; use a smaller window or fewer scales")
    return _ms_ssim3d(x, y, float(data_range), int(win_size), float(sigma), float(k1),
                      float(k2), weights)


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2x2 average pooling, stride 2, trailing odd voxels dropped (torch avg_pool3d(2))."""
    b, *spatial, c = x.shape
    half = [n // 2 for n in spatial]
    x = x[:, :2 * half[0], :2 * half[1], :2 * half[2]]
    x = x.reshape(b, half[0], 2, half[1], 2, half[2], 2, c)
    return jnp.mean(x, axis=(2, 4, 6))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _ms_ssim3d(x, y, data_range, win_size, sigma, k1, k2, weights):
    terms = []
    for s in range(len(weights)):
        ssim_map, cs_map = _ssim_cs_maps(x, y, data_range, win_size, sigma, k1, k2)
        last = s == len(weights) - 1
        m = ssim_map if last else cs_map
        terms.append(jax.nn.relu(jnp.mean(m, axis=_sample_axes(m))))
        if not last:
            x, y = _avg_pool2(x), _avg_pool2(y)
    w = jnp.asarray(weights, jnp.float32)
    return jnp.prod(jnp.stack(terms) ** w[:, None], axis=0)
