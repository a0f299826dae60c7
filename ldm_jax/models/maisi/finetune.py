"""MAISI's networks as the models of our two training stages, initialised from weight files.

Stage 1 (`config.autoencoder.kind = "maisi"`): `build_autoencoder_from_config` builds
MONAI's `AutoencoderKlMaisi` from the `autoencoder` section's own MONAI-named fields
(`num_channels`, `num_res_blocks`, `attention_levels`, `latent_channels`,
`norm_num_groups`, `norm_eps`, `with_encoder/decoder_nonlocal_attn`, `use_convtranspose`,
`in/out_channels`, `dtype`) plus, where the section has them, `include_fc`,
`use_combined_linear` and `norm_float16` (MAISI's extras; absent: MONAI's defaults, False).

Stage 2 (`config.unet.kind = "maisi"`): `build_unet_from_config` builds
`MaisiUNetFixedInputs`, MONAI's `DiffusionModelUNetMaisi` (the `unet` section's fields, with
`include_spacing_input`, `include_top/bottom_region_index_input`) whose spacing, body
region and modality inputs are constants of the config (`unet.maisi`), passed as MAISI's
inference passes them (x100, rounded to float16), so our diffusion task, sampler and
pipeline call it as any UNet (x, t, context, class_labels).

`ldm_jax.models.maisi.init_from.load_init(path, model, field)` reads a MAISI / MONAI weight
file into a model's params (a module of its own: the converters import the `ldm_jax.models`
package, whose `build_unet` imports this one); `replace_params` / `host_params` put them
into a traced init without embedding them in the program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConfigError
from ldm_jax.models.maisi.autoencoder import AutoencoderKlMaisi
from ldm_jax.models.maisi.unet import DiffusionModelUNetMaisi

__all__ = ["UNET_KINDS", "MaisiUNetFixedInputs", "build_autoencoder_from_config",
           "build_unet_from_config", "host_params", "maisi_autoencoder_problems",
           "maisi_unet_problems", "replace_params"]

# `config.unet.kind`: MONAI's DiffusionModelUNet ("monai", the default) or MAISI's.
UNET_KINDS = ("monai", "maisi")

_AE_FIELDS = ("in_channels", "out_channels", "num_res_blocks", "num_channels",
              "attention_levels", "latent_channels", "norm_num_groups", "norm_eps",
              "with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn", "include_fc",
              "use_combined_linear", "use_convtranspose", "norm_float16", "dtype")


def _get(cfg, key, default=None):
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def build_autoencoder_from_config(ae_cfg) -> AutoencoderKlMaisi:
    """`AutoencoderKlMaisi` from a stage-1 `config.autoencoder` section (a ConfigDict or
    dict; see the module docstring for the fields read). Raises ConfigError for a field
    combination the model refuses (e.g. groups not dividing the channels)."""
    fields = {k: _tuple(_get(ae_cfg, k)) for k in _AE_FIELDS if _get(ae_cfg, k) is not None}
    try:
        model = AutoencoderKlMaisi(**fields)
        model.factor  # noqa: B018 -- checks num_channels is a sequence
    except (TypeError, ValueError) as e:
        raise ConfigError(f"autoencoder (kind 'maisi'): {e}") from None
    return model


def maisi_autoencoder_problems(ae_cfg) -> list[str]:
    """One line per field of a stage-1 `autoencoder` section with `kind = "maisi"` that
    MAISI's autoencoder cannot honour: it halves every axis at every level (stem 1, level
    factors 2, strided convs), has no remat, and its extra fields are bools. The fields it
    shares with AutoencoderKL are checked by `ldm_jax.autoencoder.config` as for "kl"."""
    problems = []
    stem = _get(ae_cfg, "initial_downsample_factor", 1)
    if stem not in (None, 1) and _tuple(stem) != (1, 1, 1):
        problems.append(f"autoencoder.initial_downsample_factor must be 1 for kind 'maisi' "
                        f"(MAISI's autoencoder has no strided stem); got {stem!r}")
    factors = _get(ae_cfg, "downsample_factors")
    if factors is not None and any(_tuple(f) not in (2, (2, 2, 2)) for f in factors):
        problems.append("autoencoder.downsample_factors must be None (2 per level) for kind "
                        f"'maisi' (MAISI halves every axis per level); got {_tuple(factors)!r}")
    if _get(ae_cfg, "use_conv_downsample", True) is not True:
        problems.append("autoencoder.use_conv_downsample must be True for kind 'maisi' "
                        "(MAISI downsamples with strided convs)")
    if _get(ae_cfg, "remat", "none") not in (None, "none"):
        problems.append("autoencoder.remat (or train.remat) must be 'none' for kind 'maisi' "
                        f"(not implemented for MAISI's autoencoder); got {_get(ae_cfg, 'remat')!r}")
    for key in ("include_fc", "use_combined_linear", "norm_float16"):
        v = _get(ae_cfg, key)
        if v is not None and not isinstance(v, bool):
            problems.append(f"autoencoder.{key} must be True or False; got {v!r}")
    init = _get(ae_cfg, "init_from")
    if init is not None and not isinstance(init, str):
        problems.append(f"autoencoder.init_from must be a file path or None; got {init!r}")
    return problems


class MaisiUNetFixedInputs(DiffusionModelUNetMaisi):
    """`DiffusionModelUNetMaisi` whose spacing / region / modality inputs default to
    constants, so it is called as `DiffusionModelUNet` (x, timesteps, context,
    class_labels, ControlNet residuals). The param tree is DiffusionModelUNetMaisi's.

    Fields (besides the UNet's): `fixed_spacing` (3 floats, mm), `fixed_top_region` /
    `fixed_bottom_region` (4 floats, MAISI's one-hot body-region codes), each used only
    when its `include_*_input` is set, and passed x100 rounded to float16 as MAISI does;
    `fixed_class_label` (int, MAISI's modality: 1 CT, 8 and up MR) used when
    `num_class_embeds` is set and no class_labels are given. An input given at call time
    wins over its constant."""

    fixed_spacing: tuple | None = None
    fixed_top_region: tuple | None = None
    fixed_bottom_region: tuple | None = None
    fixed_class_label: int | None = None

    def __call__(self, x, timesteps, context=None, class_labels=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 top_region_index_tensor=None, bottom_region_index_tensor=None,
                 spacing_tensor=None):
        b = x.shape[0]

        def const(v, dim):
            v = np.asarray(np.asarray(v, np.float64) * 1e2, np.float16).astype(np.float32)
            return jnp.broadcast_to(jnp.asarray(v.reshape(1, dim)), (b, dim))

        if self.include_spacing_input and spacing_tensor is None \
                and self.fixed_spacing is not None:
            spacing_tensor = const(self.fixed_spacing, 3)
        if self.include_top_region_index_input and top_region_index_tensor is None \
                and self.fixed_top_region is not None:
            top_region_index_tensor = const(self.fixed_top_region, 4)
        if self.include_bottom_region_index_input and bottom_region_index_tensor is None \
                and self.fixed_bottom_region is not None:
            bottom_region_index_tensor = const(self.fixed_bottom_region, 4)
        if self.num_class_embeds is not None and class_labels is None \
                and self.fixed_class_label is not None:
            class_labels = jnp.full((b,), int(self.fixed_class_label), jnp.int32)
        return super().__call__(x, timesteps, context, class_labels,
                                down_block_additional_residuals, mid_block_additional_residual,
                                top_region_index_tensor, bottom_region_index_tensor,
                                spacing_tensor)

    def dummy_inputs(self, spatial=None, batch: int = 1, context_len: int = 1) -> dict:
        """As `DiffusionModelUNetMaisi.dummy_inputs`, plus class labels when the UNet has
        class embeddings (the converter's init needs them)."""
        out = super().dummy_inputs(spatial, batch, context_len)
        if self.num_class_embeds is not None and out.get("class_labels") is None:
            out["class_labels"] = jnp.zeros((batch,), jnp.int32)
        return out


def maisi_unet_problems(unet_cfg) -> list[str]:
    """One line per problem of `unet.maisi` (the constant inputs) against the UNet's
    `include_*_input` fields; [] when `unet.kind` is not "maisi"."""
    if _get(unet_cfg, "kind", "monai") != "maisi":
        return []
    m = _get(unet_cfg, "maisi") or {}
    problems = []
    for flag, key, dim in (("include_spacing_input", "spacing", 3),
                           ("include_top_region_index_input", "top_region_index", 4),
                           ("include_bottom_region_index_input", "bottom_region_index", 4)):
        if not _get(unet_cfg, flag, False):
            continue
        v = _get(m, key)
        ok = isinstance(v, (list, tuple)) and len(v) == dim and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in v)
        if not ok:
            like = ("mm, e.g. (1.5, 1.5, 2.0)" if dim == 3 else
                    "MAISI's one-hot body region, e.g. (0, 1, 0, 0) = chest")
            problems.append(f"unet.{flag}=True needs unet.maisi.{key}: {dim} numbers "
                            f"({like}); got {v!r}")
    k = _get(unet_cfg, "num_class_embeds")
    mod = _get(m, "modality")
    if k is not None and mod is not None and not (isinstance(mod, int) and 0 <= mod < int(k)):
        problems.append(f"unet.maisi.modality must be an int in [0, {k}) (MAISI: 1 CT, 8 and up "
                        f"MR); got {mod!r}")
    return problems


def build_unet_from_config(unet_cfg, fields: Mapping[str, Any]) -> MaisiUNetFixedInputs:
    """`MaisiUNetFixedInputs` from a stage-2 `config.unet` section with `kind = "maisi"`:
    `fields` are the DiffusionModelUNet fields already read from it (the caller's
    `_module_fields`), plus the MAISI ones and the constants of `unet.maisi` (`spacing`,
    `top_region_index`, `bottom_region_index`, `modality`). Raises ConfigError listing
    the problems of `maisi_unet_problems`."""
    problems = maisi_unet_problems(unet_cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    extra = {k: bool(_get(unet_cfg, k)) for k in (
        "include_fc", "use_combined_linear", "include_top_region_index_input",
        "include_bottom_region_index_input", "include_spacing_input")
        if _get(unet_cfg, k) is not None and k not in fields}
    m = _get(unet_cfg, "maisi") or {}

    def vec(key):
        v = _get(m, key)
        return None if v is None else tuple(float(a) for a in v)

    mod = _get(m, "modality")
    return MaisiUNetFixedInputs(**dict(fields), **extra, fixed_spacing=vec("spacing"),
                                fixed_top_region=vec("top_region_index"),
                                fixed_bottom_region=vec("bottom_region_index"),
                                fixed_class_label=None if mod is None else int(mod))


def host_params(params):
    """`params` (a pytree of numpy arrays) inside a traced function (a jitted init): read
    from the host when the program runs (`jax.pure_callback`), so they are not embedded
    in the compiled program, and not read at all under `jax.eval_shape`."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple(jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in leaves)
    out = jax.pure_callback(lambda: tuple(np.asarray(a) for a in leaves), shapes)
    return jax.tree.unflatten(treedef, list(out))


def replace_params(init, loaded, field: str):
    """`loaded` in place of the freshly initialised `init` (the same tree and shapes, else
    ConfigError naming `field`), as `host_params`."""
    flat_i = jax.tree_util.tree_flatten_with_path(init)[0]
    flat_l = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    for k, v in flat_i:
        if k not in flat_l or tuple(np.shape(flat_l[k])) != tuple(v.shape):
            got = None if k not in flat_l else tuple(np.shape(flat_l[k]))
            raise ConfigError(f"{field}: the weights do not fit the model at "
                              f"{jax.tree_util.keystr(k)} (file {got} vs model {tuple(v.shape)})")
    return host_params(jax.tree.map(lambda _, a: np.asarray(a, np.float32), init, loaded))
