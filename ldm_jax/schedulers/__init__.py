"""Noise schedulers for diffusion training and sampling: DDPM, DDIM, rectified flow.

Pure JAX with MONAI 1.6's numbers (`monai/networks/schedulers/`): a scheduler is a frozen
dataclass of settings, its arrays a pytree state from `create_state()`, every method a
pure function whose timesteps may be traced; `sample_loop` runs the whole denoising loop
as one `lax.fori_loop`.

    sched = build_scheduler(config.scheduler)            # or build_scheduler(name="ddim", ...)
    state = sched.create_state()
    t = sched.sample_timesteps(key, x0)                   # training
    loss = mse(model(sched.add_noise(state, x0, noise, t), t),
               sched.training_target(state, x0, noise, t))
    x0 = sample_loop(sched, state, model_fn, noise, key, num_inference_steps=50)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ldm_jax.errors import ConfigError
from ldm_jax.schedulers.base import DiffusionState, DiscreteScheduler, check_num_inference_steps
from ldm_jax.schedulers.betas import (
    NOISE_SCHEDULES,
    cosine,
    linear_beta,
    make_schedule,
    scaled_linear_beta,
    sigmoid_beta,
)
from ldm_jax.schedulers.ddim import DDIMScheduler
from ldm_jax.schedulers.ddpm import DDPMScheduler
from ldm_jax.schedulers.loop import sample_loop
from ldm_jax.schedulers.rflow import RFlowScheduler, RFlowState, timestep_transform

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "rflow": RFlowScheduler}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# Every field any scheduler reads (a config section holds them all; each scheduler takes
# its own and ignores the others). `prediction_type` is fixed for rflow (checked below).
ALL_FIELDS = set().union(*(_fields(c) for c in SCHEDULERS.values())) | {"prediction_type"}


def build_scheduler(sched_cfg: Any = None, /, **overrides: Any):
    """A scheduler from a config section and/or keyword arguments.

    Args:
        sched_cfg: ml_collections.ConfigDict or dict with `name` ("ddpm" | "ddim" |
            "rflow") and any scheduler fields: num_train_timesteps, schedule, beta_start,
            beta_end, sig_range, prediction_type, variance_type, clip_sample,
            clip_sample_min, clip_sample_max, set_alpha_to_one, steps_offset,
            use_timestep_transform, sample_method, use_discrete_timesteps,
            base_img_size_numel (and optionally loc, scale, transform_scale, spatial_dim,
            monai_prev_timestep, monai_truncate_next_timestep, float32_transform). Fields
            that the named scheduler does not use are ignored; missing or None ones take
            MONAI's defaults.
        overrides: fields given as keywords (they win over sched_cfg), e.g.
            build_scheduler(name="ddim", schedule="scaled_linear_beta").

    Returns:
        DDPMScheduler | DDIMScheduler | RFlowScheduler.

    Raises:
        ConfigError: unknown name or field, or any invalid value (one line).
    """
    fields = dict(sched_cfg.to_dict() if hasattr(sched_cfg, "to_dict") else (sched_cfg or {}))
    fields.update(overrides)
    fields = {k: v for k, v in fields.items() if v is not None}  # None: the default
    name = fields.pop("name", None)
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={name!r} is not known; use one of {list(SCHEDULERS)}.")
    unknown = sorted(set(fields) - ALL_FIELDS)
    if unknown:
        raise ConfigError(f"scheduler has unknown field(s) {unknown}; known: {sorted(ALL_FIELDS)}.")
    cls = SCHEDULERS[name]
    if name == "rflow" and fields.get("prediction_type", "v_prediction") != "v_prediction":
        raise ConfigError(
            f"scheduler.prediction_type={fields['prediction_type']!r} is not possible with "
            "rflow, whose model predicts the velocity x0 - noise; set it to 'v_prediction'.")
    return cls(**{k: v for k, v in fields.items() if k in _fields(cls)})


__all__ = [
    "ConfigError", "DDIMScheduler", "DDPMScheduler", "DiffusionState", "DiscreteScheduler",
    "NOISE_SCHEDULES", "RFlowScheduler", "RFlowState", "SCHEDULERS", "build_scheduler",
    "check_num_inference_steps",
    "cosine", "linear_beta", "make_schedule", "sample_loop", "scaled_linear_beta",
    "sigmoid_beta", "timestep_transform",
]
