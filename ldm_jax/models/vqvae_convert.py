"""MONAI `VQVAE` state dicts <-> our `VQVAE` variables ({"params", "codebook"}), both ways.

MONAI's keys are `encoder.blocks.N...`, `decoder.blocks.N...` (our `blocks_N`; each block's
`conv` is `.conv`, its PReLU slope `.adn.A.weight`, a residual unit's `conv1`/`conv2` the
same one level down) and `quantizer.quantizer.{embedding.weight, ema_cluster_size, ema_w}`
(our "codebook" collection). Layouts as `ldm_jax.models.convert` (Conv3d and
ConvTranspose3d weights transposed, vectors and the (K, D) codebook as stored); reading
accepts every form `ldm_jax.models.state_dict.load_state_dict` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import ConversionError
from ldm_jax.models.convert import Leaf, _read, _Table, _write
from ldm_jax.models.vqvae import VQVAE, parse_act

__all__ = ["monai_vqvae_kwargs", "vqvae_from_monai", "vqvae_to_monai"]

_HINT = ("If it is a MONAI VQVAE, the model must match the settings it was built with: "
         "channels, num_res_layers, num_res_channels, down/upsample_parameters, "
         "num_embeddings, embedding_dim, act")


def _block(t: _Table, key: str, path: tuple, act, conv_only=False, layout="conv"):
    t.conv(f"{key}.conv", (*path, "conv"), layout=layout)
    if not conv_only and act is not None and parse_act(act)[0] == "prelu":
        t.add(f"{key}.adn.A.weight", (*path, "act", "weight"), "vector")


def _table(model: VQVAE) -> list[Leaf]:
    """Every MONAI VQVAE key, in MONAI's state-dict order, with our variables path.
    Raises ConversionError for a model with memory levers (MONAI has no such model)."""
    if model.uses_levers:
        raise ConversionError(
            "this VQVAE uses memory levers (initial_downsample_factor, downsample_factors "
            "or an upsample_head other than 'deconv'), which MONAI's VQVAE does not have: "
            "only a model with the lever defaults converts to or from MONAI")
    t, n, act = _Table(), len(model.channels), model.act

    def res(key, path):
        _block(t, f"{key}.conv1", (*path, "conv1"), act)
        _block(t, f"{key}.conv2", (*path, "conv2"), act, conv_only=True)

    for part in ("encoder", "decoder"):
        b = 0
        if part == "decoder":
            _block(t, "decoder.blocks.0", ("params", "decoder", "blocks_0"), act, True)
            b = 1
        for i in range(n):
            if part == "encoder":
                _block(t, f"encoder.blocks.{b}", ("params", part, f"blocks_{b}"), act)
                b += 1
            for _ in range(model.num_res_layers):
                res(f"{part}.blocks.{b}", ("params", part, f"blocks_{b}"))
                b += 1
            if part == "decoder":
                _block(t, f"decoder.blocks.{b}", ("params", part, f"blocks_{b}"), act,
                       conv_only=i == n - 1, layout="deconv")
                b += 1
        if part == "encoder":
            _block(t, f"encoder.blocks.{b}", ("params", part, f"blocks_{b}"), act, True)
    q = ("codebook", "quantizer")
    t.add("quantizer.quantizer.ema_cluster_size", (*q, "ema_cluster_size"), "vector")
    t.add("quantizer.quantizer.ema_w", (*q, "ema_w"), "vector")
    t.add("quantizer.quantizer.embedding.weight", (*q, "embedding"), "vector")
    return t.leaves


def _shapes(model: VQVAE) -> dict:
    """Our variables' shapes, from an abstract init on an input the model can take."""
    def factor(rows):
        f = 1
        for r in rows:
            f *= r[0]
        return f
    rows = model.downsample_parameters
    size = 16 * factor(rows if not all(isinstance(v, int) for v in rows)
                      else (rows,) * len(model.channels))
    x = jax.ShapeDtypeStruct((1, size, size, size, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return {k: shapes[k] for k in ("params", "codebook")}


def vqvae_from_monai(state_dict: Any, model: VQVAE) -> dict:
    """Variables {"params", "codebook"} of `model` from a MONAI `VQVAE(spatial_dims=3)`.

    Args:
      state_dict: its state dict (torch tensors or numpy arrays), the nn.Module, a training
        checkpoint holding it or a .pt/.pth path, wrapped or not (`module.`, ...).
      model: our `VQVAE` with the same settings.

    Returns:
      Nested dict of float32 numpy arrays: `model.apply(variables, x)`.

    Raises:
      ConversionError: keys that do not fit (with what they look like), a shape mismatch,
        or a `model` with memory levers.
      ConfigError: an activation or parameter rows the model cannot take.
    """
    out = _read(state_dict, _table(model), _shapes(model), None,
                "a MONAI VQVAE built with these settings", _HINT)
    # Copies: numpy views of torch's buffers would follow MONAI's in-place EMA updates.
    return jax.tree.map(np.array, out)


def vqvae_to_monai(variables: Mapping, model: VQVAE) -> dict:
    """MONAI `VQVAE(**monai_vqvae_kwargs(model))` state dict from our {"params", "codebook"}.

    The inverse of `vqvae_from_monai`: MONAI loads it with `load_state_dict(strict=True)`.
    Float32 torch tensors when torch is importable, else numpy arrays. Raises
    ConversionError when `variables` do not fit `model`."""
    return _write(variables, _table(model), _shapes(model))


def _plain(v):
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def monai_vqvae_kwargs(model: VQVAE) -> dict:
    """Keyword arguments of `monai.networks.nets.VQVAE` for the same model (JSON-able)."""
    return dict(
        spatial_dims=3, in_channels=int(model.in_channels), out_channels=int(model.out_channels),
        channels=[int(c) for c in model.channels], num_res_layers=int(model.num_res_layers),
        num_res_channels=[int(c) for c in model.res_channels],
        downsample_parameters=_plain(model.downsample_parameters),
        upsample_parameters=_plain(model.upsample_parameters),
        num_embeddings=int(model.num_embeddings), embedding_dim=int(model.embedding_dim),
        embedding_init=model.embedding_init, commitment_cost=float(model.commitment_cost),
        decay=float(model.decay), epsilon=float(model.epsilon), dropout=float(model.dropout),
        act=_plain(model.act), output_act=_plain(model.output_act), ddp_sync=False,
        use_checkpointing=False)
