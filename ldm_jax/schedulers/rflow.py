"""Rectified flow scheduler (Liu et al. 2022, https://arxiv.org/abs/2209.03003), as MAISI uses it.

Follows MONAI 1.6 `monai/networks/schedulers/rectified_flow.py` (itself from Open-Sora):
continuous time t in [0, T], x_t = (1 - t/T) x0 + (t/T) noise, the model predicts the
velocity x0 - noise, and sampling is Euler steps from t = T down to 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ldm_jax.schedulers.base import (
    check_bool,
    check_choice,
    check_int,
    check_num_inference_steps,
    check_number,
    expand_right,
    following_timestep,
)

SAMPLE_METHODS = ("uniform", "logit-normal")


@struct.dataclass
class RFlowState:
    """timesteps: (n,) descending, int32 (discrete) or float32 (continuous; values are
    float16-rounded as in MONAI). num_inference_steps: static Python int."""

    timesteps: jax.Array
    num_inference_steps: int = struct.field(pytree_node=False)


def timestep_transform(t, input_img_size_numel, base_img_size_numel=32 * 32 * 32, scale=1.0,
                       num_train_timesteps=1000, spatial_dim=3):
    """Shift timesteps towards the noisy end for volumes larger than the reference (MONAI's).

    With r = scale * (input_img_size_numel / base_img_size_numel) ** (1/spatial_dim) and
    s = t/T: returns T * r s / (1 + (r - 1) s). Works on Python numbers, numpy and jax
    arrays of any shape; t in [0, T] (timestep units), sizes in voxels.
    """
    t = t / num_train_timesteps
    ratio = (input_img_size_numel / base_img_size_numel) ** (1.0 / spatial_dim) * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_train_timesteps


@dataclasses.dataclass(frozen=True)
class RFlowScheduler:
    """Rectified flow scheduler, MONAI's `RFlowScheduler` in JAX (MONAI names and defaults).

    Args:
        num_train_timesteps: T, the time range [0, T] the model was trained on.
        use_discrete_timesteps: integer timesteps (training: truncated; inference: rounded).
        sample_method: training timestep distribution, "uniform" on [0, T) or
            "logit-normal" (T * sigmoid(N(loc, scale))).
        loc, scale: logit-normal parameters.
        use_timestep_transform: shift timesteps towards the noisy end for volumes larger
            than base_img_size_numel voxels (`timestep_transform`).
        transform_scale: extra factor of the transform's ratio. MONAI 1.6 stores but never
            uses it (its transform always has scale 1); here it is applied. Default 1.0
            gives MONAI's numbers.
        steps_offset: added to every inference timestep.
        base_img_size_numel: reference volume size X*Y*Z (voxels) of the transform.
        spatial_dim: 2 or 3, spatial axes of the samples (used by `set_timesteps`).
        monai_truncate_next_timestep: MONAI's `step` converts next_timestep with int(),
            so with continuous timesteps each Euler step is longer than the gap to the
            next scheduled timestep and the steps no longer sum to t_0 / T. The default
            (False) uses the exact next timestep; True reproduces MONAI 1.6.
        float32_transform: `set_timesteps` computes the transform in float32, as MONAI
            does when input_img_size_numel is a torch tensor (MAISI's scripts pass
            torch.prod(torch.tensor(latent.shape[-3:]))). False: float64, as MONAI with a
            Python int. The two can round a timestep to neighbouring float16 values (one
            of 50 steps at a 48^3 latent, for example).

    The model's prediction type is always "v_prediction" with velocity x0 - noise.

    Raises:
        ConfigError: invalid settings.
    """

    num_train_timesteps: int = 1000
    use_discrete_timesteps: bool = True
    sample_method: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    use_timestep_transform: bool = False
    transform_scale: float = 1.0
    steps_offset: int = 0
    base_img_size_numel: int = 32 * 32 * 32
    spatial_dim: int = 3
    monai_truncate_next_timestep: bool = False
    float32_transform: bool = False

    prediction_type = "v_prediction"  # class constant, not a field

    def __post_init__(self):
        T = check_int("num_train_timesteps", self.num_train_timesteps, 1)
        check_bool("use_discrete_timesteps", self.use_discrete_timesteps)
        check_choice("sample_method", self.sample_method, SAMPLE_METHODS)
        check_bool("use_timestep_transform", self.use_timestep_transform)
        check_bool("monai_truncate_next_timestep", self.monai_truncate_next_timestep)
        check_bool("float32_transform", self.float32_transform)
        check_int("steps_offset", self.steps_offset, 0, T - 1)
        check_int("base_img_size_numel", self.base_img_size_numel, 1)
        check_int("spatial_dim", self.spatial_dim, 2, 3)
        check_number("loc", self.loc)
        check_number("scale", self.scale, positive=True)
        check_number("transform_scale", self.transform_scale, positive=True)

    # -- state ---------------------------------------------------------------------------
    def create_state(self) -> RFlowState:
        """State with T inference steps (transform at the reference size, i.e. identity);
        call `set_timesteps` with the real step count and volume size before sampling."""
        empty = RFlowState(timesteps=jnp.zeros((0,), jnp.float32), num_inference_steps=0)
        return self.set_timesteps(empty, self.num_train_timesteps, self.base_img_size_numel)

    def set_timesteps(self, state: RFlowState, num_inference_steps: int,
                      input_img_size_numel: int | None = None) -> RFlowState:
        """Timesteps (1 - i/n) * T for i < n: rounded if discrete, transformed if enabled,
        rounded to float16 (MONAI stores them so), truncated to int if discrete, + offset.

        Args:
            num_inference_steps: n in [1, T].
            input_img_size_numel: X*Y*Z of the sampled volumes (voxels); required when
                use_timestep_transform is True.

        Raises:
            ConfigError: n out of range. ValueError: transform without input_img_size_numel.
        """
        T = self.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        ts = [(1.0 - i / n) * T for i in range(n)]
        if self.use_discrete_timesteps:
            ts = [int(round(t)) for t in ts]
        if self.use_timestep_transform:
            if input_img_size_numel is None:
                raise ValueError("RFlowScheduler.set_timesteps needs input_img_size_numel "
                                 "(X*Y*Z of the samples) when use_timestep_transform=True.")
            transform = self._transform_f32 if self.float32_transform else self._transform
            ts = [transform(t, input_img_size_numel, self.spatial_dim) for t in ts]
        arr = np.array(ts).astype(np.float16)
        if self.use_discrete_timesteps:
            arr = arr.astype(np.int64)
        arr = arr + arr.dtype.type(self.steps_offset)
        arr = arr.astype(np.int32 if self.use_discrete_timesteps else np.float32)
        return state.replace(timesteps=jax.device_put(arr), num_inference_steps=n)

    def set_timesteps_for(self, state: RFlowState, num_inference_steps: int,
                          sample_shape: tuple[int, ...]) -> RFlowState:
        """`set_timesteps` for sampling arrays of shape (B, X, Y, Z, C)."""
        return self.set_timesteps(state, num_inference_steps, math.prod(sample_shape[1:-1]))

    def _transform(self, t, numel, spatial_dim):
        return timestep_transform(t, numel, self.base_img_size_numel, self.transform_scale,
                                  self.num_train_timesteps, spatial_dim)

    def _transform_f32(self, t, numel, spatial_dim):
        # torch's float32 ops, one rounding each; its pow gives the correctly rounded root
        f, T = np.float32, self.num_train_timesteps
        s = f(t / T)
        root = f(np.float64(f(numel) / f(self.base_img_size_numel)) ** (1.0 / spatial_dim))
        r = f(root * f(self.transform_scale))
        return f(f(f(r * s) / f(f(1) + f((r - f(1)) * s))) * f(T))

    # -- training ------------------------------------------------------------------------
    def sample_timesteps(self, key: jax.Array, x_start: Any) -> jax.Array:
        """Training timesteps for x_start of shape (B, X, Y, Z, C) (only its shape is used).

        Returns (B,): int32 if discrete without transform, else float32, in [0, T).
        """
        B, T = x_start.shape[0], self.num_train_timesteps
        if self.sample_method == "uniform":
            t = jax.random.uniform(key, (B,), jnp.float32) * T
        else:
            z = self.loc + self.scale * jax.random.normal(key, (B,), jnp.float32)
            t = jax.nn.sigmoid(z) * T
        if self.use_discrete_timesteps:
            t = t.astype(jnp.int32)
        if self.use_timestep_transform:
            numel = math.prod(x_start.shape[1:-1])
            t = self._transform(t.astype(jnp.float32), numel, len(x_start.shape) - 2)
        return t

    def add_noise(self, state: RFlowState, original_samples: jax.Array, noise: jax.Array,
                  timesteps: jax.Array) -> jax.Array:
        """x_t = (1 - t/T) x0 + (t/T) noise; arrays (B, ...), timesteps (B,) or ()."""
        del state
        tp = 1 - jnp.asarray(timesteps).astype(jnp.float32) / self.num_train_timesteps
        tp = expand_right(tp, original_samples.ndim)
        return (tp * original_samples + (1 - tp) * noise).astype(original_samples.dtype)

    def training_target(self, state: RFlowState, original_samples: jax.Array, noise: jax.Array,
                        timesteps: jax.Array) -> jax.Array:
        """Velocity x0 - noise (the model is trained to output it), shape of the inputs."""
        del state, timesteps
        return original_samples - noise

    # -- sampling ------------------------------------------------------------------------
    def step(self, state: RFlowState, model_output: jax.Array, timestep, sample: jax.Array,
             key: jax.Array | None = None, *, next_timestep=None) -> tuple[jax.Array, jax.Array]:
        """One Euler step from t to next_timestep: x + v * (t - t_next) / T.

        Args:
            model_output: predicted velocity, (B, X, Y, Z, C).
            timestep: current t (scalar, may be traced).
            sample: x_t, (B, X, Y, Z, C).
            key: unused (deterministic), accepted for a uniform step signature.
            next_timestep: scalar (may be traced); None: step by T / num_inference_steps.

        Returns:
            (pred_post_sample, pred_original_sample = x + v * t / T), in sample's dtype.
        """
        del key
        t = jnp.asarray(timestep).astype(jnp.float32)
        if next_timestep is None:
            dt = 1.0 / state.num_inference_steps
        else:
            nt = jnp.asarray(next_timestep).astype(jnp.float32)
            if self.monai_truncate_next_timestep:
                nt = jnp.trunc(nt)
            dt = (t - nt) / self.num_train_timesteps
        post = sample + model_output * dt
        x0 = sample + model_output * t / self.num_train_timesteps
        return post.astype(sample.dtype), x0.astype(sample.dtype)

    def sampling_step(self, state, model_output, index, sample, key=None, **step_kwargs):
        """Step from state.timesteps[index] to the next scheduled timestep (0 after the last)."""
        nxt = following_timestep(state.timesteps, index, 0)
        return self.step(state, model_output, state.timesteps[index], sample, key,
                         next_timestep=nxt, **step_kwargs)
