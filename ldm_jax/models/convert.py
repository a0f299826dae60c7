"""Map MONAI state_dicts onto our Flax params (AutoencoderKL and PatchDiscriminator).

Why: MONAI-trained autoencoders (e.g. the 3D LDM tutorial's) can be loaded, fine-tuned and
encoded with ldm-jax, and the parity tests prove that our model is the same function.

Layout rules: Conv3d weight (O, I, kx, ky, kz) -> Flax kernel (kx, ky, kz, I, O);
ConvTranspose3d weight (I, O, kx, ky, kz) -> (kx, ky, kz, I, O) (no flip);
Linear weight (out, in) -> kernel (in, out); GroupNorm/BatchNorm weight -> scale.
MONAI's spatial axes (D, H, W) of an NCDHW tensor are our (X, Y, Z) of (B, X, Y, Z, C).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config import ConfigError


class ConversionError(ValueError):
    """A state_dict does not match the model built from the config (missing/extra/shape)."""


def _np(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


class _Reader:
    """Pops MONAI keys, transforms them and records where they go; reports the first problem."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self.sd = dict(state_dict)
        self.used: set[str] = set()
        self.out: dict = {}

    def take(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise ConversionError(
                f"missing key {key!r} in the MONAI state_dict: the config does not describe the "
                "model that saved it (check num_channels, num_res_blocks, attention_levels, "
                "with_*_nonlocal_attn and use_convtranspose)")
        self.used.add(key)
        return _np(self.sd[key])

    def put(self, path: tuple[str, ...], value: np.ndarray) -> None:
        d = self.out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = value

    # -- layer kinds ---------------------------------------------------------------------

    def conv(self, key: str, path, bias: bool = True) -> None:
        w = self.take(f"{key}.weight")
        if w.ndim != 5:
            raise ConversionError(f"{key}.weight has shape {w.shape}; expected a Conv3d weight "
                                  "(out, in, kx, ky, kz)")
        self.put((*path, "kernel"), w.transpose(2, 3, 4, 1, 0))
        if bias:
            self.put((*path, "bias"), self.take(f"{key}.bias"))

    def deconv(self, key: str, path) -> None:
        w = self.take(f"{key}.weight")
        self.put((*path, "kernel"), w.transpose(2, 3, 4, 0, 1))
        self.put((*path, "bias"), self.take(f"{key}.bias"))

    def norm(self, key: str, path) -> None:
        self.put((*path, "scale"), self.take(f"{key}.weight"))
        self.put((*path, "bias"), self.take(f"{key}.bias"))

    def linear(self, key: str, path) -> None:
        self.put((*path, "kernel"), self.take(f"{key}.weight").T)
        self.put((*path, "bias"), self.take(f"{key}.bias"))

    def res(self, key: str, path, shortcut: bool) -> None:
        self.norm(f"{key}.norm1", (*path, "norm1"))
        self.conv(f"{key}.conv1.conv", (*path, "conv1"))
        self.norm(f"{key}.norm2", (*path, "norm2"))
        self.conv(f"{key}.conv2.conv", (*path, "conv2"))
        if shortcut:
            self.conv(f"{key}.nin_shortcut.conv", (*path, "nin_shortcut"))

    def attn(self, key: str, path) -> None:
        self.norm(f"{key}.norm", (*path, "norm"))
        for n in ("to_q", "to_k", "to_v", "out_proj"):
            self.linear(f"{key}.attn.{n}", (*path, n))

    def finish(self, expected) -> dict:
        extra = [k for k in self.sd if k not in self.used and not k.endswith("num_batches_tracked")]
        if extra:
            raise ConversionError(
                f"unexpected key {extra[0]!r} in the MONAI state_dict ({len(extra)} unused in "
                "all): the checkpoint has layers the config does not describe (check "
                "num_channels, num_res_blocks, attention_levels, with_*_nonlocal_attn)")
        _check_tree(self.out, expected)
        return self.out


def _check_tree(got, expected, where: str = "") -> None:
    """Same keys and shapes as the model's own init, or a ConversionError naming the first diff."""
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            raise ConversionError(f"{where or 'params'}: expected a sub-tree, got an array")
        for k in expected:
            if k not in got:
                raise ConversionError(f"converted params lack {where}/{k}: the state_dict "
                                      "describes a different model than the config")
        for k in got:
            if k not in expected:
                raise ConversionError(f"converted params have {where}/{k}, which the model "
                                      "built from the config does not have")
        for k in expected:
            _check_tree(got[k], expected[k], f"{where}/{k}")
        return
    if tuple(got.shape) != tuple(expected.shape):
        raise ConversionError(
            f"shape mismatch at {where}: the state_dict gives {tuple(got.shape)}, the model "
            f"built from the config expects {tuple(expected.shape)} (check num_channels, "
            "latent_channels, in/out_channels)")


def _monai_compatible(model) -> None:
    problems = []
    if model.initial_factor != (1, 1, 1):
        problems.append(f"initial_downsample_factor must be 1 (got {model.initial_factor})")
    if any(f != (2, 2, 2) for f in model.level_factors):
        problems.append(f"downsample_factors must all be 2 (got {model.level_factors})")
    if not model.use_conv_downsample:
        problems.append("use_conv_downsample must be True")
    if model.strided_kernel not in (None, 3):
        problems.append(f"strided_kernel must be None or 3 (got {model.strided_kernel})")
    if problems:
        raise ConfigError("from_monai needs a MONAI-compatible autoencoder config: "
                          + "; ".join(problems))


def from_monai(state_dict: Mapping[str, Any], ae_cfg) -> dict:
    """Params (nested dict of float32 numpy arrays) for `build_autoencoder(ae_cfg)` from a
    MONAI `AutoencoderKL(spatial_dims=3, ...)` state_dict (torch tensors or numpy arrays).

    Use as `model.apply({"params": params}, x, ...)`; raises ConversionError naming the first
    missing/unexpected key or mismatched shape.
    """
    from ldm_jax.models import AutoencoderKL, build_autoencoder

    model = ae_cfg if isinstance(ae_cfg, AutoencoderKL) else build_autoencoder(ae_cfg)
    _monai_compatible(model)
    ch = tuple(model.num_channels)
    nrb = model.res_blocks_per_level
    att = tuple(bool(a) for a in model.attention_levels)
    n = len(ch)
    r = _Reader(state_dict)

    # Encoder, in MONAI's block order.
    b = 0
    r.conv(f"encoder.blocks.{b}.conv", ("encoder", "conv_in"))
    b += 1
    cin = ch[0]
    for i in range(n):
        for j in range(nrb[i]):
            r.res(f"encoder.blocks.{b}", ("encoder", f"level_{i}", f"res_{j}"), cin != ch[i])
            cin = ch[i]
            b += 1
            if att[i]:
                r.attn(f"encoder.blocks.{b}", ("encoder", f"level_{i}", f"attn_{j}"))
                b += 1
        if i < n - 1:
            r.conv(f"encoder.blocks.{b}.conv.conv", ("encoder", f"level_{i}", "down", "conv"))
            b += 1
    if model.with_encoder_nonlocal_attn:
        r.res(f"encoder.blocks.{b}", ("encoder", "mid", "res_0"), False)
        r.attn(f"encoder.blocks.{b + 1}", ("encoder", "mid", "attn"))
        r.res(f"encoder.blocks.{b + 2}", ("encoder", "mid", "res_1"), False)
        b += 3
    r.norm(f"encoder.blocks.{b}", ("encoder", "norm_out"))
    r.conv(f"encoder.blocks.{b + 1}.conv", ("encoder", "conv_out"))

    for name in ("quant_conv_mu", "quant_conv_log_sigma", "post_quant_conv"):
        r.conv(f"{name}.conv", (name,))

    # Decoder: levels deepest first (our level_0 is MONAI's first decoder level).
    b = 0
    r.conv(f"decoder.blocks.{b}.conv", ("decoder", "conv_in"))
    b += 1
    if model.with_decoder_nonlocal_attn:
        r.res(f"decoder.blocks.{b}", ("decoder", "mid", "res_0"), False)
        r.attn(f"decoder.blocks.{b + 1}", ("decoder", "mid", "attn"))
        r.res(f"decoder.blocks.{b + 2}", ("decoder", "mid", "res_1"), False)
        b += 3
    cin = ch[-1]
    for i in range(n):
        enc = n - 1 - i
        for j in range(nrb[enc]):
            r.res(f"decoder.blocks.{b}", ("decoder", f"level_{i}", f"res_{j}"), cin != ch[enc])
            cin = ch[enc]
            b += 1
            if att[enc]:
                r.attn(f"decoder.blocks.{b}", ("decoder", f"level_{i}", f"attn_{j}"))
                b += 1
        if enc > 0:
            up = ("decoder", f"level_{i}", "up")
            if model.use_convtranspose:
                r.deconv(f"decoder.blocks.{b}.deconv", (*up, "deconv"))
            else:
                r.conv(f"decoder.blocks.{b}.postconv.conv", (*up, "postconv"))
            b += 1
    r.norm(f"decoder.blocks.{b}", ("decoder", "head", "norm_out"))
    r.conv(f"decoder.blocks.{b + 1}.conv", ("decoder", "head", "conv_out"))

    x = jax.ShapeDtypeStruct((1, *model.total_factor, model.in_channels), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(
        {"params": jax.random.key(0), "sample": jax.random.key(1)}, x, sample=False), x)["params"]
    return r.finish(expected)


def discriminator_from_monai(state_dict: Mapping[str, Any], disc_cfg) -> dict:
    """Variables ({"params"} and, for norm="batch", {"batch_stats"}) for
    `build_discriminator(disc_cfg)` from a MONAI `PatchDiscriminator(spatial_dims=3)` state_dict."""
    from ldm_jax.models import PatchDiscriminator, build_discriminator

    model = disc_cfg if isinstance(disc_cfg, PatchDiscriminator) else build_discriminator(disc_cfg)
    r = _Reader(state_dict)
    r.conv("initial_conv.conv", ("params", "initial_conv"))
    for l in range(model.num_layers_d):
        r.conv(f"{l}.conv", ("params", f"conv_{l}"), bias=False)
        if model.norm == "batch":
            r.norm(f"{l}.adn.N", ("params", f"norm_{l}"))
            r.put(("batch_stats", f"norm_{l}", "mean"), r.take(f"{l}.adn.N.running_mean"))
            r.put(("batch_stats", f"norm_{l}", "var"), r.take(f"{l}.adn.N.running_var"))
    r.conv("final_conv.conv", ("params", "final_conv"))
    size = 2 ** (model.num_layers_d + 2)
    x = jax.ShapeDtypeStruct((1, size, size, size, model.in_channels), jnp.float32)
    expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return r.finish(expected)
