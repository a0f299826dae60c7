"""Inpainting in latent space: fill a masked region of a volume, keep the rest.

Two variants of one jitted loop (`make_inpainter`):
- replace-known-region (`jump_n_sample=1`): before every denoising step the known latent
  voxels are replaced by the input's latents noised to the current timestep (fresh
  noise each step), and by the clean latents after the last step;
- RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion
  Probabilistic Models", arXiv:2201.09865; its `get_schedule_jump`, as diffusers'
  RePaintScheduler): the same, plus, every `jump_length` steps, the sample is noised
  back up `jump_length` steps (q(x_t | x_{t-k})) and denoised again, `jump_n_sample - 1`
  extra times, so the filled region harmonises with the known one.

Masks are volumes with 1 (True) where the region is to be filled. The latent mask is the
image mask max-pooled to the latent grid: a latent voxel whose footprint touches the
hole is generated, so no latent kept from the input carries the hole's content. After
decoding, `blend` pastes the decoded volume into the input: voxels outside the mask are
the input's exactly (max |delta| = 0); inside, within `width` voxels of the border, the
decoded volume is mixed in linearly with the distance (a feathered seam), beyond that it
is the decoded volume alone.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError


def repaint_schedule(n: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[tuple[int, bool]]:
    """The moves of RePaint's jump schedule over `n` inference steps: (index, up) pairs.

    `index` is the position in the scheduler's `timesteps` where the move starts; a down
    move denoises from timesteps[index] to the next scheduled one, an up move noises from
    there back to timesteps[index - 1]. jump_n_sample=1 gives the n plain down moves.
    Raises ConfigError for jump_length or jump_n_sample < 1.
    """
    if int(jump_length) < 1 or int(jump_n_sample) < 1:
        raise ConfigError(f"--jump_length={jump_length} and --jump_n_sample={jump_n_sample} "
                          "must be >= 1 (RePaint's resampling; 1 and 1: no resampling).")
    jumps = {j: int(jump_n_sample) - 1 for j in range(0, n - int(jump_length), int(jump_length))}
    t, times = n, []
    while t >= 1:  # RePaint's time t counts down from n - 1 to 0; -1 is the clean end
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(int(jump_length)):
                t += 1
                times.append(t)
    times.append(-1)
    return [(n - 1 - a, b > a) for a, b in itertools.pairwise(times)]


def _reached(scheduler, state, i):
    """The timestep a down move from index i lands on (-1: clean)."""
    name = type(scheduler).__name__
    ts = state.timesteps
    if name == "DDIMScheduler":
        return ts[i] - scheduler.num_train_timesteps // state.num_inference_steps
    if getattr(scheduler, "monai_prev_timestep", False):
        return ts[i] - 1
    n = ts.shape[0]
    return jnp.where(i + 1 < n, ts[jnp.minimum(i + 1, n - 1)], -1)


def _alpha_prod(state, t):
    return jnp.where(t >= 0, state.alphas_cumprod[jnp.maximum(t, 0)], state.final_alpha_cumprod)


def make_inpainter(unet, scheduler, *, shape, steps: int, jump_length: int = 1,
                   jump_n_sample: int = 1, guidance_scale: float = 1.0,
                   null_label: int | None = None, eta: float = 0.0, controlnet=None,
                   aligned=None):
    """A jitted `fn(params, key, z0, mask, class_labels=None, context=None,
    cn_params=None, condition=None, conditioning_scale=1.0, aligned_condition=None) ->
    latents` (B, *shape) float32 (scaled and padded, like `z0`).

    Args:
        unet, scheduler: the flax DiffusionModelUNet and a DDPM / DDIM (any variant) or,
            for jump_n_sample=1 only, RFlow scheduler.
        shape: (X, Y, Z, C) the UNet's input. steps: inference steps.
        jump_length, jump_n_sample: RePaint's resampling (1, 1: replace-known-region).
        guidance_scale, null_label, eta: as `make_sampler`.
        controlnet: None or a `ControlNet` module steering the UNet (its params and
            condition (B, X', Y', Z', C_cond) passed at call time).
        aligned: None or, for an aligned-condition UNet (e.g. an inpainting UNet,
            `conditioning.aligned="inpainting"`), `make_sampler`'s `aligned`: the raw
            conditions (B, X', Y', Z', C') are passed at call time.
    Call: z0 (B, *shape) the input's scaled, padded latents; mask (B, X, Y, Z, 1) or
    (X, Y, Z, 1) float, 1 where latents are generated. One program per (B, settings).

    Raises:
        ConfigError: RePaint with rectified flow, bad jump settings, guidance for an
            unconditional model.
    """
    from ldm_jax.diffusion.sampling import bind_controlnet, check_guidance, guided_model_fn

    moves = repaint_schedule(int(steps), jump_length, jump_n_sample)
    is_flow = type(scheduler).__name__ == "RFlowScheduler"
    if is_flow and int(jump_n_sample) > 1:
        raise ConfigError("RePaint's resampling (--jump_n_sample > 1) needs a DDPM/DDIM "
                          "model; for rectified flow use --jump_n_sample 1 (replace the "
                          "known region).")
    state = scheduler.set_timesteps_for(scheduler.create_state(), int(steps), (1, *shape))
    g = check_guidance(unet, guidance_scale, null_label, aligned is not None)
    kwargs = {"eta": float(eta)} if type(scheduler).__name__ == "DDIMScheduler" else {}
    idx = jnp.asarray([i for i, _ in moves], jnp.int32)
    up = jnp.asarray([u for _, u in moves])

    def known_at(z0, t, key):
        """The known latents noised to timestep t (t < 0: clean)."""
        noisy = scheduler.add_noise(state, z0, jax.random.normal(key, z0.shape), jnp.maximum(t, 0))
        return jnp.where(t >= 0, noisy, z0)

    def time_of(i):
        return jnp.where(i == 0, state.timesteps[0], _reached(scheduler, state, jnp.maximum(i - 1, 0)))

    def run(params, key, z0, mask, class_labels=None, context=None, cn_params=None,
            condition=None, conditioning_scale=1.0, aligned_condition=None):
        m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), z0.shape[:-1] + (1,))
        model_fn = guided_model_fn(unet, params, g, null_label, class_labels, context,
                                   bind_controlnet(controlnet, cn_params, condition,
                                                   conditioning_scale),
                                   aligned_condition, aligned)
        k0, key = jax.random.split(key)
        x = jax.random.normal(k0, z0.shape, jnp.float32)

        def down(x, i, key):
            k1, k2 = jax.random.split(key)
            x = m * x + (1 - m) * known_at(z0, time_of(i), k1)
            out = model_fn(x, state.timesteps[i])
            x, _ = scheduler.sampling_step(state, out, i, x, k2, **kwargs)
            return x

        def noise_up(x, i, key):  # from the timestep index i stands at, up to timesteps[i-1]
            a_to = _alpha_prod(state, state.timesteps[i - 1])
            a_from = _alpha_prod(state, time_of(i))
            r = a_to / a_from
            return jnp.sqrt(r) * x + jnp.sqrt(1 - r) * jax.random.normal(key, x.shape)

        def body(carry, move):
            x, key = carry
            key, sub = jax.random.split(key)
            i, u = move
            x = jax.lax.cond(u, noise_up, down, x, i, sub)
            return (x, key), None

        (x, _), _ = jax.lax.scan(body, (x, key), (idx, up))
        return m * x + (1 - m) * z0

    return jax.jit(run)


# ----------------------------------------------------------------------------------------
# Masks.


def parse_box(text: str, shape) -> tuple[slice, slice, slice]:
    """'x0:x1,y0:y1,z0:z1' (voxels, end exclusive, of the volume's X, Y, Z axes) -> slices.
    Raises ConfigError unless 0 <= a < b <= size on every axis."""
    parts = [p.strip() for p in str(text).split(",")]
    found = [re.fullmatch(r"(\d+):(\d+)", p) for p in parts]
    if len(parts) != 3 or not all(found):
        raise ConfigError(f"--box={text!r} must be three voxel ranges x0:x1,y0:y1,z0:z1 "
                          "(end exclusive), e.g. --box 4:12,4:12,2:6.")
    out = []
    for axis, (f, n) in enumerate(zip(found, shape)):
        a, b = int(f.group(1)), int(f.group(2))
        if not 0 <= a < b <= int(n):
            raise ConfigError(f"--box={text!r}: axis {'XYZ'[axis]} range {a}:{b} must satisfy "
                              f"0 <= start < end <= {n} (the volume is {tuple(shape)}).")
        out.append(slice(a, b))
    return tuple(out)


def box_mask(shape, box) -> np.ndarray:
    """(X, Y, Z) bool mask, True inside `box` (a 'x0:x1,...' string or three slices)."""
    sl = parse_box(box, shape) if isinstance(box, str) else tuple(box)
    m = np.zeros(tuple(int(s) for s in shape), bool)
    m[sl] = True
    return m


def check_mask(mask, shape, what: str = "--mask") -> np.ndarray:
    """A mask volume as (X, Y, Z) bool (True: fill), for a volume of spatial `shape`.
    Takes (X, Y, Z) or (X, Y, Z, 1), any dtype, True where != 0. Raises ConfigError for
    another shape, or a mask that is empty or covers the whole volume."""
    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ConfigError(f"{what} has shape {np.asarray(mask).shape}; it must be the volume's "
                          f"{tuple(shape)} (1 / non-zero where to fill).")
    m = m != 0
    if not m.any():
        raise ConfigError(f"{what} is empty: nothing to fill; mark the region with non-zero "
                          "voxels.")
    if m.all():
        raise ConfigError(f"{what} covers the whole volume: nothing is kept; that is "
                          "sampling (ldm-jax sample).")
    return m


def latent_mask(mask, latent_spatial) -> np.ndarray:
    """(X, Y, Z) image mask -> (x, y, z, 1) float32 latent mask: 1 where any image voxel
    of the latent voxel's footprint is masked (max-pool by X/x, Y/y, Z/z)."""
    m = np.asarray(mask, bool)
    f = [s // t for s, t in zip(m.shape, latent_spatial)]
    x, y, z = (int(t) for t in latent_spatial)
    m = m[:x * f[0], :y * f[1], :z * f[2]].reshape(x, f[0], y, f[1], z, f[2])
    return m.any(axis=(1, 3, 5)).astype(np.float32)[..., None]


def blend(decoded, original, mask, width: float = 0.0) -> np.ndarray:
    """The decoded volume pasted into the original inside `mask` (X, Y, Z) bool.

    Weight of the decoded volume: 0 outside the mask (the original's voxels exactly), and
    inside min(1, d / width) with d the Euclidean distance (voxels) to the nearest voxel
    outside the mask; width 0: 1 everywhere inside. decoded, original: (X, Y, Z, C)
    float; returns (X, Y, Z, C) float32."""
    from scipy import ndimage

    m = np.asarray(mask, bool)
    if float(width) > 0:
        w = np.minimum(1.0, ndimage.distance_transform_edt(m) / float(width))
    else:
        w = m.astype(np.float64)
    w = w.astype(np.float32)[..., None]
    out = w * np.asarray(decoded, np.float32) + (1 - w) * np.asarray(original, np.float32)
    return np.where(m[..., None], out, np.asarray(original, np.float32)).astype(np.float32)
