"""MONAI state dicts <-> our Flax params (AutoencoderKL and PatchDiscriminator), both ways.

Why: MONAI-trained autoencoders (e.g. the 3D LDM tutorial's) can be loaded, fine-tuned and
encoded with ldm-jax, models trained here go back to MONAI users, and the parity tests
prove that our model is the same function as MONAI's.

One table per model lists every MONAI key with the Flax path it maps to and its layout;
`from_monai`/`to_monai` (and the discriminator's pair) walk the same table in opposite
directions. Layout rules: Conv3d weight (O, I, kx, ky, kz) <-> Flax kernel
(kx, ky, kz, I, O); ConvTranspose3d weight (I, O, kx, ky, kz) <-> (kx, ky, kz, I, O) (no
flip); Linear weight (out, in) <-> kernel (in, out); GroupNorm/BatchNorm weight <-> scale.
MONAI's spatial axes (D, H, W) of an NCDHW tensor are our (X, Y, Z) of (B, X, Y, Z, C).
Reading accepts state dicts as people save them (`ldm_jax.models.state_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError, ConversionError
from ldm_jax.models.state_dict import load_state_dict

__all__ = ["ConversionError", "from_monai", "to_monai", "discriminator_from_monai",
           "discriminator_to_monai", "monai_autoencoder_kwargs",
           "monai_discriminator_kwargs", "monai_incompatibilities", "old_generative_names"]

# Flax axes from torch axes per layout ("vector": as is; "count": a BatchNorm
# num_batches_tracked buffer, written as 0 and not read).
_PERM = {"conv": (2, 3, 4, 1, 0), "deconv": (2, 3, 4, 0, 1), "linear": (1, 0)}
_WHAT = {"conv": "a Conv3d weight (out, in, kx, ky, kz)",
         "deconv": "a ConvTranspose3d weight (in, out, kx, ky, kz)",
         "linear": "a Linear weight (out, in)"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One MONAI state-dict entry: its key, our variables path and the layout."""

    key: str
    path: tuple[str, ...] | None
    layout: str  # "conv" | "deconv" | "linear" | "vector" | "count"


class _Table:
    """Builds the list of Leaf entries layer by layer (MONAI's names on the left)."""

    def __init__(self, root: tuple[str, ...] = ()):
        self.root = root
        self.leaves: list[Leaf] = []

    def add(self, key: str, path: tuple[str, ...] | None, layout: str) -> None:
        self.leaves.append(Leaf(key, None if path is None else (*self.root, *path), layout))

    def conv(self, key, path, bias=True, layout="conv"):
        self.add(f"{key}.weight", (*path, "kernel"), layout)
        if bias:
            self.add(f"{key}.bias", (*path, "bias"), "vector")

    def norm(self, key, path):
        self.add(f"{key}.weight", (*path, "scale"), "vector")
        self.add(f"{key}.bias", (*path, "bias"), "vector")

    def res(self, key, path, shortcut: bool):
        self.norm(f"{key}.norm1", (*path, "norm1"))
        self.conv(f"{key}.conv1.conv", (*path, "conv1"))
        self.norm(f"{key}.norm2", (*path, "norm2"))
        self.conv(f"{key}.conv2.conv", (*path, "conv2"))
        if shortcut:
            self.conv(f"{key}.nin_shortcut.conv", (*path, "nin_shortcut"))

    def attn(self, key, path):
        self.norm(f"{key}.norm", (*path, "norm"))
        for n in ("out_proj", "to_q", "to_k", "to_v"):  # MONAI's order
            self.conv(f"{key}.attn.{n}", (*path, n), layout="linear")

    def mid(self, key_of, path):
        """MONAI's non-local block: three consecutive blocks from `key_of(0)`."""
        self.res(key_of(0), (*path, "res_0"), False)
        self.attn(key_of(1), (*path, "attn"))
        self.res(key_of(2), (*path, "res_1"), False)


# -- the autoencoder --------------------------------------------------------------------

def _model(cfg, cls_name: str, build_name: str):
    import ldm_jax.models as models
    return cfg if isinstance(cfg, getattr(models, cls_name)) else getattr(models, build_name)(cfg)


def monai_incompatibilities(ae_cfg) -> list[str]:
    """'field must be X (got Y)' for every autoencoder setting MONAI's AutoencoderKL cannot
    express; empty when the model converts both ways."""
    model = _model(ae_cfg, "AutoencoderKL", "build_autoencoder")
    problems = []
    if model.initial_factor != (1, 1, 1):
        problems.append(f"initial_downsample_factor must be 1 (got {model.initial_factor}; "
                        "MONAI has no strided stem, nor the upsample_head that undoes it)")
    if any(f != (2, 2, 2) for f in model.level_factors):
        problems.append(f"downsample_factors must all be 2, i.e. None (got {model.level_factors})")
    if not model.use_conv_downsample:
        problems.append("use_conv_downsample must be True (got False: average pooling)")
    if model.strided_kernel not in (None, 3):
        problems.append(f"strided_kernel must be None or 3 (got {model.strided_kernel})")
    return problems


def _monai_compatible(model, fn: str) -> None:
    problems = monai_incompatibilities(model)
    if problems:
        raise ConfigError(f"{fn} needs a MONAI-compatible autoencoder config: "
                          + "; ".join(problems))


def _autoencoder_table(model) -> list[Leaf]:
    """Every MONAI AutoencoderKL key, in MONAI's state-dict order, with our params path."""
    ch = tuple(model.num_channels)
    nrb = model.res_blocks_per_level
    att = tuple(bool(a) for a in model.attention_levels)
    n = len(ch)
    t = _Table()

    b = 0
    t.conv(f"encoder.blocks.{b}.conv", ("encoder", "conv_in"))
    b += 1
    cin = ch[0]
    for i in range(n):
        for j in range(nrb[i]):
            t.res(f"encoder.blocks.{b}", ("encoder", f"level_{i}", f"res_{j}"), cin != ch[i])
            cin = ch[i]
            b += 1
            if att[i]:
                t.attn(f"encoder.blocks.{b}", ("encoder", f"level_{i}", f"attn_{j}"))
                b += 1
        if i < n - 1:
            t.conv(f"encoder.blocks.{b}.conv.conv", ("encoder", f"level_{i}", "down", "conv"))
            b += 1
    if model.with_encoder_nonlocal_attn:
        t.mid(lambda k, b=b: f"encoder.blocks.{b + k}", ("encoder", "mid"))
        b += 3
    t.norm(f"encoder.blocks.{b}", ("encoder", "norm_out"))
    t.conv(f"encoder.blocks.{b + 1}.conv", ("encoder", "conv_out"))

    # Decoder: levels deepest first (our level_0 is MONAI's first decoder level).
    b = 0
    t.conv(f"decoder.blocks.{b}.conv", ("decoder", "conv_in"))
    b += 1
    if model.with_decoder_nonlocal_attn:
        t.mid(lambda k, b=b: f"decoder.blocks.{b + k}", ("decoder", "mid"))
        b += 3
    cin = ch[-1]
    for i in range(n):
        enc = n - 1 - i
        for j in range(nrb[enc]):
            t.res(f"decoder.blocks.{b}", ("decoder", f"level_{i}", f"res_{j}"), cin != ch[enc])
            cin = ch[enc]
            b += 1
            if att[enc]:
                t.attn(f"decoder.blocks.{b}", ("decoder", f"level_{i}", f"attn_{j}"))
                b += 1
        if enc > 0:
            up = ("decoder", f"level_{i}", "up")
            if model.use_convtranspose:
                t.conv(f"decoder.blocks.{b}.deconv", (*up, "deconv"), layout="deconv")
            else:
                t.conv(f"decoder.blocks.{b}.postconv.conv", (*up, "postconv"))
            b += 1
    t.norm(f"decoder.blocks.{b}", ("decoder", "head", "norm_out"))
    t.conv(f"decoder.blocks.{b + 1}.conv", ("decoder", "head", "conv_out"))
    for name in ("quant_conv_mu", "quant_conv_log_sigma", "post_quant_conv"):
        t.conv(f"{name}.conv", (name,))
    return t.leaves


@functools.lru_cache(maxsize=16)  # flax modules hash by their fields; not mutated
def _autoencoder_shapes(model) -> dict:
    x = jax.ShapeDtypeStruct((1, *model.total_factor, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(
        {"params": jax.random.key(0), "sample": jax.random.key(1)}, x, sample=False), x)["params"]


# MONAI GenerativeModels' AutoencoderKL (before MONAI 1.4) named the attention projections
# on the block itself and the upsampler's conv `conv` (MONAI autoencoderkl.py,
# `load_old_state_dict`).
_OLD_NAMES = (
    (re.compile(r"\.to_([qkv])\.(weight|bias)$"), r".attn.to_\1.\2"),
    (re.compile(r"\.proj_attn\.(weight|bias)$"), r".attn.out_proj.\1"),
    (re.compile(r"^(.*decoder\.blocks\.\d+)\.conv\.conv\.(weight|bias)$"), r"\1.postconv.conv.\2"),
)


def old_generative_names(key: str) -> str:
    """A MONAI GenerativeModels AutoencoderKL key -> its MONAI 1.4+ name (others unchanged)."""
    for pattern, repl in _OLD_NAMES:
        new = pattern.sub(repl, key)
        if new != key:
            return new
    return key


_AE_HINT = ("If it is a MONAI AutoencoderKL, the config must match the settings it was built "
            "with: num_channels, num_res_blocks, attention_levels, "
            "with_encoder/decoder_nonlocal_attn, use_convtranspose")


def from_monai(state_dict: Any, ae_cfg) -> dict:
    """Params for `build_autoencoder(ae_cfg)` from a MONAI `AutoencoderKL(spatial_dims=3)`.

    Args:
      state_dict: its state dict (torch tensors or numpy arrays), the nn.Module, a training
        checkpoint holding it, or a .pt/.pth path, wrapped or not (`module.`,
        `_orig_mod.`, ...; see `ldm_jax.models.state_dict.load_state_dict`); MONAI
        GenerativeModels' old attention/upsampler names are accepted.
      ae_cfg: `config.autoencoder` (or an AutoencoderKL module) with MONAI-compatible
        settings (stem 1, level factors 2, conv downsampling).

    Returns:
      Nested dict of float32 numpy arrays; use as `model.apply({"params": params}, x)`.

    Raises:
      ConversionError: keys that do not fit (with what they look like) or a shape mismatch.
      ConfigError: a config MONAI's model cannot express (lists the fields).
    """
    model = _model(ae_cfg, "AutoencoderKL", "build_autoencoder")
    _monai_compatible(model, "from_monai")
    return _read(state_dict, _autoencoder_table(model), _autoencoder_shapes(model),
                 old_generative_names, "a MONAI AutoencoderKL built from this config", _AE_HINT)


def to_monai(params: Mapping, ae_cfg) -> dict:
    """MONAI `AutoencoderKL(**monai_autoencoder_kwargs(ae_cfg))` state dict from our params.

    The inverse of `from_monai`: MONAI loads it with `load_state_dict(strict=True)` and
    computes the same function. Values are float32 torch tensors when torch is importable,
    else numpy arrays. Raises ConfigError for a config MONAI cannot express and
    ConversionError when `params` do not fit the model built from `ae_cfg`.
    """
    model = _model(ae_cfg, "AutoencoderKL", "build_autoencoder")
    _monai_compatible(model, "to_monai")
    return _write(params, _autoencoder_table(model), _autoencoder_shapes(model))


def monai_autoencoder_kwargs(ae_cfg) -> dict:
    """Keyword arguments of `monai.networks.nets.AutoencoderKL` for the same model (JSON-able).

    Raises ConfigError when MONAI's model cannot express the config.
    """
    model = _model(ae_cfg, "AutoencoderKL", "build_autoencoder")
    _monai_compatible(model, "MONAI export")
    return dict(
        spatial_dims=3, in_channels=int(model.in_channels), out_channels=int(model.out_channels),
        num_res_blocks=[int(b) for b in model.res_blocks_per_level],
        channels=[int(c) for c in model.num_channels],
        attention_levels=[bool(a) for a in model.attention_levels],
        latent_channels=int(model.latent_channels), norm_num_groups=int(model.norm_num_groups),
        norm_eps=float(model.norm_eps),
        with_encoder_nonlocal_attn=bool(model.with_encoder_nonlocal_attn),
        with_decoder_nonlocal_attn=bool(model.with_decoder_nonlocal_attn),
        use_checkpoint=False, use_convtranspose=bool(model.use_convtranspose),
        include_fc=True, use_combined_linear=False, use_flash_attention=False)


# -- the discriminator ------------------------------------------------------------------

def _discriminator_table(model) -> list[Leaf]:
    t = _Table()
    t.conv("initial_conv.conv", ("params", "initial_conv"))
    for l in range(model.num_layers_d):
        t.conv(f"{l}.conv", ("params", f"conv_{l}"), bias=False)
        if model.norm == "batch":
            t.norm(f"{l}.adn.N", ("params", f"norm_{l}"))
            t.add(f"{l}.adn.N.running_mean", ("batch_stats", f"norm_{l}", "mean"), "vector")
            t.add(f"{l}.adn.N.running_var", ("batch_stats", f"norm_{l}", "var"), "vector")
            t.add(f"{l}.adn.N.num_batches_tracked", None, "count")
    t.conv("final_conv.conv", ("params", "final_conv"))
    return t.leaves


@functools.lru_cache(maxsize=16)
def _discriminator_shapes(model) -> dict:
    size = 2 ** (model.num_layers_d + 2)
    x = jax.ShapeDtypeStruct((1, size, size, size, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}


def discriminator_from_monai(state_dict: Any, disc_cfg) -> dict:
    """Variables ({"params"} and, for norm="batch", {"batch_stats"}) for
    `build_discriminator(disc_cfg)` from a MONAI `PatchDiscriminator(spatial_dims=3)` state
    dict (any form `from_monai` takes). Raises ConversionError as `from_monai` does."""
    model = _model(disc_cfg, "PatchDiscriminator", "build_discriminator")
    return _read(state_dict, _discriminator_table(model), _discriminator_shapes(model), None,
                 "a MONAI PatchDiscriminator built from this config",
                 "If it is a MONAI PatchDiscriminator, the config must match its num_layers_d "
                 "and norm")


def discriminator_to_monai(variables: Mapping, disc_cfg) -> dict:
    """MONAI `PatchDiscriminator(**monai_discriminator_kwargs(disc_cfg))` state dict from
    our variables ({"params", "batch_stats"} as `discriminator_from_monai` returns; bare
    params are accepted for norm="instance"). BatchNorm's `num_batches_tracked` is written
    as 0 (unused with MONAI's momentum 0.1). Torch tensors when torch is importable."""
    model = _model(disc_cfg, "PatchDiscriminator", "build_discriminator")
    if "params" not in variables and model.norm == "instance":
        variables = {"params": variables}
    return _write(variables, _discriminator_table(model), _discriminator_shapes(model))


def monai_discriminator_kwargs(disc_cfg) -> dict:
    """Keyword arguments of `monai.networks.nets.PatchDiscriminator` (JSON-able)."""
    model = _model(disc_cfg, "PatchDiscriminator", "build_discriminator")
    return dict(spatial_dims=3, channels=int(model.num_channels),
                in_channels=int(model.in_channels), out_channels=int(model.out_channels),
                num_layers_d=int(model.num_layers_d), kernel_size=int(model.kernel_size),
                norm=model.norm.upper(), bias=False, padding=int(model.padding), dropout=0.0,
                last_conv_kernel_size=None if model.last_conv_kernel_size is None
                else int(model.last_conv_kernel_size))


# -- the two directions over a table ----------------------------------------------------

def _np(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        # A copy: .numpy() shares the tensor's memory, which in-place updates (running
        # statistics, EMA codebooks) would change under the converted params.
        v = v.detach().cpu().float().numpy().copy()
    return np.asarray(jax.device_get(v), dtype=np.float32)


def _read(source, leaves, shapes, rename, what, hint) -> dict:
    sd = load_state_dict(source, [l.key for l in leaves if l.layout != "count"],
                         rename=rename, what=what, hint=hint)
    out: dict = {}
    for leaf in leaves:
        if leaf.layout == "count":
            continue
        w = _np(sd[leaf.key])
        perm = _PERM.get(leaf.layout)
        if perm is not None:
            if w.ndim != len(perm):
                raise ConversionError(f"{leaf.key} has shape {w.shape}; expected "
                                      f"{_WHAT[leaf.layout]} (is it a 3D model?)")
            w = w.transpose(perm)
        d = out
        for p in leaf.path[:-1]:
            d = d.setdefault(p, {})
        d[leaf.path[-1]] = w
    _check_tree(out, shapes, "the state dict")
    return out


def _write(variables, leaves, shapes) -> dict:
    _check_tree(variables, shapes, "the params")
    try:
        import torch
    except ImportError:
        torch = None
    out = {}
    for leaf in leaves:
        if leaf.layout == "count":
            out[leaf.key] = np.zeros((), np.int64)
        else:
            w = variables
            for p in leaf.path:
                w = w[p]
            w = _np(w)
            perm = _PERM.get(leaf.layout)
            out[leaf.key] = np.array(w if perm is None else w.transpose(np.argsort(perm)),
                                     order="C")  # a writable copy (torch.from_numpy shares it)
    if torch is not None:
        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out


def _check_tree(got, expected, source: str, where: str = "") -> None:
    """Same keys and shapes as the model's own init, or a ConversionError naming the first diff."""
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            raise ConversionError(f"{source} has an array at {where or '/'}, where the model "
                                  "built from the config has a sub-tree")
        for k in expected:
            if k not in got:
                raise ConversionError(f"{where}/{k} is missing from {source} but the model "
                                      "built from the config has it: they describe different "
                                      "models")
        for k in got:
            if k not in expected:
                raise ConversionError(f"{where}/{k} is in {source} but not in the model built "
                                      "from the config")
        for k in expected:
            _check_tree(got[k], expected[k], source, f"{where}/{k}")
        return
    if tuple(np.shape(got)) != tuple(expected.shape):
        raise ConversionError(
            f"shape mismatch at {where}: {tuple(np.shape(got))} in {source}, "
            f"{tuple(expected.shape)} in the model built from the config (check num_channels, "
            "latent_channels, in/out_channels)")
