"""Stage-1 training losses: reconstruction, KL, PatchGAN least squares, denoising noise.

Why one module: the train step composes these, and each one must match a reference the
user may compare against (MONAI's tutorials and PatchAdversarialLoss), stay jittable with
traced steps/keys, and compute in float32 whatever the model's compute dtype is.
Arrays are channels-last `(B, X, Y, Z, C)`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError

RECON_LOSSES = ("l1", "mse", "weighted", "dice", "combined")
NOISE_MODES = ("gaussian", "dropout", "mixed")
# MONAI's PatchAdversarialLoss(criterion="least_squares") passes logits through
# LeakyReLU(0.05) before the MSE (no_activation_leastsq=False is its default).
LSGAN_NEGATIVE_SLOPE = 0.05


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def loss_problems(loss_cfg: Any) -> list[str]:
    """Every problem of a `config.loss` section that the functions below would reject at
    trace time, as one-line messages (empty when valid)."""
    problems = []
    recon = _get(loss_cfg, "recon", "l1")
    if recon not in RECON_LOSSES:
        problems.append(
            f"config.loss.recon={recon!r} is not a known reconstruction loss; valid: "
            f"{', '.join(RECON_LOSSES)} (e.g. --config.loss.recon=l1)")
    noise = _get(loss_cfg, "noise", None)
    if noise is not None and noise not in NOISE_MODES:
        problems.append(
            f"config.loss.noise={noise!r} is not a known noise mode; valid: None (no "
            f"denoising), {', '.join(NOISE_MODES)}")
    p = _get(loss_cfg, "noise_dropout", 0.0)
    if not 0.0 <= float(p) < 1.0:
        problems.append(f"config.loss.noise_dropout must be in [0, 1), got {p!r}")
    for name in ("noise_std", "fg_weight", "dice_smooth", "kl_weight", "adv_weight",
                 "perceptual_weight", "l1_weight", "mse_weight", "dice_weight"):
        v = _get(loss_cfg, name, 0.0)
        if v is not None and float(v) < 0:
            problems.append(f"config.loss.{name} must be >= 0, got {v!r}")
    frac = _get(loss_cfg, "perceptual_fraction", 0.25)
    if not 0.0 < float(frac) <= 1.0:
        problems.append(f"config.loss.perceptual_fraction must be in (0, 1], got {frac!r}")
    return problems


def check_loss_config(loss_cfg: Any) -> None:
    """Raises ConfigError (the first problem of `loss_problems`) for an invalid section."""
    problems = loss_problems(loss_cfg)
    if problems:
        raise ConfigError(problems[0])


# ---------------------------------------------------------------------------------------
# Reconstruction.

def l1_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(_f32(recon) - _f32(target)))


def mse_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(_f32(recon) - _f32(target)))


def weighted_l1_loss(recon: jax.Array, target: jax.Array, fg_weight: float = 10.0,
                     fg_threshold: float = 0.1) -> jax.Array:
    """L1 with foreground voxels (target > fg_threshold) weighted by fg_weight.

    Normalised by the sum of the weights, so the loss stays an average absolute error and
    its scale does not change with how much of the volume is foreground (thin filaments
    occupy ~1% of voxels: plain L1 lets the model predict empty volumes).
    """
    recon, target = _f32(recon), _f32(target)
    w = jnp.where(target > fg_threshold, jnp.float32(fg_weight), jnp.float32(1.0))
    return jnp.sum(w * jnp.abs(recon - target)) / jnp.sum(w)


def soft_dice_loss(recon: jax.Array, target: jax.Array, smooth: float = 1e-5) -> jax.Array:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) per sample, then the batch mean.

    Targets are assumed in [0, 1]. The decoder output is unbounded, so p is clipped to
    [0, 1]: with negative p the denominator can reach zero and the loss diverges to -inf
    (a degenerate optimum). Clipping zeroes the gradient outside [0, 1]; use "combined"
    (with an L1 term) when outputs may start far outside the range.
    """
    p = jnp.clip(_f32(recon), 0.0, 1.0)
    t = _f32(target)
    axes = tuple(range(1, p.ndim))
    inter = jnp.sum(p * t, axis=axes)
    denom = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return jnp.mean(1.0 - dice)


def reconstruction_loss(recon: jax.Array, target: jax.Array, loss_cfg: Any) -> jax.Array:
    """The reconstruction loss named by loss_cfg.recon (see RECON_LOSSES), a float32 scalar."""
    name = _get(loss_cfg, "recon", "l1")
    if name == "l1":
        return l1_loss(recon, target)
    if name == "mse":
        return mse_loss(recon, target)
    if name == "weighted":
        return weighted_l1_loss(recon, target, float(_get(loss_cfg, "fg_weight", 10.0)),
                                float(_get(loss_cfg, "fg_threshold", 0.1)))
    if name == "dice":
        return soft_dice_loss(recon, target, float(_get(loss_cfg, "dice_smooth", 1e-5)))
    if name == "combined":
        total = jnp.zeros((), jnp.float32)
        w_l1 = float(_get(loss_cfg, "l1_weight", 1.0))
        w_mse = float(_get(loss_cfg, "mse_weight", 0.0))
        w_dice = float(_get(loss_cfg, "dice_weight", 0.5))
        # Zero weights are skipped at trace time: no wasted reductions.
        if w_l1:
            total = total + w_l1 * l1_loss(recon, target)
        if w_mse:
            total = total + w_mse * mse_loss(recon, target)
        if w_dice:
            total = total + w_dice * soft_dice_loss(
                recon, target, float(_get(loss_cfg, "dice_smooth", 1e-5)))
        return total
    raise ConfigError(
        f"config.loss.recon={name!r} is not a known reconstruction loss; valid: "
        f"{', '.join(RECON_LOSSES)}")


# ---------------------------------------------------------------------------------------
# KL.

def kl_loss(z_mu: jax.Array, z_sigma: jax.Array) -> jax.Array:
    """0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1) over non-batch axes, mean over batch.

    The MONAI tutorials' form (a per-sample SUM: large, hence kl_weight ~1e-6).
    log sigma^2 is taken as 2 log(sigma) with sigma floored at 1e-30, which never binds for
    the model's sigma = exp(clip(logvar, -30, 20) / 2) >= 3e-7 but keeps log finite.
    """
    mu, sigma = _f32(z_mu), _f32(z_sigma)
    log_var = 2.0 * jnp.log(jnp.maximum(sigma, 1e-30))
    per_voxel = jnp.square(mu) + jnp.square(sigma) - log_var - 1.0
    axes = tuple(range(1, mu.ndim))
    return jnp.mean(0.5 * jnp.sum(per_voxel, axis=axes))


# ---------------------------------------------------------------------------------------
# PatchGAN least squares (MONAI PatchAdversarialLoss(criterion="least_squares")).

def _last_logits(outputs: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """The discriminator returns a list of feature maps with the logits last."""
    if isinstance(outputs, (list, tuple)):
        outputs = outputs[-1]
    return jax.nn.leaky_relu(_f32(outputs), negative_slope=LSGAN_NEGATIVE_SLOPE)


def generator_adv_loss(logits_fake: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """Generator side: mean((act(D(fake)) - 1)^2), act = LeakyReLU(0.05) as in MONAI."""
    return jnp.mean(jnp.square(_last_logits(logits_fake) - 1.0))


def discriminator_loss(logits_fake: jax.Array | Sequence[jax.Array],
                       logits_real: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """(loss(fake, target 0) + loss(real, target 1)) / 2, the MONAI tutorials' form."""
    loss_fake = jnp.mean(jnp.square(_last_logits(logits_fake)))
    loss_real = jnp.mean(jnp.square(_last_logits(logits_real) - 1.0))
    return 0.5 * (loss_fake + loss_real)


def adv_weight_at(step: jax.Array | int, loss_cfg: Any) -> jax.Array:
    """adv_weight from step adv_warmup_steps on, 0 before; works with a traced step."""
    warmup = int(_get(loss_cfg, "adv_warmup_steps", 0))
    weight = float(_get(loss_cfg, "adv_weight", 0.0))
    return jnp.where(jnp.asarray(step) >= warmup, jnp.float32(weight), jnp.float32(0.0))


# ---------------------------------------------------------------------------------------
# Denoising input corruption.

def add_noise(x: jax.Array, rng: jax.Array, loss_cfg: Any) -> jax.Array:
    """Corrupt the model INPUT for denoising training; the caller keeps the clean target.

    noise None: x unchanged. "gaussian": x + noise_std * N(0, 1). "dropout": each voxel
    zeroed with probability noise_dropout (no 1/(1-p) rescale: it mimics missing signal).
    "mixed": each sample gets one of the two, with probability 1/2 each.
    """
    mode = _get(loss_cfg, "noise", None)
    x = _f32(x)
    if mode is None:
        return x
    if mode not in NOISE_MODES:
        raise ConfigError(
            f"config.loss.noise={mode!r} is not a known noise mode; valid: None, "
            f"{', '.join(NOISE_MODES)}")
    std = float(_get(loss_cfg, "noise_std", 0.1))
    p = float(_get(loss_cfg, "noise_dropout", 0.1))
    k_gauss, k_drop, k_pick = jax.random.split(rng, 3)
    # Draw (B, rest) then reshape: XLA:CPU compiles threefry over a 5D shape several
    # times slower, and keeping the batch axis leaves data-parallel sharding intact.
    flat = (x.shape[0], x.size // max(x.shape[0], 1))

    def gaussian():
        return x + std * jax.random.normal(k_gauss, flat, jnp.float32).reshape(x.shape)

    def dropout():
        keep = jax.random.uniform(k_drop, flat).reshape(x.shape) >= p
        return jnp.where(keep, x, jnp.zeros_like(x))

    if mode == "gaussian":
        return gaussian()
    if mode == "dropout":
        return dropout()
    pick = jax.random.bernoulli(k_pick, 0.5, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(pick, gaussian(), dropout())
