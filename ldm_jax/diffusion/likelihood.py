"""The variational bound of latents under a DDPM model, per latent voxel: an anomaly map.

Reference: MONAI 1.6 `DiffusionInferer.get_likelihood` (`monai/inferers/inferer.py`),
after Ho et al. 2020 (arXiv:2006.11239, formulas 5-7) and Nichol & Dhariwal's improved
DDPM code (the discretised Gaussian decoder term). One noise draw eps for all timesteps;
for every t of the scheduler's timesteps: x_t = add_noise(x0, eps, t); the model's
x0-prediction (clipped as the scheduler clips) gives the predicted posterior mean; the
KL between q(x_{t-1} | x_t, x0) and p(x_{t-1} | x_t) with the posterior variance for
both (fixed_small, clamped at 1e-20; fixed_large: beta_t) -- or, at t = 0, minus the
log-likelihood of x0 under a Gaussian discretised into bins of width
(scaled range) / (original range) = 1/255 by default, with MONAI's tanh approximation of
the normal CDF. As in MONAI the posterior is always the one-training-step posterior
(alphas_cumprod[t - 1]), also when fewer timesteps than T are used.

MONAI's score, `total_kl` (B,), sums over t the mean over all latent elements; the map
sums over t and over channels, so total_kl = mean(map) / C (over the padded latent).
Latent diffusion (MONAI's `LatentDiffusionInferer.get_likelihood`) runs this on the
autoencoder's scaled latents; `to_image_grid` resamples the map to the volume
(nearest, MONAI's default `resample_interpolation_mode`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(jnp.float32(math.sqrt(2.0 / math.pi))
                                 * (x + 0.044715 * x ** 3)))


def decoder_log_likelihood(inputs, means, log_scales, original_input_range=(0, 255),
                           scaled_input_range=(0, 1)):
    """log p(x0 | x1) of a Gaussian discretised to bins of the data's quantisation
    (MONAI's `_get_decoder_log_likelihood`); arrays of one shape, float32 out."""
    bin_width = (scaled_input_range[1] - scaled_input_range[0]) / (
        original_input_range[1] - original_input_range[0])
    centered = inputs - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + bin_width / 2))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - bin_width / 2))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(inputs < -0.999, log_cdf_plus,
                     jnp.where(inputs > 0.999, log_one_minus_cdf_min, log_delta))


def make_likelihood(unet, scheduler, *, steps: int | None = None,
                    original_input_range=(0, 255), scaled_input_range=(0, 1),
                    decoder_term: bool = True):
    """A jitted `fn(params, key, x0, class_labels=None, context=None, noise=None) ->
    (total_kl (B,), kl_map (B, X, Y, Z))` float32 for x0 (B, X, Y, Z, C) (the UNet's
    input: scaled, padded latents).

    Args:
        unet: the flax DiffusionModelUNet. scheduler: a DDPMScheduler (fixed_small or
            fixed_large variance).
        steps: evaluate at `set_timesteps(steps)` (None: all T timesteps, MONAI's default).
        original_input_range, scaled_input_range: the t = 0 term's bin width, MONAI's
            defaults (LatentDiffusionInferer always uses them).
        decoder_term: False leaves out the t = 0 term (the KL terms of t >= 1 only; not
            MONAI's). With the fixed-small variance (clamped to 1e-20 at t = 0) that term
            is near-binary: ~27.6 nats (log 1e12) per element whose prediction misses its
            1/255 bin, ~0 where it hits; beyond +-0.999 the edge bins are open to one
            side, so large latents miss less often. Not a graded measure on latents.
    `noise` (B, X, Y, Z, C): the one Gaussian draw, else drawn from `key`.

    Raises:
        ConfigError: another scheduler than DDPM (as MONAI's NotImplementedError) or a
            learned variance.
    """
    if type(scheduler).__name__ != "DDPMScheduler":
        raise ConfigError("the likelihood is defined for DDPM models only (MONAI's "
                          f"get_likelihood); this model samples with {type(scheduler).__name__}"
                          ": pass --scheduler ddpm (DDIM-trained models train as DDPM).")
    if scheduler.variance_type not in ("fixed_small", "fixed_large"):
        raise ConfigError(f"scheduler.variance_type={scheduler.variance_type!r}: the likelihood "
                          "takes fixed_small or fixed_large.")
    state = scheduler.create_state()
    if steps is not None:
        state = scheduler.set_timesteps(state, int(steps))

    def run(params, key, x0, class_labels=None, context=None, noise=None):
        x0 = jnp.asarray(x0, jnp.float32)
        if noise is None:
            noise = jax.random.normal(key, x0.shape, jnp.float32)
        b = x0.shape[0]

        def body(i, carry):
            total, kl_map = carry
            t = state.timesteps[i]
            tt = jnp.full((b,), t, jnp.int32)
            xt = scheduler.add_noise(state, x0, noise, tt)
            out = unet.apply({"params": params}, xt, tt, context=context,
                             class_labels=class_labels)
            ac_t = state.alphas_cumprod[t]
            ac_prev = jnp.where(t > 0, state.alphas_cumprod[jnp.maximum(t - 1, 0)], 1.0)
            beta_t, alpha_t = state.betas[t], state.alphas[t]
            x0_hat, _ = scheduler._x0_eps(out, xt, ac_t)
            x0_hat = scheduler._clip(x0_hat)
            coef0 = ac_prev ** 0.5 * beta_t / (1 - ac_t)
            coeft = alpha_t ** 0.5 * (1 - ac_prev) / (1 - ac_t)
            pred_mean = coef0 * x0_hat + coeft * xt
            post_mean = coef0 * x0 + coeft * xt
            var = (1 - ac_prev) / (1 - ac_t) * beta_t
            var = jnp.maximum(var, 1e-20) if scheduler.variance_type == "fixed_small" else beta_t
            log_var = jnp.log(var)
            kl = 0.5 * (post_mean - pred_mean) ** 2 * jnp.exp(-log_var)  # equal variances
            nll = -decoder_log_likelihood(x0, pred_mean, 0.5 * log_var, original_input_range,
                                          scaled_input_range)
            kl = jnp.where(t == 0, nll if decoder_term else jnp.zeros_like(kl), kl)
            return total + kl.reshape(b, -1).mean(axis=1), kl_map + kl.sum(axis=-1)

        init = (jnp.zeros((b,), jnp.float32), jnp.zeros(x0.shape[:-1], jnp.float32))
        return jax.lax.fori_loop(0, state.num_inference_steps, body, init)

    return jax.jit(run)


def to_image_grid(kl_map, factor) -> np.ndarray:
    """(..., x, y, z) latent map -> (..., x*fx, y*fy, z*fz) by nearest-neighbour repeat
    (MONAI's nn.Upsample(mode="nearest") to the input size)."""
    m = np.asarray(kl_map)
    for axis, f in zip((-3, -2, -1), factor):
        m = np.repeat(m, int(f), axis=axis)
    return m
