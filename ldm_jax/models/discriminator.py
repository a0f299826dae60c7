"""PatchGAN discriminator with MONAI's PatchDiscriminator semantics, channels-last 3D.

Layout (MONAI `patchgan_discriminator.py`, spatial_dims=3):
  initial_conv: conv k s2 p1 (bias) -> LeakyReLU(0.2)
  layer l = 0..num_layers_d-1: conv k (stride 2, the last one stride 1) p1, no bias ->
      norm (BatchNorm eps 1e-5, or InstanceNorm without affine) -> LeakyReLU(0.2)
  final_conv: conv last_conv_kernel_size (default k), p (k-1)//2, bias, no activation.
`__call__` returns every block's output (num_layers_d + 2 maps), logits last, as MONAI's
forward does; feature-matching losses use the intermediate ones. Init is MONAI's
`normal_init` (conv N(0, 0.02), BatchNorm scale N(1, 0.02)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import tap_conv

NORMS = ("batch", "instance")


def _normal_around_one(std: float):
    def init(key, shape, dtype=jnp.float32):
        return 1.0 + std * jax.random.normal(key, shape, dtype)

    return init


class TorchBatchNorm(nn.Module):
    """PyTorch's BatchNorm over (B, X, Y, Z, C): eps 1e-5, momentum 0.1, the output
    normalised with the biased batch variance and the running variance updated with the
    unbiased one (n / (n - 1), as torch does; flax's BatchNorm keeps the biased one).
    Variables as flax's BatchNorm: params "scale", "bias"; batch_stats "mean", "var"."""

    dtype: Any
    scale_init: Any

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = ((xf - mean) ** 2).mean(axes)
            if not self.is_initializing():
                n = xf.size // c
                ra_mean.value = 0.9 * ra_mean.value + 0.1 * mean
                ra_var.value = 0.9 * ra_var.value + 0.1 * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return y.astype(self.dtype)


class PatchDiscriminator(nn.Module):
    """MONAI PatchDiscriminator(spatial_dims=3) in Flax.

    `norm="batch"` keeps running statistics in the "batch_stats" collection: call with
    `train=True, mutable=["batch_stats"]` to normalise with batch statistics and update
    them (momentum 0.1 as PyTorch), `train=False` to use the running averages.
    """

    in_channels: int = 1
    out_channels: int = 1
    num_layers_d: int = 3
    num_channels: int = 32
    kernel_size: int = 4
    norm: str = "batch"
    padding: int = 1
    last_conv_kernel_size: int | None = None
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.norm not in NORMS:
            raise ValueError(f"discriminator.norm must be one of {NORMS}; got {self.norm!r}")
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(f"discriminator input must be (batch, X, Y, Z, {self.in_channels}) "
                             f"channels-last; got shape {tuple(x.shape)}")
        dt = jnp.dtype(self.dtype)
        k, p = self.kernel_size, self.padding
        last_k = self.last_conv_kernel_size or k
        self._check_size(x.shape[1:4], k, p, last_k)
        init = nn.initializers.normal(0.02)

        def conv(features, kernel, stride, pad, bias, name):
            return nn.Conv(features, (kernel,) * 3, (stride,) * 3, ((pad, pad),) * 3,
                           use_bias=bias, dtype=dt, param_dtype=jnp.float32,
                           kernel_init=init, name=name,
                           conv_general_dilated=tap_conv.conv_general_dilated)

        feats = []
        h = x.astype(dt)
        h = nn.leaky_relu(conv(self.num_channels, k, 2, p, True, "initial_conv")(h), 0.2)
        feats.append(h)
        channels = self.num_channels
        for l in range(self.num_layers_d):
            channels *= 2
            stride = 1 if l == self.num_layers_d - 1 else 2
            h = conv(channels, k, stride, p, False, f"conv_{l}")(h)
            if self.norm == "batch":
                h = TorchBatchNorm(dt, _normal_around_one(0.02), name=f"norm_{l}")(h, train)
            else:
                h = nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, dtype=dt,
                                    use_fast_variance=False, name=f"norm_{l}")(h)
            h = nn.leaky_relu(h, 0.2)
            feats.append(h)
        feats.append(conv(self.out_channels, last_k, 1, (last_k - 1) // 2, True, "final_conv")(h))
        return [f.astype(jnp.float32) for f in feats]

    def _check_size(self, shape, k, p, last_k):
        sizes = logits_shape(shape, self.num_layers_d, k, p, last_k)
        if min(sizes) < 1:
            raise ValueError(
                f"discriminator input spatial shape {tuple(shape)} is too small for "
                f"num_layers_d={self.num_layers_d} (the logits would be {tuple(sizes)}); "
                "use larger volumes or fewer discriminator layers")


def logits_shape(shape, num_layers_d=3, kernel_size=4, padding=1, last_kernel_size=None):
    """Spatial shape of the logits for an input of spatial `shape` (sizes < 1: too small)."""
    k, p, last_k = int(kernel_size), int(padding), int(last_kernel_size or kernel_size)
    sizes = [int(s) for s in shape]
    for stride in [2] * int(num_layers_d) + [1]:
        sizes = [(s + 2 * p - k) // stride + 1 for s in sizes]
    return tuple(s + 2 * ((last_k - 1) // 2) - last_k + 1 for s in sizes)


def size_problems(disc_cfg, volume_size) -> list[str]:
    """One-line problems when `volume_size` (X, Y, Z) is too small for the discriminator
    of `disc_cfg` (a config.discriminator section), with the smallest size that works."""
    get = disc_cfg.get
    args = (int(get("num_layers_d", 3)), int(get("kernel_size", 4)), 1,
            get("last_conv_kernel_size"))
    sizes = logits_shape(volume_size, *args)
    bad = [a for a in range(3) if sizes[a] < 1]
    if not bad:
        return []
    need = next(n for n in range(1, 4096) if logits_shape((n,) * 3, *args)[0] >= 1)
    axes = ", ".join(f"{'XYZ'[a]} = {volume_size[a]}" for a in bad)
    return [f"data.volume_size {tuple(volume_size)} is too small for the discriminator "
            f"(discriminator.num_layers_d={args[0]}, kernel_size={args[1]}): {axes}, but "
            f"every axis needs >= {need} voxels. Use a larger volume_size"
            + (f" or --config.discriminator.num_layers_d={args[0] - 1}." if args[0] > 1
               else ".")]
