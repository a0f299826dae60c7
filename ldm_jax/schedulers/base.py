"""What DDPM and DDIM share: the state pytree, noising, velocity, targets, x0 prediction.

A scheduler is a frozen dataclass of static settings (hashable, so it can close over or
be a static argument of a jitted function); its arrays live in a `DiffusionState`
(`flax.struct.dataclass`) made by `create_state()`. Every method is a pure function of
(state, arrays): no Python branch depends on a traced value, so timesteps may be traced
and a whole sampling loop can run under `jax.jit` (see `ldm_jax.schedulers.loop`).

Reference: MONAI 1.6 `monai/networks/schedulers/scheduler.py`; the state/step layout
follows diffusers-flax / maxdiffusion (`create_state`, `set_timesteps(state, n)`,
`step(state, model_output, t, sample, key)`). Arrays are channels-last, (B, X, Y, Z, C).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.errors import ConfigError
from ldm_jax.schedulers.betas import NOISE_SCHEDULES, linspace32, make_schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@struct.dataclass
class DiffusionState:
    """Arrays of a discrete (DDPM/DDIM) scheduler.

    betas, alphas, alphas_cumprod: (T,) float32. final_alpha_cumprod: () float32, the
    alphas_cumprod used before step 0 (1.0, or alphas_cumprod[0] for DDIM with
    set_alpha_to_one=False). timesteps: (num_inference_steps,) int32, descending.
    num_inference_steps: static Python int (changing it recompiles, as the loop length does).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    timesteps: jax.Array
    num_inference_steps: int = struct.field(pytree_node=False)


def expand_right(v: jax.Array, ndim: int) -> jax.Array:
    """(B,) or () -> (B, 1, ..., 1) with `ndim` axes (MONAI's unsqueeze_right)."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def following_timestep(timesteps: jax.Array, index, end) -> jax.Array:
    """timesteps[index + 1], or `end` after the last one (index may be traced)."""
    n = timesteps.shape[0]
    return jnp.where(index + 1 < n, timesteps[jnp.minimum(index + 1, n - 1)], end)


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """`v` as an int in [lo, hi]; ConfigError naming `scheduler.<name>` otherwise."""
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not ok or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"scheduler.{name} must be an int {rng}, got {v!r}.")
    return int(v)


def check_choice(name: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        raise ConfigError(f"scheduler.{name}={v!r} is not known; use one of {list(choices)}.")


def check_number(name: str, v: Any, positive: bool = False) -> None:
    """`v` a real number (> 0 if `positive`); ConfigError naming `scheduler.<name>` otherwise."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or (positive and not v > 0):
        what = "a number > 0" if positive else "a number"
        raise ConfigError(f"scheduler.{name} must be {what}, got {v!r}.")


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"scheduler.{name} must be True or False, got {v!r}.")


def check_num_inference_steps(n: Any, num_train_timesteps: int) -> int:
    """n as an int in [1, T]; ConfigError otherwise (a model trained on T steps has no more)."""
    T = num_train_timesteps
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= T:
        raise ConfigError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                          f"got {n!r}; the model was trained on {T} timesteps.")
    return int(n)


def linspace_timesteps(num_train_timesteps: int, n: int, steps_offset: int = 0) -> jax.Array:
    """MONAI's DDPM/DDIM timesteps: linspace(T-1-offset, 0, n).round() + offset, (n,) int32.

    Note (MONAI #8600 context): with offset 0 the first timestep is T-1, the last 0.
    """
    ts = np.round(linspace32(num_train_timesteps - 1 - steps_offset, 0, n)).astype(np.int64)
    # device_put, not jnp.asarray: no XLA program compiled per distinct n
    return jax.device_put((ts + steps_offset).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class DiscreteScheduler:
    """Settings shared by DDPM and DDIM (MONAI names and defaults).

    Args:
        num_train_timesteps: T, diffusion steps the model was trained with.
        schedule: "linear_beta" | "scaled_linear_beta" | "sigmoid_beta" | "cosine".
        beta_start, beta_end: beta range of the linear/scaled/sigmoid schedules
            (0 < beta_start < beta_end < 1; unused by "cosine").
        sig_range: sigmoid_beta input range [-sig_range, sig_range] (> 0).
        prediction_type: what the model predicts: "epsilon" (noise), "v_prediction"
            (velocity, Salimans & Ho 2022) or "sample" (x0).
        clip_sample: clip the predicted x0 to [clip_sample_min, clip_sample_max] in `step`.
            MONAI's default True suits images in [-1, 1]; latents usually want False.

    Raises:
        ConfigError: on any invalid setting (one line: what, expected, how to fix).
    """

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    sig_range: float = 6.0
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_min: float = -1.0
    clip_sample_max: float = 1.0

    def __post_init__(self):
        check_int("num_train_timesteps", self.num_train_timesteps, 1)
        check_choice("schedule", self.schedule, tuple(NOISE_SCHEDULES))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_bool("clip_sample", self.clip_sample)
        for name in ("beta_start", "beta_end", "clip_sample_min", "clip_sample_max"):
            check_number(name, getattr(self, name))
        check_number("sig_range", self.sig_range, positive=True)
        if self.schedule != "cosine":
            if not 0.0 < self.beta_start < self.beta_end < 1.0:
                raise ConfigError(
                    f"scheduler.beta_start={self.beta_start!r} and beta_end={self.beta_end!r} must "
                    f"satisfy 0 < beta_start < beta_end < 1 (e.g. 0.0015 and 0.0195).")
        if self.clip_sample and not self.clip_sample_min < self.clip_sample_max:
            raise ConfigError(
                f"scheduler.clip_sample_min={self.clip_sample_min!r} must be below "
                f"clip_sample_max={self.clip_sample_max!r}; swap them or set clip_sample=False.")

    # -- state ---------------------------------------------------------------------------
    def _schedule_arrays(self):
        b, a, ac = make_schedule(self.schedule, self.num_train_timesteps, self.beta_start,
                                 self.beta_end, self.sig_range)
        return jax.device_put((b, a, ac))

    def set_timesteps(self, state: DiffusionState, num_inference_steps: int) -> DiffusionState:
        """State with MONAI's inference timesteps: linspace(T-1, 0, n).round(), (n,) int32.

        Raises:
            ConfigError: num_inference_steps not in [1, num_train_timesteps].
        """
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        return state.replace(timesteps=linspace_timesteps(self.num_train_timesteps, n),
                             num_inference_steps=n)

    def set_timesteps_for(self, state: DiffusionState, num_inference_steps: int,
                          sample_shape: tuple[int, ...]) -> DiffusionState:
        """`set_timesteps` for sampling volumes of `sample_shape` (unused here; RFlow uses it)."""
        del sample_shape
        return self.set_timesteps(state, num_inference_steps)

    # -- training ------------------------------------------------------------------------
    def sample_timesteps(self, key: jax.Array, x_start: Any) -> jax.Array:
        """Training timesteps, uniform integers in [0, T): (B,) int32 for x_start (B, ...)."""
        return jax.random.randint(key, (x_start.shape[0],), 0, self.num_train_timesteps, jnp.int32)

    def _coefs(self, state, timesteps, ndim):
        ac = state.alphas_cumprod[jnp.asarray(timesteps)]
        return expand_right(ac**0.5, ndim), expand_right((1 - ac) ** 0.5, ndim)

    def add_noise(self, state: DiffusionState, original_samples: jax.Array, noise: jax.Array,
                  timesteps: jax.Array) -> jax.Array:
        """q(x_t | x_0): sqrt(acp_t) x0 + sqrt(1 - acp_t) noise.

        original_samples, noise: (B, ...) same shape; timesteps: (B,) or () int.
        Returns (B, ...) in original_samples' dtype (coefficients in float32).
        """
        sa, s1a = self._coefs(state, timesteps, original_samples.ndim)
        return (sa * original_samples + s1a * noise).astype(original_samples.dtype)

    def get_velocity(self, state: DiffusionState, sample: jax.Array, noise: jax.Array,
                     timesteps: jax.Array) -> jax.Array:
        """Velocity target v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0 (Salimans & Ho 2022).

        sample: x0 (B, ...); noise: same shape; timesteps: (B,) or (). Returns (B, ...).
        """
        sa, s1a = self._coefs(state, timesteps, sample.ndim)
        return (sa * noise - s1a * sample).astype(sample.dtype)

    def training_target(self, state: DiffusionState, original_samples: jax.Array,
                        noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """What the model is trained to output: noise ("epsilon"), velocity ("v_prediction")
        or x0 ("sample"). Shapes as `add_noise`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return original_samples
        return self.get_velocity(state, original_samples, noise, timesteps)

    # -- sampling helpers ----------------------------------------------------------------
    def _x0_eps(self, model_output, sample, alpha_prod_t):
        """(pred_original_sample before clipping, pred_epsilon), MONAI's formulas."""
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            return x0, model_output
        if self.prediction_type == "sample":
            return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        return x0, alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

    def _clip(self, x0):
        return jnp.clip(x0, self.clip_sample_min, self.clip_sample_max) if self.clip_sample else x0

    def _alpha_prod(self, state, t):
        """alphas_cumprod[t], or final_alpha_cumprod where t < 0 (t may be traced)."""
        t = jnp.asarray(t)
        safe = jnp.clip(t, 0, self.num_train_timesteps - 1)
        return jnp.where(t >= 0, state.alphas_cumprod[safe], state.final_alpha_cumprod)

    def sampling_step(self, state, model_output, index, sample, key=None, **step_kwargs):
        """The step the sampling loop takes at position `index` of state.timesteps."""
        return self.step(state, model_output, state.timesteps[index], sample, key, **step_kwargs)


def step_noise(key: jax.Array | None, noise: jax.Array | None, like: jax.Array,
               who: str) -> jax.Array:
    """The step's Gaussian noise: `noise` if given, else N(0, 1) drawn from `key`."""
    if noise is not None:
        return noise
    if key is None:
        raise ValueError(f"{who} adds noise: pass a PRNG key (or noise=) to step.")
    return jax.random.normal(key, like.shape, jnp.float32)
