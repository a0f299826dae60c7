"""MAISI's autoencoder: MONAI's `AutoencoderKlMaisi`, in Flax, weight for weight.

Reference: MONAI 1.6 `monai/apps/generation/maisi/networks/autoencoderkl_maisi.py`
(spatial_dims=3), the stage-1 model of MAISI / NV-Generate-CTMR (Guo et al. 2024, "MAISI:
Medical AI for Synthetic Imaging", arXiv:2409.11169). Channels-last `(B, X, Y, Z, C)`
where MONAI's tensors are `(B, C, X, Y, Z)`.

What differs from MONAI's generic `AutoencoderKL` (`ldm_jax.models.autoencoder`):
- the decoder upsamples TRILINEARLY x2 (align_corners=False) before its conv, not nearest;
  with `use_convtranspose` it is a ConvTranspose k3 s2 p1 (output padding 1), not k2 s2;
- the level res blocks and the final norms are `MaisiGroupNorm3D`: GroupNorm statistics
  in float32 (x - mean) / sqrt(var + eps), then the affine;
- attention blocks take `include_fc` / `use_combined_linear` (MONAI's SABlock options).

MAISI's memory tactics, and what they map to here:
- `num_splits` / `dim_split`: PyTorch runs every conv on `num_splits` overlapping slabs
  along spatial axis `dim_split`, one after another, to bound one GPU's peak. The result
  is the same function (tests: MONAI with 1, 2 and 4 splits on each axis equals this
  model). Here nothing is needed in the model: XLA plans the whole graph's buffers; to bound
  per-device memory, shard that axis over devices (the mesh's "spatial" axis) or decode
  in windows (`ldm_jax.autoencoder.sliding`). Accepted by `build_autoencoder_maisi` and
  ignored.
- `norm_float16`: MaisiGroupNorm3D's normalised output is stored in float16 (then the
  affine, in place, in float16). Kept as a field: the same rounding is applied here, so
  outputs differ from float32 within half precision (tested). A memory saving on a GPU only
  where the next op consumes float16; with `dtype="bfloat16"` this model computes convs in
  bfloat16 anyway.
- `save_mem` (torch.cuda.empty_cache between blocks), `print_info` (logging),
  `use_checkpointing` (activation checkpointing), `use_flash_attention`: no effect on the
  function; `build_autoencoder_maisi` (`ldm_jax.models.maisi.build`) accepts and ignores
  them. Flash attention is what `ldm_jax.models.layers.attention` picks per backend.

The param tree spells MONAI's state-dict keys (`encoder/blocks_1/conv1/conv/kernel` is
`encoder.blocks.1.conv1.conv.conv.weight`); `ldm_jax.models.maisi.convert` maps them both
ways. A transposed conv's kernel is stored (kx, ky, kz, out, in), the permutation of
PyTorch's (in, out, kx, ky, kz) that every other conv's (out, in, k...) uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import conv, group_norm, torch_like_init
from ldm_jax.models.unet import SpatialAttentionBlock

__all__ = ["AutoencoderKlMaisi", "MaisiGroupNorm3D", "trilinear_upsample2"]


class MaisiGroupNorm3D(nn.Module):
    """MONAI's MaisiGroupNorm3D: per group (x - mean) / sqrt(var + eps) in float32 (biased
    variance), then scale and bias. `norm_float16`: the normalised values are rounded to
    float16 and the affine is applied in float16 (MONAI's in-place mul_/add_ on a half
    tensor), output float16; else float32. x: (B, X, Y, Z, C), C divisible by num_groups."""

    num_groups: int
    eps: float = 1e-5
    norm_float16: bool = False

    @nn.compact
    def __call__(self, x):
        b, X, Y, Z, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(b, X, Y, Z, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 3, 5), keepdims=True)
        y = ((g - mean) / jnp.sqrt(var + self.eps)).reshape(x.shape)
        if not self.norm_float16:
            return y * scale + bias
        half = jnp.float16  # each in-place op on the half tensor rounds once
        y = (y.astype(half).astype(jnp.float32) * scale).astype(half)
        return (y.astype(jnp.float32) + bias).astype(half)


def convolution(features: int, kernel: int = 3, strides: int = 1, padding: int = 1,
                transposed: bool = False, dtype: Any = jnp.float32,
                name: str | None = None) -> nn.Module:
    """MONAI's `Convolution(conv_only=True)`: conv (k, stride, symmetric padding), or with
    `transposed` ConvTranspose k3 s2 p1 with output padding 1 (size x2)."""
    if transposed:
        return _ConvTranspose(features, dtype, name=name)
    return conv(features, kernel, strides, ((padding, padding),) * 3, dtype, name=name)


class _ConvTranspose(nn.Module):
    """torch ConvTranspose3d(k=3, stride=2, padding=1, output_padding=1): (B, n...) ->
    (B, 2n...). As a conv over the 2x-dilated input with the flipped kernel, padding
    (k - 1 - p, k - 1 - p + output_padding) = (1, 2)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        # stored (k, k, k, out, in); torch's init draws from fan_in = out * k^3 too
        kernel = self.param("kernel", torch_like_init, (3, 3, 3, self.features, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        w = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w, (1, 1, 1), ((1, 2),) * 3, lhs_dilation=(2, 2, 2),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias.astype(self.dtype)


def trilinear_upsample2(x: jax.Array) -> jax.Array:
    """torch `F.interpolate(scale_factor=2, mode="trilinear", align_corners=False)` on
    (B, X, Y, Z, C) -> (B, 2X, 2Y, 2Z, C): per axis, out[2k] = 0.75 x[k] + 0.25 x[k-1],
    out[2k+1] = 0.75 x[k] + 0.25 x[k+1], edges replicated. Slices and concatenations only
    (no gather), so a spatially sharded input stays sharded."""
    for axis in (1, 2, 3):
        n = x.shape[axis]
        first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
        last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
        even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
        y = jnp.stack([even, odd], axis=axis + 1)
        x = y.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])
    return x


class ResBlock(nn.Module):
    """MaisiResBlock (`maisi=True`: MaisiGroupNorm3D, convs in MaisiConvolution wrappers) or
    AEKLResBlock (the non-local blocks: torch GroupNorm, plain Convolution): GN -> SiLU ->
    conv3 -> GN -> SiLU -> conv3, + x (1x1 `nin_shortcut` when the channels change)."""

    out_channels: int
    norm_num_groups: int
    norm_eps: float
    maisi: bool = True
    norm_float16: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.out_channels, self.dtype

        def norm(name):
            if self.maisi:
                return MaisiGroupNorm3D(self.norm_num_groups, self.norm_eps, self.norm_float16,
                                        name=name)
            return group_norm(self.norm_num_groups, self.norm_eps, jnp.float32, name=name)

        def conv_layer(name, kernel=3):
            if self.maisi:  # MaisiConvolution(Convolution(Conv3d)): one level deeper
                return _Wrap(c, kernel, dt, name=name)
            return convolution(c, kernel, 1, kernel // 2, dtype=dt, name=name)

        h = conv_layer("conv1")(nn.silu(norm("norm1")(x)))
        h = conv_layer("conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != c:
            x = conv_layer("nin_shortcut", 1)(x)
        return x.astype(h.dtype) + h


class _Wrap(nn.Module):
    """MONAI's MaisiConvolution: a `convolution` named `conv` (params `<name>/conv`, MONAI
    `<name>.conv.conv.weight`)."""

    features: int
    kernel: int = 3
    dtype: Any = jnp.float32
    strides: int = 1
    padding: int | None = None
    transposed: bool = False

    @nn.compact
    def __call__(self, x):
        p = self.kernel // 2 if self.padding is None else self.padding
        return convolution(self.features, self.kernel, self.strides, p, self.transposed,
                           self.dtype, name="conv")(x)


class MaisiEncoder(nn.Module):
    """MaisiEncoder: conv_in, per level `num_res_blocks` MaisiResBlocks (each followed by
    attention where `attention_levels`), a downsample (zero pad at the end of each axis,
    conv k3 s2) between levels, optionally the non-local ResBlock -> attention -> ResBlock,
    MaisiGroupNorm3D, conv to `out_channels`. Params `blocks_<i>` in MONAI's order."""

    num_channels: Sequence[int]
    out_channels: int
    num_res_blocks: Sequence[int]
    attention_levels: Sequence[bool]
    norm_num_groups: int
    norm_eps: float
    with_nonlocal_attn: bool
    include_fc: bool
    use_combined_linear: bool
    norm_float16: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ch, g, e, dt = tuple(self.num_channels), self.norm_num_groups, self.norm_eps, self.dtype
        names = (f"blocks_{i}" for i in range(10_000))
        attn = _attention(g, e, self.include_fc, self.use_combined_linear, dt)
        x = _Wrap(ch[0], 3, dt, name=next(names))(x)
        for i, c in enumerate(ch):
            for _ in range(self.num_res_blocks[i]):
                x = ResBlock(c, g, e, True, self.norm_float16, dt, name=next(names))(x)
                if self.attention_levels[i]:
                    x = attn(next(names))(x)
            if i < len(ch) - 1:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 1), (0, 0)))
                x = _DownOrUp(c, False, False, dt, name=next(names))(x)
        if self.with_nonlocal_attn:
            x = ResBlock(ch[-1], g, e, False, dtype=dt, name=next(names))(x)
            x = attn(next(names))(x)
            x = ResBlock(ch[-1], g, e, False, dtype=dt, name=next(names))(x)
        x = MaisiGroupNorm3D(g, e, self.norm_float16, name=next(names))(x)
        return _Wrap(self.out_channels, 3, dt, name=next(names))(x)


class MaisiDecoder(nn.Module):
    """MaisiDecoder: conv_in from the latent, optionally the non-local block, per level
    (deepest first) `num_res_blocks` MaisiResBlocks (+ attention), an upsample between
    levels (trilinear x2 + conv k3, or ConvTranspose k3 s2), MaisiGroupNorm3D, conv to
    `out_channels`. Params `blocks_<i>` in MONAI's order."""

    num_channels: Sequence[int]
    out_channels: int
    num_res_blocks: Sequence[int]
    attention_levels: Sequence[bool]
    norm_num_groups: int
    norm_eps: float
    with_nonlocal_attn: bool
    include_fc: bool
    use_combined_linear: bool
    norm_float16: bool
    use_convtranspose: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        ch, g, e, dt = tuple(self.num_channels), self.norm_num_groups, self.norm_eps, self.dtype
        names = (f"blocks_{i}" for i in range(10_000))
        attn = _attention(g, e, self.include_fc, self.use_combined_linear, dt)
        x = _Wrap(ch[-1], 3, dt, name=next(names))(z)
        if self.with_nonlocal_attn:
            x = ResBlock(ch[-1], g, e, False, dtype=dt, name=next(names))(x)
            x = attn(next(names))(x)
            x = ResBlock(ch[-1], g, e, False, dtype=dt, name=next(names))(x)
        n = len(ch)
        for i in range(n):
            lvl = n - 1 - i
            for _ in range(self.num_res_blocks[lvl]):
                x = ResBlock(ch[lvl], g, e, True, self.norm_float16, dt, name=next(names))(x)
                if self.attention_levels[lvl]:
                    x = attn(next(names))(x)
            if lvl > 0:
                x = _DownOrUp(x.shape[-1], True, self.use_convtranspose, dt, name=next(names))(x)
        x = MaisiGroupNorm3D(g, e, self.norm_float16, name=next(names))(x)
        return _Wrap(self.out_channels, 3, dt, name=next(names))(x)


class _DownOrUp(nn.Module):
    """MaisiDownsample (conv k3 s2 p0 on the end-padded input) or MaisiUpsample (trilinear
    x2 then conv k3 p1, or ConvTranspose k3 s2): a MaisiConvolution under `conv`."""

    features: int
    up: bool
    use_convtranspose: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.up:
            return _Wrap(self.features, 3, self.dtype, strides=2, padding=0, name="conv")(x)
        if self.use_convtranspose:
            return _Wrap(self.features, 3, self.dtype, transposed=True, name="conv")(x)
        x = trilinear_upsample2(x.astype(jnp.float32)).astype(self.dtype)
        return _Wrap(self.features, 3, self.dtype, name="conv")(x)


def _attention(groups, eps, include_fc, use_combined_linear, dtype):
    def make(name):  # MONAI's SpatialAttentionBlock with num_head_channels=None: one head
        return SpatialAttentionBlock(None, groups, eps, dtype, include_fc, use_combined_linear,
                                     name=name)
    return make


class AutoencoderKlMaisi(nn.Module):
    """MONAI's AutoencoderKlMaisi (spatial_dims=3), channels-last.

    Fields keep MONAI's names and defaults for everything that changes the function;
    MAISI's memory tactics are described in the module docstring (`norm_float16` is a
    field, the others are accepted by `build_autoencoder_maisi`). `dtype`: compute dtype
    of the convs ("float32" | "bfloat16"); norms and the latent 1x1 convs are float32.

    Use through `apply`: `encode(x) -> (z_mu, z_sigma)`, `sampling(z_mu, z_sigma, rng)`,
    `decode(z)`, `reconstruct(x)` (decodes mu) and `__call__(x, sample=True) -> (recon,
    z_mu, z_sigma)` (sample=True needs `rngs={"sample": key}`). x: (B, X, Y, Z,
    in_channels), each spatial size divisible by 2^(levels - 1); z: (B, X/f, Y/f, Z/f,
    latent_channels). Outputs float32. Raises ValueError for a misshaped input.
    """

    in_channels: int
    out_channels: int
    num_res_blocks: Sequence[int]
    num_channels: Sequence[int]
    attention_levels: Sequence[bool]
    latent_channels: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    include_fc: bool = False
    use_combined_linear: bool = False
    use_convtranspose: bool = False
    norm_float16: bool = False
    dtype: Any = "float32"

    @property
    def factor(self) -> int:
        """Downsampling per axis: 2^(levels - 1)."""
        return 2 ** (len(tuple(self.num_channels)) - 1)

    def setup(self):
        n = len(tuple(self.num_channels))
        nrb = (tuple(self.num_res_blocks) if isinstance(self.num_res_blocks, (list, tuple))
               else (self.num_res_blocks,) * n)
        if len(nrb) != n or len(tuple(self.attention_levels)) != n:
            raise ValueError("num_res_blocks and attention_levels need one entry per level of "
                             f"num_channels={tuple(self.num_channels)}")
        if any(c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every entry "
                             f"of num_channels={tuple(self.num_channels)}")
        dt = jnp.dtype(self.dtype)
        common = {"num_channels": tuple(self.num_channels), "num_res_blocks": nrb,
                  "attention_levels": tuple(bool(a) for a in self.attention_levels),
                  "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
                  "include_fc": self.include_fc, "use_combined_linear": self.use_combined_linear,
                  "norm_float16": self.norm_float16, "dtype": dt}
        self.encoder = MaisiEncoder(out_channels=self.latent_channels,
                                    with_nonlocal_attn=self.with_encoder_nonlocal_attn, **common)
        self.decoder = MaisiDecoder(out_channels=self.out_channels,
                                    with_nonlocal_attn=self.with_decoder_nonlocal_attn,
                                    use_convtranspose=self.use_convtranspose, **common)
        self.quant_conv_mu = convolution(self.latent_channels, 1, 1, 0)
        self.quant_conv_log_sigma = convolution(self.latent_channels, 1, 1, 0)
        self.post_quant_conv = convolution(self.latent_channels, 1, 1, 0, dtype=dt)

    def _check(self, x, what, channels, factor):
        if x.ndim != 5 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be (batch, X, Y, Z, {channels}) channels-last; got "
                             f"shape {tuple(x.shape)}")
        if any(s % factor for s in x.shape[1:4]):
            raise ValueError(f"{what} spatial shape {tuple(x.shape[1:4])} must be divisible by "
                             f"{factor} on every axis")

    def encode(self, x):
        self._check(x, "encoder input", self.in_channels, self.factor)
        h = self.encoder(x.astype(jnp.dtype(self.dtype))).astype(jnp.float32)
        z_mu = self.quant_conv_mu(h)
        z_log_var = jnp.clip(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, jnp.exp(z_log_var / 2)

    def sampling(self, z_mu, z_sigma, rng):
        return z_mu + jax.random.normal(rng, z_sigma.shape, jnp.float32) * z_sigma

    def decode(self, z):
        self._check(z, "latent", self.latent_channels, 1)
        return self.decoder(self.post_quant_conv(z.astype(jnp.dtype(self.dtype)))).astype(
            jnp.float32)

    def reconstruct(self, x):
        return self.decode(self.encode(x)[0])

    def __call__(self, x, sample: bool = True):
        z_mu, z_sigma = self.encode(x)
        z = self.sampling(z_mu, z_sigma, self.make_rng("sample")) if sample else z_mu
        return self.decode(z), z_mu, z_sigma
