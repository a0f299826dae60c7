"""Aligned conditions: what an instrument sees of a volume, computed from it, and brought
to the diffusion UNet's input grid.

`conditioning.aligned` picks the condition a model is trained on (computed on the fly
from each training volume after its random crop and flips, so it stays aligned):
- "projection": the volume reduced along `conditioning.projection.axis` (sum / max /
  mean), optionally through a depth-dependent point-spread (`psf`): "defocus" blurs a
  plane at depth u by sigma0 * sqrt(1 + (u / d)^2), "astigmatic" by sigma_x(u) = sigma0 *
  sqrt(1 + ((u - g) / d)^2) and sigma_y(u) = sigma0 * sqrt(1 + ((u + g) / d)^2) (the
  cylindrical-lens model of 3D SMLM, Huang et al. 2008, Science 319:810), u in voxels
  from the focal plane (`focal_plane` voxels from the volume's middle plane; 0: the
  middle, where a plane above and one below blur alike), sigma0 = `psf_sigma`, g =
  `astigmatism`, d = `depth_of_focus`. Then a depth-independent `blur`, min-max
  normalisation per volume and channel (`normalize`) and Gaussian read noise (`noise`,
  in normalised units).
  A plain sum of an isotropic volume carries no depth: the point-spread is the depth cue.
  The condition grid is the volume grid with 1 on the projection axis.
- "coarse": the block mean by `conditioning.coarse.factor` (an int or one per axis), a
  Gaussian `blur` (sigma in coarse voxels) and Gaussian `noise` (intensity units).
- "inpainting": the volume with a box set to 0, and the box (C + 1 channels on the volume
  grid: the masked image and mask of diffusers' inpainting UNets, the 9-channel input of
  Stable Diffusion's inpainting model). In training one box per volume, its side per axis
  uniform in `conditioning.inpainting.box_fraction` of the axis at a uniform position;
  without a key (validation, a volume given as `--condition`) the centred half of each
  axis. `ldm-jax edit --mode inpaint` builds it from each input and its mask.
A condition is float32, channels-last (B, X', Y', Z', C) with the data's channels C
(`condition_channels`: C + 1 for "inpainting").

`lift` brings a condition to the UNet's input grid (the latent grid; voxel space: the
volume grid), per axis: a finer condition is folded into channels (space-to-depth, so
nothing is averaged away), a coarser one repeated, the projection axis broadcast; a
projection also gets the normalised coordinate along its axis as one more channel (a
broadcast image is the same at every depth; the UNet needs to know where it is to put a
structure at the depth the point-spread says). The lifted condition is concatenated to
the UNet's noisy input (MONAI's `DiffusionInferer(mode="concat")`); the null condition of
classifier-free guidance is a zero condition (lifted as any other).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ldm_jax.errors import ConfigError

KINDS = ("projection", "coarse", "inpainting")
MODES = ("concat", "pooled")  # pooled: the original design's 2D CNN vector (projections)
REDUCES = ("sum", "max", "mean")
PSFS = ("none", "defocus", "astigmatic")


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import jax.numpy as jnp
    return jnp


def kind_of(config) -> str | None:
    """The aligned condition kind of a stage-2 config ("projection" | "coarse" |
    "inpainting") or None."""
    cond = config.get("conditioning") or {}
    return str(cond.get("aligned") or "") or None


def mode_of(config) -> str:
    return str((config.get("conditioning") or {}).get("aligned_mode", "concat") or "concat")


def _triple(v, what: str) -> tuple:
    t = tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * 3
    if len(t) != 3 or min(t) < 1:
        raise ConfigError(f"{what} must be a positive int or 3 of them, got {v!r}")
    return t


def aligned_problems(config, volume_grid=None) -> list[str]:
    """One-line problems of `conditioning.aligned` and its sections (empty when off).
    `volume_grid` (X, Y, Z), when known, is checked against the coarse factor."""
    kind = kind_of(config)
    if kind is None:
        return []
    cond = config.conditioning
    if kind not in KINDS:
        return [f"conditioning.aligned={kind!r} is not known; use 'projection', 'coarse', "
                "'inpainting' or '' (none)"]
    problems = []
    mode = mode_of(config)
    if mode not in MODES:
        problems.append(f"conditioning.aligned_mode={mode!r} is not known; use 'concat' or "
                        "'pooled'")
    if mode == "pooled" and kind != "projection":
        problems.append("conditioning.aligned_mode='pooled' (a 2D CNN embedding) takes 2D "
                        "projections only; use --config.conditioning.aligned_mode=concat")
    if kind == "inpainting":
        lo, hi = box_fraction(cond)
        if not 0 < lo <= hi <= 1:
            problems.append(f"conditioning.inpainting.box_fraction=({lo}, {hi}) must satisfy "
                            "0 < min <= max <= 1 (the box's side per axis, a fraction of it)")
    elif kind == "projection":
        p = cond.projection
        if int(p.get("axis", 2)) not in (0, 1, 2):
            problems.append(f"conditioning.projection.axis must be 0, 1 or 2, got {p.axis}")
        if str(p.get("reduce", "sum")) not in REDUCES:
            problems.append(f"conditioning.projection.reduce={p.reduce!r} is not known; use "
                            "'sum', 'max' or 'mean'")
        if str(p.get("psf", "none")) not in PSFS:
            problems.append(f"conditioning.projection.psf={p.psf!r} is not known; use 'none', "
                            "'defocus' or 'astigmatic'")
        for f in ("psf_sigma", "depth_of_focus"):
            if str(p.get("psf", "none")) != "none" and not float(p.get(f, 1.0)) > 0:
                problems.append(f"conditioning.projection.{f} must be > 0, got {p.get(f)}")
        for f in ("blur", "noise"):
            if float(p.get(f, 0.0)) < 0:
                problems.append(f"conditioning.projection.{f} must be >= 0, got {p.get(f)}")
    else:
        c = cond.coarse
        try:
            f = _triple(c.get("factor", 4), "conditioning.coarse.factor")
        except ConfigError as e:
            return problems + [str(e)]
        if volume_grid is not None and any(int(v) % k for v, k in zip(volume_grid, f)):
            problems.append(f"conditioning.coarse.factor={f} does not divide the volume size "
                            f"{tuple(volume_grid)}; choose a factor that divides every axis")
        for name in ("blur", "noise"):
            if float(c.get(name, 0.0)) < 0:
                problems.append(f"conditioning.coarse.{name} must be >= 0, got {c.get(name)}")
    return problems


def box_fraction(cond_cfg) -> tuple[float, float]:
    """(min, max) side of the "inpainting" kind's training boxes, a fraction per axis."""
    lo, hi = (cond_cfg.get("inpainting") or {}).get("box_fraction", (0.25, 0.75))
    return float(lo), float(hi)


def condition_channels(cond_cfg, channels: int) -> int:
    """Channels of the raw condition of volumes with `channels` channels."""
    return int(channels) + (str(cond_cfg.aligned) == "inpainting")


def condition_grid(cond_cfg, volume_grid: Sequence[int]) -> tuple:
    """(X', Y', Z') of the condition of a volume of `volume_grid` (see the module)."""
    g = [int(v) for v in volume_grid]
    kind = str(cond_cfg.aligned)
    if kind == "inpainting":
        return tuple(g)
    if kind == "projection":
        g[int(cond_cfg.projection.get("axis", 2))] = 1
        return tuple(g)
    f = _triple(cond_cfg.coarse.get("factor", 4), "conditioning.coarse.factor")
    return tuple(v // k for v, k in zip(g, f))


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 blur along one axis: row i holds a Gaussian of std `sigma` centred at
    i, normalised over the infinite line (mass that leaves the field of view is lost)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    m = np.arange(-4 * n, 4 * n + 1)
    norm = np.exp(-m ** 2 / (2 * sigma ** 2)).sum()
    return (np.exp(-d ** 2 / (2 * sigma ** 2)) / norm).astype(np.float32)


def psf_sigmas(p, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigma of the first in-plane axis, of the second), each (depth,) float64 voxels, of
    a plane at each depth index under `p.psf` (see the module docstring)."""
    u = np.arange(depth) - (depth - 1) / 2.0 - float(p.get("focal_plane", 0.0))
    s0, d = float(p.get("psf_sigma", 1.0)), float(p.get("depth_of_focus", 4.0))
    kind = str(p.get("psf", "none"))
    if kind == "none":
        return np.zeros(depth), np.zeros(depth)
    if kind == "defocus":
        s = s0 * np.sqrt(1 + (u / d) ** 2)
        return s, s
    g = float(p.get("astigmatism", 4.0))
    return s0 * np.sqrt(1 + ((u - g) / d) ** 2), s0 * np.sqrt(1 + ((u + g) / d) ** 2)


def _blur2d(img, sigma: float):
    """(B, n1, n2, C) -> the same, Gaussian blur of std `sigma` pixels on both axes."""
    if sigma <= 0:
        return img
    xp = _xp(img)
    g1 = _gaussian_matrix(img.shape[1], sigma)
    g2 = _gaussian_matrix(img.shape[2], sigma)
    return xp.einsum("ix,bxyc,jy->bijc", g1, img, g2)


def _normalize(p, axes):
    xp = _xp(p)
    lo = xp.min(p, axis=axes, keepdims=True)
    hi = xp.max(p, axis=axes, keepdims=True)
    return (p - lo) / xp.maximum(hi - lo, 1e-6)


def _noise(x, std: float, key):
    if std <= 0 or key is None:
        return x
    if isinstance(x, np.ndarray):
        import jax
        return x + std * np.asarray(jax.random.normal(key, x.shape), np.float32)
    import jax
    return x + std * jax.random.normal(key, x.shape, x.dtype)


def project(volumes, p):
    """(B, X, Y, Z, C) -> (B, X', Y', Z', C) with 1 on `p.axis`: the point-spread-blurred
    reduction along the axis, then `blur`, no normalisation and no noise. numpy or jax."""
    xp = _xp(volumes)
    axis = int(p.get("axis", 2))
    v = xp.moveaxis(volumes.astype(xp.float32), 1 + axis, 3)  # (B, n1, n2, depth, C)
    depth = v.shape[3]
    reduce = str(p.get("reduce", "sum"))
    if str(p.get("psf", "none")) != "none":
        s1, s2 = psf_sigmas(p, depth)
        g1 = np.stack([_gaussian_matrix(v.shape[1], s) for s in s1])  # (depth, n1, n1)
        g2 = np.stack([_gaussian_matrix(v.shape[2], s) for s in s2])
        planes = xp.einsum("kix,bxykc,kjy->bijkc", g1, v, g2)
    else:
        planes = v
    img = {"sum": xp.sum, "max": xp.max, "mean": xp.mean}[reduce](planes, axis=3)
    img = _blur2d(img, float(p.get("blur", 0.0)))
    return xp.expand_dims(img, 1 + axis)


def coarsen(volumes, c):
    """(B, X, Y, Z, C) -> (B, X/f, Y/f, Z/f, C): block mean by `c.factor`, then `c.blur`
    (Gaussian, sigma in coarse voxels), no noise. numpy or jax."""
    from ldm_jax.diffusion.condition import resample

    xp = _xp(volumes)
    f = _triple(c.get("factor", 4), "conditioning.coarse.factor")
    grid = tuple(int(s) // k for s, k in zip(volumes.shape[1:4], f))
    out = resample(volumes.astype(xp.float32), grid)
    sigma = float(c.get("blur", 0.0))
    if sigma > 0:
        g = [_gaussian_matrix(n, sigma) for n in grid]
        out = xp.einsum("ix,jy,kz,bxyzc->bijkc", *g, out)
    return out


def compute_condition(volumes, cond_cfg, key=None):
    """The condition (B, X', Y', Z', C) float32 of volumes (B, X, Y, Z, C) under
    `cond_cfg` (a stage-2 config's `conditioning`): see the module docstring. `key` (a jax
    PRNG key) draws the noise; None: noise-free (what consistency is measured with).
    numpy in -> numpy out; jax arrays are traceable."""
    kind = str(cond_cfg.aligned)
    if kind == "projection":
        p = cond_cfg.projection
        img = project(volumes, p)
        if bool(p.get("normalize", True)):
            img = _normalize(img, (1, 2, 3))
        return _noise(img, float(p.get("noise", 0.0)), key)
    if kind == "coarse":
        c = cond_cfg.coarse
        return _noise(coarsen(volumes, c), float(c.get("noise", 0.0)), key)
    if kind == "inpainting":
        from ldm_jax.diffusion import condition as cond_lib
        if key is None:
            hole = cond_lib.centre_box(volumes.shape[1:4])
            hole = _xp(volumes).broadcast_to(_xp(volumes).asarray(hole),
                                             (*volumes.shape[:4], 1))
        else:
            hole = cond_lib.random_boxes(key, volumes.shape[0], volumes.shape[1:4],
                                         *box_fraction(cond_cfg))
        return cond_lib.inpainting_condition(volumes, hole)
    raise ConfigError(f"conditioning.aligned={kind!r} is not known; use one of {list(KINDS)}")


def condition_from_array(a, cond_cfg, volume_grid: Sequence[int], channels: int):
    """One sample's condition (*condition grid, C) float32 from an array read from a file,
    or None when its shape is none of: a volume on `volume_grid` ((X, Y, Z[, C]): its
    condition is computed, noise-free), an array on the condition grid, or for a
    projection a 2D image (n1, n2[, C]) (min-max normalised when the config's are). For
    "inpainting" (condition grid = volume grid) C + 1 channels are a condition (the
    blanked volume and its mask), C a volume (its centre half is blanked)."""
    vg = tuple(int(v) for v in volume_grid)
    grid = condition_grid(cond_cfg, vg)
    a = np.asarray(a, np.float32)
    v = a[..., None] if a.ndim == 3 else a
    if str(cond_cfg.aligned) == "inpainting" and v.ndim == 4 and v.shape[:3] == vg:
        if v.shape[3] == condition_channels(cond_cfg, channels):
            return v
        return (np.asarray(compute_condition(v[None], cond_cfg)[0], np.float32)
                if v.shape[3] == int(channels) else None)
    if v.ndim == 4 and v.shape[:3] == vg:
        return np.asarray(compute_condition(v[None], cond_cfg)[0], np.float32)
    if v.ndim == 4 and v.shape[:3] == grid:
        return v
    if str(cond_cfg.aligned) == "projection":
        axis = int(cond_cfg.projection.get("axis", 2))
        plane = tuple(g for i, g in enumerate(grid) if i != axis)
        if a.shape[:2] == plane and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == channels)):
            a = np.expand_dims(a if a.ndim == 3 else a[..., None], axis)
            if bool(cond_cfg.projection.get("normalize", True)):
                a = _normalize(a[None], (1, 2, 3))[0]
            return a
    return None


def accepted_shapes(cond_cfg, volume_grid: Sequence[int]) -> str:
    """The shapes `condition_from_array` takes, in words."""
    vg = tuple(int(v) for v in volume_grid)
    grid = condition_grid(cond_cfg, vg)
    if str(cond_cfg.aligned) == "inpainting":
        return (f"{vg} with the data's channels (a volume: its centre half is blanked) or "
                "one channel more (the blanked volume, then the mask: 1 in the hole)")
    plane = tuple(g for i, g in enumerate(grid)
                  if i != int(cond_cfg.projection.get("axis", 2)))
    shapes = ([f"a 2D image {plane}"] if str(cond_cfg.aligned) == "projection" else []) + [
        f"{grid} (the condition grid)", f"{vg} (the volume grid)"]
    return " or ".join(shapes)


# ---------------------------------------------------------------------- to the UNet grid

def _axis_plan(cond_grid, unet_grid, proj_axis):
    """Per axis: ("keep" | "broadcast" | "fold" | "repeat", factor)."""
    plan = []
    for i, (g, u) in enumerate(zip(cond_grid, unet_grid)):
        if i == proj_axis:
            plan.append(("broadcast", u))
        elif g == u:
            plan.append(("keep", 1))
        elif g % u == 0:
            plan.append(("fold", g // u))
        elif u % g == 0:
            plan.append(("repeat", u // g))
        else:
            raise ConfigError(f"the condition grid {tuple(cond_grid)} and the UNet's input grid "
                              f"{tuple(unet_grid)} are not integer multiples on axis {i}; "
                              "choose a coarse factor (or volume size) that the autoencoder's "
                              "factor divides or is divided by")
    return plan


def lifted_channels(cond_cfg, volume_grid, unet_grid, channels: int) -> int:
    """Channels of `lift`'s output for this config, grids and condition channels."""
    grid = condition_grid(cond_cfg, volume_grid)
    axis = int(cond_cfg.projection.get("axis", 2)) if str(cond_cfg.aligned) == "projection" \
        else -1
    plan = _axis_plan(grid, unet_grid, axis)
    folded = math.prod(k for how, k in plan if how == "fold")
    return condition_channels(cond_cfg, channels) * folded + (axis >= 0)


def lift(c, cond_cfg, unet_grid: Sequence[int], pad=None):
    """Condition (B, X', Y', Z', C) -> (B, *unet_grid (padded by `pad`), C') float32 for
    concatenation with the UNet input (see the module docstring). numpy or jax."""
    xp = _xp(c)
    unet_grid = tuple(int(u) for u in unet_grid)
    axis = int(cond_cfg.projection.get("axis", 2)) if str(cond_cfg.aligned) == "projection" \
        else -1
    plan = _axis_plan(c.shape[1:4], unet_grid, axis)
    for i, (how, k) in enumerate(plan):
        ax = 1 + i
        if how == "fold":
            s = c.shape
            c = c.reshape(*s[:ax], s[ax] // k, k, *s[ax + 1:])
            c = xp.moveaxis(c, ax + 1, -1)
            c = c.reshape(*c.shape[:-2], c.shape[-2] * k)
        elif how == "repeat":
            c = xp.repeat(c, k, axis=ax)
        elif how == "broadcast":
            shape = list(c.shape)
            shape[ax] = k
            c = xp.broadcast_to(c, tuple(shape))
    if axis >= 0:
        u = unet_grid[axis]
        coord = xp.linspace(-1.0, 1.0, u, dtype=xp.float32) if u > 1 else xp.zeros(
            (1,), xp.float32)
        shape = [1, 1, 1, 1, 1]
        shape[1 + axis] = u
        coord = xp.broadcast_to(coord.reshape(shape), (*c.shape[:4], 1))
        c = xp.concatenate([c, coord.astype(c.dtype)], axis=-1)
    if pad is not None and any(lo or hi for lo, hi in pad):
        c = xp.pad(c, ((0, 0), *pad, (0, 0)))
    return c.astype(xp.float32)


def pooled_input(c, cond_cfg):
    """A projection (B, X', Y', Z', C) with 1 on its axis -> the 2D image (B, n1, n2, C)
    the pooled-embedding encoder takes."""
    xp = _xp(c)
    return xp.squeeze(c, axis=1 + int(cond_cfg.projection.get("axis", 2)))


def describe(cond_cfg, volume_grid) -> str:
    """One line: what the condition is and its grid."""
    grid = "x".join(map(str, condition_grid(cond_cfg, volume_grid)))
    if str(cond_cfg.aligned) == "projection":
        p = cond_cfg.projection
        psf = str(p.get("psf", "none"))
        focus = float(p.get("focal_plane", 0.0))
        where = f", focus {focus:g} voxels from the middle" if focus else ""
        cue = "no depth cue" if psf == "none" else f"{psf} point-spread (depth cue{where})"
        return (f"{p.get('reduce', 'sum')} projection along axis {p.get('axis', 2)} ({grid}), "
                f"{cue}, noise {p.get('noise', 0.0)}")
    if str(cond_cfg.aligned) == "inpainting":
        lo, hi = box_fraction(cond_cfg)
        return (f"volume with a box blanked and the box ({grid}; training boxes {lo:g}-{hi:g} "
                "of each axis)")
    c = cond_cfg.coarse
    return (f"coarse volume ({grid}, block mean by {c.get('factor', 4)}), blur "
            f"{c.get('blur', 0.0)}, noise {c.get('noise', 0.0)}")


def build_unet_for(config, volume_grid, latent_shape, channels: int):
    """The stage-2 model of `config`: MONAI's DiffusionModelUNet (`unet` section), with
    `lifted_channels` more input channels for a concat-conditioned model (its config's
    `unet.in_channels` stays the latent channels), or wrapped by the pooled-embedding
    encoder (`ldm_jax.models.pooled_condition`). `channels`: the condition's (the data's)."""
    from ldm_jax.models import build_unet

    if kind_of(config) is None:
        return build_unet(config.unet)
    if mode_of(config) == "pooled":
        from ldm_jax.models.pooled_condition import from_unet
        return from_unet(build_unet(config.unet))
    u = config.unet.copy_and_resolve_references()
    u.in_channels = int(u.in_channels) + lifted_channels(
        config.conditioning, volume_grid, tuple(latent_shape)[:3], channels)
    return build_unet(u)
