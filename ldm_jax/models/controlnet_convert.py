"""MONAI `ControlNet` state_dicts <-> our `ControlNet` params, both ways.

The mapping is the UNet's (`ldm_jax.models.unet_convert`: derived from our param tree,
whose names spell MONAI's keys) plus the ControlNet's own ModuleLists
(`controlnet_cond_embedding.blocks.N`, `controlnet_down_blocks.N`) and one irregularity
of MONAI 1.6: `controlnet_down_blocks.0` is a bare Conv3d (`controlnet_down_blocks.0.weight`)
where every other zero conv is a `Convolution` wrapper (`controlnet_down_blocks.1.conv.weight`).
Attention out projections spelt `to_out.0` (MONAI GenerativeModels checkpoints) load too,
as MONAI's `ControlNet.load_old_state_dict` maps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from ldm_jax.models.unet_convert import Entry, _entries, params_from_monai, params_to_monai

_HINT = ("check the encoder fields (num_channels, num_res_blocks, attention_levels, "
         "num_head_channels, with_conditioning, cross_attention_dim, transformer_num_layers, "
         "resblock_updown, num_class_embeds, in_channels) and "
         "conditioning_embedding_in_channels / conditioning_embedding_num_channels")
_LIST = re.compile(r"(^|\.)(blocks|controlnet_down_blocks)_(\d+)(?=\.)")


def _key(key: str) -> str:
    key = _LIST.sub(r"\1\2.\3", key)
    return re.sub(r"^controlnet_down_blocks\.0\.conv\.", "controlnet_down_blocks.0.", key)


def _old_key(key: str) -> str:
    """The older spelling MONAI's `ControlNet.load_old_state_dict` maps: `to_out.0` for
    every attention's `out_proj`."""
    return key.replace(".out_proj.", ".to_out.0.")


def controlnet_entries(shapes: Mapping) -> list[Entry]:
    """(MONAI key, our param path, MONAI -> ours, ours -> MONAI) per param of a ControlNet
    param tree `shapes` (arrays or ShapeDtypeStructs)."""
    return [(_key(k), path, fwd, inv) for k, path, fwd, inv in _entries(shapes)]


def _model_and_shapes(cfg):
    from ldm_jax.models.controlnet import ControlNet, build_controlnet

    model = cfg if isinstance(cfg, ControlNet) else build_controlnet(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.dummy_inputs()))
    return model, shapes["params"]


def controlnet_from_monai(state_dict: Any, controlnet_cfg) -> dict:
    """Params (nested dict of float32 numpy arrays) for `build_controlnet(controlnet_cfg)`
    (or the `ControlNet` itself) from a MONAI `ControlNet(spatial_dims=3, ...)` state_dict:
    torch tensors or numpy arrays, wrapped or nested as `unet_from_monai` accepts, or a
    `.pt` path. Raises ConversionError naming the first missing, unexpected or mis-shaped
    key."""
    _, shapes = _model_and_shapes(controlnet_cfg)
    return params_from_monai(state_dict, shapes, controlnet_entries(shapes),
                             what="a MONAI ControlNet built from this config", hint=_HINT,
                             old_key=_old_key)


def controlnet_to_monai(params: Mapping, controlnet_cfg, as_torch: bool = True) -> dict:
    """MONAI 1.6 state_dict of our ControlNet `params`: float32 torch tensors (`as_torch`)
    or numpy arrays; `ControlNet(spatial_dims=3, ...).load_state_dict(sd, strict=True)`
    loads it. Raises ConversionError naming a missing, extra or mis-shaped param."""
    _, shapes = _model_and_shapes(controlnet_cfg)
    return params_to_monai(params, shapes, controlnet_entries(shapes), hint=_HINT,
                           as_torch=as_torch)
