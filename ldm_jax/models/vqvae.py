"""3D VQ-VAE: MONAI's `VQVAE` and `EMAQuantizer` (MONAI 1.6), weight for weight.

Reference: `monai/networks/nets/vqvae.py` and `monai/networks/layers/vector_quantizer.py`
(Tudosiu et al. 2022, https://arxiv.org/abs/2209.03177; van den Oord et al. 2017,
https://arxiv.org/abs/1711.00937). Channels-last `(B, X, Y, Z, C)`; MONAI's (D, H, W) are
our (X, Y, Z). `ldm_jax.models.vqvae_convert` maps MONAI state dicts both ways.

Variables: "params" (the convolutions, PReLU slopes) and "codebook" (the quantizer's
`embedding`, `ema_cluster_size`, `ema_w`: not trained by gradients but by the EMA update,
which `train=True` returns as the new "codebook" collection instead of mutating a buffer:
`model.apply(v, x, train=True, mutable=["codebook"], rngs={"dropout": key})`).

Memory levers (not MONAI's; their defaults leave the model MONAI's, weight for weight),
the KL autoencoder's (`ldm_jax.models.autoencoder`) with its layers:

- `initial_downsample_factor` f0 (int or per-axis triple): the first encoder conv strides
  by f0 with a voxel-complete kernel (`layers.strided_geometry`: kernel >= stride on every
  axis, output exactly n / f0) in place of the first `downsample_parameters` row, so
  level 0 runs at 1/f0.
- `downsample_factors` (one int or triple per later level): the same for the strided convs
  of levels 1..n-1; the decoder then upsamples between levels by nearest x factor then
  conv k3 (`layers.nearest_conv`, computed on the coarse grid) instead of transposed convs.
- `upsample_head`: the decoder's last upsample (undoing the first conv's stride).
  "deconv" is MONAI's transposed conv (the last `upsample_parameters` row); "nearest_conv"
  is nearest x f then conv k3 to out_channels (on the coarse grid); "subpixel" is a conv
  k3 to out_channels * prod(f) on the coarse grid then depth-to-space (ICNR init, so it
  starts as a nearest upsample), the mirror of a strided stem.
- `strided_kernel`: the kernel of those strided convs (None: voxel-complete; smaller than
  the stride skips voxels, with a warning, as the KL model's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.config import as_triple
from ldm_jax.errors import ConfigError
from ldm_jax.models.layers import (
    conv,
    depth_to_space,
    icnr_init,
    nearest_conv,
    strided_geometry,
    torch_like_init,
    warn_if_skipping,
)
from ldm_jax.models.tap_conv import DIMENSION_NUMBERS, conv_general_dilated

# PyTorch ConvTranspose init: its fan_in is computed from weight dim 1 (= out channels) * k.
_deconv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                in_axis=-1, out_axis=-2)
UPSAMPLE_HEADS = ("deconv", "nearest_conv", "subpixel")
_ACTS = ("relu", "leakyrelu", "prelu", "elu", "gelu", "silu", "swish", "tanh", "sigmoid")


def parse_act(act) -> tuple[str, dict] | None:
    """MONAI's `act` ("RELU", ("leakyrelu", {"negative_slope": 0.2}), None) -> (name, kwargs).

    Raises ConfigError for activations other than relu, leakyrelu, prelu, elu, gelu,
    silu/swish, tanh, sigmoid."""
    if act is None:
        return None
    if isinstance(act, str):
        name, kwargs = act, {}
    else:
        name, kwargs = act[0], dict(act[1]) if len(act) > 1 else {}
    name = str(name).lower()
    if name not in _ACTS:
        raise ConfigError(f"vqvae act must be one of {_ACTS} (MONAI's names, any case) or a "
                          f"(name, kwargs) pair; got {act!r}")
    return name, kwargs


class Act(nn.Module):
    """MONAI's `Act[name](**kwargs)`; PReLU has a learnable slope `weight` (num_parameters)."""

    act: Any

    @nn.compact
    def __call__(self, x):
        name, kw = parse_act(self.act)
        if name == "relu":
            return nn.relu(x)
        if name == "leakyrelu":
            return nn.leaky_relu(x, kw.get("negative_slope", 0.01))
        if name == "prelu":
            n = int(kw.get("num_parameters", 1))
            w = self.param("weight", nn.initializers.constant(kw.get("init", 0.25)), (n,))
            return jnp.where(x >= 0, x, w.astype(x.dtype) * x)
        if name == "elu":
            return nn.elu(x, kw.get("alpha", 1.0))
        if name == "gelu":
            return nn.gelu(x, approximate=kw.get("approximate", "none") == "tanh")
        if name in ("silu", "swish"):
            return nn.silu(x)
        return jnp.tanh(x) if name == "tanh" else nn.sigmoid(x)


class ConvTranspose(nn.Module):
    """torch.nn.ConvTranspose3d (stride, kernel, dilation, padding, output_padding), any geometry.

    Kernel stored (kx, ky, kz, I, O) where PyTorch stores (I, O, kx, ky, kz); computed as
    the gradient of a conv: the input dilated by the stride, the kernel flipped, padded
    dilation*(k-1)-padding before and that plus output_padding after (negative: cropped).
    Output size per axis (n-1)*stride - 2*padding + dilation*(k-1) + output_padding + 1.
    """

    features: int
    kernel: int
    stride: int
    dilation: int
    padding: int
    output_padding: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s, d = self.kernel, self.stride, self.dilation
        w = self.param("kernel", _deconv_init, (k, k, k, x.shape[-1], self.features), jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        lo = d * (k - 1) - self.padding
        y = lax.conv_general_dilated(
            x.astype(self.dtype), jnp.flip(w, (0, 1, 2)).astype(self.dtype), (1, 1, 1),
            [(lo, lo + self.output_padding)] * 3, lhs_dilation=(s,) * 3, rhs_dilation=(d,) * 3,
            dimension_numbers=DIMENSION_NUMBERS)
        return y + b.astype(self.dtype)


class Convolution(nn.Module):
    """MONAI's `Convolution(adn_ordering="DA")`: conv (or transposed conv) -> dropout -> act.

    `geometry`: (stride, kernel, dilation, padding[, output_padding]) as MONAI's
    `downsample_parameters`/`upsample_parameters` rows; `conv_only` skips dropout and act;
    `dropout` None or 0 skips dropout (MONAI's first encoder conv has none).

    The memory levers replace the conv (params `conv/kernel`, `conv/bias` either way):
    `strided` = (kernel triple, stride triple, padding pairs) is a strided conv of that
    geometry (`layers.conv`); `up_factor` (a triple) upsamples by it, with `upsample`
    "nearest_conv" (nearest then conv k3, `layers.nearest_conv`) or "subpixel" (conv k3
    to features * prod(up_factor), ICNR init, then `layers.depth_to_space`).
    """

    features: int
    geometry: Sequence[int] = (1, 3, 1, 1)
    transposed: bool = False
    act: Any = None
    dropout: float | None = None
    conv_only: bool = False
    dtype: Any = jnp.float32
    strided: Any = None
    up_factor: Any = None
    upsample: str = "nearest_conv"

    @nn.compact
    def __call__(self, x, train: bool = False):
        s, k, d, p = self.geometry[:4]
        if self.up_factor is not None:
            f = tuple(self.up_factor)
            n = f[0] * f[1] * f[2]
            if self.upsample == "subpixel" and n > 1:
                x = depth_to_space(conv(self.features * n, dtype=self.dtype, name="conv",
                                        kernel_init=icnr_init(torch_like_init, n))(x), f)
            else:
                x = nearest_conv(self.features, f, self.dtype, "conv")(x)
        elif self.strided is not None:
            kernel, stride, padding = self.strided
            x = conv(self.features, kernel, stride, padding, self.dtype, name="conv")(x)
        elif self.transposed:
            x = ConvTranspose(self.features, k, s, d, p, self.geometry[4], self.dtype,
                              name="conv")(x)
        else:
            x = nn.Conv(self.features, (k,) * 3, (s,) * 3, [(p, p)] * 3, kernel_dilation=(d,) * 3,
                        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_like_init,
                        conv_general_dilated=conv_general_dilated, name="conv")(x)
        if self.conv_only:
            return x
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return x if self.act is None else Act(self.act, name="act")(x)


class ResidualUnit(nn.Module):
    """MONAI's `VQVAEResidualUnit`: relu(x + conv2(act(dropout(conv1(x))))), convs k3 p1.

    The final ReLU is fixed whatever `act` is (as MONAI's)."""

    num_res_channels: int
    act: Any
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = Convolution(self.num_res_channels, act=self.act, dropout=self.dropout,
                        dtype=self.dtype, name="conv1")(x, train)
        h = Convolution(x.shape[-1], conv_only=True, dtype=self.dtype, name="conv2")(h)
        return nn.relu(x + h)


class Encoder(nn.Module):
    """MONAI's VQVAE `Encoder`: per level a strided `Convolution` then `num_res_layers`
    residual units; a final conv k3 p1 to `out_channels` (embedding_dim). Our block i is
    MONAI's `blocks.i`. `strided`: per level None (the `downsample_parameters` row) or a
    lever conv's (kernel, stride, padding) (see `Convolution`)."""

    out_channels: int
    channels: Sequence[int]
    num_res_layers: int
    num_res_channels: Sequence[int]
    downsample_parameters: Sequence[Sequence[int]]
    dropout: float
    act: Any
    dtype: Any = jnp.float32
    strided: Sequence | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = 0
        strided = self.strided or (None,) * len(self.channels)
        for i, c in enumerate(self.channels):
            x = Convolution(c, tuple(self.downsample_parameters[i]), act=self.act,
                            dropout=None if i == 0 else self.dropout, dtype=self.dtype,
                            strided=strided[i], name=f"blocks_{b}")(x, train)
            b += 1
            for _ in range(self.num_res_layers):
                x = ResidualUnit(self.num_res_channels[i], self.act, self.dropout, self.dtype,
                                 name=f"blocks_{b}")(x, train)
                b += 1
        return Convolution(self.out_channels, conv_only=True, dtype=self.dtype,
                           name=f"blocks_{b}")(x)


class Decoder(nn.Module):
    """MONAI's VQVAE `Decoder`: conv k3 p1 to channels[-1]; per level (deepest first)
    residual units then a transposed `Convolution` (the last one conv only, to
    `out_channels`); then `output_act` when set. Our block i is MONAI's `blocks.i`.
    `up_factors`: per upsample (deepest first) None (the transposed conv of the
    `upsample_parameters` row) or a lever's factor triple, the last one made by `head`
    ("nearest_conv" or "subpixel"; see `Convolution`)."""

    out_channels: int
    channels: Sequence[int]
    num_res_layers: int
    num_res_channels: Sequence[int]
    upsample_parameters: Sequence[Sequence[int]]
    dropout: float
    act: Any
    output_act: Any = None
    dtype: Any = jnp.float32
    up_factors: Sequence | None = None
    head: str = "deconv"

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch, rch, n = self.channels[::-1], self.num_res_channels[::-1], len(self.channels)
        up = self.up_factors or (None,) * n
        x = Convolution(ch[0], conv_only=True, dtype=self.dtype, name="blocks_0")(x)
        b = 1
        for i in range(n):
            for _ in range(self.num_res_layers):
                x = ResidualUnit(rch[i], self.act, self.dropout, self.dtype,
                                 name=f"blocks_{b}")(x, train)
                b += 1
            last = i == n - 1
            x = Convolution(self.out_channels if last else ch[i + 1],
                            tuple(self.upsample_parameters[i]), transposed=True, act=self.act,
                            dropout=None if last else self.dropout, conv_only=last,
                            dtype=self.dtype, up_factor=up[i],
                            upsample=self.head if last else "nearest_conv",
                            name=f"blocks_{b}")(x, train)
            b += 1
        if self.output_act is not None:
            x = Act(self.output_act, name="output_act")(x)
        return x


def _codebook_init(key, num_embeddings: int, embedding_dim: int, how: str):
    """MONAI's init: "normal" is torch.nn.Embedding's N(0, 1); "kaiming_uniform" (fan_in =
    embedding_dim, linear gain) is U(+-sqrt(3 / embedding_dim))."""
    shape = (num_embeddings, embedding_dim)
    if how == "normal":
        return jax.random.normal(key, shape, jnp.float32)
    if how == "kaiming_uniform":
        bound = (3.0 / embedding_dim) ** 0.5
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    raise ConfigError(f"vqvae embedding_init must be 'normal' or 'kaiming_uniform'; got {how!r}")


class EMAQuantizer(nn.Module):
    """MONAI's `EMAQuantizer`: nearest codebook vector, commitment loss, EMA codebook update.

    Call: x (B, X, Y, Z, embedding_dim), any float dtype, computed in float32 (MONAI
    disables autocast here). Returns (quantized (B, X, Y, Z, D) float32 with a
    straight-through gradient to x, loss () float32 = commitment_cost * mean((q - x)^2)
    with q constant, indices (B, X, Y, Z) int32). Ties go to the lowest index (torch.max).

    With `train=True` (and "codebook" mutable) the codebook is updated after quantizing, as
    MONAI does in training mode: cluster_size <- decay*cluster_size + (1-decay)*counts;
    ema_w <- decay*ema_w + (1-decay)*sum of the vectors assigned to each code; embedding
    <- ema_w / Laplace-smoothed cluster size ((cs + eps) / (n + K*eps) * n, n = sum cs).
    Counts and sums run over the whole (global) batch, which is what MONAI's DDP all-reduce
    gives. The returned q and loss use the codebook from before the update (as MONAI's).
    """

    num_embeddings: int
    embedding_dim: int
    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    embedding_init: str = "normal"

    def setup(self):
        k, d = self.num_embeddings, self.embedding_dim
        self.embedding = self.variable(
            "codebook", "embedding",
            lambda: _codebook_init(self.make_rng("params"), k, d, self.embedding_init))
        self.ema_cluster_size = self.variable("codebook", "ema_cluster_size",
                                              lambda: jnp.zeros((k,), jnp.float32))
        self.ema_w = self.variable("codebook", "ema_w", lambda: self.embedding.value)

    def quantize(self, x):
        """x (B, X, Y, Z, D) -> (flat x (N, D) float32, indices (B, X, Y, Z) int32)."""
        flat = x.astype(jnp.float32).reshape(-1, self.embedding_dim)
        e = self.embedding.value
        dist = ((flat ** 2).sum(1, keepdims=True) + (e ** 2).sum(1)[None, :]
                - 2 * jnp.dot(flat, e.T, precision=lax.Precision.HIGHEST))
        return flat, jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(x.shape[:-1])

    def embed(self, indices):
        """indices (B, X, Y, Z) int -> codebook vectors (B, X, Y, Z, D) float32."""
        return jnp.take(self.embedding.value, indices, axis=0)

    def __call__(self, x, train: bool = False):
        flat, idx = self.quantize(x)
        q = self.embed(idx)
        if train and not self.is_initializing():
            self._ema_update(flat, idx.reshape(-1))
        x = x.astype(jnp.float32)
        q = lax.stop_gradient(q)
        loss = self.commitment_cost * jnp.mean((q - x) ** 2)
        return x + lax.stop_gradient(q - x), loss, idx

    def _ema_update(self, flat, idx):
        onehot = jax.nn.one_hot(idx, self.num_embeddings, dtype=jnp.float32)
        flat = lax.stop_gradient(flat)
        counts = onehot.sum(0)
        dw = jnp.dot(onehot.T, flat, precision=lax.Precision.HIGHEST)
        d = self.decay
        cs = self.ema_cluster_size.value * d + counts * (1 - d)
        n = cs.sum()
        weights = (cs + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        ema_w = self.ema_w.value * d + dw * (1 - d)
        self.ema_cluster_size.value = cs
        self.ema_w.value = ema_w
        self.embedding.value = ema_w / weights[:, None]


def _rows(params, n: int, width: int, name: str) -> tuple[tuple[int, ...], ...]:
    """One (stride, kernel, dilation, padding[, output_padding]) row, or one per level."""
    rows = (params,) * n if all(isinstance(v, int) for v in params) else tuple(params)
    if len(rows) != n or any(len(r) != width or not all(isinstance(v, int) for v in r)
                             for r in rows):
        raise ConfigError(f"vqvae {name} must be one tuple of {width} ints or {n} such tuples "
                          f"(one per level of channels); got {params!r}")
    return tuple(tuple(r) for r in rows)


class VQVAE(nn.Module):
    """MONAI's `VQVAE(spatial_dims=3, ...)`: same fields, defaults and function.

    Fields as MONAI's (`downsample_parameters` rows are (stride, kernel, dilation,
    padding), `upsample_parameters` rows (stride, kernel, dilation, padding,
    output_padding); one row or one per level; `act`/`output_act` MONAI names or
    (name, kwargs)), plus `dtype` of the convolutions (the quantizer is float32) and the
    memory levers `initial_downsample_factor`, `downsample_factors`, `upsample_head`,
    `strided_kernel` (module docstring; their defaults are MONAI's model).
    `ddp_sync`/`use_checkpointing` have no field: the EMA statistics are global batch sums
    under jit, and remat is the caller's `jax.checkpoint`.

    `__call__(x, train)`: x (B, X, Y, Z, in_channels) -> (reconstruction (B, X', Y', Z',
    out_channels), quantization loss ()) as MONAI's forward; `train=True` applies dropout
    (rng "dropout") and the EMA codebook update (mutable "codebook"). Raises ConfigError
    for parameter rows of the wrong shape or an unknown activation.
    """

    in_channels: int = 1
    out_channels: int = 1
    channels: Sequence[int] = (96, 96, 192)
    num_res_layers: int = 3
    num_res_channels: Sequence[int] | int = (96, 96, 192)
    downsample_parameters: Sequence = ((2, 4, 1, 1), (2, 4, 1, 1), (2, 4, 1, 1))
    upsample_parameters: Sequence = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    num_embeddings: int = 32
    embedding_dim: int = 64
    embedding_init: str = "normal"
    commitment_cost: float = 0.25
    decay: float = 0.5
    epsilon: float = 1e-5
    dropout: float = 0.0
    act: Any = "RELU"
    output_act: Any = None
    dtype: Any = "float32"
    initial_downsample_factor: Any = None
    downsample_factors: Sequence | None = None
    upsample_head: str = "deconv"
    strided_kernel: int | None = None

    @property
    def uses_levers(self) -> bool:
        """True when a memory lever is set (the model is then not MONAI's)."""
        return (self.initial_downsample_factor is not None
                or self.downsample_factors is not None or self.upsample_head != "deconv")

    def lever_layout(self) -> tuple[tuple, tuple, tuple]:
        """(encoder stride triple per level, lever conv (kernel, stride, padding) or None
        per encoder level, lever upsample factor triple or None per decoder upsample
        (deepest first)). None means the MONAI row. Raises ConfigError for bad lever
        settings (their names in the message)."""
        n = len(self.channels)
        down = _rows(self.downsample_parameters, n, 4, "downsample_parameters")
        if self.upsample_head not in UPSAMPLE_HEADS:
            raise ConfigError(f"vqvae upsample_head must be one of {UPSAMPLE_HEADS}; got "
                              f"{self.upsample_head!r}")
        sk = self.strided_kernel
        if sk is not None and (isinstance(sk, bool) or not isinstance(sk, int) or sk < 1):
            raise ConfigError("vqvae strided_kernel must be None (voxel-complete) or a "
                              f"positive int; got {sk!r}")
        factors: list = [None] * n
        if self.initial_downsample_factor is not None:
            factors[0] = as_triple(self.initial_downsample_factor,
                                   "vqvae initial_downsample_factor")
        if self.downsample_factors is not None:
            df = tuple(self.downsample_factors)
            if len(df) != n - 1:
                raise ConfigError(f"vqvae downsample_factors needs {n - 1} entries (one per "
                                  f"level after the first of channels {tuple(self.channels)}), "
                                  f"or None for the downsample_parameters rows; got {df!r}")
            for i, f in enumerate(df):
                factors[i + 1] = as_triple(f, f"vqvae downsample_factors[{i}]")
        strides = tuple((down[i][0],) * 3 if f is None else f for i, f in enumerate(factors))
        strided = tuple(None if f is None else
                        (strided_geometry(f, sk)[0], f, strided_geometry(f, sk)[1])
                        for f in factors)
        up: list = [None] * n
        if self.downsample_factors is not None:
            for i in range(n - 1):
                up[i] = strides[n - 1 - i]
        if self.upsample_head != "deconv":
            up[n - 1] = strides[0]
        return strides, strided, tuple(up)

    @property
    def res_channels(self) -> tuple[int, ...]:
        rc = self.num_res_channels
        rc = (rc,) * len(self.channels) if isinstance(rc, int) else tuple(rc)
        if len(rc) != len(self.channels):
            raise ConfigError("vqvae num_res_channels must be one int or one per level of "
                              f"channels {tuple(self.channels)}; got {self.num_res_channels!r}")
        return rc

    def setup(self):
        n, dt = len(self.channels), jnp.dtype(self.dtype)
        parse_act(self.act)
        if self.output_act is not None and parse_act(self.output_act)[0] == "prelu":
            raise ConfigError("vqvae output_act 'prelu' is not supported (it would add a "
                              "parameter MONAI stores outside any block); pick another")
        strides, strided, up = self.lever_layout()
        if self.is_initializing():  # once per model, not on every apply
            for i, g in enumerate(strided):
                if g is not None:
                    warn_if_skipping(f"vqvae encoder level {i}", strides[i], self.strided_kernel)
        self.encoder = Encoder(self.embedding_dim, tuple(self.channels), self.num_res_layers,
                               self.res_channels,
                               _rows(self.downsample_parameters, n, 4, "downsample_parameters"),
                               self.dropout, self.act, dt, strided)
        self.decoder = Decoder(self.out_channels, tuple(self.channels), self.num_res_layers,
                               self.res_channels,
                               _rows(self.upsample_parameters, n, 5, "upsample_parameters"),
                               self.dropout, self.act, self.output_act, dt, up,
                               self.upsample_head)
        self.quantizer = EMAQuantizer(self.num_embeddings, self.embedding_dim,
                                      self.commitment_cost, self.decay, self.epsilon,
                                      self.embedding_init)

    def encode(self, x, train: bool = False):
        """x (B, X, Y, Z, in_channels) -> continuous latents (B, x', y', z', embedding_dim)."""
        return self.encoder(x, train)

    def quantize(self, z, train: bool = False):
        """Latents -> (quantized float32, loss () float32, indices int32 (B, x', y', z'))."""
        return self.quantizer(z, train)

    def decode(self, q, train: bool = False):
        """Quantized latents (B, x', y', z', embedding_dim) -> (B, X, Y, Z, out_channels)."""
        return self.decoder(q, train)

    def index_quantize(self, x):
        """x -> codebook indices (B, x', y', z') int32 (no update)."""
        return self.quantizer.quantize(self.encoder(x))[1]

    def decode_samples(self, indices):
        """Codebook indices (B, x', y', z') -> decoded volumes."""
        return self.decoder(self.quantizer.embed(indices))

    def decode_latents(self, z):
        """Continuous latents (B, x', y', z', D) -> decoded volumes through the quantiser:
        each latent vector replaced by its nearest codebook vector (exactly, no
        straight-through sum), then decoded; no codebook update. What decoding a
        pre-quantisation latent (extracted, or sampled by stage 2) means."""
        return self.decoder(self.quantizer.embed(self.quantizer.quantize(z)[1]))

    def forward_all(self, x, train: bool = False):
        """One pass returning every intermediate the training step needs: (reconstruction,
        quantization loss (), continuous latents z (B, x', y', z', D) in the encoder's
        dtype, indices (B, x', y', z') int32). With `train` as `__call__`."""
        z = self.encoder(x, train)
        q, loss, idx = self.quantizer(z, train)
        return self.decoder(q, train), loss, z, idx

    def __call__(self, x, train: bool = False):
        q, loss, _ = self.quantizer(self.encoder(x, train), train)
        return self.decoder(q, train), loss


def conv_size(n: int, row) -> int:
    """Output length of a conv (stride, kernel, dilation, padding) over `n` voxels."""
    s, k, d, p = row[:4]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def deconv_size(n: int, row) -> int:
    """Output length of a transposed conv (stride, kernel, dilation, padding,
    output_padding) over `n` voxels (torch.nn.ConvTranspose3d's formula)."""
    s, k, d, p, op = row[:5]
    return (n - 1) * s - 2 * p + d * (k - 1) + op + 1


def vqvae_shapes(model: VQVAE, size) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """(encoder output (X, Y, Z) per level, decoder output (X, Y, Z)) for an input of
    spatial `size`, with the memory levers' geometry where set; a non-positive entry means
    the input is too small. Raises ConfigError for misshaped parameter rows or lever
    settings."""
    n = len(model.channels)
    down = _rows(model.downsample_parameters, n, 4, "downsample_parameters")
    up = _rows(model.upsample_parameters, n, 5, "upsample_parameters")
    _, strided, up_factors = model.lever_layout()
    levels, cur = [], tuple(int(v) for v in size)
    for row, lever in zip(down, strided):
        if lever is None:
            cur = tuple(conv_size(v, row) for v in cur)
        else:
            k, s, pad = lever
            cur = tuple((v + lo + hi - kk) // ss + 1
                        for v, kk, ss, (lo, hi) in zip(cur, k, s, pad))
        levels.append(cur)
    for row, f in zip(up, up_factors):
        cur = (tuple(deconv_size(v, row) for v in cur) if f is None
               else tuple(v * ff for v, ff in zip(cur, f)))
    return levels, cur


def build_vqvae(ae_cfg: Any) -> VQVAE:
    """VQVAE from `config.autoencoder` (a ConfigDict or dict): its `vqvae` subsection holds
    the MONAI fields (channels, num_res_layers, ..., num_embeddings, embedding_dim,
    commitment_cost, decay, epsilon); `in_channels`, `out_channels` and `dtype` are the
    section's own. Lists become tuples; None leaves MONAI's default. Raises ConfigError
    for an unsupported dtype. The levers are `vqvae` fields too; absent ones keep MONAI's
    model."""
    get = ae_cfg.get if hasattr(ae_cfg, "get") else lambda k, d=None: getattr(ae_cfg, k, d)
    vq = get("vqvae", None) or {}
    vq_get = vq.get if hasattr(vq, "get") else lambda k, d=None: getattr(vq, k, d)

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v

    fields = {}
    for name in VQVAE.__dataclass_fields__:
        if name in ("parent", "name"):
            continue
        value = get(name, None) if name in ("in_channels", "out_channels", "dtype") \
            else vq_get(name, None)
        if value is not None:
            fields[name] = tup(value)
    dtype = fields.get("dtype", "float32")
    try:
        dtype = jnp.dtype(dtype).name
    except TypeError:
        dtype = None
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"autoencoder.dtype must be 'float32' or 'bfloat16'; got "
                          f"{fields.get('dtype')!r}")
    fields["dtype"] = dtype
    return VQVAE(**fields)
