"""MONAI `DiffusionModelUNet` state_dicts <-> our `DiffusionModelUNet` params, both ways.

Why: a UNet trained with MONAI (or MONAI GenerativeModels, the older package) loads into
ldm-jax for sampling or fine-tuning, and ours goes back to MONAI; the parity tests prove
both compute the same function.

Our param tree spells MONAI's keys (see `ldm_jax.models.unet`), so the mapping is derived
from the model's own param shapes: `a_3/b` -> `a.3.b` for MONAI's ModuleLists and
Sequentials, `.conv` appended for MONAI `Convolution` wrappers (5-D kernels), and
Conv3d weight (O, I, kx, ky, kz) <-> kernel (kx, ky, kz, I, O), Linear weight (out, in) <->
kernel (in, out), norm weight <-> scale, Embedding weight <-> embedding.

Accepted key spellings: MONAI 1.4-1.6, and MONAI GenerativeModels' (attention
`to_q/to_k/to_v/proj_attn` without the `.attn.`, transformer `to_out.0`, upsampler
`upsampler.conv.conv`), following MONAI's `DiffusionModelUNet.load_old_state_dict`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from ldm_jax.errors import ConversionError
from ldm_jax.models.convert import _np
from ldm_jax.models.state_dict import load_state_dict

_LISTS = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|time_embed|out)"
                    r"_(\d+)$")
_HINT = ("check num_channels, num_res_blocks, attention_levels, num_head_channels, "
         "with_conditioning, cross_attention_dim, transformer_num_layers, resblock_updown, "
         "num_class_embeds and in/out_channels")


def _conv_in(w):
    return w.transpose(2, 3, 4, 1, 0)


def _conv_out(k):
    return k.transpose(4, 3, 0, 1, 2)


def _t(w):
    return w.T


def _same(w):
    return w


# (monai key, our param path, MONAI -> ours, ours -> MONAI)
Entry = tuple[str, tuple[str, ...], Callable, Callable]


def _entries(tree: Mapping, path: tuple[str, ...] = ()) -> list[Entry]:
    """One entry per param leaf of our model (a tree of arrays or ShapeDtypeStructs)."""
    out: list[Entry] = []
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    prefix = ".".join(_LISTS.sub(r"\1.\2", p) for p in path)
    kernel = leaves.get("kernel")
    is_conv = kernel is not None and len(kernel.shape) == 5
    module = prefix + ".conv" if is_conv else prefix
    for name in leaves:
        if name == "kernel":
            fwd, inv = (_conv_in, _conv_out) if is_conv else (_t, _t)
            out.append((f"{module}.weight", (*path, name), fwd, inv))
        elif name in ("scale", "embedding"):
            out.append((f"{module}.weight", (*path, name), _same, _same))
        elif name == "bias":
            out.append((f"{module}.bias", (*path, name), _same, _same))
        else:
            raise AssertionError(f"no MONAI name for param {'/'.join((*path, name))}")
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out += _entries(v, (*path, k))
    return out


def _old_key(key: str) -> str:
    """The MONAI GenerativeModels spelling of a MONAI >= 1.4 key (itself when unchanged)."""
    if ".transformer_blocks." in key:
        return key.replace(".out_proj.", ".to_out.0.")
    if ".attn." in key:
        return key.replace(".attn.out_proj.", ".proj_attn.").replace(".attn.to_", ".to_")
    return key.replace("upsampler.postconv.", "upsampler.conv.")


def _model_and_shapes(unet_cfg):
    from ldm_jax.models import DiffusionModelUNet, build_unet

    model = unet_cfg if isinstance(unet_cfg, DiffusionModelUNet) else build_unet(unet_cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.dummy_inputs()))
    return model, shapes["params"]


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def unet_from_monai(state_dict: Any, unet_cfg) -> dict:
    """Params (nested dict of float32 numpy arrays) for `build_unet(unet_cfg)` from a MONAI
    `DiffusionModelUNet(spatial_dims=3, ...)` state_dict (values: torch tensors or numpy
    arrays; MONAI 1.4-1.6 or GenerativeModels key names; `unet_cfg` may also be the model).
    As for the autoencoder (`ldm_jax.models.state_dict.load_state_dict`), the state dict
    may be wrapped (`module.`, `_orig_mod.` ...), nested in a training checkpoint, a
    `nn.Module` or a path to a `.pt`/`.pth` file.

    Use as `model.apply({"params": params}, x, timesteps, ...)`. Raises ConversionError (a
    ValueError) naming the first missing key, unexpected key or mismatched shape.
    """
    _, shapes = _model_and_shapes(unet_cfg)
    return params_from_monai(state_dict, shapes, _entries(shapes),
                             what="a MONAI DiffusionModelUNet built from this config",
                             hint=_HINT, old_key=_old_key)


def params_from_monai(state_dict: Any, shapes: Mapping, entries: list[Entry], *, what: str,
                      hint: str, old_key: Callable[[str], str] = lambda k: k) -> dict:
    """Params shaped as `shapes` from a MONAI state_dict, one per `entries` row (the
    UNet's and the ControlNet's converters); `old_key` gives a key's older spelling.
    Raises ConversionError as `unet_from_monai`."""
    expected = [key for key, _, _, _ in entries]
    old_to_new = {old_key(k): k for k in expected if old_key(k) != k}
    sd = load_state_dict(state_dict, expected, rename=lambda k: old_to_new.get(k, k),
                         what=what, hint=hint)
    used, params = set(), {}
    for key, path, fwd, inv in entries:
        src = key if key in sd else old_key(key)
        if src not in sd:
            raise ConversionError(f"missing key {key!r} in the MONAI state_dict: the config does "
                                  f"not describe the model that saved it ({hint})")
        value = _np(sd[src])
        want = inv(np.broadcast_to(np.float32(0), _get_path(shapes, path).shape)).shape
        if value.shape != want:
            raise ConversionError(f"shape mismatch at {src!r}: the state_dict gives "
                                  f"{tuple(value.shape)}, the model built from the config "
                                  f"expects {tuple(want)} ({hint})")
        used.add(src)
        _put(params, path, np.ascontiguousarray(fwd(value)))
    extra = [k for k in sd if k not in used]
    if extra:
        raise ConversionError(f"unexpected key {extra[0]!r} in the MONAI state_dict ({len(extra)} "
                              f"unused in all): the checkpoint has layers the config does not "
                              f"describe ({hint})")
    return params


def unet_to_monai(params: Mapping, unet_cfg, as_torch: bool = True) -> dict:
    """MONAI >= 1.4 state_dict of `params` (our DiffusionModelUNet's, from `unet_cfg` or the
    model itself): float32 torch tensors (`as_torch`, imports torch) or numpy arrays.
    `DiffusionModelUNet(spatial_dims=3, ...).load_state_dict(sd, strict=True)` loads it.
    Raises ConversionError naming a missing, extra or mis-shaped param.
    """
    _, shapes = _model_and_shapes(unet_cfg)
    return params_to_monai(params, shapes, _entries(shapes), hint=_HINT, as_torch=as_torch)


def params_to_monai(params: Mapping, shapes: Mapping, entries: list[Entry], *, hint: str,
                    as_torch: bool = True) -> dict:
    """The MONAI state_dict of `params` (shaped as `shapes`), one key per `entries` row.
    Raises ConversionError as `unet_to_monai`."""
    if "params" in params:  # a variables dict
        params = params["params"]
    out = {}
    for key, path, _, inv in entries:
        leaf = _get_path(params, path)
        if leaf is None:
            raise ConversionError(f"params lack {'/'.join(path)} (MONAI {key!r}): they belong "
                                  f"to a different model than the config ({hint})")
        want = tuple(_get_path(shapes, path).shape)
        if tuple(leaf.shape) != want:
            raise ConversionError(f"shape mismatch at {'/'.join(path)}: params give "
                                  f"{tuple(leaf.shape)}, the config expects {want} ({hint})")
        out[key] = np.array(inv(np.asarray(leaf, dtype=np.float32)), order="C")  # writable
    n_leaves = len(jax.tree_util.tree_leaves(params))
    if n_leaves != len(entries):
        known = {p for _, p, _, _ in entries}
        extra = next("/".join(str(getattr(k, "key", k)) for k in p)
                     for p, _ in jax.tree_util.tree_leaves_with_path(params)
                     if tuple(str(getattr(k, "key", k)) for k in p) not in known)
        raise ConversionError(f"params have {extra}, which the model built from the config "
                              f"does not have ({hint})")
    if as_torch:
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out
