"""KL-regularised 3D autoencoder: MONAI's AutoencoderKL plus strided stems and per-axis factors.

With `initial_downsample_factor=1`, every level factor 2, conv downsampling and the
"nearest_conv" head this is the same function as `monai.networks.nets.AutoencoderKL`
(weights map one to one via `ldm_jax.convert.from_monai`). Beyond MONAI:

- `initial_downsample_factor` f0: the first conv is strided by f0 (kernel >= stride on
  every axis, see `layers.strided_axis_geometry`), so level 0 already runs at 1/f0.
- `downsample_factors`: each level transition downsamples by its own (per-axis) factor;
  the decoder upsamples by the same factors in reverse order.
- The decoder head undoes f0. "nearest_conv": GN -> nearest upsample x f0 -> conv k3 to
  out_channels at full resolution (the original PyTorch project's head; GN commutes with nearest upsampling,
  so normalising on the coarse grid is the same function and cheaper; the upsample + conv
  is computed on the coarse grid, `layers.nearest_conv`). "subpixel": GN ->
  conv k3 to out_channels * prod(f0) on the coarse grid -> depth-to-space (the mirror of
  the strided stem, no wide conv at full resolution; ICNR init so it starts as a nearest
  upsample). With f0 = 1 both heads are MONAI's GN -> conv.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.config import as_triple
from ldm_jax.errors import ConfigError
from ldm_jax.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    conv,
    depth_to_space,
    group_norm,
    icnr_init,
    nearest_conv,
    strided_geometry,
    torch_like_init,
    warn_if_skipping,
)

REMAT_MODES = ("none", "res_blocks", "levels")
UPSAMPLE_HEADS = ("nearest_conv", "subpixel")


def _res_block_cls(remat: str):
    return nn.remat(ResBlock) if remat == "res_blocks" else ResBlock


def _level_cls(cls, remat: str):
    return nn.remat(cls) if remat == "levels" else cls


class EncoderLevel(nn.Module):
    """Res blocks (each followed by attention if asked), then the downsample to the next level."""

    out_channels: int
    num_res_blocks: int
    attention: bool
    down_factor: Sequence[int] | None  # None: last level, no downsample
    norm_num_groups: int
    norm_eps: float
    use_conv_downsample: bool = True
    strided_kernel: int | None = None
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        res = _res_block_cls(self.remat)
        for j in range(self.num_res_blocks):
            x = res(self.out_channels, self.norm_num_groups, self.norm_eps, self.dtype,
                    name=f"res_{j}")(x)
            if self.attention:
                x = AttentionBlock(self.norm_num_groups, self.norm_eps, self.dtype,
                                   name=f"attn_{j}")(x)
        if self.down_factor is not None:
            x = Downsample(self.down_factor, self.use_conv_downsample, self.strided_kernel,
                           self.dtype, name="down")(x)
        return x


class DecoderLevel(nn.Module):
    """Res blocks (each followed by attention if asked), then the upsample to the next level."""

    out_channels: int
    num_res_blocks: int
    attention: bool
    up_factor: Sequence[int] | None  # None: last level, no upsample
    norm_num_groups: int
    norm_eps: float
    use_convtranspose: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        res = _res_block_cls(self.remat)
        for j in range(self.num_res_blocks):
            x = res(self.out_channels, self.norm_num_groups, self.norm_eps, self.dtype,
                    name=f"res_{j}")(x)
            if self.attention:
                x = AttentionBlock(self.norm_num_groups, self.norm_eps, self.dtype,
                                   name=f"attn_{j}")(x)
        if self.up_factor is not None:
            x = Upsample(self.up_factor, self.use_convtranspose, self.dtype, name="up")(x)
        return x


class MidBlock(nn.Module):
    """MONAI's non-local block at the bottom: ResBlock -> attention -> ResBlock."""

    norm_num_groups: int
    norm_eps: float
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        res = _res_block_cls(self.remat)
        c, g, e, dt = x.shape[-1], self.norm_num_groups, self.norm_eps, self.dtype
        x = res(c, g, e, dt, name="res_0")(x)
        x = AttentionBlock(g, e, dt, name="attn")(x)
        return res(c, g, e, dt, name="res_1")(x)


class DecoderHead(nn.Module):
    """Final GN -> conv, undoing the stem's factor (see the module docstring for the choice)."""

    out_channels: int
    factor: Sequence[int]
    head: str
    norm_num_groups: int
    norm_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = as_triple(self.factor)
        x = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, name="norm_out")(x)
        if self.head == "nearest_conv" or f == (1, 1, 1):
            return nearest_conv(self.out_channels, f, self.dtype, "conv_out")(x)
        n = f[0] * f[1] * f[2]
        y = nn.Conv(self.out_channels * n, (3, 3, 3), padding=((1, 1),) * 3, dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=icnr_init(torch_like_init, n),
                    name="conv_out")(x)
        return depth_to_space(y, f)


class Encoder(nn.Module):
    """Strided stem -> levels -> (mid block) -> GN -> conv to latent channels."""

    num_channels: Sequence[int]
    latent_channels: int
    num_res_blocks: Sequence[int]
    attention_levels: Sequence[bool]
    initial_factor: Sequence[int]
    level_factors: Sequence[Sequence[int]]
    norm_num_groups: int
    norm_eps: float
    with_nonlocal_attn: bool = True
    use_conv_downsample: bool = True
    strided_kernel: int | None = None
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ch, dt = self.num_channels, self.dtype
        kernel, padding = strided_geometry(self.initial_factor, self.strided_kernel)
        x = conv(ch[0], kernel, self.initial_factor, padding, dt, name="conv_in")(x)
        level = _level_cls(EncoderLevel, self.remat)
        for i, c in enumerate(ch):
            down = self.level_factors[i] if i < len(ch) - 1 else None
            x = level(c, self.num_res_blocks[i], bool(self.attention_levels[i]), down,
                      self.norm_num_groups, self.norm_eps, self.use_conv_downsample,
                      self.strided_kernel, self.remat, dt, name=f"level_{i}")(x)
        if self.with_nonlocal_attn:
            x = _level_cls(MidBlock, self.remat)(self.norm_num_groups, self.norm_eps,
                                                 self.remat, dt, name="mid")(x)
        x = group_norm(self.norm_num_groups, self.norm_eps, dt, name="norm_out")(x)
        return conv(self.latent_channels, dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
    """conv from latent -> (mid block) -> levels deepest first -> head back to full resolution."""

    num_channels: Sequence[int]
    out_channels: int
    num_res_blocks: Sequence[int]
    attention_levels: Sequence[bool]
    initial_factor: Sequence[int]
    level_factors: Sequence[Sequence[int]]
    norm_num_groups: int
    norm_eps: float
    with_nonlocal_attn: bool = True
    use_convtranspose: bool = False
    upsample_head: str = "nearest_conv"
    remat: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        ch, dt, n = self.num_channels, self.dtype, len(self.num_channels)
        x = conv(ch[-1], dtype=dt, name="conv_in")(z)
        if self.with_nonlocal_attn:
            x = _level_cls(MidBlock, self.remat)(self.norm_num_groups, self.norm_eps,
                                                 self.remat, dt, name="mid")(x)
        level = _level_cls(DecoderLevel, self.remat)
        for i in range(n):  # i = 0 is the deepest level, as in MONAI's block order
            enc = n - 1 - i
            up = self.level_factors[enc - 1] if enc > 0 else None
            x = level(ch[enc], self.num_res_blocks[enc], bool(self.attention_levels[enc]), up,
                      self.norm_num_groups, self.norm_eps, self.use_convtranspose, self.remat,
                      dt, name=f"level_{i}")(x)
        head = _level_cls(DecoderHead, self.remat)
        return head(self.out_channels, self.initial_factor, self.upsample_head,
                    self.norm_num_groups, self.norm_eps, dt, name="head")(x)


def _dtype(d) -> Any:
    try:
        dt = jnp.dtype(d)
    except TypeError as e:
        raise ConfigError(f"autoencoder.dtype must be 'float32' or 'bfloat16'; got {d!r}") from e
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ConfigError(f"autoencoder.dtype must be 'float32' or 'bfloat16'; got {d!r}")
    return dt


class AutoencoderKL(nn.Module):
    """KL autoencoder (MONAI AutoencoderKL semantics), channels-last 3D.

    Fields are those of `config.autoencoder` (configs/default.py). Use through `apply`:
    `encode(x) -> (z_mu, z_sigma)`, `sampling(z_mu, z_sigma, rng)`, `decode(z)`,
    `reconstruct(x)` (decodes mu) and `__call__(x, sample=True) -> (recon, z_mu, z_sigma)`
    (sample=True needs `rngs={"sample": key}`). Outputs are float32 whatever `dtype` is.

    `remat`: "res_blocks" recomputes each ResBlock in the backward pass; "levels" recomputes
    each encoder/decoder level, both mid blocks and the decoder head (coarser: less memory,
    more recompute). Param names are the same in every mode, so checkpoints interchange.
    """

    in_channels: int = 1
    out_channels: int = 1
    num_channels: Sequence[int] = (32, 64, 64)
    latent_channels: int = 3
    num_res_blocks: int | Sequence[int] = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: Sequence[bool] = (False, False, False)
    with_encoder_nonlocal_attn: bool = True
    with_decoder_nonlocal_attn: bool = True
    initial_downsample_factor: int | Sequence[int] = 1
    downsample_factors: Sequence[Any] | None = None
    use_conv_downsample: bool = True
    use_convtranspose: bool = False
    upsample_head: str = "nearest_conv"
    strided_kernel: int | None = None
    dtype: Any = "float32"
    remat: str = "none"

    # -- derived settings ------------------------------------------------------------------

    @property
    def compute_dtype(self):
        return _dtype(self.dtype)

    @property
    def res_blocks_per_level(self) -> tuple[int, ...]:
        n = len(self.num_channels)
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * n
        return tuple(int(b) for b in self.num_res_blocks)

    @property
    def initial_factor(self) -> tuple[int, int, int]:
        return as_triple(self.initial_downsample_factor, "autoencoder.initial_downsample_factor")

    @property
    def level_factors(self) -> tuple[tuple[int, int, int], ...]:
        n = len(self.num_channels)
        if self.downsample_factors is None:
            return ((2, 2, 2),) * (n - 1)
        return tuple(as_triple(f, f"autoencoder.downsample_factors[{i}]")
                     for i, f in enumerate(self.downsample_factors))

    @property
    def total_factor(self) -> tuple[int, int, int]:
        t = list(self.initial_factor)
        for f in self.level_factors:
            t = [a * b for a, b in zip(t, f)]
        return tuple(t)

    def check(self) -> None:
        """Raise ConfigError for settings this model cannot build (messages say how to fix)."""
        n = len(self.num_channels)
        if n == 0:
            raise ConfigError("autoencoder.num_channels must list at least one level, like (32, 64, 64)")
        bad = [c for c in self.num_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"autoencoder.norm_num_groups={self.norm_num_groups} must divide every entry of "
                f"num_channels={tuple(self.num_channels)} (GroupNorm needs whole groups)")
        if len(self.attention_levels) != n:
            raise ConfigError(
                f"autoencoder.attention_levels needs one bool per level ({n}); got "
                f"{tuple(self.attention_levels)}")
        if len(self.res_blocks_per_level) != n or min(self.res_blocks_per_level) < 1:
            raise ConfigError(
                f"autoencoder.num_res_blocks must be a positive int or {n} positive ints (one "
                f"per level); got {self.num_res_blocks!r}")
        if self.downsample_factors is not None and len(self.downsample_factors) != n - 1:
            raise ConfigError(
                f"autoencoder.downsample_factors needs {n - 1} entries (one per level "
                f"transition of num_channels={tuple(self.num_channels)}), or None for 2 "
                f"everywhere; got {tuple(self.downsample_factors)!r}")
        self.level_factors, self.initial_factor, self.compute_dtype  # noqa: B018 (validates)
        if self.upsample_head not in UPSAMPLE_HEADS:
            raise ConfigError(f"autoencoder.upsample_head must be one of {UPSAMPLE_HEADS}; "
                              f"got {self.upsample_head!r}")
        if self.remat not in REMAT_MODES:
            raise ConfigError(f"autoencoder.remat must be one of {REMAT_MODES}; got {self.remat!r}")
        if self.strided_kernel is not None and int(self.strided_kernel) < 1:
            raise ConfigError("autoencoder.strided_kernel must be None (voxel-complete) or a "
                              f"positive int; got {self.strided_kernel!r}")

    # -- modules ---------------------------------------------------------------------------

    def setup(self):
        self.check()
        dt = self.compute_dtype
        if self.is_initializing():  # once per model, not on every apply
            warn_if_skipping("encoder stem", self.initial_factor, self.strided_kernel)
            if self.use_conv_downsample:
                for i, f in enumerate(self.level_factors):
                    warn_if_skipping(f"encoder level {i} downsample", f, self.strided_kernel)
        common = dict(
            num_channels=tuple(self.num_channels), num_res_blocks=self.res_blocks_per_level,
            attention_levels=tuple(bool(a) for a in self.attention_levels),
            initial_factor=self.initial_factor, level_factors=self.level_factors,
            norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps, remat=self.remat,
            dtype=dt,
        )
        self.encoder = Encoder(
            latent_channels=self.latent_channels, with_nonlocal_attn=self.with_encoder_nonlocal_attn,
            use_conv_downsample=self.use_conv_downsample, strided_kernel=self.strided_kernel,
            **common)
        self.decoder = Decoder(
            out_channels=self.out_channels, with_nonlocal_attn=self.with_decoder_nonlocal_attn,
            use_convtranspose=self.use_convtranspose, upsample_head=self.upsample_head, **common)
        # The latent 1x1 convs run in float32: they are tiny and log-sigma feeds an exp.
        self.quant_conv_mu = conv(self.latent_channels, kernel=1, dtype=jnp.float32)
        self.quant_conv_log_sigma = conv(self.latent_channels, kernel=1, dtype=jnp.float32)
        self.post_quant_conv = conv(self.latent_channels, kernel=1, dtype=dt)

    def _check_input(self, x, what, channels, factor):
        if x.ndim != 5 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be (batch, X, Y, Z, {channels}) channels-last; got "
                             f"shape {tuple(x.shape)}")
        bad = [a for a in range(3) if x.shape[1 + a] % factor[a]]
        if bad:
            raise ValueError(
                f"{what} spatial shape {tuple(x.shape[1:4])} is not divisible by the total "
                f"downsampling factor {factor} on axes {bad}; crop or pad the volume to a "
                "multiple of it")

    def encode(self, x):
        self._check_input(x, "encoder input", self.in_channels, self.total_factor)
        h = self.encoder(x.astype(self.compute_dtype)).astype(jnp.float32)
        z_mu = self.quant_conv_mu(h)
        z_log_var = jnp.clip(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, jnp.exp(z_log_var / 2)

    def sampling(self, z_mu, z_sigma, rng):
        eps = jax.random.normal(rng, z_sigma.shape, jnp.float32)
        return z_mu + eps * z_sigma

    def decode(self, z):
        self._check_input(z, "latent", self.latent_channels, (1, 1, 1))
        h = self.post_quant_conv(z.astype(self.compute_dtype))
        return self.decoder(h).astype(jnp.float32)

    def reconstruct(self, x):
        return self.decode(self.encode(x)[0])

    def __call__(self, x, sample: bool = True):
        z_mu, z_sigma = self.encode(x)
        z = self.sampling(z_mu, z_sigma, self.make_rng("sample")) if sample else z_mu
        return self.decode(z), z_mu, z_sigma
