"""Nearest upsampling followed by a 3x3x3 conv, computed on the coarse grid.

`conv3(nearest_upsample(x, f))` (kernel 3, padding 1, as MONAI's `Upsample(mode="nontrainable",
interp_mode="nearest")` + `postconv`) never needs the upsampled tensor: along an axis with
factor f >= 2, fine voxel f*i + a sees coarse voxels i + floor((a + t) / f) for taps
t = -1, 0, 1, which all lie in {i - 1, i} (a = 0), {i} (0 < a < f - 1) or {i, i + 1}
(a = f - 1), and the upsampled tensor's zero padding is the coarse tensor's. So every
output parity a is a 2-tap conv on the coarse grid whose taps are sums of the 3x3x3
kernel's taps. All parities are ONE conv with kernel 2 (padding 1, output n + 1) and
prod(f) * C_out output channels -- parity a reads its output at offset 0 (a < f - 1) or 1
(a = f - 1) -- followed by depth-to-space. Axes with factor 1 keep kernel 3, padding 1.

For factor 2 per axis that is 8 x 8 = 64 kernel taps per coarse voxel against 8 x 27 = 216
for the conv on the upsampled grid (3.4x fewer FLOPs), and neither the upsampled input
(prod(f) x the coarse tensor) nor its gradient is ever built.

The folded kernel is computed from the 3x3x3 kernel at trace time (a constant 0/1 matrix
per axis), so the parameters are the 3x3x3 kernel and bias of the naive form -- MONAI's,
with the same names and init -- and gradients flow to them. Values equal the naive form
to float rounding (the folded taps are sums of up to 8 float32 weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config import as_triple
from ldm_jax.models.tap_conv import conv_general_dilated


def fold_matrix(f: int) -> tuple[np.ndarray, list[int]]:
    """(M (f, K, 3) 0/1 float32, offsets (f,)) of one axis with nearest factor f.

    Folded tap k of parity a is sum_t M[a, k, t] * w[t]; parity a reads the coarse conv's
    output at index i + offsets[a]. K = 3 for f = 1 (the conv unchanged), else 2.
    """
    if f < 1:
        raise ValueError(f"nearest upsampling factor must be >= 1; got {f}")
    if f == 1:
        return np.eye(3, dtype=np.float32)[None], [0]
    m = np.zeros((f, 2, 3), np.float32)
    offsets = []
    for a in range(f):
        off = 1 if a == f - 1 else 0  # output j = i + off covers coarse voxels j - 1, j
        offsets.append(off)
        for t in (-1, 0, 1):
            d = (a + t) // f  # coarse offset of fine voxel f*i + a + t
            m[a, d - off + 1, t + 1] += 1.0
    return m, offsets


def fold_kernel(kernel: jax.Array, factor) -> jax.Array:
    """(3, 3, 3, I, O) kernel -> (Kx, Ky, Kz, I, fx*fy*fz*O), channel ((a*fy + b)*fz + c)*O + o."""
    (mx, _), (my, _), (mz, _) = (fold_matrix(f) for f in as_triple(factor))
    w = jnp.einsum("akx,bly,cmz,xyzio->klmiabco", mx, my, mz, kernel,
                   precision=jax.lax.Precision.HIGHEST)
    kx, ky, kz, i = w.shape[:4]
    return w.reshape(kx, ky, kz, i, -1)


def _take_parities(y, factor, spatial):
    """(B, X+ex, Y+ey, Z+ez, fx, fy, fz, O) -> (B, X, Y, Z, fx, fy, fz, O): parity a of an
    axis with f >= 2 reads offset 0 for a < f - 1 and offset 1 for a = f - 1.

    Written as selects between two shifted slices (elementwise), which XLA fuses into
    one loop with the depth-to-space transpose; concatenates would each be a copy."""
    for axis, (f, n) in enumerate(zip(as_triple(factor), spatial)):
        if f == 1:
            continue
        sp, par = 1 + axis, 4 + axis
        last = (jnp.arange(f) == f - 1).reshape((1,) * par + (f,) + (1,) * (y.ndim - par - 1))
        y = jnp.where(last, jax.lax.slice_in_dim(y, 1, n + 1, axis=sp),
                      jax.lax.slice_in_dim(y, 0, n, axis=sp))
    return y


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, factor,
                  dtype: Any = None) -> jax.Array:
    """conv3x3x3_pad1(nearest_upsample(x, factor)) + bias without the upsampled tensor.

    x: (B, X, Y, Z, I); kernel: (3, 3, 3, I, O) (flax layout); bias: (O,) or None;
    factor: int or per-axis triple of ints >= 1. Computes in `dtype` (default x.dtype)
    and returns (B, X*fx, Y*fy, Z*fz, O) in that dtype.
    """
    f = as_triple(factor)
    dtype = dtype or x.dtype
    b, X, Y, Z, _ = x.shape
    o = kernel.shape[-1]
    w = fold_kernel(kernel, f).astype(dtype)
    # Padding 1 everywhere: kernel 3 (factor 1) keeps n, kernel 2 gives n + 1.
    y = conv_general_dilated(x.astype(dtype), w, (1, 1, 1), [(1, 1)] * 3,
                             dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    y = y.reshape(*y.shape[:4], *f, o)
    y = _take_parities(y, f, (X, Y, Z))  # (B, X, Y, Z, fx, fy, fz, O)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, X * f[0], Y * f[1], Z * f[2], o)
    return y if bias is None else y + bias.astype(dtype)


class NearestUpsampleConv(nn.Module):
    """Nearest x `factor` then conv k3 p1 to `features` (MONAI's upsample + postconv), folded.

    Params `kernel` (3, 3, 3, in, features) and `bias` (features,) float32 -- the same
    names, shapes and init as `layers.conv(features)`, so checkpoints and
    `ldm_jax.convert` do not change. See the module docstring for the computation.
    """

    features: int
    factor: Sequence[int]
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, 3, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return upsample_conv(x, kernel, bias, self.factor, self.dtype)
