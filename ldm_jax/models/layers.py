"""Building blocks of the autoencoder, channels-last `(batch, X, Y, Z, C)`.

Every block mirrors one MONAI block (`monai/networks/nets/autoencoderkl.py`) so that a
MONAI state_dict maps onto our params one to one (see `ldm_jax.convert`); the strided
stages generalise MONAI's factor-2 layers to any per-axis factor without skipping voxels.

Precision: params are float32; compute runs in `dtype` (float32 or bfloat16); GroupNorm
statistics are reduced in float32 (flax's `force_float32_reductions`), attention logits
and softmax in float32 (`attention`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.config import as_triple
from ldm_jax.errors import ConfigError
from ldm_jax.models.chunked_attention import chunked_attention
from ldm_jax.models.tap_conv import after, conv_general_dilated
from ldm_jax.models.upsample_conv import NearestUpsampleConv

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# PyTorch's default conv/linear weight init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))),
# so that MONAI's training recipes (learning rates, warm-ups) transfer unchanged.
torch_like_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ----------------------------------------------------------------------------------------
# Geometry of strided stages.


def strided_axis_geometry(stride: int, kernel: int | None = None) -> tuple[int, tuple[int, int]]:
    """(kernel, (pad_lo, pad_hi)) of one axis of a strided conv whose output is exactly n/stride.

    Why this rule: stride 1 is MONAI's k3 p(1,1); stride 2 is MONAI's downsample (pad one
    voxel at the end, k3 s2 p0); stride s >= 3 uses k = s + 1 with the same end padding,
    so output voxel i sees input voxels [s*i, s*i + s] -- its own block plus the first
    voxel of the next -- and every input voxel is seen (k >= s) at a cost only slightly
    above a patchify conv (k = s).

    `kernel` overrides the kernel on strided axes (the original PyTorch project used 3).
    With kernel < stride the padding is (k-1)//2 at the start (the windows of the original
    project's symmetric padding) and the conv floors the output to n/stride: stride -
    kernel voxels of every block never reach the output.
    """
    if stride < 1:
        raise ConfigError(f"strides must be positive ints, got {stride}")
    if stride == 1:
        return 3, (1, 1)
    k = stride + 1 if kernel is None else int(kernel)
    if k < 1:
        raise ConfigError(f"autoencoder.strided_kernel must be a positive int, got {kernel}")
    total = k - stride  # out = (n + total - k) / s + 1 = n / s exactly when s | n
    if total >= 0:
        return k, (total // 2, total - total // 2)
    lo = (k - 1) // 2
    return k, (lo, 0)  # floor((n + lo - k)/s) + 1 == n/s for 0 <= lo < k < s


def strided_geometry(factor, kernel: int | None = None) -> tuple[Triple, tuple]:
    """Per-axis (kernel triple, padding pairs) of a strided stage with `factor` (int or triple)."""
    f = as_triple(factor)
    geo = [strided_axis_geometry(s, kernel) for s in f]
    return tuple(g[0] for g in geo), tuple(g[1] for g in geo)


def skips_voxels(factor, kernel: int | None) -> bool:
    """True when a strided stage with this kernel leaves some input voxels unseen."""
    return any(k < s for k, s in zip(strided_geometry(factor, kernel)[0], as_triple(factor)))


def warn_if_skipping(where: str, factor, kernel: int | None) -> None:
    if skips_voxels(factor, kernel):
        log.warning(
            "%s: strided_kernel=%s is smaller than the stride %s on some axis, so some input "
            "voxels never reach the latent (as in the original PyTorch project). Set "
            "autoencoder.strided_kernel=None for a voxel-complete kernel.",
            where, kernel, as_triple(factor),
        )


# ----------------------------------------------------------------------------------------
# Resampling without gathers.


def nearest_upsample(x: jax.Array, factor) -> jax.Array:
    """Nearest-neighbour upsampling by integer per-axis factors via broadcast + reshape.

    Same values as `torch.nn.Upsample(mode="nearest")` / `jnp.repeat`, but lowers to a
    broadcast, so arrays sharded along a spatial axis stay sharded (resize lowers to a
    gather, which all-gathers).
    """
    fx, fy, fz = as_triple(factor)
    if (fx, fy, fz) == (1, 1, 1):
        return x
    b, X, Y, Z, c = x.shape
    x = x[:, :, None, :, None, :, None, :]
    x = jnp.broadcast_to(x, (b, X, fx, Y, fy, Z, fz, c))
    return x.reshape(b, X * fx, Y * fy, Z * fz, c)


def depth_to_space(x: jax.Array, factor) -> jax.Array:
    """(B, X, Y, Z, fx*fy*fz*C) -> (B, X*fx, Y*fy, Z*fz, C); channel = ((a*fy + b)*fz + c)*C + o."""
    fx, fy, fz = as_triple(factor)
    b, X, Y, Z, cf = x.shape
    c = cf // (fx * fy * fz)
    x = x.reshape(b, X, Y, Z, fx, fy, fz, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, X * fx, Y * fy, Z * fz, c)


def avg_pool(x: jax.Array, factor) -> jax.Array:
    """Mean over non-overlapping blocks of `factor` voxels (every voxel counted once)."""
    fx, fy, fz = as_triple(factor)
    b, X, Y, Z, c = x.shape
    x = x.reshape(b, X // fx, fx, Y // fy, fy, Z // fz, fz, c)
    return x.mean(axis=(2, 4, 6), dtype=jnp.float32).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Layers.


def conv(features: int, kernel=3, strides=1, padding=None, dtype: Any = jnp.float32,
         name: str | None = None, kernel_init=torch_like_init) -> nn.Conv:
    """3D conv with explicit padding; default k3 p1 (MONAI's `Convolution(conv_only=True)`).

    `kernel_init=nn.initializers.zeros` gives MONAI's `zero_module` (bias is zero-initialised
    either way)."""
    k = as_triple(kernel)
    if padding is None:
        padding = tuple(((kk - 1) // 2, kk // 2) for kk in k)
    return nn.Conv(
        features, kernel_size=k, strides=as_triple(strides), padding=tuple(padding),
        dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name,
        conv_general_dilated=conv_general_dilated,
    )


def group_norm(groups: int, eps: float, dtype: Any, name: str | None = None) -> nn.GroupNorm:
    """torch.nn.GroupNorm(affine=True); statistics in float32, two-pass variance."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
        use_fast_variance=False, name=name,
    )


def _norm_act_conv_fn(cfg, p_norm, p_conv, x):
    """conv(SiLU(GN(x))) as a pure function of the two layers' params; cfg = (C, G, eps, dtype)."""
    features, groups, eps, dtype = cfg
    h = nn.silu(group_norm(groups, eps, dtype).apply({"params": p_norm}, x))
    return conv(features, dtype=dtype).apply({"params": p_conv}, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _norm_act_conv_recomputed(cfg, p_norm, p_conv, x):
    return _norm_act_conv_fn(cfg, p_norm, p_conv, x)


def _nac_fwd(cfg, p_norm, p_conv, x):
    return _norm_act_conv_fn(cfg, p_norm, p_conv, x), (p_norm, p_conv, x)


def _nac_bwd(cfg, residuals, g):
    p_norm, p_conv, x = residuals
    # `after`: the recomputation must wait for g and must not be merged with the forward
    # (XLA:CPU drops optimization barriers, so jax.checkpoint alone saved nothing there).
    _, vjp = jax.vjp(functools.partial(_norm_act_conv_fn, cfg), p_norm, p_conv, after(x, g))
    return vjp(g)  # the conv's forward output is unused here: XLA drops it


_norm_act_conv_recomputed.defvjp(_nac_fwd, _nac_bwd)


def norm_act_conv(module: nn.Module, x, features: int, groups: int, eps: float, dtype: Any,
                  norm_name: str, conv_name: str, recompute: bool = True,
                  kernel_init=torch_like_init):
    """conv_k3(SiLU(GroupNorm(x))) with layers `norm_name`, `conv_name` of `module`
    (`kernel_init`: the conv's, as in `conv`).

    x: (B, X, Y, Z, C_in) -> (B, X, Y, Z, features) in `dtype`. With `recompute` (same
    values, same params) the backward pass keeps only x and the params and recomputes
    the normalisation and activation from them once this block's gradient arrives (a
    `jax.custom_vjp`); without it, it keeps x - mean and SiLU's output as well: two more
    tensors of x's size per call, which is why it is the default (the step's peak memory:
    benchmarks/RESULTS.md, section 8, "GroupNorm -> SiLU -> conv").
    """
    if recompute and not module.is_initializing():
        p = module.variables["params"]
        return _norm_act_conv_recomputed((features, groups, eps, jnp.dtype(dtype)),
                                         p[norm_name], p[conv_name], x)
    h = nn.silu(group_norm(groups, eps, dtype, name=norm_name)(x))
    return conv(features, dtype=dtype, name=conv_name, kernel_init=kernel_init)(h)


class ResBlock(nn.Module):
    """MONAI AEKLResBlock: GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus (1x1) shortcut.

    `recompute_norm_act`: see `norm_act_conv` (same values and params either way).
    """

    out_channels: int
    norm_num_groups: int
    norm_eps: float
    dtype: Any = jnp.float32
    recompute_norm_act: bool = True

    @nn.compact
    def __call__(self, x):
        g, e, dt, c = self.norm_num_groups, self.norm_eps, self.dtype, self.out_channels
        r = self.recompute_norm_act
        h = norm_act_conv(self, x, c, g, e, dt, "norm1", "conv1", r)
        h = norm_act_conv(self, h, c, g, e, dt, "norm2", "conv2", r)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, kernel=1, dtype=dt, name="nin_shortcut")(x)
        return x + h


def attention(q, k, v, implementation: str | None = None, *, query_chunk: int | None = None,
              key_chunk: int | None = None):
    """Softmax attention softmax(q k^T / sqrt(D)) v; q (B, T, heads, D), k and v (B, S, heads, D).

    Returns (B, T, heads, D) in q's dtype; logits and softmax are float32. `implementation`:

    - None (default) picks, in this order: cuDNN flash attention on GPU for bf16/fp16 with
      head dims it supports; plain XLA attention when queries and keys each fit in one
      chunk (T <= query_chunk and S <= key_chunk: the T x S matrix is at most one block,
      so there is nothing to save); otherwise `ldm_jax.models.chunked_attention`, memory
      linear in T and S (online softmax over key chunks, a backward that recomputes the
      scores per block instead of storing T x S probabilities). On XLA:CPU the chunked
      form was also faster than plain attention (benchmarks/RESULTS.md, "Figures behind
      code comments").
    - "chunked": always the chunked form; "xla" / "cudnn": `jax.nn.dot_product_attention`.

    `query_chunk` / `key_chunk` (None: `default_chunks()`) set the block sizes.
    With a single key the softmax is exactly 1, so the output is `v`: returned directly,
    which also avoids XLA:CPU failing to compile that bf16 dot ("Algorithm not supported
    by the ElementalIrEmitter: ALG_DOT_BF16_BF16_F32") for a 1-voxel attention level."""
    if k.shape[1] == 1:
        return jnp.broadcast_to(v, q.shape[:2] + v.shape[2:]).astype(q.dtype)
    dq, dk = default_chunks()
    qc, kc = query_chunk or dq, key_chunk or dk
    if implementation is None:
        d = q.shape[-1]
        if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                and d % 8 == 0 and d <= 128):
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except Exception as e:  # unsupported cuDNN version/shape: XLA is always correct
                log.debug("cuDNN attention unavailable (%s); using XLA", e)
        implementation = "xla" if q.shape[1] <= qc and k.shape[1] <= kc else "chunked"
    if implementation == "chunked":
        return chunked_attention(q, k, v, query_chunk=qc, key_chunk=kc)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def default_chunks() -> tuple[int, int]:
    """(query_chunk, key_chunk) of `attention`: 512 x 512 on CPU (the fastest block size
    measured there: benchmarks/RESULTS.md, "Figures behind code comments"), 1024 x 2048 on
    accelerators (fewer loop iterations, each a kernel launch; not yet measured)."""
    return (512, 512) if jax.default_backend() == "cpu" else (1024, 2048)


class AttentionBlock(nn.Module):
    """MONAI SpatialAttentionBlock: GN -> one head over all voxels (raster order) -> proj, + x.

    q/k/v/out are Linear layers with bias, scale C^-1/2. `attention` computes logits and
    softmax in float32 in memory linear in the voxel count (cuDNN flash attention on GPU
    for bf16, the chunked form elsewhere).
    """

    norm_num_groups: int
    norm_eps: float
    dtype: Any = jnp.float32
    attention_impl: str | None = None  # None: see `attention`

    @nn.compact
    def __call__(self, x):
        b, X, Y, Z, c = x.shape
        h = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, name="norm")(x)
        h = h.reshape(b, X * Y * Z, c)

        def dense(name):
            return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=torch_like_init, name=name)

        q, k, v = (dense(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
        o = attention(q, k, v, self.attention_impl)
        o = dense("out_proj")(o[:, :, 0, :])
        return x + o.reshape(b, X, Y, Z, c).astype(x.dtype)


class Downsample(nn.Module):
    """Level downsample by `factor`: strided conv (MONAI's pad-end + k3 s2 for factor 2) or avg pool."""

    factor: Sequence[int]
    use_conv: bool = True
    strided_kernel: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = as_triple(self.factor)
        if not self.use_conv:
            return avg_pool(x, f)
        kernel, padding = strided_geometry(f, self.strided_kernel)
        return conv(x.shape[-1], kernel, f, padding, self.dtype, name="conv")(x)


class ConvTransposeUpsample(nn.Module):
    """Transposed conv with kernel == stride == factor (MONAI's deconv k2 s2 for factor 2).

    With kernel == stride the output blocks do not overlap, so it is one matmul per voxel
    followed by depth-to-space: no scatter, no wasted zeros. Kernel layout (kx, ky, kz, I, O)
    where PyTorch stores (I, O, kx, ky, kz); PyTorch does not flip the kernel.
    """

    factor: Sequence[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = as_triple(self.factor)
        c = x.shape[-1]
        # PyTorch ConvTranspose init: fan_in is computed from weight dim 1 (= out channels) * k.
        kernel = self.param("kernel", nn.initializers.variance_scaling(
            1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2), (*f, c, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        kx, ky, kz = f
        w = kernel.astype(self.dtype).transpose(3, 0, 1, 2, 4).reshape(c, kx * ky * kz * c)
        y = jnp.dot(x.astype(self.dtype), w)  # (..., fx*fy*fz*C), channel order (a, b, c, o)
        return depth_to_space(y, f) + bias.astype(self.dtype)


def nearest_conv(features: int, factor, dtype: Any, name: str) -> nn.Module:
    """Nearest upsample x `factor` then conv k3 p1 (params: one `layers.conv`'s kernel and
    bias); computed on the coarse grid (`ldm_jax.models.upsample_conv`) when factor > 1."""
    if as_triple(factor) == (1, 1, 1):
        return conv(features, dtype=dtype, name=name)
    return NearestUpsampleConv(features, as_triple(factor), torch_like_init, dtype, name=name)


class Upsample(nn.Module):
    """Level upsample by `factor`: nearest then conv k3 (MONAI "postconv", computed on the
    coarse grid by `nearest_conv`) or conv-transpose."""

    factor: Sequence[int]
    use_convtranspose: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = as_triple(self.factor)
        if self.use_convtranspose:
            return ConvTransposeUpsample(f, self.dtype, name="deconv")(x)
        return nearest_conv(x.shape[-1], f, self.dtype, "postconv")(x)


def icnr_init(base_init, subpixels: int):
    """Subpixel-conv init whose output is nearest-upsampled at start (Aitken et al. 2017):
    one kernel per output channel, repeated for every subpixel -> no checkerboard at init."""

    def init(key, shape, dtype=jnp.float32):
        *spatial, cin, cout = shape
        base = base_init(key, (*spatial, cin, cout // subpixels), dtype)
        return jnp.tile(base, (1,) * (len(spatial) + 1) + (subpixels,))

    return init
