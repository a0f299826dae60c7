"""MAISI's ControlNet: MONAI's `ControlNetMaisi`, in Flax, weight for weight.

Reference: MONAI 1.6 `monai/apps/generation/maisi/networks/controlnet_maisi.py`. Its
forward is MONAI's ControlNet's (`ldm_jax.models.controlnet`, reused whole): the same
conditioning embedding, encoder copy, zero convs and conditioning_scale. What differs:
`include_fc` defaults to False, and `use_checkpointing` (activation checkpointing of the
conditioning embedding, default True) is a PyTorch memory tactic with no effect on the
function: here `remat="blocks"` rematerialises the encoder's blocks instead;
`build_controlnet_maisi` accepts and ignores it. It takes no region or spacing inputs
(MAISI feeds those to the UNet only), so its resnets project the time (+ class)
embedding alone: when MAISI initialises it from a UNet built with spacing / region inputs
(`monai.networks.utils.copy_model_state`), the resnets' `time_emb_proj` differ in width
and are skipped; `controlnet_maisi_from_unet` does the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from ldm_jax.models.controlnet import SHARED_WITH_UNET, ControlNet

__all__ = ["ControlNetMaisi", "controlnet_maisi_from_unet"]


class ControlNetMaisi(ControlNet):
    """MONAI's ControlNetMaisi (spatial_dims=3), channels-last: `ControlNet` with MAISI's
    default `include_fc=False`. Call and returns as `ControlNet`."""

    include_fc: bool = False


def controlnet_maisi_from_unet(controlnet_params: Mapping, unet_params: Mapping) -> dict:
    """MONAI's `copy_model_state(controlnet, unet.state_dict())` as MAISI initialises its
    ControlNet: every param of the UNet's conv_in, time / class embedding, down blocks and
    middle block whose path and shape the ControlNet also has replaces the ControlNet's;
    the rest (e.g. `time_emb_proj` of a UNet with spacing input) keeps the ControlNet's.
    Args: param trees (a `{"params": ...}` dict is unwrapped). Returns a new dict."""
    if "params" in controlnet_params:
        controlnet_params = controlnet_params["params"]
    if "params" in unet_params:
        unet_params = unet_params["params"]
    flat_cn = dict(jax.tree_util.tree_leaves_with_path(controlnet_params))
    flat_unet = dict(jax.tree_util.tree_leaves_with_path(unet_params))

    def pick(path, leaf):
        top = path[0].key
        shared = top in SHARED_WITH_UNET or top.startswith("down_blocks_")
        theirs = flat_unet.get(path) if shared else None
        return theirs if theirs is not None and theirs.shape == leaf.shape else leaf

    del flat_cn
    return jax.tree_util.tree_map_with_path(pick, dict(controlnet_params))
