"""MAISI's network definitions (the `autoencoder_def`, `diffusion_unet_def`,
`controlnet_def` dicts of NV-Generate-CTMR's `configs/config_network_*.json`) -> our modules.

The definitions name MONAI's constructor arguments; those that only steer PyTorch's memory
or kernels (see each model module's docstring) are accepted and dropped here, the rest
become module fields. `_target_` and `spatial_dims` (must be 3) are checked; references
such as "@latent_channels" must be resolved by the caller (MAISI's ConfigParser does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_jax.errors import ConfigError
from ldm_jax.models.maisi.autoencoder import AutoencoderKlMaisi
from ldm_jax.models.maisi.controlnet import ControlNetMaisi
from ldm_jax.models.maisi.unet import DiffusionModelUNetMaisi

__all__ = [
    "MEMORY_TACTICS",
    "build_autoencoder_maisi",
    "build_controlnet_maisi",
    "build_unet_maisi",
]

# Constructor arguments of MONAI's MAISI classes with no effect on the function.
MEMORY_TACTICS = ("num_splits", "dim_split", "save_mem", "print_info", "use_checkpointing",
                  "use_flash_attention")


def _fields(cls, definition: Mapping[str, Any], where: str) -> dict:
    d = dict(definition)
    target = d.pop("_target_", None)
    if target is not None and not str(target).endswith(cls.__name__):
        raise ConfigError(f"{where}: _target_ {target!r} is not MONAI's {cls.__name__}")
    if d.pop("spatial_dims", 3) != 3:
        raise ConfigError(f"{where}: only spatial_dims=3 is supported")
    for name in MEMORY_TACTICS:
        d.pop(name, None)
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(k for k in d if k not in fields)
    if unknown:
        raise ConfigError(f"{where}: unknown argument(s) {unknown} for {cls.__name__}")
    unresolved = sorted(k for k, v in d.items() if isinstance(v, str) and v.startswith("@"))
    if unresolved:
        raise ConfigError(f"{where}: unresolved references for {unresolved}; substitute "
                          "the values (e.g. latent_channels: 4) first")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_autoencoder_maisi(definition: Mapping[str, Any]) -> AutoencoderKlMaisi:
    """AutoencoderKlMaisi from MAISI's `autoencoder_def`. Raises ConfigError for another
    _target_, spatial_dims != 3, unknown arguments or unresolved "@" references."""
    return AutoencoderKlMaisi(**_fields(AutoencoderKlMaisi, definition, "autoencoder_def"))


def build_unet_maisi(definition: Mapping[str, Any]) -> DiffusionModelUNetMaisi:
    """DiffusionModelUNetMaisi from MAISI's `diffusion_unet_def` (MONAI's `channels` is
    spelt `num_channels` there and here). Raises as `build_autoencoder_maisi`."""
    return DiffusionModelUNetMaisi(**_fields(DiffusionModelUNetMaisi, definition,
                                             "diffusion_unet_def"))


def build_controlnet_maisi(definition: Mapping[str, Any]) -> ControlNetMaisi:
    """ControlNetMaisi from MAISI's `controlnet_def`. Raises as `build_autoencoder_maisi`."""
    return ControlNetMaisi(**_fields(ControlNetMaisi, definition, "controlnet_def"))
