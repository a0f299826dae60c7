"""3D convolution whose kernel gradient is one matmul per kernel tap (for XLA:CPU).

`conv_general_dilated(...)` has `lax.conv_general_dilated`'s signature and values. For
a stride-1, undilated, ungrouped conv in NDHWC / DHWIO layout its backward pass differs:

- d(input): XLA's own (a conv with the flipped kernel), unchanged;
- d(kernel): for each tap t of the k_x x k_y x k_z window, dW[t] = x_pad[shifted by t]^T
  @ dY -- a (voxels x C_in)^T (voxels x C_out) matmul -- in a `lax.scan` over the taps,
  so one shifted copy of the input exists at a time.

Why: XLA:CPU computes d(kernel) as a convolution whose window is the whole output grid,
after transposing input and output gradient to feature-major layouts (two more copies of
activation size). That was 130x slower than the forward conv for the coarse-grid
upsample conv (kernel 2, 512 output channels: 13.9 CPU-s against 0.1 at 24x24x16x64)
and a large part of every conv's backward; the per-tap matmuls run in XLA:CPU's matmul
library and need no transposed copies. Other conv shapes fall back to `lax`'s gradient.
Accumulation is float32 (`preferred_element_type`), the result cast to the kernel dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")


def _conv(x, w, padding, precision):
    return lax.conv_general_dilated(x, w, (1, 1, 1), padding,
                                    dimension_numbers=DIMENSION_NUMBERS, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grad(x, w, padding, precision):
    return _conv(x, w, padding, precision)


def _fwd(x, w, padding, precision):
    return _conv(x, w, padding, precision), (x, w)


def kernel_grad(x, g, kernel_shape, padding):
    """d(kernel) of a stride-1 NDHWC/DHWIO conv: (kx, ky, kz, C_in, C_out) float32.

    x: (B, X, Y, Z, C_in) the conv input; g: (B, X', Y', Z', C_out) the output gradient;
    padding: ((lo, hi),) * 3.
    """
    kx, ky, kz = kernel_shape[:3]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_sp = g.shape[1:4]
    taps = np.array([(a, b, c) for a in range(kx) for b in range(ky) for c in range(kz)],
                    np.int32)

    def one_tap(t):
        start = (0, t[0], t[1], t[2], 0)
        xs = lax.dynamic_slice(xp, start, (x.shape[0], *out_sp, x.shape[-1]))
        return jnp.einsum("bxyzi,bxyzo->io", xs, g, preferred_element_type=jnp.float32)

    dw = lax.map(one_tap, jnp.asarray(taps))
    return dw.reshape(kx, ky, kz, x.shape[-1], g.shape[-1])


def _bwd(padding, precision, residuals, g):
    x, w = residuals
    _, vjp_x = jax.vjp(lambda x: _conv(x, w, padding, precision), x)
    (dx,) = vjp_x(g)
    dw = kernel_grad(x, g.astype(x.dtype), w.shape, padding)
    return dx, dw.astype(w.dtype)


_conv_tap_grad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` with the per-tap kernel gradient where it applies.

    It applies on the CPU backend to 3D stride-1 convs without dilation or groups, with
    a kernel larger than 1x1x1 (XLA turns those into a matmul already),
    NDHWC/DHWIO/NDHWC layout and explicit (lo, hi) padding (what `flax.linen.Conv`
    passes); anything else (GPUs: cuDNN's kernel gradients are fine) is
    `lax.conv_general_dilated` itself. Usable as `nn.Conv(conv_general_dilated=...)`.
    """
    simple = (
        jax.default_backend() == "cpu" and lhs.ndim == 5 and rhs.ndim == 5
        and tuple(rhs.shape[:3]) != (1, 1, 1) and tuple(window_strides) == (1, 1, 1)
        and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1, 1))
        and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1, 1))
        and feature_group_count == 1 and batch_group_count == 1
        and preferred_element_type is None and not isinstance(padding, str)
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS)
    )
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_tap_grad(lhs, rhs, pad, precision)
