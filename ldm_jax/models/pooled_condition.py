"""Pooled-embedding conditioning: a 3D diffusion UNet conditioned on a 2D image (baseline).

What is followed: the PyTorch system this project started from conditions its 3D diffusion
UNet on a 2D image (a z-projection of the volume) by encoding the image with a small 2D
CNN -- three stride-2 convolutions to 64, 128 and 256 channels, global average pooling, a
Linear layer to 8 numbers -- and adding that vector to the UNet's time embedding. Here the
8 numbers are projected to the time embedding's width (4 * num_channels[0]) by one Dense
layer (`condition_proj`) before the addition. It is kept as the "pooled embedding" baseline
to compare against the aligned (concatenated-channels) conditioning.

Param tree of `PooledConditionUNet`: {"unet": <exactly a plain DiffusionModelUNet's params>,
"condition_encoder": {...}, "condition_proj": {...}}, so the "unet" subtree converts to and
from MONAI's state_dict with `ldm_jax.models.unet_convert` unchanged.

Classifier-free guidance: the "no condition" input is an all-zero image (`null_condition`);
training drops conditions by replacing them with zeros. At init (zero biases) a zero image
gives a zero offset, i.e. exactly the plain UNet; after training the zero image maps to a
learned "unconditional" offset.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models.layers import torch_like_init
from ldm_jax.models.unet import DiffusionModelUNet

__all__ = ["PooledConditionEncoder", "PooledConditionUNet", "from_unet", "null_condition"]


def _check_condition(shape, batch: int | None = None):
    """ValueError unless `shape` is (B, H, W, C) (and B == `batch` when given)."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"condition must be a 4-D 2D image (B, H, W, C), channels-last; got "
                         f"shape {shape}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"condition batch {shape[0]} != x batch {batch}; give one 2D image "
                         f"(B, H, W, C) per volume")


def null_condition(like) -> jnp.ndarray:
    """The "no condition" input for classifier-free guidance: zeros, float32.

    `like`: a condition array (B, H, W, C) or its shape. Training drops a condition by
    replacing it with this; sampling evaluates the UNet once with the real condition and
    once with this. Raises ValueError unless the shape is 4-D."""
    shape = tuple(like) if isinstance(like, (tuple, list)) else tuple(jnp.shape(like))
    _check_condition(shape)
    return jnp.zeros(shape, jnp.float32)


class PooledConditionEncoder(nn.Module):
    """The original's 2D condition encoder: 3 x (conv 3x3, stride 2, padding 1, ReLU) to
    `features` channels, global average pooling over H and W, Dense to `out_features`.

    The original's activation is not documented; ReLU is our choice. Kernels use PyTorch's
    default init (`torch_like_init`), biases zeros (as the rest of this library).

    Call: condition (B, H, W, C) float, a 2D image channels-last (any H, W >= 1). Computes in
    `dtype` (params float32, the pooling mean in float32). Returns (B, out_features) float32.
    Raises ValueError unless the input is 4-D.
    """

    features: Sequence[int] = (64, 128, 256)
    out_features: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, condition):
        _check_condition(jnp.shape(condition))
        dt = jnp.dtype(self.dtype)
        h = jnp.asarray(condition).astype(dt)
        for i, f in enumerate(self.features):
            h = nn.Conv(f, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        dtype=dt, param_dtype=jnp.float32, kernel_init=torch_like_init,
                        name=f"conv_{i}")(h)
            h = nn.relu(h)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2)).astype(dt)
        h = nn.Dense(self.out_features, dtype=dt, param_dtype=jnp.float32,
                     kernel_init=torch_like_init, name="dense")(h)
        return h.astype(jnp.float32)


class PooledConditionUNet(nn.Module):
    """A `DiffusionModelUNet` whose time embedding is offset by a pooled 2D-image embedding.

    emb = unet.time_class_embedding(x, timesteps, class_labels)
          + condition_proj(condition_encoder(condition))
    then the UNet's body (conv_in ... out) runs on `emb` exactly as in `DiffusionModelUNet`.

    Fields: `unet` -- a `DiffusionModelUNet` instance (e.g. from `build_unet(cfg.unet)`),
    adopted under the name "unet" (its params are the "unet" subtree, identical in structure
    to `unet.init`'s); `embed_features` -- the encoder's output width (the original's 8).
    The encoder and projection compute in `unet.dtype`.

    Call: x (B, X, Y, Z, in_channels); timesteps (B,) or scalar; condition (B, H, W, C) float,
    the 2D image (zeros = no condition, see `null_condition`); context, class_labels,
    down_block_additional_residuals, mid_block_additional_residual as `DiffusionModelUNet`.
    Returns (B, X, Y, Z, out_channels) float32. Raises ValueError if condition is not 4-D or
    its batch differs from x's (and whatever `DiffusionModelUNet` raises); RuntimeError if
    `unet`'s `__call__` never calls `time_class_embedding` (a subclass that does not).

    How: flax only lets a module define params inside its own compact method, so the
    UNet's `time_class_embedding` cannot be called from here; instead the UNet's own
    `__call__` runs under a method interceptor that adds the condition offset to what its
    `time_class_embedding` returns. Same function as the formula above; works for
    subclasses whose `__call__` calls `time_class_embedding` once (e.g. MAISI's, where the
    offset goes to the time part of its concatenated embedding).
    """

    unet: DiffusionModelUNet
    embed_features: int = 8

    @nn.compact
    def __call__(self, x, timesteps, condition, context=None, class_labels=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        _check_condition(jnp.shape(condition), batch=x.shape[0])
        dt = jnp.dtype(self.unet.dtype)
        emb_dim = 4 * tuple(self.unet.num_channels)[0]
        pooled = PooledConditionEncoder(out_features=self.embed_features, dtype=dt,
                                        name="condition_encoder")(condition)
        offset = nn.Dense(emb_dim, dtype=dt, param_dtype=jnp.float32,
                          kernel_init=torch_like_init, name="condition_proj")(pooled.astype(dt))
        unet = self.unet
        calls = []

        def add_offset(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name == "time_class_embedding" and ctx.module is unet:
                calls.append(1)
                out = out + offset.astype(out.dtype)
            return out

        with nn.intercept_methods(add_offset):
            out = unet(x, timesteps, context, class_labels, down_block_additional_residuals,
                       mid_block_additional_residual)
        if len(calls) != 1:
            raise RuntimeError(f"{type(unet).__name__}.__call__ called time_class_embedding "
                               f"{len(calls)} times (expected once): the condition offset "
                               "was not applied exactly once")
        return out


def from_unet(unet: DiffusionModelUNet, embed_features: int = 8) -> PooledConditionUNet:
    """`PooledConditionUNet` around `unet` (e.g. `from_unet(build_unet(cfg.unet))`)."""
    return PooledConditionUNet(unet=unet, embed_features=embed_features)
