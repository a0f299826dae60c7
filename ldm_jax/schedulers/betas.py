"""Noise schedules: the betas, alphas and alphas_cumprod of a discrete diffusion process.

Follows MONAI 1.6 `monai/networks/schedulers/scheduler.py` (`NoiseSchedules`): the same
formulas in float32, computed once on the host with numpy (they depend only on static
config), so a scheduler state holds constant arrays. torch's float32 `linspace` is
emulated (start + i*step for the first half, end - (n-1-i)*step for the second), and the
cumulative product is accumulated in float64 and rounded to float32, as torch does on
CPU; the results agree with MONAI to within one or two float32 ulp (torch's vectorised
linspace and cos round a few elements differently).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

F32 = np.float32


def linspace32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=float32) on the host: (num,) float32.

    torch computes in float32 from both ends towards the middle; rounding the result
    (DDPM/DDIM timesteps) then gives exactly torch's integers, which a float64 linspace
    does not for some `num` (e.g. linspace(999, 0, 7)).
    """
    a, b = F32(start), F32(end)
    if num == 1:
        return np.array([a], F32)
    step = F32((b - a) / F32(num - 1))
    i = np.arange(num)
    first = a + step * i.astype(F32)
    second = b - step * (num - 1 - i).astype(F32)
    return np.where(i < num // 2, first, second).astype(F32)


def linear_beta(num_train_timesteps: int, beta_start: float = 1e-4,
                beta_end: float = 2e-2) -> np.ndarray:
    """Linear betas (Ho et al. 2020): linspace(beta_start, beta_end, T), (T,) float32."""
    return linspace32(beta_start, beta_end, num_train_timesteps)


def scaled_linear_beta(num_train_timesteps: int, beta_start: float = 1e-4,
                       beta_end: float = 2e-2) -> np.ndarray:
    """Scaled linear betas (Stable Diffusion, MONAI LDM tutorials):
    linspace(sqrt(beta_start), sqrt(beta_end), T)**2, (T,) float32."""
    return linspace32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2


def sigmoid_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 sig_range: float = 6.0) -> np.ndarray:
    """Sigmoid betas: sigmoid(linspace(-sig_range, sig_range, T)) scaled to
    [beta_start, beta_end], (T,) float32."""
    x = linspace32(-sig_range, sig_range, num_train_timesteps)
    sig = (F32(1) / (F32(1) + np.exp(-x))).astype(F32)
    return (sig * F32(beta_end - beta_start) + F32(beta_start)).astype(F32)


def cosine(num_train_timesteps: int, s: float = 8e-3):
    """Cosine schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672).

    alphas_cumprod = cos(((t/T) + s) / (1 + s) * pi/2)**2 normalised to 1 at t=0; betas
    from consecutive ratios, clipped to [0, 0.999]. Returns (betas, alphas,
    alphas_cumprod), each (T,) float32, like MONAI's `_cosine_beta`.
    """
    T = num_train_timesteps
    x = linspace32(0, T, T + 1)
    arg = (x / F32(T) + F32(s)) / F32(1 + s) * F32(math.pi) * F32(0.5)
    # cos correctly rounded to float32 (torch's SLEEF cos differs by an ulp at some points).
    ac = np.cos(arg.astype(np.float64)).astype(F32) ** 2
    ac = (ac / ac[0]).astype(F32)
    betas = np.clip(F32(1) - ac[1:] / ac[:-1], F32(0.0), F32(0.999)).astype(F32)
    alphas = (F32(1) - betas).astype(F32)
    return betas, alphas, cumprod32(alphas)


def cumprod32(alphas: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64, rounded to float32 (torch CPU's)."""
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


# name -> function(num_train_timesteps, **args) returning betas or (betas, alphas, alphas_cumprod).
NOISE_SCHEDULES: dict[str, Callable] = {
    "linear_beta": linear_beta,
    "scaled_linear_beta": scaled_linear_beta,
    "sigmoid_beta": sigmoid_beta,
    "cosine": cosine,
}


def make_schedule(schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 2e-2, sig_range: float = 6.0):
    """(betas, alphas, alphas_cumprod), each (T,) float32 numpy, for a named schedule.

    Raises KeyError for an unknown name (schedulers validate names before calling this).
    """
    fn = NOISE_SCHEDULES[schedule]
    if schedule == "cosine":
        out = fn(num_train_timesteps)
    elif schedule == "sigmoid_beta":
        out = fn(num_train_timesteps, beta_start, beta_end, sig_range)
    else:
        out = fn(num_train_timesteps, beta_start, beta_end)
    if isinstance(out, tuple):
        return out
    alphas = (F32(1) - out).astype(F32)
    return out, alphas, cumprod32(alphas)
