"""A MAISI / MONAI weight file -> the params of our MAISI autoencoder or diffusion UNet, for
`autoencoder.init_from` and `unet.init_from` (`ldm_jax.models.maisi.finetune` builds the
models; docs/maisi.md, "Fine-tuning")."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ldm_jax.errors import ConfigError, ConversionError
from ldm_jax.models.maisi.autoencoder import AutoencoderKlMaisi

__all__ = ["load_init"]


def _short(problem: str) -> str:
    """A converter message cut to its first clause and first missing / mis-shaped key."""
    text = " ".join(str(problem).split())
    out = re.split(r"; | \(check ", text)[0]
    missing = re.search(r"\d+ missing, first: ('[^']+')", text)
    if missing:
        out += f"; missing e.g. {missing.group(1)}"
    return out if len(out) <= 300 else out[:297] + "..."


def load_init(path: str, model, field: str) -> tuple[dict, float | None]:
    """(params, scale_factor or None) of `model` (an AutoencoderKlMaisi or a
    DiffusionModelUNetMaisi) from a weight file: MONAI's state dict of the same class, or
    MAISI's released layouts (`{"unet_state_dict": ...}`; a diffusion-UNet file's
    `scale_factor` is returned). Params are float32 numpy arrays.

    Raises ConfigError in one line naming `field` (e.g. "autoencoder.init_from"), the
    file and what is wrong: no such file, or weights that do not fit the model."""
    from ldm_jax.models.maisi.convert import autoencoder_maisi_from_monai, unet_maisi_from_monai
    from ldm_jax.models.state_dict import read_checkpoint

    full = os.path.abspath(os.path.expanduser(str(path)))
    what = ("AutoencoderKlMaisi weights (MAISI's autoencoder file, e.g. autoencoder_v1.pt)"
            if isinstance(model, AutoencoderKlMaisi) else
            "DiffusionModelUNetMaisi weights (MAISI's diffusion UNet file, e.g. "
            "diff_unet_3d_rflow-ct.pt)")
    if not os.path.isfile(full):
        raise ConfigError(f"{field}={path}: no such file; expected {what}.")
    try:
        obj = read_checkpoint(full)
        convert = (autoencoder_maisi_from_monai if isinstance(model, AutoencoderKlMaisi)
                   else unet_maisi_from_monai)
        params = convert(obj, model)
    except (ConversionError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{field}={path}: {_short(e)}; expected {what} for the network "
                          "this config builds.") from None
    sf = obj.get("scale_factor") if isinstance(obj, Mapping) else None
    if sf is not None:
        sf = float(sf.item() if hasattr(sf, "item") else sf)
    return params, sf
