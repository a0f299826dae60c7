"""3D VQ-VAE: MONAI's `VQVAE` and `EMAQuantizer` (MONAI 1.6), weight for weight.

Reference: `monai/networks/nets/vqvae.py` and `monai/networks/layers/vector_quantizer.py`
(Tudosiu et al. 2022, https://arxiv.org/abs/2209.03177; van den Oord et al. 2017,
https://arxiv.org/abs/1711.00937). Channels-last `(B, X, Y, Z, C)`; MONAI's (D, H, W) are
our (X, Y, Z). `ldm_jax.models.vqvae_convert` maps MONAI state dicts both ways.

Variables: "params" (the convolutions, PReLU slopes) and "codebook" (the quantizer's
`embedding`, `ema_cluster_size`, `ema_w`: not trained by gradients but by the EMA update,
which `train=True` returns as the new "codebook" collection instead of mutating a buffer:
`model.apply(v, x, train=True, mutable=["codebook"], rngs={"dropout": key})`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.errors import ConfigError
from ldm_jax.models.layers import torch_like_init
from ldm_jax.models.tap_conv import DIMENSION_NUMBERS, conv_general_dilated

# PyTorch ConvTranspose init: its fan_in is computed from weight dim 1 (= out channels) * k.
_deconv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                in_axis=-1, out_axis=-2)
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
    """

    features: int
    geometry: Sequence[int] = (1, 3, 1, 1)
    transposed: bool = False
    act: Any = None
    dropout: float | None = None
    conv_only: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        s, k, d, p = self.geometry[:4]
        if self.transposed:
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
    MONAI's `blocks.i`."""

    out_channels: int
    channels: Sequence[int]
    num_res_layers: int
    num_res_channels: Sequence[int]
    downsample_parameters: Sequence[Sequence[int]]
    dropout: float
    act: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = 0
        for i, c in enumerate(self.channels):
            x = Convolution(c, tuple(self.downsample_parameters[i]), act=self.act,
                            dropout=None if i == 0 else self.dropout, dtype=self.dtype,
                            name=f"blocks_{b}")(x, train)
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
    `out_channels`); then `output_act` when set. Our block i is MONAI's `blocks.i`."""

    out_channels: int
    channels: Sequence[int]
    num_res_layers: int
    num_res_channels: Sequence[int]
    upsample_parameters: Sequence[Sequence[int]]
    dropout: float
    act: Any
    output_act: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch, rch, n = self.channels[::-1], self.num_res_channels[::-1], len(self.channels)
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
                            dtype=self.dtype, name=f"blocks_{b}")(x, train)
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
    (name, kwargs)), plus `dtype` of the convolutions (the quantizer is float32).
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
        self.encoder = Encoder(self.embedding_dim, tuple(self.channels), self.num_res_layers,
                               self.res_channels,
                               _rows(self.downsample_parameters, n, 4, "downsample_parameters"),
                               self.dropout, self.act, dt)
        self.decoder = Decoder(self.out_channels, tuple(self.channels), self.num_res_layers,
                               self.res_channels,
                               _rows(self.upsample_parameters, n, 5, "upsample_parameters"),
                               self.dropout, self.act, self.output_act, dt)
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
    spatial `size`; a non-positive entry means the input is too small. Raises ConfigError
    for misshaped parameter rows."""
    n = len(model.channels)
    down = _rows(model.downsample_parameters, n, 4, "downsample_parameters")
    up = _rows(model.upsample_parameters, n, 5, "upsample_parameters")
    levels, cur = [], tuple(int(v) for v in size)
    for row in down:
        cur = tuple(conv_size(v, row) for v in cur)
        levels.append(cur)
    for row in up:
        cur = tuple(deconv_size(v, row) for v in cur)
    return levels, cur


def build_vqvae(ae_cfg: Any) -> VQVAE:
    """VQVAE from `config.autoencoder` (a ConfigDict or dict): its `vqvae` subsection holds
    the MONAI fields (channels, num_res_layers, ..., num_embeddings, embedding_dim,
    commitment_cost, decay, epsilon); `in_channels`, `out_channels` and `dtype` are the
    section's own. Lists become tuples; None leaves MONAI's default. Raises ConfigError
    for an unsupported dtype."""
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
