"""ControlNet for the diffusion UNet: MONAI's `ControlNet`, in Flax, weight for weight.

Reference: MONAI 1.6 `monai/networks/nets/controlnet.py` (spatial_dims=3), after Zhang &
Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"
(arXiv:2302.05543). A trainable copy of the UNet's encoder (conv_in, time/class
embedding, down blocks, middle block; the same blocks as `ldm_jax.models.unet`) reads the
noisy latent plus an embedded condition volume; zero-initialised 1x1 convs turn each of
its skips and its middle output into residuals that `DiffusionModelUNet(...,
down_block_additional_residuals=..., mid_block_additional_residual=...)` adds to its own.

The param tree spells MONAI's state_dict keys (`controlnet_cond_embedding/blocks_1/conv`
is `controlnet_cond_embedding.blocks.1.conv.weight`); `ldm_jax.models.controlnet_convert`
maps state dicts both ways and `controlnet_from_unet` copies a trained UNet's encoder in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.layers import conv
from ldm_jax.models.unet import DownBlock, MidBlock, _dense, _Make, _per_level, timestep_embedding

_zeros = nn.initializers.zeros  # MONAI's zero_module


class ControlNetConditioningEmbedding(nn.Module):
    """MONAI's ControlNetConditioningEmbedding: conv3 -> SiLU, then per further entry of
    `num_channels` [conv3 -> SiLU, conv3 stride 2 (padding 1 both sides) -> SiLU], then a
    zero-initialised conv3 to `out_channels` (no activation).

    x: (B, X, Y, Z, C_cond) -> (B, X / 2^(k-1), ..., out_channels), k = len(num_channels)
    (each spatial size must divide by 2^(k-1)).
    """

    out_channels: int
    num_channels: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ch, dt = tuple(self.num_channels), self.dtype
        h = nn.silu(conv(ch[0], dtype=dt, name="conv_in")(x.astype(dt)))
        for i in range(len(ch) - 1):
            h = nn.silu(conv(ch[i], dtype=dt, name=f"blocks_{2 * i}")(h))
            h = nn.silu(conv(ch[i + 1], 3, 2, ((1, 1),) * 3, dt, name=f"blocks_{2 * i + 1}")(h))
        return conv(self.out_channels, dtype=dt, name="conv_out", kernel_init=_zeros)(h)


class ControlNet(nn.Module):
    """MONAI's ControlNet (spatial_dims=3), channels-last.

    Fields: those of `DiffusionModelUNet` for the encoder it copies (same names and
    defaults; there is no out_channels), plus `conditioning_embedding_in_channels` (the
    condition volume's channels) and `conditioning_embedding_num_channels` (the embedding's
    conv widths; its length k sets the condition's resolution: 2^(k-1) times the latent's
    on each axis). `include_fc` / `use_combined_linear` as the UNet's; MONAI's
    use_flash_attention is what `layers.attention` decides.

    Call: x (B, X, Y, Z, in_channels) the noisy latent, each spatial size divisible by
    2^(levels - 1); timesteps (B,) or scalar; controlnet_cond (B, X*2^(k-1), Y*2^(k-1),
    Z*2^(k-1), conditioning_embedding_in_channels); conditioning_scale (float or traced
    scalar) multiplies every residual; context / class_labels as the UNet's.
    Returns (down_block_res_samples, mid_block_res_sample): a list with one float32 array
    per UNet skip ((B, X, Y, Z, channels[0]) first, then each down block's) and
    (B, X/2^(levels-1), ..., channels[-1]) float32. Raises ValueError (as MONAI) for a
    context without with_conditioning, missing class_labels, or a condition whose
    embedded size is not the latent's.
    """

    in_channels: int
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
    conditioning_embedding_in_channels: int = 1
    conditioning_embedding_num_channels: Sequence[int] = (16, 32, 96, 256)
    include_fc: bool = True
    use_combined_linear: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @property
    def condition_factor(self) -> int:
        """How many condition voxels per latent voxel along each axis: 2^(k-1)."""
        return 2 ** (len(tuple(self.conditioning_embedding_num_channels)) - 1)

    @nn.compact
    def __call__(self, x, timesteps, controlnet_cond, conditioning_scale=1.0, context=None,
                 class_labels=None):
        ch = tuple(self.num_channels)
        n = len(ch)
        nrb, hc = _per_level(self.num_res_blocks, n), _per_level(self.num_head_channels, n)
        att = tuple(bool(a) for a in self.attention_levels)
        dt = jnp.dtype(self.dtype)
        make = _Make(self.norm_num_groups, self.norm_eps, dt, self.remat == "blocks",
                     self.with_conditioning, self.transformer_num_layers, self.upcast_attention,
                     self.include_fc, self.use_combined_linear)
        if context is not None and not self.with_conditioning:
            raise ValueError("a context was given but with_conditioning=False: the ControlNet "
                             "has no cross-attention")

        t = jnp.broadcast_to(jnp.asarray(timesteps), (x.shape[0],))
        emb = timestep_embedding(t, ch[0]).astype(dt)
        emb = _dense(4 * ch[0], dt, "time_embed_0")(emb)
        emb = _dense(4 * ch[0], dt, "time_embed_2")(nn.silu(emb))
        if self.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"class_labels (B,) ints in [0, {self.num_class_embeds}) are "
                                 "required: the ControlNet was built with num_class_embeds")
            emb = emb + nn.Embed(self.num_class_embeds, 4 * ch[0], dtype=dt,
                                 param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0),
                                 name="class_embedding")(class_labels)

        h = conv(ch[0], dtype=dt, name="conv_in")(x)
        cond = ControlNetConditioningEmbedding(
            ch[0], tuple(self.conditioning_embedding_num_channels), dt,
            name="controlnet_cond_embedding")(controlnet_cond)
        if cond.shape[1:4] != h.shape[1:4]:
            raise ValueError(f"the condition {tuple(controlnet_cond.shape[1:4])} embeds to "
                             f"{tuple(cond.shape[1:4])}, not the latent's {tuple(h.shape[1:4])}: "
                             f"it must be {self.condition_factor}x the latent on each axis")
        h = h + cond
        skips = [h]
        for i in range(n):
            h, new = DownBlock(ch[i], nrb[i], att[i], hc[i], i < n - 1, self.resblock_updown,
                               make, name=f"down_blocks_{i}")(h, emb, context)
            skips += new
        h = MidBlock(hc[-1], make, name="middle_block")(h, emb, context)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        down = [conv(s.shape[-1], kernel=1, dtype=dt, name=f"controlnet_down_blocks_{j}",
                     kernel_init=_zeros)(s).astype(jnp.float32) * scale
                for j, s in enumerate(skips)]
        mid = conv(h.shape[-1], kernel=1, dtype=dt, name="controlnet_mid_block",
                   kernel_init=_zeros)(h).astype(jnp.float32) * scale
        return down, mid

    def dummy_inputs(self, spatial=None, batch: int = 1, context_len: int = 1) -> dict:
        """Zero inputs for `init` / `eval_shape`: the smallest valid latent size by default,
        the condition at `condition_factor` times it."""
        n = len(self.num_channels)
        spatial = tuple(spatial or (2 ** (n - 1),) * 3)
        f = self.condition_factor
        cond = (batch, *(s * f for s in spatial), self.conditioning_embedding_in_channels)
        out = {"x": jnp.zeros((batch, *spatial, self.in_channels), jnp.float32),
               "timesteps": jnp.zeros((batch,), jnp.int32),
               "controlnet_cond": jnp.zeros(cond, jnp.float32)}
        if self.with_conditioning:
            out["context"] = jnp.zeros((batch, context_len, self.cross_attention_dim), jnp.float32)
        if self.num_class_embeds is not None:
            out["class_labels"] = jnp.zeros((batch,), jnp.int32)
        return out


# The UNet's params a ControlNet shares (same names, same shapes): MONAI's tutorials copy
# them with `controlnet.load_state_dict(unet.state_dict(), strict=False)`.
SHARED_WITH_UNET = ("conv_in", "time_embed_0", "time_embed_2", "class_embedding",
                    "middle_block")


def controlnet_from_unet(controlnet_params: Mapping, unet_params: Mapping) -> dict:
    """`controlnet_params` with every param the UNet also has (conv_in, time embedding,
    class embedding, down blocks, middle block) replaced by the UNet's: MONAI's
    `controlnet.load_state_dict(unet.state_dict(), strict=False)` (its tutorials' and
    MAISI's initialisation). The conditioning embedding and the zero convs keep theirs.

    Args: param trees (dicts; a `{"params": ...}` variables dict is unwrapped) of a
    ControlNet and of the UNet it will steer, built with the same encoder fields.
    Returns a new dict. Raises ValueError naming a shared param whose shape differs.
    """
    import jax

    if "params" in controlnet_params:
        controlnet_params = controlnet_params["params"]
    if "params" in unet_params:
        unet_params = unet_params["params"]
    out = dict(controlnet_params)
    for name, value in unet_params.items():
        if name in SHARED_WITH_UNET or name.startswith("down_blocks_"):
            if name not in out:
                raise ValueError(f"the ControlNet has no {name}: it was built with other encoder "
                                 "fields than the UNet (num_channels, num_res_blocks, ...)")
            mine = jax.tree.map(lambda a: a.shape, out[name])
            theirs = jax.tree.map(lambda a: a.shape, value)
            if mine != theirs:
                raise ValueError(f"the UNet's {name} has other shapes than the ControlNet's: "
                                 "build both with the same encoder fields")
            out[name] = jax.tree.map(lambda a: a, value)
    return out


def build_controlnet(cfg: Any, unet_cfg: Any = None) -> ControlNet:
    """ControlNet from a config section (ConfigDict or dict; ControlNet field names). With
    `unet_cfg`, the encoder fields it does not set are the UNet's (the ControlNet copies
    that UNet's encoder), so a section may hold only the conditioning_embedding_* fields.
    Raises ConfigError naming every encoder problem (`validate_unet`'s checks) or a
    conditioning embedding that is not positive ints."""
    from ldm_jax.config import is_pos_int
    from ldm_jax.errors import ConfigError
    from ldm_jax.models import _module_fields, validate_unet

    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    merged = {}
    if unet_cfg is not None:
        uget = unet_cfg.get if hasattr(unet_cfg, "get") else lambda k, d=None: getattr(
            unet_cfg, k, d)
        merged = {k: uget(k) for k in ControlNet.__dataclass_fields__ if uget(k) is not None}
    merged.update({k: get(k) for k in ControlNet.__dataclass_fields__
                   if k not in ("parent", "name") and get(k) is not None})
    validate_unet(dict(merged, out_channels=merged.get("in_channels", 1)))
    emb = merged.get("conditioning_embedding_num_channels", (16, 32, 96, 256))
    if not isinstance(emb, (list, tuple)) or not emb or not all(is_pos_int(c) for c in emb):
        raise ConfigError("controlnet.conditioning_embedding_num_channels must be a non-empty "
                          f"sequence of positive ints like (16, 32); got {emb!r}")
    cin = merged.get("conditioning_embedding_in_channels", 1)
    if not is_pos_int(cin):
        raise ConfigError("controlnet.conditioning_embedding_in_channels must be a positive "
                          f"int; got {cin!r}")
    return ControlNet(**_module_fields(ControlNet, merged, "controlnet"))
