"""Nearest upsample + conv k3 on the coarse grid (ldm_jax.models.upsample_conv) is the naive form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.hlo_flops import loop_flops_correction
from ldm_jax.models.layers import conv, nearest_upsample
from ldm_jax.models.upsample_conv import NearestUpsampleConv, fold_matrix, upsample_conv


def _naive(x, kernel, bias, factor):
    """The reference: build the upsampled tensor, then the 3x3x3 conv with padding 1."""
    up = nearest_upsample(x, factor)
    y = jax.lax.conv_general_dilated(up, kernel.astype(x.dtype), (1, 1, 1), [(1, 1)] * 3,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(x.dtype)


def _inputs(shape=(2, 5, 4, 3, 3), out=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], out)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(out,)), jnp.float32)
    return x, kernel, bias


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("factor", [2, (2, 2, 1), (1, 3, 2), 4])
def test_values_and_gradients_equal_the_naive_form(factor):
    x, kernel, bias = _inputs()
    f = (factor,) * 3 if isinstance(factor, int) else factor
    got = jax.jit(upsample_conv, static_argnums=3)(x, kernel, bias, factor)
    ref = _naive(x, kernel, bias, factor)
    assert got.shape == ref.shape == (2, 5 * f[0], 4 * f[1], 3 * f[2], 4)
    assert _rel(got, ref) <= 1e-6

    w = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)

    def loss(fn):
        return jax.grad(lambda x, k, b: jnp.sum(fn(x, k, b, factor) * w), argnums=(0, 1, 2))

    for name, a, b in zip(("dx", "dkernel", "dbias"), jax.jit(loss(upsample_conv))(
            x, kernel, bias), jax.jit(loss(_naive))(x, kernel, bias)):
        assert a.shape == b.shape and _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_bfloat16_matches_within_bf16_rounding():
    x, kernel, bias = _inputs(seed=2)
    ref = _naive(x, kernel, bias, 2)  # float32 reference
    got = upsample_conv(x.astype(jnp.bfloat16), kernel, bias, 2)
    naive_bf16 = _naive(x.astype(jnp.bfloat16), kernel, bias, 2)
    assert got.dtype == jnp.bfloat16
    assert _rel(got, ref) <= max(2 * _rel(naive_bf16, ref), 1e-2)


def test_fold_matrix_sums_every_tap_once():
    for f in (1, 2, 3, 5):
        m, offsets = fold_matrix(f)
        assert m.shape == ((1, 3, 3) if f == 1 else (f, 2, 3))
        # Each parity uses every original tap exactly once.
        np.testing.assert_array_equal(m.sum(axis=1), np.ones((f, 3)))
        assert offsets == ([0] if f == 1 else [0] * (f - 1) + [1])
    with pytest.raises(ValueError, match=">= 1"):
        fold_matrix(0)


def test_module_params_are_the_plain_convs():
    x = jnp.zeros((1, 4, 4, 2, 8), jnp.float32)
    ours = NearestUpsampleConv(6, (2, 2, 1), name="postconv")
    plain = conv(6, name="postconv")
    p_ours = jax.eval_shape(lambda: ours.init(jax.random.key(0), x))
    p_plain = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), p_plain)
    # The plain conv's params applied through the folded module give the naive output.
    params = plain.init(jax.random.key(3), x + 1.0)
    xr = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
    got = ours.apply(params, xr)
    ref = plain.apply(params, nearest_upsample(xr, (2, 2, 1)))
    assert _rel(got, ref) <= 1e-6
    assert isinstance(ours, nn.Module)


def _cost(fn, c_out, n=16):
    """(forward FLOPs, temp bytes of the gradient w.r.t. input, kernel and bias)."""
    x = jax.ShapeDtypeStruct((1, n, n, n, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 3, 8, c_out), jnp.float32)
    b = jax.ShapeDtypeStruct((c_out,), jnp.float32)
    fwd = jax.jit(lambda x, k, b: fn(x, k, b, 2)).lower(x, k, b).compile()
    grad = jax.jit(jax.grad(lambda x, k, b: jnp.sum(fn(x, k, b, 2) ** 2), (0, 1, 2)))
    temp = grad.lower(x, k, b).compile().memory_analysis().temp_size_in_bytes
    return fwd.cost_analysis()["flops"] + loop_flops_correction(fwd.as_text()), temp


def test_factor_two_does_3_4x_fewer_flops():
    # 27 taps per fine voxel against 8 per coarse output of a grid one larger per axis:
    # 27/8 x (32/33)^3 = 3.08 here, 2.88 as counted (XLA leaves the naive conv's padded
    # taps out, the folded conv's per-tap matmuls count them); -> 3.4 for large grids.
    assert _cost(_naive, 8, 32)[0] / _cost(upsample_conv, 8, 32)[0] >= 2.8


def test_head_gradient_builds_no_upsampled_tensor():
    # The nearest_conv head (many channels in, few out): the naive form materialises the
    # 8-channel input at 2x resolution and its gradient; the folded conv only its
    # 8 x 2-channel output on the coarse grid.
    upsampled = 32 ** 3 * 8 * 4
    ours, naive = _cost(upsample_conv, 2)[1], _cost(_naive, 2)[1]
    assert naive >= 2 * upsampled and ours < 0.7 * naive
