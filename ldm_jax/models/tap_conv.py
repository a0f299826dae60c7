"""3D convolution as one matmul per kernel tap, forward and backward, for XLA:CPU.

`conv_general_dilated(...)` has `lax.conv_general_dilated`'s signature and values. On the
CPU backend, for a stride-1, undilated, ungrouped conv in NDHWC / DHWIO layout with a
kernel larger than 1x1x1, it computes (a `jax.custom_vjp`):

- y = sum_t x_pad[shifted by t] @ w[t] over the k_x k_y k_z kernel taps (`tap_conv`:
  the first tap, then a `lax.scan` over the others; float32 accumulation; the shift on
  the input's or the products' side, whichever has fewer channels);
- d(input): the same with the flipped, transposed kernel on the output gradient;
- d(kernel): dW[t] = dY^T @ x_pad[shifted by t], one (C_out x voxels) (voxels x C_in)
  matmul per tap in a `lax.map` (`kernel_grad`).

One tap's temporaries exist at a time; the matmuls run in XLA:CPU's matmul
library (YNNPACK). Why: XLA:CPU's own 3D convolutions are slow, and its kernel gradient
-- a convolution whose window is the whole output grid, after transposing input and
output gradient to feature-major copies -- is far slower than the forward; tap convs
cut the step's CPU time at the same peak memory (benchmarks/RESULTS.md, section 8,
"3D convolutions on CPU" and "Where the time went"). Everything else (other backends:
cuDNN's convolutions are fast; strided convs; 1x1x1 kernels, which XLA turns into one
matmul) is `lax.conv_general_dilated` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DIMENSION_NUMBERS = ("NDHWC", "DHWIO", "NDHWC")
_ENABLED = contextvars.ContextVar("tap_conv_enabled", default=True)


@contextlib.contextmanager
def enabled(flag: bool = True):
    """Inside this block, trace convs by kernel taps where they apply (`flag` True, the
    setting outside any block) or with `lax.conv_general_dilated` everywhere (False).
    Blocks nest; each puts back the setting it found. Only tracing reads it: a function
    jitted and traced before keeps the convolutions it was traced with."""
    token = _ENABLED.set(bool(flag))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def disabled():
    """`enabled(False)`: trace with `lax.conv_general_dilated` everywhere inside the block.

    For programs whose activations are sharded along a spatial axis (`mesh.spatial` > 1):
    the taps' `dynamic_slice` along a sharded axis makes XLA's partitioner gather the
    whole activation on every device, where its own convolutions exchange halos only.
    """
    return enabled(False)


def for_mesh(mesh):
    """`disabled()` when `mesh` splits activations along its "spatial" axis (size > 1),
    else a context that changes nothing. Enter it around the trace of a program that runs
    on `mesh` (`ldm_jax.trainer` does for the train and eval steps)."""
    spatial = dict(mesh.shape).get("spatial", 1)
    return disabled() if spatial > 1 else contextlib.nullcontext()


def _taps(kernel_shape):
    """The kernel taps' (x, y, z) offsets in kernel order, as three int32 arrays (what
    `lax.scan` / `lax.map` hand their body one element of per tap)."""
    kx, ky, kz = kernel_shape[:3]
    grid = np.array([(a, b, c) for a in range(kx) for b in range(ky) for c in range(kz)],
                    np.int32)
    return tuple(jnp.asarray(grid[:, axis]) for axis in range(3))


# (B, X, Y, Z, C_in) x (C_in, C_out) -> (B, X, Y, Z, C_out), and the kernel gradient's
# (C_out, voxels) x (voxels, C_in) -> (C_out, C_in). lax.dot_general, not jnp.einsum: the
# same dot, without einsum's path search on every trace (the tap convs were the largest
# part of tracing a model on CPU).
_TAP_DOT = (((4,), (0,)), ((), ()))
_TAP_KERNEL_DOT = (((1,), (0,)), ((), ()))
# At most this many (taps x C_out) columns: all taps' products come from one matmul
# (a conv to one channel: 4x faster than a matmul per tap, benchmarks/RESULTS.md, section
# 8, "Shifting the smaller side").
ONE_DOT_COLUMNS = 64


def _dot(a, b):
    return lax.dot_general(a, b, _TAP_DOT, preferred_element_type=jnp.float32)


def _scan_taps(term, taps, wt):
    """term(0, 0, 0, wt[0]) + sum over the other taps of term(tx, ty, tz, w_tap), in a
    `lax.scan` (one tap's temporaries alive at a time)."""
    def body(acc, tap):
        return acc + term(*tap), None

    first = term(0, 0, 0, lax.index_in_dim(wt, 0, keepdims=False))
    acc, _ = lax.scan(body, first, (*(t[1:] for t in taps), wt[1:]))
    return acc


def tap_conv(x, w, padding):
    """Stride-1 NDHWC/DHWIO conv as one matmul per kernel tap, accumulated in float32.

    y = sum_t x_pad[shifted by t] @ w[t]. The shift goes to the side with fewer channels:
    with C_out <= C_in each tap's product is computed on the whole padded grid and its
    shifted window added to the sum (XLA fuses that window into the add: no copy); else
    the input's shifted window is copied for the matmul. Taps run in a `lax.scan`, so
    one tap's temporaries exist at a time. With taps x C_out <= ONE_DOT_COLUMNS, all
    taps' products come from one matmul. Returns x.dtype.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    c_in, c_out = w.shape[3:]
    out_sp = tuple(n - k + 1 for n, k in zip(xp.shape[1:4], w.shape[:3]))
    offsets = list(itertools.product(*(range(k) for k in w.shape[:3])))
    if len(offsets) * c_out <= ONE_DOT_COLUMNS:
        y = _dot(xp, w.reshape(-1, c_in, c_out).transpose(1, 0, 2).reshape(c_in, -1))
        acc = None
        for t, (a, b, c) in enumerate(offsets):
            part = y[:, a:a + out_sp[0], b:b + out_sp[1], c:c + out_sp[2],
                     t * c_out:(t + 1) * c_out]
            acc = part if acc is None else acc + part
        return acc.astype(x.dtype)
    wt = w.reshape(-1, c_in, c_out)
    taps = _taps(w.shape)
    if c_out <= c_in:
        size = (x.shape[0], *out_sp, c_out)

        def term(tx, ty, tz, w_tap):
            return lax.dynamic_slice(_dot(xp, w_tap), (0, tx, ty, tz, 0), size)
    else:
        size = (x.shape[0], *out_sp, c_in)

        def term(tx, ty, tz, w_tap):
            return _dot(lax.dynamic_slice(xp, (0, tx, ty, tz, 0), size), w_tap)

    return _scan_taps(term, taps, wt).astype(x.dtype)


def _conv(x, w, padding, precision):
    if TAP_FORWARD:
        return tap_conv(x, w, padding)
    return lax.conv_general_dilated(x, w, (1, 1, 1), padding,
                                    dimension_numbers=DIMENSION_NUMBERS, precision=precision)


def _input_grad(g, w, padding, x_shape):
    """d(input) of a stride-1 conv: the conv of g with the flipped, transposed kernel."""
    k = w.shape[:3]
    wf = jnp.flip(w, (0, 1, 2)).swapaxes(3, 4)
    pad = tuple((kk - 1 - lo, kk - 1 - hi) for kk, (lo, hi) in zip(k, padding))
    return tap_conv(g, wf, pad)


TAP_FORWARD = True  # False: XLA's forward and input gradient, only the kernel gradient by taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grad(x, w, padding, precision):
    return _conv(x, w, padding, precision)


def _fwd(x, w, padding, precision):
    return _conv(x, w, padding, precision), (x, w)


def kernel_grad(x, g, kernel_shape, padding):
    """d(kernel) of a stride-1 NDHWC/DHWIO conv: (kx, ky, kz, C_in, C_out) float32.

    x: (B, X, Y, Z, C_in) the conv input; g: (B, X', Y', Z', C_out) the output gradient;
    padding: ((lo, hi),) * 3. dW[t] = sum over voxels of x_pad[v + t] (x) g[v]: one
    (C_out, voxels) @ (voxels, C_in) matmul per tap in a `lax.map`, on a copy of x's
    shifted window, with g transposed once (as x^T @ g, XLA transposed every window).
    With taps x C_out <= ONE_DOT_COLUMNS: g's shifted copies on the padded grid, stacked,
    against x_pad in one matmul.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    (b, *grid, c_in), c_out = xp.shape, g.shape[-1]
    k = tuple(kernel_shape[:3])
    gt = jnp.moveaxis(g, -1, 0)  # (C_out, B, X', Y', Z')
    if np.prod(k) * c_out <= ONE_DOT_COLUMNS:
        # g[u - t] on the padded grid u: windows of g padded by k - 1 on both sides
        gt = jnp.pad(gt, ((0, 0), (0, 0), *[(kk - 1, kk - 1) for kk in k]))
        gs = jnp.concatenate([
            lax.slice(gt, (0, 0, *(kk - 1 - o for kk, o in zip(k, t))),
                      (c_out, b, *(kk - 1 - o + n for kk, o, n in zip(k, t, grid))))
            .reshape(c_out, -1) for t in itertools.product(*(range(kk) for kk in k))])
        dw = lax.dot_general(gs, xp.reshape(-1, c_in), _TAP_KERNEL_DOT,
                             preferred_element_type=jnp.float32)
    else:
        size = (b, *g.shape[1:4], c_in)
        gt = gt.reshape(c_out, -1)

        def one_tap(tap):
            xs = lax.dynamic_slice(xp, (0, *tap, 0), size).reshape(-1, c_in)
            return lax.dot_general(gt, xs, _TAP_KERNEL_DOT, preferred_element_type=jnp.float32)

        dw = lax.map(one_tap, _taps(kernel_shape))  # (taps, C_out, C_in)
    return dw.reshape(*k, c_out, c_in).swapaxes(3, 4)


def after(x, g):
    """x, made to depend on g without changing its value (unless g[0...] is inf/NaN).

    XLA:CPU drops optimization barriers before common-subexpression elimination, so a
    value the backward pass recomputes from a forward input (here the padded input) is
    merged with the forward's own copy, which then stays alive until the backward: the
    recomputation saves nothing and may be scheduled before the gradient exists. Adding
    0 * g[0, ...] makes it a different expression that can only run once g is there.
    """
    zero = lax.index_in_dim(g.reshape(-1), 0, keepdims=False).astype(x.dtype) * 0
    return x + zero


def _bwd(padding, precision, residuals, g):
    x, w = residuals
    x = after(x, g)
    if TAP_FORWARD:
        dx = _input_grad(g, w, padding, x.shape)
    else:
        _, vjp_x = jax.vjp(lambda x: _conv(x, w, padding, precision), x)
        (dx,) = vjp_x(g)
    dw = kernel_grad(x, g.astype(x.dtype), w.shape, padding)
    return dx, dw.astype(w.dtype)


_conv_tap_grad.defvjp(_fwd, _bwd)


def strided_as_stride_one(x, w, strides, padding):
    """(x', w') such that conv(x', w', stride 1, no padding) == conv(x, w, strides, padding).

    Space-to-depth: the padded input is cut into s_x s_y s_z phases stacked on the channel
    axis, the kernel zero-padded to a multiple of the stride and cut the same way
    (kernel ceil(k/s), s_x s_y s_z C_in input channels). Kernels not divisible by the
    stride (MONAI's k3 s2 downsample) compute their zero taps: (4/3)^3 = 2.4x that
    conv's FLOPs.
    """
    b, *sp, c = x.shape
    k = w.shape[:3]
    kq = [-(-kk // ss) for kk, ss in zip(k, strides)]  # kernel in stride units
    out = [(n + lo + hi - kk) // ss + 1 for n, (lo, hi), kk, ss in zip(sp, padding, k, strides)]
    length = [ss * (o + q - 1) for ss, o, q in zip(strides, out, kq)]  # padded input used
    pads = [(lo, ln - n - lo) for n, (lo, _), ln in zip(sp, padding, length)]
    crop = tuple(slice(0, n + min(hi, 0)) for n, (_, hi) in zip(sp, pads))
    x = jnp.pad(x[(slice(None), *crop)], ((0, 0), *[(lo, max(hi, 0)) for lo, hi in pads],
                                         (0, 0)))
    (sx, sy, sz), (qx, qy, qz) = strides, kq
    x = x.reshape(b, length[0] // sx, sx, length[1] // sy, sy, length[2] // sz, sz, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, *(ln // ss for ln, ss in
                                                         zip(length, strides)), sx * sy * sz * c)
    w = jnp.pad(w, [(0, q * ss - kk) for q, ss, kk in zip(kq, strides, k)] + [(0, 0)] * 2)
    o = w.shape[-1]
    w = w.reshape(qx, sx, qy, sy, qz, sz, c, o).transpose(0, 2, 4, 1, 3, 5, 6, 7)
    return x, w.reshape(qx, qy, qz, sx * sy * sz * c, o)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, computed by kernel taps where it applies.

    It applies on the CPU backend to 3D convs without dilation or groups, with a kernel
    larger than 1x1x1 (XLA turns those into a matmul already), NDHWC/DHWIO/NDHWC layout
    and explicit (lo, hi) padding (what `flax.linen.Conv` passes); strided convs are first
    rewritten as stride-1 convs (`strided_as_stride_one`: XLA:CPU's input gradient of a
    strided conv is slow, benchmarks/RESULTS.md, section 8). Anything
    else (other backends: cuDNN's convolutions are fast; code traced inside `disabled()`)
    is `lax.conv_general_dilated` itself. Usable as `nn.Conv(conv_general_dilated=...)`.
    """
    simple = (
        _ENABLED.get() and jax.default_backend() == "cpu" and lhs.ndim == 5 and rhs.ndim == 5
        and tuple(rhs.shape[:3]) != (1, 1, 1)
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
    strides = tuple(int(s) for s in window_strides)
    if strides != (1, 1, 1):
        lhs, rhs = strided_as_stride_one(lhs, rhs, strides, pad)
        pad = ((0, 0),) * 3
    return _conv_tap_grad(lhs, rhs, pad, precision)
