"""The whole denoising loop as one `jax.lax.fori_loop`, for any scheduler here.

The loop follows diffusers-flax / maxdiffusion pipelines: carry (sample, key), call the
model on (sample, timestep), let the scheduler step. It traces once, so it can sit under
`jax.jit` with the model parameters closed over by `model_fn` (or passed in by a caller's
own jitted function).
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def sample_loop(scheduler: Any, state: Any, model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                x_T: jax.Array, key: jax.Array | None = None,
                num_inference_steps: int | None = None, **step_kwargs) -> jax.Array:
    """Denoise x_T over state.timesteps with `scheduler.step`; returns x_0 (shape of x_T).

    Args:
        scheduler: a DDPMScheduler, DDIMScheduler or RFlowScheduler (static, hashable).
        state: its state (from `create_state`, optionally `set_timesteps`).
        model_fn: (x (B, X, Y, Z, C), t scalar) -> model output (B, X, Y, Z, C), or 2C
            channels for DDPM's learned variances. t is int32 (DDPM/DDIM, discrete RFlow) or
            float32 (continuous RFlow); broadcast it to (B,) inside. Classifier-free
            guidance belongs in model_fn.
        x_T: starting noise, (B, X, Y, Z, C).
        key: PRNG key, split once per step (DDPM, and DDIM with eta > 0); None for the
            deterministic samplers.
        num_inference_steps: if given, `set_timesteps` is applied first (static int; RFlow's
            timestep transform then uses X*Y*Z of x_T).
        step_kwargs: passed to every step, e.g. eta=0.5 for DDIM.

    Returns:
        The final sample, same shape and dtype as x_T.

    Raises:
        ConfigError: num_inference_steps out of range. ValueError: a stochastic step
        without a key.
    """
    if num_inference_steps is not None:
        state = scheduler.set_timesteps_for(state, num_inference_steps, x_T.shape)

    def body(i, carry):
        x, k = carry
        sub = None
        if k is not None:
            k, sub = jax.random.split(k)
        out = model_fn(x, state.timesteps[i])
        x, _ = scheduler.sampling_step(state, out, i, x, sub, **step_kwargs)
        return x, k

    x, _ = jax.lax.fori_loop(0, state.num_inference_steps, body, (x_T, key))
    return x
