"""MAISI's released noise schedulers and inference settings, on our schedulers.

Source followed: NVIDIA-Medtech/NV-Generate-CTMR (MAISI) `configs/config_network_rflow.json`
and `configs/config_network_ddpm.json` (the `noise_scheduler` and
`mask_generation_noise_scheduler` entries), `configs/config_infer*.json` and
`configs/config_maisi_diff_model_*.json` (step counts, output sizes, guidance), and the
sampling loops of `scripts/diff_model_infer.py` / `scripts/utils_infer.py`:

- rflow (the v2 weights, `diff_unet_3d_rflow-*.pt`): MONAI `RFlowScheduler` with
  continuous timesteps and the timestep transform at the latent size
  (`input_img_size_numel = X*Y*Z` of the (1, 4, X, Y, Z) latent, 4x smaller per axis
  than the output); Euler steps to the next scheduled timestep, which MONAI truncates to
  int (`monai_truncate_next_timestep=True` reproduces the released volumes); the
  transform runs in float32 because the scripts pass the numel as a torch tensor
  (`float32_transform=True`).
  The released `"scale": 1.4` is the logit-normal scale, unused with uniform sampling.
- ddpm (the v1 weights, `diff_unet_3d_ddpm-ct.pt`, and the mask generator): MONAI
  `DDPMScheduler`, scaled_linear_beta 0.0015..0.0195, no clipping, epsilon prediction,
  fixed_small variance, sampled with all 1000 steps.

    sched, state = maisi_sampling("rflow-ct")                 # 30 steps at 256^3
    x0 = sample_loop(sched, state, model_fn, noise, key, num_inference_steps=30)
"""

from __future__ import annotations

import dataclasses
import math

from ldm_jax.errors import ConfigError
from ldm_jax.schedulers import DDPMScheduler, RFlowScheduler, build_scheduler

# The `noise_scheduler` entries of MAISI's network configs, MONAI names (`_target_` -> name).
MAISI_NOISE_SCHEDULERS = {
    "rflow": {"name": "rflow", "num_train_timesteps": 1000, "use_discrete_timesteps": False,
              "use_timestep_transform": True, "sample_method": "uniform", "scale": 1.4},
    "ddpm": {"name": "ddpm", "num_train_timesteps": 1000, "beta_start": 0.0015,
             "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False},
}

# Per axis, output voxels per latent voxel (AutoencoderKlMaisi with three levels).
LATENT_DOWNSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class MaisiSampling:
    """One released inference setting.

    Attributes:
        scheduler: key of MAISI_NOISE_SCHEDULERS.
        num_inference_steps: the config's `num_inference_steps`.
        output_size: (X, Y, Z) output voxels; the latent is output_size // 4 per axis.
        spacing: (X, Y, Z) mm, the UNet's spacing input.
        modality: class label (1 CT, 9 MR).
        cfg_guidance_scale: classifier-free guidance scale (0: none).
        source: the released config file it comes from.
    """

    scheduler: str
    num_inference_steps: int
    output_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modality: int
    cfg_guidance_scale: float
    source: str

    @property
    def latent_spatial_shape(self) -> tuple[int, int, int]:
        return tuple(s // LATENT_DOWNSAMPLE for s in self.output_size)


MAISI_SAMPLING = {
    "rflow-ct": MaisiSampling("rflow", 30, (256, 256, 256), (1.5, 1.5, 2.0), 1, 0.0,
                              "configs/config_infer.json"),
    "rflow-ct-512x512x768": MaisiSampling("rflow", 30, (512, 512, 768), (0.75, 0.75, 0.66667),
                                          1, 0.0, "configs/config_infer_80g_512x512x768.json"),
    "rflow-ct-diff-model": MaisiSampling("rflow", 30, (256, 256, 128), (1.7, 1.7, 2.0), 1, 0.0,
                                         "configs/config_maisi_diff_model_rflow-ct.json"),
    "rflow-mr": MaisiSampling("rflow", 30, (128, 256, 256), (1.25, 1.0, 1.0), 9, 15.0,
                              "configs/config_maisi_diff_model_rflow-mr.json"),
    "rflow-mr-brain": MaisiSampling("rflow", 30, (256, 256, 128), (0.94, 0.94, 1.36), 9, 2.0,
                                    "configs/config_maisi_diff_model_rflow-mr-brain.json"),
    "ddpm-ct": MaisiSampling("ddpm", 1000, (256, 256, 128), (1.0, 1.0, 0.75), 1, 0.0,
                             "configs/config_maisi_diff_model_ddpm-ct.json"),
}


def maisi_noise_scheduler(kind: str, *, monai_exact: bool = True) -> RFlowScheduler | DDPMScheduler:
    """Our scheduler for MAISI's released `noise_scheduler` definition.

    Args:
        kind: "rflow" (v2 weights) or "ddpm" (v1 weights and the mask generator).
        monai_exact: reproduce MONAI 1.6's stepping as MAISI samples with it
            (rflow: `monai_truncate_next_timestep`, and `float32_transform` for the
            float32 timestep transform MAISI's tensor numel gives; ddpm:
            `monai_prev_timestep`, which changes nothing at MAISI's 1000 steps). False:
            our exact rules.

    Returns:
        RFlowScheduler | DDPMScheduler.

    Raises:
        ConfigError: unknown kind.
    """
    if kind not in MAISI_NOISE_SCHEDULERS:
        raise ConfigError(f"MAISI noise scheduler {kind!r} is not known; use one of "
                          f"{sorted(MAISI_NOISE_SCHEDULERS)}.")
    exact = bool(monai_exact)
    flags = ({"monai_truncate_next_timestep": exact, "float32_transform": exact} if kind == "rflow"
             else {"monai_prev_timestep": exact})
    return build_scheduler(MAISI_NOISE_SCHEDULERS[kind], **flags)


def maisi_sampling(preset: str, *, output_size: tuple[int, ...] | None = None,
                   num_inference_steps: int | None = None, monai_exact: bool = True):
    """Scheduler and state set for sampling as a released MAISI inference config does.

    Args:
        preset: key of MAISI_SAMPLING.
        output_size: (X, Y, Z) output voxels, each divisible by 4; None: the preset's.
            Only rflow uses it (the timestep transform scales with the latent's X*Y*Z).
        num_inference_steps: None: the preset's.
        monai_exact: see `maisi_noise_scheduler`.

    Returns:
        (scheduler, state) with state.timesteps MAISI's (rflow: float32 holding
        float16-rounded values, descending; ddpm: int32 999..0).

    Raises:
        ConfigError: unknown preset, output_size not 3 positive multiples of 4, or a
            step count out of [1, 1000].
    """
    if preset not in MAISI_SAMPLING:
        raise ConfigError(f"MAISI sampling preset {preset!r} is not known; use one of "
                          f"{sorted(MAISI_SAMPLING)}.")
    p = MAISI_SAMPLING[preset]
    size = tuple(p.output_size if output_size is None else output_size)
    if len(size) != 3 or any(int(s) != s or s <= 0 or s % LATENT_DOWNSAMPLE for s in size):
        raise ConfigError(f"output_size={size} must be 3 positive multiples of "
                          f"{LATENT_DOWNSAMPLE} (the autoencoder's downsampling).")
    n = p.num_inference_steps if num_inference_steps is None else num_inference_steps
    sched = maisi_noise_scheduler(p.scheduler, monai_exact=monai_exact)
    state = sched.create_state()
    if isinstance(sched, RFlowScheduler):
        numel = math.prod(int(s) // LATENT_DOWNSAMPLE for s in size)
        return sched, sched.set_timesteps(state, n, input_img_size_numel=numel)
    return sched, sched.set_timesteps(state, n)
