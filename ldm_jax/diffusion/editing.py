"""Editing given volumes with a trained pipeline: inpainting, image-to-image (SDEdit),
likelihood and anomaly maps.

    pipe = ldm_jax.load_pipeline("runs/ldm")
    vols, lat = editing.inpaint(pipe, volumes, masks, jax.random.PRNGKey(0), steps=50,
                                jump_length=10, jump_n_sample=10)
    vols, lat = editing.sdedit(pipe, volumes, jax.random.PRNGKey(0), strength=0.5)
    maps, healthy, scores = editing.anomaly(pipe, volumes, jax.random.PRNGKey(0))

Volumes are encoded to the autoencoder's mean latents, multiplied by the run's
scale_factor and padded to the UNet's shape (as in training), edited in one jitted
loop per batch (`inpainting.make_inpainter`, `img2img.make_sdedit`), cropped, divided by
the scale factor and decoded. A batch drawn with `index` uses fold_in(rng, index), as
`Pipeline.sample_batch` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError


def check_volumes(pipe, volumes) -> np.ndarray:
    """`volumes` as (B, X, Y, Z, C) float32 of the size the autoencoder was trained on
    (the latents must be the UNet's). (X, Y, Z, C) is one volume. Raises ConfigError."""
    v = np.asarray(volumes, np.float32)
    if v.ndim == 4:
        v = v[None]
    want = tuple(int(s) for s in pipe.autoencoder.config.data.volume_size)
    c = int(pipe.autoencoder.in_channels)
    if v.ndim != 5 or v.shape[1:4] != want or v.shape[-1] != c:
        raise ConfigError(f"the input volume has shape {tuple(np.shape(volumes))}; this model "
                          f"edits volumes of {want} with {c} channel(s) (the autoencoder's "
                          "data.volume_size): crop or resample it first.")
    return v


def encode(pipe, volumes) -> jax.Array:
    """(B, X, Y, Z, C) volumes -> (B, *pipe.padded_shape, latent C) float32: the mean
    latents times scale_factor, zero-padded symmetrically (what the UNet was trained on)."""
    v = check_volumes(pipe, volumes)
    z = np.stack([pipe.autoencoder.encode_volume(x) for x in v]) * pipe.scale_factor
    return jnp.pad(jnp.asarray(z), ((0, 0), *pipe.pad, (0, 0)))


def _finish(pipe, z):
    from ldm_jax.diffusion.latent_space import crop

    lat = np.asarray(crop(z, pipe.pad)) / pipe.scale_factor
    return pipe.decode(lat), lat


def _cached(pipe, key, make):
    if key not in pipe._samplers:
        pipe._samplers[key] = make()
    return pipe._samplers[key]


def _conditions(pipe, n, class_label, context, steps, scheduler):
    class_label = pipe.check_request(steps, scheduler, class_label)
    labels = None if class_label is None else jnp.full((n,), int(class_label), jnp.int32)
    ctx = pipe.contexts_for(n, context)
    return labels, None if ctx is None else jnp.asarray(ctx)


def _controlnet_args(pipe, n, condition, conditioning_scale):
    args = pipe.controlnet_args(n, condition, conditioning_scale)
    return pipe.controlnet, args or {}


def controlnet_kind(pipe) -> str | None:
    """The condition kind a ControlNet run was trained on (`controlnet.condition.kind`:
    "foreground_mask", "inpainting", "files"), None without a ControlNet."""
    if pipe.controlnet is None:
        return None
    cn = pipe.config.get("controlnet") or {}
    return str((cn.get("condition") or {}).get("kind", "foreground_mask"))


def inpainting_condition(pipe, volumes, masks) -> np.ndarray:
    """An inpainting ControlNet's condition of `volumes` (B, X, Y, Z, C) and their holes
    `masks` (B, X, Y, Z) non-zero inside: (B, *condition grid, C + 1) float32, the
    volume blanked in the hole and the hole, as its training built them."""
    from ldm_jax.diffusion.condition import inpainting_condition as cond
    from ldm_jax.diffusion.condition import resample

    v = np.asarray(volumes, np.float32)
    return np.asarray(resample(cond(v, np.asarray(masks) != 0), pipe.condition_grid()))


def inpaint(pipe, volumes, masks, rng, index: int = 0, *, steps: int = 50,
            scheduler: str | None = None, jump_length: int = 1, jump_n_sample: int = 1,
            eta: float = 0.0, guidance_scale: float = 1.0, class_label: int | None = None,
            context=None, blend_width: float = 0.0, condition=None,
            conditioning_scale: float = 1.0, num_repeats: int = 1):
    """Fill the masked regions of `volumes`; keep the rest exactly.

    Args:
        volumes: (B, X, Y, Z, C) float32 in the data's intensity range (or one (X, Y, Z, C)).
        masks: (B, X, Y, Z) or (X, Y, Z) for all, non-zero where to fill.
        rng, index: the batch draws from fold_in(rng, index).
        jump_length, jump_n_sample: RePaint's resampling (1, 1: replace the known region).
        blend_width: voxels of the feathered seam inside the mask (`inpainting.blend`).
        condition: the ControlNet's or aligned-condition model's condition, for a run
            that has one; for an inpainting ControlNet run (`controlnet_kind`) or an
            inpainting UNet (`conditioning.aligned="inpainting"`) None builds it from
            `volumes` and `masks`.
        num_repeats: > 1 returns the mean of that many fills, fill r drawn from
            fold_in(fold_in(rng, index), r), and the mean of their latents: an estimate of
            the model's posterior mean, the fill of least expected squared error (smoother
            than one draw; benchmarks/EDITING.md measures both).
        Other keywords: as `Pipeline.sample_latents`.
    Returns (volumes (B, X, Y, Z, C_out), unscaled latents (B, x, y, z, C)), float32
    numpy; outside each mask the volumes are the input's voxels exactly.
    Raises ConfigError for volumes or masks of another shape, an empty or full mask, bad
    jump settings, num_repeats < 1 or any request `sample_latents` refuses.
    """
    from ldm_jax.diffusion.inpainting import blend, check_mask, latent_mask, make_inpainter
    from ldm_jax.diffusion.sampling import sampler_for

    if int(num_repeats) < 1:
        raise ConfigError(f"--num_repeats={num_repeats} must be >= 1 (fills averaged).")
    if int(num_repeats) > 1:
        key = jax.random.fold_in(rng, int(index))
        fills = [inpaint(pipe, volumes, masks, key, r, steps=steps, scheduler=scheduler,
                         jump_length=jump_length, jump_n_sample=jump_n_sample, eta=eta,
                         guidance_scale=guidance_scale, class_label=class_label,
                         context=context, blend_width=blend_width, condition=condition,
                         conditioning_scale=conditioning_scale)
                 for r in range(int(num_repeats))]
        # float64 sums of equal float32 values are exact: outside the mask the input's voxels
        return tuple(np.mean([f[i] for f in fills], axis=0, dtype=np.float64)
                     .astype(np.float32) for i in (0, 1))
    v = check_volumes(pipe, volumes)
    m = np.asarray(masks)
    m = np.broadcast_to(m, (v.shape[0], *m.shape[-3:])) if m.ndim == 3 else m
    if m.shape[0] != v.shape[0]:
        raise ConfigError(f"{m.shape[0]} masks for {v.shape[0]} volumes; give one mask per "
                          "volume or one for all.")
    m = np.stack([check_mask(mm, v.shape[1:4]) for mm in m])
    labels, ctx = _conditions(pipe, v.shape[0], class_label, context, steps, scheduler)
    if condition is None and controlnet_kind(pipe) == "inpainting":
        condition = inpainting_condition(pipe, v, m)
    if condition is None and pipe.aligned == "inpainting":
        from ldm_jax.diffusion.condition import inpainting_condition as cond
        condition = np.asarray(cond(v, m), np.float32)
    cn, cn_args = _controlnet_args(pipe, v.shape[0], condition, conditioning_scale)
    lm = np.stack([latent_mask(mm, pipe.latent_shape[:3]) for mm in m])
    lm = jnp.pad(jnp.asarray(lm), ((0, 0), *pipe.pad, (0, 0)))  # padding: known zeros
    key = ("inpaint", scheduler, int(steps), int(jump_length), int(jump_n_sample),
           float(guidance_scale), float(eta))
    fn = _cached(pipe, key, lambda: make_inpainter(
        pipe.unet, sampler_for(pipe.config.scheduler, scheduler),
        shape=(*pipe.padded_shape, pipe.latent_shape[-1]), steps=steps,
        jump_length=jump_length, jump_n_sample=jump_n_sample, guidance_scale=guidance_scale,
        null_label=pipe.null_label, eta=eta, controlnet=cn,
        aligned=None if pipe.aligned is None else pipe.aligned_to_model))
    z = fn(pipe.params, jax.random.fold_in(rng, int(index)), encode(pipe, v), lm, labels, ctx,
           **cn_args)
    decoded, lat = _finish(pipe, z)
    out = np.stack([blend(d, x, mm, blend_width) for d, x, mm in zip(decoded, v, m)])
    return out, lat


def sdedit(pipe, volumes, rng, index: int = 0, *, strength: float = 0.5, steps: int = 50,
           scheduler: str | None = None, eta: float = 0.0, guidance_scale: float = 1.0,
           class_label: int | None = None, context=None, condition=None,
           conditioning_scale: float = 1.0):
    """Image-to-image: `volumes` (B, X, Y, Z, C) noised to `strength` in latent space and
    denoised (`img2img`). Returns (volumes (B, X, Y, Z, C_out), unscaled latents) float32
    numpy; strength 0 gives the autoencoder's reconstructions, 1 the samples
    `Pipeline.sample_batch(rng, index, B)` draws. Raises ConfigError as `inpaint` and for
    a strength outside [0, 1]."""
    from ldm_jax.diffusion.img2img import make_sdedit
    from ldm_jax.diffusion.sampling import sampler_for

    v = check_volumes(pipe, volumes)
    labels, ctx = _conditions(pipe, v.shape[0], class_label, context, steps, scheduler)
    cn, cn_args = _controlnet_args(pipe, v.shape[0], condition, conditioning_scale)
    key = ("sdedit", scheduler, int(steps), float(strength), float(guidance_scale), float(eta))
    fn = _cached(pipe, key, lambda: make_sdedit(
        pipe.unet, sampler_for(pipe.config.scheduler, scheduler),
        shape=(*pipe.padded_shape, pipe.latent_shape[-1]), steps=steps, strength=strength,
        guidance_scale=guidance_scale, null_label=pipe.null_label, eta=eta, controlnet=cn,
        aligned=None if pipe.aligned is None else pipe.aligned_to_model))
    z = fn(pipe.params, jax.random.fold_in(rng, int(index)), encode(pipe, v), labels, ctx,
           **cn_args)
    return _finish(pipe, z)


def likelihood_function(pipe, steps: int | None = None, decoder_term: bool = True):
    """The jitted `likelihood.make_likelihood` of this run's DDPM (made once; without the
    t = 0 term when not `decoder_term`). Raises ConfigError for a rectified-flow run,
    steps outside [1, T] or a model conditioned on aligned images."""
    from ldm_jax.diffusion.likelihood import make_likelihood
    from ldm_jax.diffusion.sampling import sampler_for

    if pipe.aligned is not None:
        raise ConfigError("likelihood maps take an unconditioned stage-2 run; this one is "
                          f"conditioned on aligned images (conditioning.aligned={pipe.aligned!r})"
                          "; pass the workdir of a run without conditioning.aligned.")
    if steps is not None:
        pipe.check_request(steps, "ddpm")
    return _cached(pipe, ("likelihood", steps, bool(decoder_term)), lambda: make_likelihood(
        pipe.unet, sampler_for(pipe.config.scheduler, "ddpm"), steps=steps,
        decoder_term=bool(decoder_term)))


def likelihood(pipe, volumes, rng, index: int = 0, *, steps: int | None = None,
               class_label: int | None = None, context=None, decoder_term: bool = True):
    """MONAI's `LatentDiffusionInferer.get_likelihood` (DDPM) of `volumes` (B, X, Y, Z, C).

    Returns (maps (B, X, Y, Z, 1) on the volume grid (nearest), latent maps (B, x, y, z)
    (the bound per latent voxel, summed over timesteps and channels), total_kl (B,)
    MONAI's score over the padded latent), float32 numpy. `steps`: None evaluates all T
    timesteps (MONAI's default), else `set_timesteps(steps)`'s. The noise is drawn from
    fold_in(rng, index); `decoder_term=False` leaves out the t = 0 term
    (`make_likelihood`). Raises ConfigError as `likelihood_function` and for volumes of
    another shape."""
    from ldm_jax.diffusion.latent_space import crop
    from ldm_jax.diffusion.likelihood import to_image_grid

    v = check_volumes(pipe, volumes)
    fn = likelihood_function(pipe, steps, decoder_term)
    labels, ctx = _conditions(pipe, v.shape[0], class_label, context, 1, "ddpm")
    total, kl = fn(pipe.params, jax.random.fold_in(rng, int(index)), encode(pipe, v), labels,
                   ctx)
    lat = np.asarray(crop(kl[..., None], pipe.pad))[..., 0]
    factor = [s // t for s, t in zip(v.shape[1:4], lat.shape[1:4])]
    return to_image_grid(lat, factor)[..., None], lat, np.asarray(total)


def anomaly(pipe, volumes, rng, index: int = 0, *, strength: float = 0.5,
            num_repeats: int = 1, steps: int = 50, scheduler: str | None = None,
            eta: float = 0.0, guidance_scale: float = 1.0, class_label: int | None = None,
            context=None):
    """Reconstruction-based anomaly map: the distance of each voxel to the model's
    "pseudo-healthy" version of the volume, as in Pinaya et al. 2022 ("Fast unsupervised
    brain anomaly detection and segmentation with diffusion models", latent DDPM noised to
    an intermediate step and denoised) and Wyatt et al. 2022 (AnoDDPM).

    Each volume is SDEdited `num_repeats` times at `strength` (`sdedit`, repeat k drawing
    from fold_in(fold_in(rng, index), k)); the mean of the repeats is the pseudo-healthy
    volume, and the map is |mean - input| summed over channels. benchmarks/EDITING.md
    ("Anomaly") measures it against the autoencoder's reconstruction error.

    Args:
        volumes: (B, X, Y, Z, C) float32 in the data's intensity range.
        strength: in (0, 1]; 0 would return the autoencoder's own reconstruction error.
        num_repeats: >= 1 SDEdit draws averaged.
    Returns (maps (B, X, Y, Z, 1), pseudo-healthy volumes (B, X, Y, Z, C_out), scores (B,)
    the mean of each map), float32 numpy, in the data's intensity units.
    Raises ConfigError as `sdedit`, and for num_repeats < 1.
    """
    if int(num_repeats) < 1:
        raise ConfigError(f"--num_repeats={num_repeats} must be >= 1 (SDEdit draws averaged).")
    v = check_volumes(pipe, volumes)
    key = jax.random.fold_in(rng, int(index))
    healthy = np.mean([sdedit(pipe, v, key, k, strength=strength, steps=steps,
                              scheduler=scheduler, eta=eta, guidance_scale=guidance_scale,
                              class_label=class_label, context=context)[0]
                       for k in range(int(num_repeats))], axis=0).astype(np.float32)
    maps = np.abs(healthy - v).sum(-1, keepdims=True).astype(np.float32)
    return maps, healthy, maps.reshape(len(v), -1).mean(1)


def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Starts of patches of `patch` voxels every `stride` along an axis of `size`, the
    last flush with the end, so every voxel is covered. Raises ConfigError unless
    1 <= patch < size and stride >= 1."""
    if not 1 <= int(patch) < int(size) or int(stride) < 1:
        raise ConfigError(f"--patch={patch} must be in [1, {int(size) - 1}] (smaller than the "
                          f"volume's {size} voxels: the rest is the context) and --stride="
                          f"{stride} >= 1.")
    starts = list(range(0, int(size) - int(patch) + 1, int(stride)))
    return starts + ([int(size) - int(patch)] if starts[-1] + int(patch) < int(size) else [])


def patched_anomaly(pipe, volumes, rng, index: int = 0, *, patch=16, stride=8,
                    num_repeats: int = 1, steps: int = 50, scheduler: str | None = None,
                    eta: float = 0.0, guidance_scale: float = 1.0,
                    return_spread: bool = False):
    """Inpainting-based anomaly map (patched diffusion, Behrendt et al. 2023, "Patched
    Diffusion Models for Unsupervised Anomaly Detection in Brain MRI", arXiv:2303.03758):
    each box of `patch` voxels (an int or one per axis) every `stride` voxels is blanked
    and inpainted from the rest of the volume (`inpaint`, replace-known, `num_repeats`
    fills); the pseudo-healthy volume is the mean of the fills of the boxes that cover a
    voxel, and the map is |pseudo-healthy - input| summed over channels (as `anomaly`'s).
    What the context predicts (a filament running through) scores low; what it cannot
    (an object inside the box) scores high. Needs an inpainting model (an inpainting UNet
    or ControlNet run: the fill is conditioned on the blanked input).

    Args:
        volumes: (B, X, Y, Z, C) float32 in the data's intensity range.
        rng, index: box j, repeat r draws from fold_in(fold_in(fold_in(rng, index), j), r).
    Returns (maps (B, X, Y, Z, 1), pseudo-healthy volumes (B, X, Y, Z, C), scores (B,)
    the mean of each map), float32 numpy, in the data's intensity units; with
    `return_spread` also the standard deviation of the fills per voxel (B, X, Y, Z, C).
    Raises ConfigError for a model that is not an inpainting one, patch or stride out of
    range, num_repeats < 1, or anything `inpaint` refuses.
    """
    if "inpainting" not in (pipe.aligned, controlnet_kind(pipe)):
        raise ConfigError("inpainting-based anomaly maps need an inpainting model (a run of "
                          "configs/diffusion/inpainting_4x.py or controlnet_inpaint_4x.py).")
    if int(num_repeats) < 1:
        raise ConfigError(f"--num_repeats={num_repeats} must be >= 1 (fills averaged).")
    v = check_volumes(pipe, volumes)
    grid = v.shape[1:4]
    p = (int(patch),) * 3 if np.ndim(patch) == 0 else tuple(int(x) for x in patch)
    s = (int(stride),) * 3 if np.ndim(stride) == 0 else tuple(int(x) for x in stride)
    starts = [patch_starts(n, pp, ss) for n, pp, ss in zip(grid, p, s)]
    total = np.zeros(v.shape, np.float64)
    total_sq = np.zeros(v.shape, np.float64)
    count = np.zeros(grid, np.float64)
    key = jax.random.fold_in(rng, int(index))
    for j, corner in enumerate(np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, 3)):
        box = np.zeros(grid, bool)
        box[tuple(slice(c, c + pp) for c, pp in zip(corner, p))] = True
        kj = jax.random.fold_in(key, j)
        for r in range(int(num_repeats)):
            fill = inpaint(pipe, v, box, kj, r, steps=steps, scheduler=scheduler, eta=eta,
                           guidance_scale=guidance_scale)[0][:, box].astype(np.float64)
            total[:, box] += fill
            total_sq[:, box] += fill ** 2
        count[box] += int(num_repeats)
    mean = total / count[None, ..., None]
    healthy = mean.astype(np.float32)
    maps = np.abs(healthy - v).sum(-1, keepdims=True).astype(np.float32)
    out = (maps, healthy, maps.reshape(len(v), -1).mean(1))
    if return_spread:
        spread = np.sqrt(np.maximum(total_sq / count[None, ..., None] - mean ** 2, 0.0))
        out += (spread.astype(np.float32),)
    return out
