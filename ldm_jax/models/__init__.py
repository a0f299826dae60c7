"""Models: the KL autoencoder, the PatchGAN discriminator and the diffusion UNet, built from
config sections."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ldm_jax.errors import ConfigError
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.discriminator import PatchDiscriminator
from ldm_jax.models.unet import DiffusionModelUNet, unet_padded_shape, validate_unet

__all__ = ["AutoencoderKL", "DiffusionModelUNet", "PatchDiscriminator", "build_autoencoder",
           "build_discriminator", "build_unet", "unet_padded_shape", "validate_unet"]

_DTYPES = ("float32", "bfloat16")


def _tuple(v):
    """ConfigDict fields may hold lists; module fields should be (nested) tuples."""
    if isinstance(v, (list, tuple)):
        return tuple(_tuple(x) for x in v)
    return v


def _module_fields(module_cls, cfg: Any, where: str, keep_none=()) -> dict:
    """The keyword arguments of flax module `module_cls` from its config section (a
    ConfigDict, dict or object): every dataclass field the section sets (lists as tuples;
    None leaves the module's default, except for the fields in `keep_none`), and `dtype`
    checked. Raises ConfigError for an unsupported dtype (naming `where`)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    fields = {}
    for name in module_cls.__dataclass_fields__:
        if name in ("parent", "name"):
            continue
        value = get(name, None)
        if value is not None or name in keep_none:
            fields[name] = _tuple(value)
    fields["dtype"] = _dtype_name(fields.get("dtype", "float32"), where)
    return fields


def _dtype_name(d, where: str) -> str:
    try:
        name = jnp.dtype(d).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ConfigError(f"{where}.dtype must be one of {_DTYPES}; got {d!r}")
    return name


def build_autoencoder(ae_cfg: Any, remat: str | None = None) -> AutoencoderKL:
    """AutoencoderKL from `config.autoencoder` (a ConfigDict or dict).

    `remat` overrides `ae_cfg.remat` (the trainer passes `config.train.remat` when set).
    """
    fields = _module_fields(AutoencoderKL, ae_cfg, "autoencoder",
                            keep_none=("downsample_factors", "strided_kernel"))
    if remat is not None:
        fields["remat"] = remat
    model = AutoencoderKL(**fields)
    model.check()
    return model


def build_discriminator(disc_cfg: Any) -> PatchDiscriminator:
    """PatchDiscriminator from `config.discriminator` (a ConfigDict or dict)."""
    fields = _module_fields(PatchDiscriminator, disc_cfg, "discriminator")
    if fields.get("norm", "batch") not in ("batch", "instance"):
        raise ConfigError(f"discriminator.norm must be 'batch' or 'instance'; got {fields['norm']!r}")
    return PatchDiscriminator(**fields)


def build_unet(unet_cfg: Any, remat: str | None = None) -> DiffusionModelUNet:
    """DiffusionModelUNet from `config.unet` (a ConfigDict or dict), validated first
    (ConfigError naming every problem). `remat` overrides `unet_cfg.remat`.
    `unet.kind = "maisi"` builds MAISI's DiffusionModelUNetMaisi with the constant inputs
    of `unet.maisi` (`ldm_jax.models.maisi.finetune.build_unet_from_config`)."""
    from ldm_jax.models.maisi.finetune import UNET_KINDS, build_unet_from_config

    get = unet_cfg.get if hasattr(unet_cfg, "get") else lambda k, d=None: getattr(unet_cfg, k, d)
    kind = get("kind", "monai")
    if kind not in UNET_KINDS:
        raise ConfigError(f"unet.kind={kind!r} is not known; valid: "
                          f"{', '.join(map(repr, UNET_KINDS))}")
    validate_unet(unet_cfg)
    fields = _module_fields(DiffusionModelUNet, unet_cfg, "unet")
    if remat is not None:
        validate_unet({**fields, "remat": remat})
        fields["remat"] = remat
    if kind == "maisi":
        return build_unet_from_config(unet_cfg, fields)
    return DiffusionModelUNet(**fields)
