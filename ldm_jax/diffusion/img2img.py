"""Image-to-image (SDEdit): noise a volume's latents part of the way and denoise them.

Reference: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations" (arXiv:2108.01073); the strength rule is diffusers'
img2img pipelines': of `steps` inference timesteps, the last round-down(strength * steps)
are run, starting from the input's latents noised (`scheduler.add_noise`) to the first of
them. strength 0 runs none: the input's latents come back unchanged (decoded: the
autoencoder's reconstruction). strength 1 starts from pure noise drawn exactly as
`sampling.make_sampler` draws it, so it is the unconditional sample of the same key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError


def start_index(steps: int, strength: float) -> int:
    """Index into the scheduler's timesteps where SDEdit starts: steps - floor(strength *
    steps) (steps when strength is 0: nothing to denoise). Raises ConfigError unless
    0 <= strength <= 1."""
    s = float(strength)
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ConfigError(f"--strength={strength} must be in [0, 1] (0: the input's "
                          "reconstruction, 1: a new sample); e.g. --strength 0.5.")
    return int(steps) - min(math.floor(s * int(steps) + 1e-9), int(steps))


def make_sdedit(unet, scheduler, *, shape, steps: int, strength: float,
                guidance_scale: float = 1.0, null_label: int | None = None,
                eta: float = 0.0, controlnet=None, aligned=None):
    """A jitted `fn(params, key, z0, class_labels=None, context=None, cn_params=None,
    condition=None, conditioning_scale=1.0, aligned_condition=None) -> latents` (B,
    *shape) float32, scaled and padded like `z0` (the input's latents).

    Args: as `sampling.make_sampler`, plus `strength` in [0, 1] and `controlnet`,
    `aligned` (as `inpainting.make_inpainter`'s). Raises ConfigError for a strength outside [0, 1],
    steps out of range, guidance for an unconditional model.
    """
    from ldm_jax.diffusion.sampling import bind_controlnet, check_guidance, guided_model_fn

    state = scheduler.set_timesteps_for(scheduler.create_state(), int(steps), (1, *shape))
    start = start_index(int(steps), strength)
    g = check_guidance(unet, guidance_scale, null_label, aligned is not None)
    kwargs = {"eta": float(eta)} if type(scheduler).__name__ == "DDIMScheduler" else {}
    n = state.num_inference_steps

    def run(params, key, z0, class_labels=None, context=None, cn_params=None, condition=None,
            conditioning_scale=1.0, aligned_condition=None):
        z0 = jnp.asarray(z0, jnp.float32)
        if start == n:
            return z0
        k0, k1 = jax.random.split(key)  # make_sampler's split: strength 1 is its sample
        eps = jax.random.normal(k0, z0.shape, jnp.float32)
        if start == 0 and float(strength) == 1.0:
            x = eps
        else:
            t = jnp.broadcast_to(state.timesteps[start], (z0.shape[0],))
            x = scheduler.add_noise(state, z0, eps, t)
        model_fn = guided_model_fn(unet, params, g, null_label, class_labels, context,
                                   bind_controlnet(controlnet, cn_params, condition,
                                                   conditioning_scale),
                                   aligned_condition, aligned)

        def body(i, carry):
            x, k = carry
            k, sub = jax.random.split(k)
            out = model_fn(x, state.timesteps[i])
            x, _ = scheduler.sampling_step(state, out, i, x, sub, **kwargs)
            return x, k

        x, _ = jax.lax.fori_loop(start, n, body, (x, k1))
        return x

    return jax.jit(run)
