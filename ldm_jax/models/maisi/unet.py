"""MAISI's diffusion UNet: MONAI's `DiffusionModelUNetMaisi`, in Flax, weight for weight.

Reference: MONAI 1.6 `monai/apps/generation/maisi/networks/diffusion_model_unet_maisi.py`
(spatial_dims=3). It is MONAI's DiffusionModelUNet (`ldm_jax.models.unet`, whose blocks
this reuses) with three optional conditioning inputs: the body region's top and bottom
indices (4-vectors each, MAISI's one-hot region codes) and the voxel spacing (3-vector,
mm). Each goes through its own Linear -> SiLU -> Linear to 4 * channels[0] and is
CONCATENATED to the time (+ class) embedding, in that order (time, top, bottom, spacing),
so every resnet projects a wider embedding. MAISI uses `num_class_embeds` for the
modality (CT, MR sequences) and defaults `include_fc=False`.

One more difference, in the forward: MONAI's MAISI UNet adds a ControlNet's
`down_block_additional_residuals` to its skips IN PLACE, and its last skip is the same
tensor as the middle block's input, so the middle block reads h + the last residual (the
generic UNet adds them out of place). Reproduced here, since MAISI's ControlNets were
trained through it.

MONAI's use_flash_attention has no effect on the function (`layers.attention` picks the
kernel); dropout_cattn is not ported (0). Params: the UNet's plus
`top_region_index_layer_0/_2`, `bottom_region_index_layer_0/_2`, `spacing_layer_0/_2`
(MONAI's `top_region_index_layer.0.weight`, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.unet import DiffusionModelUNet, _dense

__all__ = ["DiffusionModelUNetMaisi"]

# (field, call argument, MONAI layer name, input width)
_INPUTS = (("include_top_region_index_input", "top_region_index_tensor",
            "top_region_index_layer", 4),
           ("include_bottom_region_index_input", "bottom_region_index_tensor",
            "bottom_region_index_layer", 4),
           ("include_spacing_input", "spacing_tensor", "spacing_layer", 3))


class DiffusionModelUNetMaisi(DiffusionModelUNet):
    """MONAI's DiffusionModelUNetMaisi (spatial_dims=3), channels-last.

    Fields: `DiffusionModelUNet`'s (MONAI's names; here `include_fc` defaults to False as
    in MAISI) plus `include_top_region_index_input`, `include_bottom_region_index_input`,
    `include_spacing_input`.

    Call: as `DiffusionModelUNet` (x, timesteps, context, class_labels, a ControlNet's
    down/mid residuals), plus top_region_index_tensor (B, 4), bottom_region_index_tensor
    (B, 4), spacing_tensor (B, 3) float, each required when its field is set and ignored
    otherwise (as MONAI). Returns (B, X, Y, Z, out_channels) float32. Raises ValueError
    for a missing required input (and as `DiffusionModelUNet`).
    """

    include_fc: bool = False
    include_top_region_index_input: bool = False
    include_bottom_region_index_input: bool = False
    include_spacing_input: bool = False

    @nn.compact
    def __call__(self, x, timesteps, context=None, class_labels=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 top_region_index_tensor=None, bottom_region_index_tensor=None,
                 spacing_tensor=None):
        dt = jnp.dtype(self.dtype)
        width = 4 * next(iter(self.num_channels))
        given = {"top_region_index_tensor": top_region_index_tensor,
                 "bottom_region_index_tensor": bottom_region_index_tensor,
                 "spacing_tensor": spacing_tensor}
        embs = [self.time_class_embedding(x, timesteps, class_labels)]
        for field, arg, layer, dim in _INPUTS:
            if not getattr(self, field):
                continue
            value = given[arg]
            if value is None:
                raise ValueError(f"{arg} (B, {dim}) is required: the UNet was built with "
                                 f"{field}=True")
            value = jnp.asarray(value, jnp.float32).reshape(x.shape[0], dim).astype(dt)
            h = _dense(width, dt, f"{layer}_0")(value)
            embs.append(_dense(width, dt, f"{layer}_2")(nn.silu(h)))
        emb = jnp.concatenate(embs, axis=-1)
        return self.unet_body(x, emb, context, down_block_additional_residuals,
                              mid_block_additional_residual, residual_into_middle=True)

    def dummy_inputs(self, spatial=None, batch: int = 1, context_len: int = 1) -> dict:
        """Zero inputs for `init` / `eval_shape`, the region / spacing inputs included."""
        out = super().dummy_inputs(spatial, batch, context_len)
        for field, arg, _, dim in _INPUTS:
            if getattr(self, field):
                out[arg] = jnp.zeros((batch, dim), jnp.float32)
        return out
