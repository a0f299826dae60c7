"""The jitted stage-1 step: learning, warm-up, accumulation, the non-finite guard, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding
from ldm_jax.train import build_stage1, compile_train_step, init_train_state, prepare_config
from tests.tiny import tiny_config


def _batch(config, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *config.data.volume_size, 1)
    # Smooth-ish random blobs in [0, 1]: learnable, not constant.
    x = rng.random(shape).astype(np.float32)
    x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 4
    return {"image": x}


def _setup(config, devices):
    config = prepare_config(config)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    stage, perc = build_stage1(config)
    state, abstract = init_train_state(stage, config, mesh)
    step = compile_train_step(stage, mesh, abstract)
    return config, mesh, stage, state, step, perc


def _put(batch, mesh):
    return {"image": sharding.put_global_batch(batch["image"], mesh)}


def _max_rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                     (np.max(np.abs(np.asarray(y))) + 1e-12)) for x, y in zip(la, lb))


def test_overfits_one_batch():
    config = tiny_config()
    config.loss.adv_warmup_steps = 1000
    config, mesh, _, state, step, perc = _setup(config, jax.devices()[:1])
    batch = _put(_batch(config, 2), mesh)
    losses = []
    for _ in range(30):
        state, m = step(state, batch, perc)
        losses.append(float(m["recon_loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_discriminator_frozen_before_warmup_and_trained_after():
    config = tiny_config()
    config.loss.adv_warmup_steps = 2
    config, mesh, _, state, step, perc = _setup(config, jax.devices()[:1])
    batch = _put(_batch(config, 2), mesh)
    d0 = jax.device_get(state.d_params)
    for _ in range(2):
        state, m = step(state, batch, perc)
        assert float(m["adv_weight"]) == 0.0
    d_warm = jax.device_get(state.d_params)
    assert _max_rel(d_warm, d0) == 0.0
    state, m = step(state, batch, perc)
    assert float(m["adv_weight"]) > 0
    assert _max_rel(jax.device_get(state.d_params), d0) > 0


def test_bf16_step_runs():
    config = tiny_config()
    config.autoencoder.dtype = "bfloat16"
    config.discriminator.dtype = "bfloat16"
    config, mesh, _, state, step, perc = _setup(config, jax.devices()[:1])
    state, m = step(state, _put(_batch(config, 2), mesh), perc)
    assert np.isfinite(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.g_params))


def test_accumulating_two_batches_of_one_equals_one_batch_of_two():
    config = tiny_config()
    config.loss.adv_warmup_steps = 1000  # the discriminator's BatchNorm sees the batch
    config.train.grad_clip_norm = 0.0
    batch = _batch(config, 2)
    c2, mesh, _, state2, step2, perc = _setup(config, jax.devices()[:1])
    state2, _ = step2(state2, _put(batch, mesh), perc)

    config.train.batch_size = 1
    config.train.grad_accum_steps = 2
    c1, mesh, _, state1, step1, perc = _setup(config, jax.devices()[:1])
    for i in range(2):
        state1, _ = step1(state1, _put({"image": batch["image"][i:i + 1]}, mesh), perc)
    assert _max_rel(jax.device_get(state1.g_params), jax.device_get(state2.g_params)) < 1e-4


def test_non_finite_step_is_skipped_and_counted():
    config = tiny_config()
    config, mesh, _, state, step, perc = _setup(config, jax.devices()[:1])
    before = jax.device_get(state.g_params)
    bad = _batch(config, 2)
    bad["image"][0, 0, 0, 0, 0] = np.nan
    state, m = step(state, _put(bad, mesh), perc)
    assert float(m["finite"]) == 0.0
    assert int(state.bad_steps) == 1 and int(state.skipped_steps) == 1
    assert _max_rel(jax.device_get(state.g_params), before) == 0.0
    state, m = step(state, _put(_batch(config, 2), mesh), perc)
    assert int(state.bad_steps) == 0 and int(state.skipped_steps) == 1
    assert _max_rel(jax.device_get(state.g_params), before) > 0


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_data_parallel_equals_one_device():
    config = tiny_config()
    config.train.batch_size = 8
    batch = _batch(config, 8)
    _, mesh1, _, s1, step1, perc = _setup(config.copy_and_resolve_references(),
                                          jax.devices()[:1])
    config.mesh.data = 8
    _, mesh8, _, s8, step8, _ = _setup(config, jax.devices()[:8])
    s1, m1 = step1(s1, _put(batch, mesh1), perc)
    s8, m8 = step8(s8, _put(batch, mesh8), perc)
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    assert _max_rel(jax.device_get(s8.g_params), jax.device_get(s1.g_params)) < 1e-5
    assert _max_rel(jax.device_get(s8.d_params), jax.device_get(s1.d_params)) < 1e-5


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (simulated) devices")
def test_spatial_sharding_equals_unsharded():
    config = tiny_config()
    batch = _batch(config, 2)
    _, mesh1, _, s1, step1, perc = _setup(config.copy_and_resolve_references(),
                                          jax.devices()[:1])
    config.mesh.spatial = 2
    _, mesh2, _, s2, step2, _ = _setup(config, jax.devices()[:2])
    s1, m1 = step1(s1, _put(batch, mesh1), perc)
    s2, m2 = step2(s2, _put(batch, mesh2), perc)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    assert _max_rel(jax.device_get(s2.g_params), jax.device_get(s1.g_params)) < 1e-5
