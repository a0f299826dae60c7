"""ldm_jax.models.tap_conv: lax's conv as one matmul per kernel tap, forward and backward."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from ldm_jax import sharding
from ldm_jax.models import tap_conv

pytestmark = pytest.mark.tap_conv

DN = ("NDHWC", "DHWIO", "NDHWC")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _grads(conv, x, w, g, **kw):
    def f(x, w):
        return conv(x, w, kw.get("strides", (1, 1, 1)), kw["padding"], dimension_numbers=DN)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))


# Channel pairs pick each way of computing the taps (tap_conv and kernel_grad): C_out > C_in
# shifts the input (3 -> 5), C_out <= C_in shifts the products (6 -> 3 with 27 taps), and
# taps x C_out <= ONE_DOT_COLUMNS takes one matmul for all taps (4 -> 1; 3 -> 5 with 12 taps).
@pytest.mark.parametrize("channels", [(3, 5), (6, 3), (4, 1)])
@pytest.mark.parametrize("kernel,padding", [((3, 3, 3), ((1, 1),) * 3),
                                            ((2, 2, 3), ((1, 1), (0, 1), (1, 1))),
                                            ((3, 1, 2), ((2, 0), (0, 0), (0, 1))),
                                            ((1, 1, 1), ((0, 0),) * 3)])
def test_values_and_gradients_equal_lax(kernel, padding, channels):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 4, channels[0])), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, *channels)), jnp.float32)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, w, (1, 1, 1), padding, dimension_numbers=DN)).shape
    g = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    ours = jax.jit(lambda x, w, g: _grads(tap_conv.conv_general_dilated, x, w, g,
                                          padding=padding))(x, w, g)
    ref = _grads(lax.conv_general_dilated, x, w, g, padding=padding)
    for name, a, b in zip(("y", "dx", "dw"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype and _rel(a, b) <= 1e-5, name
    # The taps are the ones in use (CPU, kernel > 1x1x1): no convolution in the program.
    text = jax.jit(lambda x, w, g: _grads(tap_conv.conv_general_dilated, x, w, g,
                                          padding=padding)).lower(x, w, g).as_text()
    assert ("convolution" not in text) == (jax.default_backend() == "cpu"
                                           and np.prod(kernel) > 1)


def test_bfloat16_kernel_gradient_is_accurate():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 8, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 4)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(1, 8, 8, 8, 4)), jnp.bfloat16)
    _, _, dw = _grads(tap_conv.conv_general_dilated, x, w, g, padding=((1, 1),) * 3)
    _, _, ref = _grads(lax.conv_general_dilated, *(a.astype(jnp.float32) for a in (x, w, g)),
                       padding=((1, 1),) * 3)
    assert dw.dtype == jnp.bfloat16 and _rel(dw, ref) <= 1e-2


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((8, 8, 6), (4, 4, 4), (2, 2, 2), ((1, 1),) * 3),  # PatchGAN
    ((8, 8, 6), (3, 3, 3), (2, 2, 2), ((0, 1),) * 3),  # MONAI's downsample (zero taps)
    ((9, 7, 6), (3, 2, 4), (2, 1, 3), ((1, 0), (0, 0), (2, 1))),  # odd sizes, cropping
])
def test_strided_convs_equal_lax(shape, kernel, strides, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, *shape, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, 3, 5)), jnp.float32)

    def f(conv):
        return lambda x, w: conv(x, w, strides, padding, dimension_numbers=DN)

    y, vjp = jax.vjp(jax.jit(f(tap_conv.conv_general_dilated)), x, w)
    y_ref, vjp_ref = jax.vjp(f(lax.conv_general_dilated), x, w)
    g = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    assert y.shape == y_ref.shape and _rel(y, y_ref) <= 1e-5
    for a, b in zip(vjp(g), vjp_ref(g)):
        assert a.shape == b.shape and _rel(a, b) <= 1e-5


def test_dilated_convs_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 8, 2), jnp.float32)
    w = jnp.ones((3, 3, 3, 2, 2), jnp.float32)
    fn = jax.jit(jax.grad(lambda w: tap_conv.conv_general_dilated(
        x, w, (1, 1, 1), ((2, 2),) * 3, rhs_dilation=(2, 2, 2), dimension_numbers=DN).sum()))
    assert "while" not in fn.lower(w).as_text()
    ref = jax.grad(lambda w: lax.conv_general_dilated(
        x, w, (1, 1, 1), ((2, 2),) * 3, rhs_dilation=(2, 2, 2), dimension_numbers=DN).sum())(w)
    np.testing.assert_allclose(np.asarray(fn(w)), np.asarray(ref), rtol=1e-6)


def test_disabled_traces_lax_convolutions():
    x = jnp.ones((1, 8, 8, 8, 2), jnp.float32)
    w = jnp.ones((3, 3, 3, 2, 2), jnp.float32)

    def f(w):
        return tap_conv.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3,
                                             dimension_numbers=DN).sum()

    with tap_conv.disabled():
        text = jax.jit(jax.grad(f)).lower(w).as_text()
        with tap_conv.enabled():  # nested: taps again, then back to lax's
            nested = jax.jit(jax.grad(f)).lower(w).as_text()
        after = jax.jit(jax.grad(f)).lower(w).as_text()
    on_cpu = jax.default_backend() == "cpu"
    assert "convolution" in text and "convolution" in after
    assert ("convolution" not in nested) == on_cpu
    assert ("convolution" not in jax.jit(jax.grad(f)).lower(w).as_text()) == on_cpu


def test_for_mesh_disables_taps_only_for_spatially_split_meshes():
    def traced_taps(spatial):
        cfg = ml_collections.ConfigDict({"data": 1, "spatial": spatial})
        mesh = sharding.make_mesh(cfg, jax.devices()[:spatial])
        x = jnp.ones((1, 8, 8, 8, 2), jnp.float32)
        w = jnp.ones((3, 3, 3, 2, 2), jnp.float32)
        with tap_conv.for_mesh(mesh):
            return "convolution" not in jax.jit(lambda w: tap_conv.conv_general_dilated(
                x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN)).lower(w).as_text()

    assert traced_taps(1) == (jax.default_backend() == "cpu")
    if len(jax.devices()) >= 2:
        assert not traced_taps(2)
