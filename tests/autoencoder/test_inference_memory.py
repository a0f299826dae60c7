"""Inference windows chosen by memory: the estimate against XLA's, and the choice it drives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_jax
from ldm_jax.autoencoder import memory
from ldm_jax.models import build_autoencoder
from tests.tiny import tiny_config


def _attention_config():
    """tiny_config with attention at its last level and in both mid blocks."""
    config = tiny_config()
    ae = config.autoencoder
    ae.attention_levels = (False, True)
    ae.with_encoder_nonlocal_attn = True
    ae.with_decoder_nonlocal_attn = True
    return config


@pytest.mark.parametrize("shape", [(16, 16, 8), (32, 32, 32)])
def test_estimate_bounds_xla_memory(shape):
    """Never below what XLA allocates for one call, and within 4x of it."""
    ae = _attention_config().autoencoder
    model = build_autoencoder(ae, remat="none")
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda: model.init({"params": key, "sample": key},
                                               jnp.zeros((1, 8, 8, 8, 1)))["params"])
    x = jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32)
    z = jax.ShapeDtypeStruct((1, *(s // 2 for s in shape), 2), jnp.float32)
    for op, arg in (("encode", x), ("decode", z)):
        compiled = jax.jit(lambda p, a: model.apply({"params": p}, a, method=op)).lower(
            params, arg).compile()
        measured = compiled.memory_analysis().temp_size_in_bytes
        estimate = memory.call_bytes(ae, shape, op)
        assert measured <= estimate <= 4 * measured, (op, shape, measured, estimate)


def test_memory_grows_with_the_voxels_not_their_square():
    ae = _attention_config().autoencoder
    small, large = (memory.call_bytes(ae, s, "encode") for s in [(32, 32, 32), (64, 64, 64)])
    assert small < large <= 8 * small  # 8x the voxels: the attention is chunked, linear in T


def test_choose_window():
    ae = tiny_config().autoencoder
    f = (2, 2, 2)
    whole = memory.call_bytes(ae, (64, 48, 32), "encode")
    assert memory.choose_window(ae, (64, 48, 32), "encode", whole, f) == (None, 1, whole)
    window, batch, per = memory.choose_window(ae, (64, 48, 32), "encode", whole // 3, f)
    assert per <= whole // 3 and batch == (whole // 3) // per
    assert all(w % 2 == 0 and w <= p for w, p in zip(window, (64, 48, 32)))
    assert max(window) - min(window) <= 2 * max(f)  # the longest side shrinks first
    # A budget too small for anything: the smallest window, one per call.
    assert memory.choose_window(ae, (64, 48, 32), "encode", 1, f)[:2] == ((2, 2, 2), 1)


def test_budget_drives_the_layout_and_results_stay_close(tiny_run):
    ae = ldm_jax.load_autoencoder(tiny_run.workdir, "latest")
    x = np.random.default_rng(0).uniform(0, 1, (40, 32, 16, 1)).astype(np.float32)
    assert ae.layout(x.shape).window is None  # the default budget holds it whole
    small = ldm_jax.load_autoencoder(
        tiny_run.workdir, "latest",
        memory_budget=memory.call_bytes(ae.config.autoencoder, (24, 24, 16), "encode"))
    lay = small.layout(x.shape)
    assert lay.window is not None and lay.num_windows > 1 and lay.batch >= 1
    assert lay.estimate <= small.memory_budget
    dec = small.layout(x.shape, op="decode")  # decoding needs more: smaller windows
    assert np.prod(dec.window) <= np.prod(lay.window)
    z_whole, z = ae.encode_volume(x), small.encode_volume(x)
    assert z.shape == z_whole.shape
    assert np.corrcoef(z.ravel(), z_whole.ravel())[0, 1] > 0.5
    assert small.decode_volume(z).shape == x.shape


def test_default_budget_is_positive():
    assert memory.default_budget() > 0
