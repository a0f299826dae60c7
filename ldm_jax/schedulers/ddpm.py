"""DDPM sampling step (Ho et al. 2020, https://arxiv.org/abs/2006.11239).

Follows MONAI 1.6 `monai/networks/schedulers/ddpm.py`, with one deliberate difference in
the default: the previous timestep (see `DDPMScheduler`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ldm_jax.schedulers.base import (
    DiffusionState,
    DiscreteScheduler,
    check_bool,
    check_choice,
    following_timestep,
    linspace_timesteps,
    step_noise,
)

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


@dataclasses.dataclass(frozen=True)
class DDPMScheduler(DiscreteScheduler):
    """Denoising diffusion probabilistic model scheduler, MONAI's `DDPMScheduler` in JAX.

    Args (besides those of `DiscreteScheduler`: num_train_timesteps, schedule, beta_start,
    beta_end, sig_range, prediction_type, clip_sample, clip_sample_min/max):
        variance_type: "fixed_small" (posterior variance, clamped at 1e-20), "fixed_large"
            (beta_t), "learned" (the model's extra C output channels ARE the variance) or
            "learned_range" (variance = frac*beta_t + (1-frac)*posterior_variance with
            frac = (v+1)/2). As in MONAI, both learned types work on the variance itself,
            not its log (diffusers and Nichol & Dhariwal interpolate log-variances).
        monai_prev_timestep: previous timestep rule. MONAI 1.6's `step` always steps from t
            to t-1, which is wrong with fewer inference steps than T (the sample is moved
            one training step while the next model call is many steps further). The
            default (False) steps to t - T // num_inference_steps, as diffusers does after
            fixing the same bug, and `step` accepts an explicit `prev_timestep` (the
            sampling loop passes the next entry of state.timesteps, so the chain lands
            exactly where the model is next evaluated). True reproduces MONAI 1.6 exactly.
            With num_inference_steps == T both rules give the same numbers.

    Raises:
        ConfigError: invalid settings.
    """

    variance_type: str = "fixed_small"
    monai_prev_timestep: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        check_bool("monai_prev_timestep", self.monai_prev_timestep)

    def create_state(self) -> DiffusionState:
        """Schedule arrays and the full timestep list T-1, ..., 0 (num_inference_steps = T)."""
        b, a, ac = self._schedule_arrays()
        T = self.num_train_timesteps
        return DiffusionState(betas=b, alphas=a, alphas_cumprod=ac,
                              final_alpha_cumprod=jnp.ones((), jnp.float32),
                              timesteps=linspace_timesteps(T, T), num_inference_steps=T)

    def _variance(self, posterior_var, beta_t, predicted_variance):
        if self.variance_type == "fixed_small":
            return jnp.maximum(posterior_var, 1e-20)
        if self.variance_type == "fixed_large":
            return beta_t
        if predicted_variance is None:  # learned types without the extra channels
            return posterior_var
        if self.variance_type == "learned":
            return predicted_variance
        frac = (predicted_variance + 1) / 2
        return frac * beta_t + (1 - frac) * posterior_var

    def step(self, state: DiffusionState, model_output: jax.Array, timestep, sample: jax.Array,
             key: jax.Array | None = None, *, noise: jax.Array | None = None,
             prev_timestep=None) -> tuple[jax.Array, jax.Array]:
        """One reverse step x_t -> x_prev: posterior mean (formula 7) plus sigma * noise.

        Args:
            state: from `create_state` / `set_timesteps`.
            model_output: (B, X, Y, Z, C), or (B, X, Y, Z, 2C) for the learned variance
                types (model output, then the variance channels, on the last axis).
            timestep: current t, int scalar (may be traced).
            sample: x_t, (B, X, Y, Z, C).
            key: PRNG key for the noise (needed unless `noise` is given).
            noise: (B, X, Y, Z, C) standard normal noise to use instead of drawing it
                (for reproducing another implementation's draws).
            prev_timestep: int scalar (may be traced) to step to, -1 for the final step;
                None: t - T // num_inference_steps. Not allowed with monai_prev_timestep.

        Returns:
            (pred_prev_sample, pred_original_sample), each (B, X, Y, Z, C) in sample's
            dtype. No noise is added at t == 0.

        Raises:
            ValueError: neither key nor noise given; prev_timestep with monai_prev_timestep.
        """
        C = sample.shape[-1]
        predicted_variance = None
        if model_output.shape[-1] == 2 * C and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = model_output[..., :C], model_output[..., C:]
        t = jnp.asarray(timestep)
        if self.monai_prev_timestep:
            if prev_timestep is not None:
                raise ValueError("prev_timestep cannot be used with monai_prev_timestep=True.")
            prev_t = t - 1
        elif prev_timestep is None:
            prev_t = t - self.num_train_timesteps // state.num_inference_steps
        else:
            prev_t = jnp.asarray(prev_timestep)

        alpha_prod_t = state.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prod(state, prev_t)
        # One training step: the stored alpha/beta (MONAI's numbers); a skip of k steps:
        # the effective beta of the k-step transition, 1 - acp_t / acp_prev (diffusers).
        one_step = prev_t == t - 1
        alpha_t = jnp.where(one_step, state.alphas[t], alpha_prod_t / alpha_prod_t_prev)
        beta_t = jnp.where(one_step, state.betas[t], 1 - alpha_prod_t / alpha_prod_t_prev)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        x0, _ = self._x0_eps(model_output, sample, alpha_prod_t)
        x0 = self._clip(x0)
        x0_coeff = (alpha_prod_t_prev**0.5 * beta_t) / beta_prod_t
        xt_coeff = alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + xt_coeff * sample

        posterior_var = beta_prod_t_prev / beta_prod_t * beta_t
        var = self._variance(posterior_var, beta_t, predicted_variance)
        z = step_noise(key, noise, sample, "DDPMScheduler.step")
        prev_sample = prev_sample + jnp.where(t > 0, var**0.5 * z, 0.0)
        return prev_sample.astype(sample.dtype), x0.astype(sample.dtype)

    def sampling_step(self, state, model_output, index, sample, key=None, **step_kwargs):
        """Step from state.timesteps[index] to the next scheduled timestep (-1 after the
        last), or to t-1 with monai_prev_timestep=True."""
        if not self.monai_prev_timestep:
            prev = following_timestep(state.timesteps, index, -1)
            step_kwargs = {"prev_timestep": prev, **step_kwargs}
        return self.step(state, model_output, state.timesteps[index], sample, key, **step_kwargs)
