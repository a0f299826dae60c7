"""The diffusion UNet of a 3D latent diffusion model: MONAI's `DiffusionModelUNet`, in Flax.

Reference: MONAI 1.6 `monai/networks/nets/diffusion_model_unet.py` (spatial_dims=3), the
UNet of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (after diffusers' UNet2DConditionModel), with the sinusoidal timestep embedding
of Ho et al. 2020. Same function weight for weight; arrays are channels-last
`(B, X, Y, Z, C)` where MONAI's are `(B, C, X, Y, Z)`.

The param tree spells MONAI's state_dict keys: `down_blocks_1/resnets_0/conv1/kernel` is
`down_blocks.1.resnets.0.conv1.conv.weight`, `out_0` / `out_2` are `out.0` (GroupNorm) and
`out.2` (conv); `ldm_jax.models.unet_convert` maps state_dicts both ways.

Precision: params float32; compute in `dtype` (float32 or bfloat16); GroupNorm/LayerNorm
statistics in float32; attention through `ldm_jax.models.layers.attention` (float32
logits and softmax); the output is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ldm_jax.config import get_field, is_pos_int, raise_problems
from ldm_jax.errors import ConfigError
from ldm_jax.models import layers
from ldm_jax.models.layers import avg_pool, conv, group_norm, nearest_upsample, torch_like_init

REMAT_MODES = ("none", "blocks")
_zeros = nn.initializers.zeros  # MONAI's zero_module: conv2 of resnets, proj_out, final conv


# ----------------------------------------------------------------------------------------
# Timestep embedding.


def timestep_frequencies(dim: int, max_period: int = 10000) -> np.ndarray:
    """(dim // 2,) float32 frequencies exp(-ln(max_period) * i / (dim // 2)).

    A numpy constant (exp in float64, rounded once): XLA's float32 exp differs from
    PyTorch's by an ulp on some entries, which t ~ 1000 turns into ~1e-4 in the embedding.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    return np.exp((exponent / np.float32(half)).astype(np.float64)).astype(np.float32)


def timestep_embedding(timesteps, dim: int, max_period: int = 10000):
    """(B,) timesteps (int or float, any units the model was trained with) -> (B, dim) float32
    `[cos(t * f), sin(t * f)]` (cos first, MONAI's `get_timestep_embedding`), zero-padded
    to `dim` when odd."""
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * timestep_frequencies(dim, max_period)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ----------------------------------------------------------------------------------------
# Blocks (MONAI class names in the docstrings).


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=torch_like_init, name=name)


class ResnetBlock(nn.Module):
    """DiffusionUNetResnetBlock: GN -> SiLU -> [nearest x2 | avg-pool /2] -> conv3
    -> + Linear(SiLU(emb)) -> GN -> SiLU -> conv3 (zero init), plus a 1x1 skip conv when the
    channels change. `up` / `down` resample both branches (MONAI's resblock_updown).

    x: (B, X, Y, Z, C_in); emb: (B, 4 * channels[0]) -> (B, X', Y', Z', out_channels).
    `recompute_norm_act`: GN -> SiLU -> conv as `layers.norm_act_conv` (the backward keeps
    the block inputs only and recomputes normalisation and activation; same values and
    params either way); not for the resampling half of an up / down block.
    """

    out_channels: int
    norm_num_groups: int
    norm_eps: float
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32
    recompute_norm_act: bool = True

    @nn.compact
    def __call__(self, x, emb):
        g, e, dt, c = self.norm_num_groups, self.norm_eps, self.dtype, self.out_channels
        r = self.recompute_norm_act
        if self.up or self.down:
            h = nn.silu(group_norm(g, e, dt, name="norm1")(x))
            if self.up:
                x, h = nearest_upsample(x, 2), nearest_upsample(h, 2)
            else:
                x, h = avg_pool(x, 2), avg_pool(h, 2)
            h = conv(c, dtype=dt, name="conv1")(h)
        else:
            h = layers.norm_act_conv(self, x, c, g, e, dt, "norm1", "conv1", r)
        h = h + _dense(c, dt, "time_emb_proj")(nn.silu(emb))[:, None, None, None, :]
        h = layers.norm_act_conv(self, h, c, g, e, dt, "norm2", "conv2", r, kernel_init=_zeros)
        if x.shape[-1] != c:
            x = conv(c, kernel=1, dtype=dt, name="skip_connection")(x)
        return x + h


class Attention(nn.Module):
    """SABlock / CrossAttentionBlock: `heads` heads of `head_dim` over tokens, scale
    head_dim^-1/2, keys and values from `context` when given (else from x), out projection.

    `include_fc=False`: no out projection (MONAI's SABlock `include_fc`; then
    out_features must equal heads * head_dim). `combined_qkv`: one Linear `qkv` to
    3 * heads * head_dim, split q | k | v (MONAI's SABlock `use_combined_linear`,
    self-attention only).

    x: (B, T, C); context: (B, S, C_ctx) or None -> (B, T, out_features).
    """

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool
    upcast: bool = False  # MONAI's upcast_attention: q, k, v in float32
    dtype: Any = jnp.float32
    include_fc: bool = True
    combined_qkv: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        inner, dt = self.heads * self.head_dim, self.dtype
        kv = x if context is None else context
        if self.combined_qkv:
            if context is not None:
                raise ValueError("a combined qkv projection is for self-attention only")
            q, k, v = jnp.split(_dense(3 * inner, dt, "qkv", self.qkv_bias)(x), 3, axis=-1)
        else:
            q, k, v = (_dense(inner, dt, n, self.qkv_bias)(src) for n, src in
                       (("to_q", x), ("to_k", kv), ("to_v", kv)))
        q, k, v = (t.reshape(*t.shape[:2], self.heads, self.head_dim) for t in (q, k, v))
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        o = layers.attention(q, k, v).astype(dt).reshape(*q.shape[:2], inner)
        return _dense(self.out_features, dt, "out_proj")(o) if self.include_fc else o


def _heads(channels: int, num_head_channels: int | None) -> tuple[int, int]:
    if not num_head_channels:
        return 1, channels
    return channels // num_head_channels, num_head_channels


class SpatialAttentionBlock(nn.Module):
    """SpatialAttentionBlock: GN -> tokens in raster order -> multi-head self-attention
    (q/k/v with bias, channels // num_head_channels heads) -> + x. `context` is ignored.

    x: (B, X, Y, Z, C) -> same shape. `include_fc` / `use_combined_linear`: MONAI's (see
    `Attention`).
    """

    num_head_channels: int | None
    norm_num_groups: int
    norm_eps: float
    dtype: Any = jnp.float32
    include_fc: bool = True
    use_combined_linear: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        del context
        b, X, Y, Z, c = x.shape
        h = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, name="norm")(x)
        heads, hd = _heads(c, self.num_head_channels)
        h = Attention(heads, hd, c, qkv_bias=True, dtype=self.dtype, include_fc=self.include_fc,
                      combined_qkv=self.use_combined_linear, name="attn")(
            h.reshape(b, X * Y * Z, c))
        return x + h.reshape(x.shape).astype(x.dtype)


class GEGLUMLP(nn.Module):
    """MLPBlock(act="GEGLU"): linear1 to 2 * mlp_dim, x * GELU(gate) with exact (erf) GELU,
    linear2 back. (B, T, C) -> (B, T, C)."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _dense(2 * self.mlp_dim, self.dtype, "linear1")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        return _dense(x.shape[-1], self.dtype, "linear2")(h)


class TransformerBlock(nn.Module):
    """DiffusionUNetTransformerBlock: x += attn1(LN x); x += attn2(LN x, context);
    x += GEGLU-MLP(LN x). LayerNorm eps 1e-5, q/k/v without bias. (B, T, C) -> (B, T, C).
    `include_fc` / `use_combined_linear` apply to attn1 only (MONAI's CrossAttentionBlock
    always has its out projection and separate q/k/v)."""

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32
    include_fc: bool = True
    use_combined_linear: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        c, dt = x.shape[-1], self.dtype

        def ln(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=jnp.float32,
                                use_fast_variance=False, name=name)

        def attn(name, **kw):
            return Attention(self.heads, self.head_dim, c, qkv_bias=False, upcast=self.upcast,
                             dtype=dt, name=name, **kw)

        x = attn("attn1", include_fc=self.include_fc,
                 combined_qkv=self.use_combined_linear)(ln("norm1")(x)) + x
        x = attn("attn2")(ln("norm2")(x), context) + x
        return GEGLUMLP(4 * c, dt, name="ff")(ln("norm3")(x)) + x


class SpatialTransformer(nn.Module):
    """SpatialTransformer: GN -> 1x1 proj_in -> tokens -> `num_layers` TransformerBlocks
    -> 1x1 proj_out (zero init) -> + x.

    x: (B, X, Y, Z, C); context: (B, S, cross_attention_dim) or None (then the
    "cross" attention attends to x itself, as in MONAI) -> (B, X, Y, Z, C).
    """

    num_head_channels: int
    num_layers: int
    norm_num_groups: int
    norm_eps: float
    upcast: bool = False
    dtype: Any = jnp.float32
    include_fc: bool = True
    use_combined_linear: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        b, X, Y, Z, c = x.shape
        dt = self.dtype
        heads, hd = _heads(c, self.num_head_channels)
        inner = heads * hd
        h = group_norm(self.norm_num_groups, self.norm_eps, dt, name="norm")(x)
        h = conv(inner, kernel=1, dtype=dt, name="proj_in")(h).reshape(b, X * Y * Z, inner)
        for i in range(self.num_layers):
            h = TransformerBlock(heads, hd, self.upcast, dt, self.include_fc,
                                 self.use_combined_linear, name=f"transformer_blocks_{i}")(
                h, context)
        h = conv(c, kernel=1, dtype=dt, name="proj_out", kernel_init=_zeros)(
            h.reshape(b, X, Y, Z, inner))
        return h + x.astype(h.dtype)


class Downsample(nn.Module):
    """DiffusionUnetDownsample(use_conv=True): conv k3 s2, one voxel of zero padding on BOTH
    sides of each axis (the autoencoder pads at the end only). (B, X, Y, Z, C) -> (B, X/2, ...)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(x.shape[-1], 3, 2, ((1, 1),) * 3, self.dtype, name="op")(x)


@dataclasses.dataclass(frozen=True)
class _Make:
    """Settings every block shares; builds res / attention blocks (remat-wrapped if asked)."""

    norm_num_groups: int
    norm_eps: float
    dtype: Any
    remat: bool
    with_conditioning: bool
    transformer_num_layers: int
    upcast_attention: bool
    include_fc: bool = True
    use_combined_linear: bool = False

    def _cls(self, cls):
        return nn.remat(cls) if self.remat else cls

    def res(self, out_channels: int, name: str, up: bool = False, down: bool = False):
        return self._cls(ResnetBlock)(out_channels, self.norm_num_groups, self.norm_eps, up,
                                      down, self.dtype, name=name)

    def attn(self, num_head_channels: int, name: str):
        if self.with_conditioning:
            return self._cls(SpatialTransformer)(
                num_head_channels, self.transformer_num_layers, self.norm_num_groups,
                self.norm_eps, self.upcast_attention, self.dtype, self.include_fc,
                self.use_combined_linear, name=name)
        return self._cls(SpatialAttentionBlock)(num_head_channels, self.norm_num_groups,
                                                self.norm_eps, self.dtype, self.include_fc,
                                                self.use_combined_linear, name=name)


class DownBlock(nn.Module):
    """DownBlock / AttnDownBlock / CrossAttnDownBlock: `num_res_blocks` resnets (each followed
    by attention when `attention`), then the downsampler (conv, or a resnet with avg-pool
    when resblock_updown). Returns (h, the skips it adds: every resnet(+attn) output and
    the downsampler output)."""

    out_channels: int
    num_res_blocks: int
    attention: bool
    num_head_channels: int
    add_downsample: bool
    resblock_updown: bool
    make: _Make

    @nn.compact
    def __call__(self, h, emb, context=None):
        skips = []
        for j in range(self.num_res_blocks):
            h = self.make.res(self.out_channels, f"resnets_{j}")(h, emb)
            if self.attention:
                h = self.make.attn(self.num_head_channels, f"attentions_{j}")(h, context)
            skips.append(h)
        if self.add_downsample:
            if self.resblock_updown:
                h = self.make.res(self.out_channels, "downsampler", down=True)(h, emb)
            else:
                h = Downsample(self.make.dtype, name="downsampler")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """AttnMidBlock / CrossAttnMidBlock: resnet -> attention -> resnet, attention ALWAYS
    (whatever attention_levels[-1] says), with num_head_channels[-1]."""

    num_head_channels: int
    make: _Make

    @nn.compact
    def __call__(self, h, emb, context=None):
        c = h.shape[-1]
        h = self.make.res(c, "resnet_1")(h, emb)
        h = self.make.attn(self.num_head_channels, "attention")(h, context)
        return self.make.res(c, "resnet_2")(h, emb)


class UpBlock(nn.Module):
    """UpBlock / AttnUpBlock / CrossAttnUpBlock: for each of its resnets, pop the last skip,
    concat [h, skip] (h first), resnet (+ attention); then nearest x2 + conv k3 (or a resnet
    with nearest x2 when resblock_updown)."""

    out_channels: int
    num_resnets: int  # the level's num_res_blocks + 1
    attention: bool
    num_head_channels: int
    add_upsample: bool
    resblock_updown: bool
    make: _Make

    @nn.compact
    def __call__(self, h, skips, emb, context=None):
        skips = list(skips)
        for j in range(self.num_resnets):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = self.make.res(self.out_channels, f"resnets_{j}")(h, emb)
            if self.attention:
                h = self.make.attn(self.num_head_channels, f"attentions_{j}")(h, context)
        if self.add_upsample:
            if self.resblock_updown:
                h = self.make.res(self.out_channels, "upsampler", up=True)(h, emb)
            else:  # params upsampler/postconv: MONAI's upsampler.postconv.conv
                h = layers.Upsample((2, 2, 2), dtype=self.make.dtype, name="upsampler")(h)
        return h


# ----------------------------------------------------------------------------------------
# The model.


def _per_level(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


class DiffusionModelUNet(nn.Module):
    """MONAI's DiffusionModelUNet (spatial_dims=3), channels-last.

    Fields keep MONAI's names and defaults (`num_channels` is MONAI's `channels`);
    `num_res_blocks` and `num_head_channels` take an int or one value per level (0 for a
    level without attention is fine). `dtype`: compute dtype ("float32" | "bfloat16");
    `remat`: "none" | "blocks" (rematerialise every resnet and attention block in the
    backward pass). `include_fc` / `use_combined_linear`: MONAI's attention options (no
    out projection in the self-attentions / one `qkv` Linear; see `Attention`). Not
    ported: MONAI's dropout_cattn (0); use_flash_attention is what `layers.attention`
    decides. Validate a config with `validate_unet`.

    Call: x (B, X, Y, Z, in_channels), each spatial size divisible by 2^(levels - 1);
    timesteps (B,) or scalar, int or float (same units as training, e.g. 0..999);
    context (B, S, cross_attention_dim) when with_conditioning; class_labels (B,) int in
    [0, num_class_embeds) when num_class_embeds is set; down_block_additional_residuals
    (one array per skip, shapes as `ControlNet` returns them) and
    mid_block_additional_residual (B, X/f, Y/f, Z/f, channels[-1]): a ControlNet's outputs,
    added to the skips and to the middle block's output as MONAI's forward does. Returns
    (B, X, Y, Z, out_channels)
    float32. Raises ValueError for a context without with_conditioning or missing
    class_labels (as MONAI does).
    """

    in_channels: int
    out_channels: int
    num_res_blocks: int | Sequence[int] = (2, 2, 2, 2)
    num_channels: Sequence[int] = (32, 64, 64, 64)
    attention_levels: Sequence[bool] = (False, False, True, True)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = False
    num_head_channels: int | Sequence[int] = 8
    with_conditioning: bool = False
    transformer_num_layers: int = 1
    cross_attention_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    include_fc: bool = True
    use_combined_linear: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @property
    def levels(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
        """(channels, num_res_blocks, attention_levels, num_head_channels), one per level."""
        ch = tuple(self.num_channels)
        n = len(ch)
        return (ch, _per_level(self.num_res_blocks, n),
                tuple(bool(a) for a in self.attention_levels),
                _per_level(self.num_head_channels, n))

    @nn.compact
    def __call__(self, x, timesteps, context=None, class_labels=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        emb = self.time_class_embedding(x, timesteps, class_labels)
        return self.unet_body(x, emb, context, down_block_additional_residuals,
                              mid_block_additional_residual)

    def time_class_embedding(self, x, timesteps, class_labels=None):
        """(B, 4 * channels[0]) in the compute dtype: MLP(sinusoid(t)) + class embedding.
        Called inside `__call__` (it defines params)."""
        ch, dt = tuple(self.num_channels), jnp.dtype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
        emb = timestep_embedding(t, ch[0]).astype(dt)
        emb = _dense(4 * ch[0], dt, "time_embed_0")(emb)
        emb = _dense(4 * ch[0], dt, "time_embed_2")(nn.silu(emb))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"class_labels (B,) ints in [0, {self.num_class_embeds}) are "
                                 "required: the UNet was built with num_class_embeds")
            emb = emb + nn.Embed(self.num_class_embeds, 4 * ch[0], dtype=dt,
                                 param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0),  # torch's N(0, 1)
                                 name="class_embedding")(class_labels)
        return emb

    def unet_body(self, x, emb, context=None, down_block_additional_residuals=None,
                  mid_block_additional_residual=None, residual_into_middle: bool = False):
        """conv_in -> down blocks -> middle -> up blocks -> out, given the embedding `emb`
        (B, E) every resnet projects. Called inside `__call__` (it defines params).
        `residual_into_middle`: the middle block also reads the last skip's residual
        (MAISI's UNet adds the residuals in place, and its last skip IS the middle
        block's input tensor)."""
        ch, nrb, att, hc = self.levels
        n = len(ch)
        dt = jnp.dtype(self.dtype)
        make = _Make(self.norm_num_groups, self.norm_eps, dt, self.remat == "blocks",
                     self.with_conditioning, self.transformer_num_layers, self.upcast_attention,
                     self.include_fc, self.use_combined_linear)
        if context is not None and not self.with_conditioning:
            raise ValueError("a context was given but with_conditioning=False: the UNet has no "
                             "cross-attention; set with_conditioning=True and cross_attention_dim")
        h = conv(ch[0], dtype=dt, name="conv_in")(x)
        skips = [h]
        for i in range(n):
            h, new = DownBlock(ch[i], nrb[i], att[i], hc[i], i < n - 1, self.resblock_updown,
                               make, name=f"down_blocks_{i}")(h, emb, context)
            skips += new
        if down_block_additional_residuals is not None:  # a ControlNet's, as MONAI adds them
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has "
                                 f"{len(down_block_additional_residuals)} arrays; the UNet "
                                 f"has {len(skips)} skips (a ControlNet of another shape)")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
            if residual_into_middle:
                h = skips[-1]
        h = MidBlock(hc[-1], make, name="middle_block")(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        for i in range(n):
            lvl = n - 1 - i
            k = nrb[lvl] + 1
            h = UpBlock(ch[lvl], k, att[lvl], hc[lvl], lvl > 0, self.resblock_updown, make,
                        name=f"up_blocks_{i}")(h, skips[-k:], emb, context)
            skips = skips[:-k]
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, dt, name="out_0")(h))
        h = conv(self.out_channels, dtype=dt, name="out_2", kernel_init=_zeros)(h)
        return h.astype(jnp.float32)

    def dummy_inputs(self, spatial=None, batch: int = 1, context_len: int = 1) -> dict:
        """Zero inputs for `init` / `eval_shape`: the smallest valid spatial size by default."""
        n = len(self.num_channels)
        spatial = spatial or (2 ** (n - 1),) * 3
        out = dict(x=jnp.zeros((batch, *spatial, self.in_channels), jnp.float32),
                   timesteps=jnp.zeros((batch,), jnp.int32))
        if self.with_conditioning:
            out["context"] = jnp.zeros((batch, context_len, self.cross_attention_dim), jnp.float32)
        if self.num_class_embeds is not None:
            out["class_labels"] = jnp.zeros((batch,), jnp.int32)
        return out


# ----------------------------------------------------------------------------------------
# Config validation.


def unet_factor(unet_cfg) -> int:
    """Total downsampling 2^(levels - 1) of the UNet: every latent axis must divide by it."""
    return 2 ** (len(tuple(get_field(unet_cfg, "num_channels", ()))) - 1)


def unet_padded_shape(latent_shape, unet_cfg) -> tuple[int, ...]:
    """Smallest spatial shape >= `latent_shape` (X, Y, Z) on each axis that the UNet takes
    (each axis a multiple of 2^(levels - 1)). Pad symmetrically to it (MONAI's
    LatentDiffusionInferer: SpatialPad, then CenterSpatialCrop back)."""
    f = unet_factor(unet_cfg)
    return tuple(-(-int(s) // f) * f for s in latent_shape)


def _unet_problems(u, latent_shape) -> list[str]:
    p = "unet."
    ch = get_field(u, "num_channels")
    if not isinstance(ch, (list, tuple)) or not ch or not all(is_pos_int(c) for c in ch):
        return [f"{p}num_channels must be a non-empty sequence of positive ints like (32, 64, 64); "
                f"got {ch!r}"]
    ch, n = tuple(int(c) for c in ch), len(ch)
    problems: list[str] = []
    g = get_field(u, "norm_num_groups", 32)
    if not is_pos_int(g):
        problems.append(f"{p}norm_num_groups must be a positive int; got {g!r}")
    elif any(c % g for c in ch):
        problems.append(f"{p}norm_num_groups={g} must divide every entry of num_channels={ch} "
                        "(GroupNorm needs whole groups); change one or the other")

    def per_level(name, default, ok, what):
        v = get_field(u, name, default)
        seq = tuple(v) if isinstance(v, (list, tuple)) else None
        if seq is not None and len(seq) != n:
            problems.append(f"{p}{name} needs one value per level ({n}, like num_channels={ch}); "
                            f"got {len(seq)}: {seq!r}")
            return None
        vals = seq if seq is not None else (v,) * n
        if not all(ok(x) for x in vals):
            problems.append(f"{p}{name} must be {what} or {n} of them; got {v!r}")
            return None
        return vals

    per_level("num_res_blocks", 2, is_pos_int, "a positive int")
    att = get_field(u, "attention_levels", (False,) * n)
    if not isinstance(att, (list, tuple)) or len(att) != n:
        problems.append(f"{p}attention_levels needs one bool per level ({n}, like num_channels="
                        f"{ch}); got {att!r}")
        att = None
    hc = per_level("num_head_channels", 8,
                   lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
                   "a non-negative int")
    if hc is not None and att is not None:
        for i in range(n):
            if att[i] and (hc[i] <= 0 or ch[i] % hc[i]):
                problems.append(
                    f"{p}num_head_channels[{i}]={hc[i]} must be a positive divisor of "
                    f"num_channels[{i}]={ch[i]} (level {i} has attention); e.g. {ch[i]} for "
                    "one head")
        if hc[-1] <= 0 or ch[-1] % hc[-1]:
            problems.append(
                f"{p}num_head_channels[-1]={hc[-1]} must be a positive divisor of "
                f"num_channels[-1]={ch[-1]}: the middle block always has attention (MONAI); "
                f"e.g. {ch[-1]} for one head")
    cond, xdim = bool(get_field(u, "with_conditioning", False)), get_field(u, "cross_attention_dim")
    if cond and xdim is None:
        problems.append(f"{p}with_conditioning=True needs cross_attention_dim (the channels of "
                        "the context); set it, or with_conditioning=False")
    if xdim is not None and not cond:
        problems.append(f"{p}cross_attention_dim={xdim!r} is set but with_conditioning=False; "
                        "set with_conditioning=True, or cross_attention_dim=None")
    if xdim is not None and not is_pos_int(xdim):
        problems.append(f"{p}cross_attention_dim must be a positive int or None; got {xdim!r}")
    for name in ("in_channels", "out_channels", "transformer_num_layers"):
        if not is_pos_int(get_field(u, name, 1)):
            problems.append(f"{p}{name} must be a positive int; got {get_field(u, name)!r}")
    ncls = get_field(u, "num_class_embeds")
    if ncls is not None and not is_pos_int(ncls):
        problems.append(f"{p}num_class_embeds must be a positive int or None; got {ncls!r}")
    if get_field(u, "remat", "none") not in REMAT_MODES:
        problems.append(f"{p}remat must be one of {REMAT_MODES}; got {get_field(u, 'remat')!r}")
    dt = get_field(u, "dtype", "float32")
    try:
        dt_ok = jnp.dtype(dt).name in ("float32", "bfloat16")
    except TypeError:
        dt_ok = False
    if not dt_ok:
        problems.append(f"{p}dtype must be 'float32' or 'bfloat16'; got {dt!r}")
    if latent_shape is not None:
        problems += _latent_problems(tuple(latent_shape), ch, get_field(u, "in_channels"), u)
    return problems


def _latent_problems(shape, ch, in_channels, u) -> list[str]:
    if len(shape) not in (3, 4):
        return [f"latent shape must be (X, Y, Z) or (X, Y, Z, C); got {shape!r}"]
    problems = []
    if len(shape) == 4 and in_channels is not None and shape[3] != in_channels:
        problems.append(f"the latents have {shape[3]} channels but unet.in_channels="
                        f"{in_channels}; set unet.in_channels (and out_channels) to {shape[3]}")
    spatial, f = shape[:3], 2 ** (len(ch) - 1)
    if any(s % f for s in spatial):
        padded = unet_padded_shape(spatial, u)
        pads = tuple(((q - s) // 2, q - s - (q - s) // 2) for s, q in zip(spatial, padded))
        problems.append(
            f"latent spatial shape {spatial} is not divisible by {f} (2^(levels-1) for "
            f"{len(ch)} UNet levels); pad the latents symmetrically to {padded} (pads {pads} "
            "per axis, as MONAI's LatentDiffusionInferer does) or use fewer levels")
    return problems


def validate_unet(unet_cfg, latent_shape=None) -> None:
    """Raise ConfigError listing every problem of `config.unet` (a ConfigDict or dict) and,
    when given, of the latent shape (X, Y, Z) or (X, Y, Z, C) it will be trained on."""
    if unet_cfg is None:
        raise ConfigError("config.unet is missing; start from configs/diffusion/default.py")
    raise_problems(_unet_problems(unet_cfg, latent_shape))
