"""MAISI weights <-> our MAISI networks: MONAI state dicts both ways, and MAISI's files.

Our param trees spell MONAI's keys (see the three model modules), so each mapping is
derived from the model's own param shapes as for the UNet (`ldm_jax.models.unet_convert`):
`blocks_3` -> `blocks.3`, `.conv` appended for MONAI `Convolution` wrappers, torch layouts
transposed.

MAISI's released files (NV-Generate-CTMR `scripts/inference.py`, `diff_model_train.py`,
`train_controlnet.py`), and what reads them here:
- autoencoder (`autoencoder_v1.pt`, ...): a bare `AutoencoderKlMaisi` state dict, or
  `{"unet_state_dict": <it>, "epoch": ...}` (the v2 files): `autoencoder_maisi_from_monai`
  takes either (the state dict is found inside a checkpoint);
- diffusion UNet: `{"unet_state_dict": ..., "scale_factor": tensor, "epoch", "loss",
  "num_train_timesteps"}`: `load_maisi_unet` -> (params, scale_factor);
- ControlNet: `{"controlnet_state_dict": ..., "epoch", "loss"}`: `load_maisi_controlnet`.
`maisi_unet_checkpoint` / `maisi_controlnet_checkpoint` write those layouts back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax

from ldm_jax.errors import ConversionError
from ldm_jax.models.maisi.autoencoder import AutoencoderKlMaisi
from ldm_jax.models.maisi.controlnet import ControlNetMaisi
from ldm_jax.models.maisi.unet import DiffusionModelUNetMaisi
from ldm_jax.models.state_dict import read_checkpoint
from ldm_jax.models.unet_convert import (
    Entry,
    _entries,
    _old_key,
    params_from_monai,
    params_to_monai,
)

__all__ = [
    "autoencoder_maisi_from_monai",
    "autoencoder_maisi_to_monai",
    "controlnet_maisi_from_monai",
    "controlnet_maisi_to_monai",
    "load_maisi_controlnet",
    "load_maisi_unet",
    "maisi_controlnet_checkpoint",
    "maisi_unet_checkpoint",
    "monai_shapes",
    "unet_maisi_from_monai",
    "unet_maisi_to_monai",
]

_LIST = re.compile(r"(^|\.)(blocks|controlnet_down_blocks|top_region_index_layer|"
                   r"bottom_region_index_layer|spacing_layer)_(\d+)(?=\.)")
_AE_HINT = ("check num_channels, num_res_blocks, attention_levels, latent_channels, "
            "in/out_channels, with_encoder/decoder_nonlocal_attn, include_fc, "
            "use_combined_linear and use_convtranspose")
_UNET_HINT = ("check num_channels, num_res_blocks, attention_levels, num_head_channels, "
              "resblock_updown, num_class_embeds, include_fc, use_combined_linear, "
              "include_top/bottom_region_index_input, include_spacing_input, with_conditioning "
              "and in/out_channels")
_CN_HINT = ("check the encoder fields (as the UNet's), in_channels and "
            "conditioning_embedding_in_channels / conditioning_embedding_num_channels")


def _key(key: str) -> str:
    key = _LIST.sub(r"\1\2.\3", key)
    return re.sub(r"^controlnet_down_blocks\.0\.conv\.", "controlnet_down_blocks.0.", key)


def _table(shapes: Mapping) -> list[Entry]:
    return [(_key(k), path, fwd, inv) for k, path, fwd, inv in _entries(shapes)]


def _shapes(model, cls, dummy) -> Mapping:
    if not isinstance(model, cls):
        raise TypeError(f"expected a {cls.__name__} module; got {type(model).__name__}")
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy(model)))["params"]


def _ae_dummy(m):
    import jax.numpy as jnp
    return {"x": jnp.zeros((1, *(m.factor,) * 3, m.in_channels)), "sample": False}


def _dummy(m):
    return m.dummy_inputs()


def monai_shapes(model) -> dict[str, tuple[int, ...]]:
    """{MONAI state-dict key: torch shape} that `model` (any of the three MAISI modules)
    reads and writes, in MONAI's layout; computed from shapes only (no weights)."""
    import numpy as np

    cls, dummy = {AutoencoderKlMaisi: (AutoencoderKlMaisi, _ae_dummy),
                  DiffusionModelUNetMaisi: (DiffusionModelUNetMaisi, _dummy),
                  ControlNetMaisi: (ControlNetMaisi, _dummy)}[type(model)]
    shapes = _shapes(model, cls, dummy)
    out = {}
    for key, path, _, inv in _table(shapes):
        leaf = shapes
        for p in path:
            leaf = leaf[p]
        out[key] = tuple(inv(np.broadcast_to(np.float32(0), leaf.shape)).shape)
    return out


def autoencoder_maisi_from_monai(state_dict: Any, model: AutoencoderKlMaisi) -> dict:
    """Params for `model` from a MONAI `AutoencoderKlMaisi(spatial_dims=3, ...)` state dict
    (torch tensors or numpy arrays), the nn.Module, a checkpoint holding it (MAISI's
    `{"unet_state_dict": ...}` autoencoder files included) or a `.pt` path. Returns a
    nested dict of float32 numpy arrays. Raises ConversionError naming the first missing,
    unexpected or mis-shaped key."""
    shapes = _shapes(model, AutoencoderKlMaisi, _ae_dummy)
    return params_from_monai(state_dict, shapes, _table(shapes),
                             what="a MONAI AutoencoderKlMaisi built with these fields",
                             hint=_AE_HINT)


def autoencoder_maisi_to_monai(params: Mapping, model: AutoencoderKlMaisi,
                               as_torch: bool = True) -> dict:
    """MONAI state dict of `params` (float32 torch tensors, or numpy with `as_torch=False`);
    `AutoencoderKlMaisi(spatial_dims=3, ...).load_state_dict(sd, strict=True)` loads it.
    Raises ConversionError naming a missing, extra or mis-shaped param."""
    shapes = _shapes(model, AutoencoderKlMaisi, _ae_dummy)
    return params_to_monai(params, shapes, _table(shapes), hint=_AE_HINT, as_torch=as_torch)


def unet_maisi_from_monai(state_dict: Any, model: DiffusionModelUNetMaisi) -> dict:
    """Params for `model` from a MONAI `DiffusionModelUNetMaisi(spatial_dims=3, ...)` state
    dict (as `autoencoder_maisi_from_monai` accepts it; MONAI GenerativeModels' attention
    names too). Raises ConversionError as it does."""
    shapes = _shapes(model, DiffusionModelUNetMaisi, _dummy)
    return params_from_monai(state_dict, shapes, _table(shapes),
                             what="a MONAI DiffusionModelUNetMaisi built with these fields",
                             hint=_UNET_HINT, old_key=_old_key)


def unet_maisi_to_monai(params: Mapping, model: DiffusionModelUNetMaisi,
                        as_torch: bool = True) -> dict:
    """MONAI state dict of our DiffusionModelUNetMaisi `params` (strict-loadable)."""
    shapes = _shapes(model, DiffusionModelUNetMaisi, _dummy)
    return params_to_monai(params, shapes, _table(shapes), hint=_UNET_HINT, as_torch=as_torch)


def controlnet_maisi_from_monai(state_dict: Any, model: ControlNetMaisi) -> dict:
    """Params for `model` from a MONAI `ControlNetMaisi(spatial_dims=3, ...)` state dict
    (as `autoencoder_maisi_from_monai` accepts it). Raises ConversionError as it does."""
    shapes = _shapes(model, ControlNetMaisi, _dummy)
    return params_from_monai(state_dict, shapes, _table(shapes),
                             what="a MONAI ControlNetMaisi built with these fields",
                             hint=_CN_HINT, old_key=lambda k: k.replace(".out_proj.", ".to_out.0."))


def controlnet_maisi_to_monai(params: Mapping, model: ControlNetMaisi,
                              as_torch: bool = True) -> dict:
    """MONAI state dict of our ControlNetMaisi `params` (strict-loadable)."""
    shapes = _shapes(model, ControlNetMaisi, _dummy)
    return params_to_monai(params, shapes, _table(shapes), hint=_CN_HINT, as_torch=as_torch)


def _read(path_or_obj: Any, key: str, what: str) -> Mapping:
    obj = read_checkpoint(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) \
        else path_or_obj
    if not isinstance(obj, Mapping) or key not in obj:
        found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConversionError(f"not a MAISI {what} checkpoint: expected a dict with "
                              f"{key!r} (as MAISI's training scripts save it); found {found}")
    return obj


def load_maisi_unet(path_or_obj: Any, model: DiffusionModelUNetMaisi) -> tuple[dict, float]:
    """(params, scale_factor) from a MAISI diffusion-UNet file (`{"unet_state_dict": ...,
    "scale_factor": ...}`, a path or the loaded dict). The latents the UNet was trained on
    are the autoencoder's times scale_factor. Raises ConversionError for another layout or
    weights that do not fit `model`; FileNotFoundError for a missing path."""
    ckpt = _read(path_or_obj, "unet_state_dict", "diffusion UNet")
    if "scale_factor" not in ckpt:
        raise ConversionError("the MAISI diffusion UNet checkpoint has no 'scale_factor' "
                              "(MAISI saves it next to unet_state_dict)")
    sf = float(ckpt["scale_factor"].item() if hasattr(ckpt["scale_factor"], "item")
               else ckpt["scale_factor"])
    return unet_maisi_from_monai(ckpt["unet_state_dict"], model), sf


def load_maisi_controlnet(path_or_obj: Any, model: ControlNetMaisi) -> dict:
    """Params from a MAISI ControlNet file (`{"controlnet_state_dict": ...}`, a path or the
    loaded dict). Raises as `load_maisi_unet`."""
    ckpt = _read(path_or_obj, "controlnet_state_dict", "ControlNet")
    return controlnet_maisi_from_monai(ckpt["controlnet_state_dict"], model)


def maisi_unet_checkpoint(params: Mapping, model: DiffusionModelUNetMaisi,
                          scale_factor: float, **extra) -> dict:
    """The dict MAISI's `diff_model_train.py` saves (`torch.save` it): unet_state_dict,
    scale_factor (a 0-d tensor) and any `extra` entries (epoch, loss, ...)."""
    import torch

    return {**extra, "scale_factor": torch.tensor(float(scale_factor)),
            "unet_state_dict": unet_maisi_to_monai(params, model)}


def maisi_controlnet_checkpoint(params: Mapping, model: ControlNetMaisi, **extra) -> dict:
    """The dict MAISI's `train_controlnet.py` saves: controlnet_state_dict and `extra`."""
    return {**extra, "controlnet_state_dict": controlnet_maisi_to_monai(params, model)}
