"""DDIM sampling step and inversion (Song et al. 2021, https://arxiv.org/abs/2010.02502).

Follows MONAI 1.6 `monai/networks/schedulers/ddim.py` exactly, including its previous
timestep t - T // num_inference_steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.schedulers.base import (
    DiffusionState,
    DiscreteScheduler,
    check_bool,
    check_int,
    check_num_inference_steps,
    linspace_timesteps,
    step_noise,
)


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(DiscreteScheduler):
    """Denoising diffusion implicit model scheduler, MONAI's `DDIMScheduler` in JAX.

    Args (besides those of `DiscreteScheduler`):
        set_alpha_to_one: alphas_cumprod "before step 0" used by the last step: 1.0 if
            True, else alphas_cumprod[0].
        steps_offset: added to every inference timestep, in [0, T). steps_offset=1 with
            set_alpha_to_one=False is Stable Diffusion's choice.

    Raises:
        ConfigError: invalid settings.
    """

    set_alpha_to_one: bool = True
    steps_offset: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_bool("set_alpha_to_one", self.set_alpha_to_one)
        check_int("steps_offset", self.steps_offset, 0, self.num_train_timesteps - 1)

    def create_state(self) -> DiffusionState:
        """Schedule arrays with set_timesteps(T) applied, as MONAI's constructor does."""
        b, a, ac = self._schedule_arrays()
        final = jnp.ones((), jnp.float32) if self.set_alpha_to_one else ac[0]
        state = DiffusionState(betas=b, alphas=a, alphas_cumprod=ac, final_alpha_cumprod=final,
                               timesteps=jnp.zeros((0,), jnp.int32), num_inference_steps=0)
        return self.set_timesteps(state, self.num_train_timesteps)

    def set_timesteps(self, state: DiffusionState, num_inference_steps: int) -> DiffusionState:
        """linspace(T-1-steps_offset, 0, n).round() + steps_offset, (n,) int32.

        Raises:
            ConfigError: num_inference_steps not in [1, num_train_timesteps].
        """
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        ts = linspace_timesteps(self.num_train_timesteps, n, self.steps_offset)
        return state.replace(timesteps=ts, num_inference_steps=n)

    def _prev_offset(self, state):
        return self.num_train_timesteps // state.num_inference_steps

    def step(self, state: DiffusionState, model_output: jax.Array, timestep, sample: jax.Array,
             key: jax.Array | None = None, *, eta: float = 0.0,
             noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """One DDIM step x_t -> x_prev, prev = t - T // num_inference_steps (formula 12).

        Args:
            state: from `create_state` / `set_timesteps`.
            model_output: (B, X, Y, Z, C) model prediction of `prediction_type`.
            timestep: current t, int scalar (may be traced).
            sample: x_t, (B, X, Y, Z, C).
            key: PRNG key for the noise; needed only when eta is not the constant 0.
            eta: weight of the stochastic part (0: deterministic DDIM, 1: DDPM-like);
                may be traced.
            noise: (B, X, Y, Z, C) standard normal noise to use instead of drawing it.

        Returns:
            (pred_prev_sample, pred_original_sample), each (B, X, Y, Z, C) in sample's dtype.

        Raises:
            ValueError: eta may be non-zero and neither key nor noise is given.
        """
        t = jnp.asarray(timestep)
        prev_t = t - self._prev_offset(state)
        alpha_prod_t = state.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prod(state, prev_t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        x0, eps = self._x0_eps(model_output, sample, alpha_prod_t)
        x0 = self._clip(x0)
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
        prev_sample = alpha_prod_t_prev**0.5 * x0 + direction
        deterministic = isinstance(eta, (int, float)) and eta == 0
        if not deterministic:
            z = step_noise(key, noise, sample, "DDIMScheduler.step with eta > 0")
            prev_sample = prev_sample + jnp.where(eta > 0, variance**0.5 * eta * z, 0.0)
        return prev_sample.astype(sample.dtype), x0.astype(sample.dtype)

    def reversed_step(self, state: DiffusionState, model_output: jax.Array, timestep,
                      sample: jax.Array) -> tuple[jax.Array, jax.Array]:
        """DDIM inversion x_t -> x_next, next = t + T // num_inference_steps (Dhariwal &
        Nichol 2021 appendix F; MONAI's `reversed_step`).

        Shapes as `step`. Returns (pred_post_sample, pred_original_sample). A next
        timestep beyond T-1 uses alphas_cumprod[T-1] (MONAI raises IndexError there).
        """
        t = jnp.asarray(timestep)
        next_t = t + self._prev_offset(state)
        alpha_prod_t = state.alphas_cumprod[t]
        alpha_prod_t_next = self._alpha_prod(state, next_t)
        x0, eps = self._x0_eps(model_output, sample, alpha_prod_t)
        x0 = self._clip(x0)
        post = alpha_prod_t_next**0.5 * x0 + (1 - alpha_prod_t_next) ** 0.5 * eps
        return post.astype(sample.dtype), x0.astype(sample.dtype)

