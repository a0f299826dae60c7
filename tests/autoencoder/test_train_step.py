"""The jitted stage-1 step: learning, warm-up, accumulation, the non-finite guard, sharding."""

import re

import jax
import numpy as np
import pytest

from ldm_jax import sharding
from ldm_jax.autoencoder.config import prepare_config
from ldm_jax.autoencoder.task import AutoencoderTask
from ldm_jax.trainer.loop import compile_train_step, init_train_state
from tests.tiny import tiny_config


def _batch(config, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, *config.data.volume_size, 1)
    # Smooth-ish random blobs in [0, 1]: learnable, not constant.
    x = rng.random(shape).astype(np.float32)
    x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 4
    return {"image": x}


def _setup(config, devices=None, task=None):
    """(mesh, initial state, compiled step, step constants) of `task`, or of a new task
    of `config` on `devices`."""
    if task is None:
        config = prepare_config(config)
        task = AutoencoderTask(config)
    mesh = sharding.make_mesh(task.config.mesh, devices=devices)
    state, abstract = init_train_state(task, mesh)
    return mesh, state, compile_train_step(task, mesh, abstract), task.step_consts()


def _put(batch, mesh):
    return {"image": sharding.put_global_batch(batch["image"], mesh)}


def _max_rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) /
                     (np.max(np.abs(np.asarray(y))) + 1e-12)) for x, y in zip(la, lb))


def _rel_norm(a, b):
    """||a - b|| / ||b|| over the whole pytree."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2))
              for x, y in zip(la, lb))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return (num / den) ** 0.5


def _max_abs(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_learns_warms_up_and_skips_non_finite_steps(tiny_run):
    """One compiled step, three behaviours: warm-up (tiny_config's 1 step), learning, the
    non-finite guard. The step is tiny_run's (its task keeps it traced and compiled)."""
    config = tiny_run.task.config
    assert config.loss.adv_warmup_steps == 1
    mesh, state, step, perc = _setup(config, task=tiny_run.task)
    batch = _put(_batch(config, 2), mesh)
    d0 = jax.device_get(state.d_params)
    losses = []
    for i in range(12):  # the loss halves within ~6 steps (a step takes 0.25 s at -O0)
        state, m = step(state, batch, perc)
        losses.append(float(m["recon_loss"]))
        if i < 1:  # warm-up: no adversarial term, discriminator frozen
            assert float(m["adv_weight"]) == 0.0
            assert _max_rel(jax.device_get(state.d_params), d0) == 0.0
    assert float(m["adv_weight"]) > 0
    assert _max_rel(jax.device_get(state.d_params), d0) > 0
    assert losses[-1] < 0.5 * losses[0], losses

    before = jax.device_get(state.g_params)
    bad = _batch(config, 2)
    bad["image"][0, 0, 0, 0, 0] = np.nan
    state, m = step(state, _put(bad, mesh), perc)
    assert float(m["finite"]) == 0.0
    assert int(state.bad_steps) == 1 and int(state.skipped_steps) == 1
    assert _max_rel(jax.device_get(state.g_params), before) == 0.0
    state, m = step(state, batch, perc)
    assert int(state.bad_steps) == 0 and int(state.skipped_steps) == 1
    assert _max_rel(jax.device_get(state.g_params), before) > 0


def test_accumulating_two_batches_of_one_equals_one_batch_of_two():
    config = tiny_config()
    config.loss.adv_warmup_steps = 1000  # the discriminator's BatchNorm sees the batch
    config.loss.sample_posterior = False  # eps draws differ between the two layouts
    config.train.grad_clip_norm = 0.0
    batch = _batch(config, 2)
    mesh, state2, step2, perc = _setup(config, jax.devices()[:1])
    p0 = jax.device_get(state2.g_params)
    state2, _ = step2(state2, _put(batch, mesh), perc)

    config.train.batch_size = 1
    config.train.grad_accum_steps = 2
    mesh, state1, step1, perc = _setup(config, jax.devices()[:1])
    state1, _ = step1(state1, _put({"image": batch["image"][:1]}, mesh), perc)
    assert _max_abs(jax.device_get(state1.g_params), p0) == 0.0  # accumulating only
    state1, _ = step1(state1, _put({"image": batch["image"][1:]}, mesh), perc)
    p1, p2 = jax.device_get(state1.g_params), jax.device_get(state2.g_params)
    assert _max_abs(p1, p2) <= 1e-2 * _max_abs(p2, p0)


@pytest.fixture(scope="module")
def one_device_step():
    """Reference: 8 volumes, one device, adversarial on from the first step."""
    config = tiny_config()
    config.train.batch_size = 8
    batch = _batch(config, 8)
    mesh, state, step, perc = _setup(config, jax.devices()[:1])
    state, m = step(state, _put(batch, mesh), perc)
    return config, batch, jax.device_get(state), float(m["loss"])


@pytest.mark.tap_conv
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("data,spatial", [(8, 1), (4, 2)])
def test_sharded_step_equals_one_device(one_device_step, data, spatial):
    config, batch, ref_state, ref_loss = one_device_step
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.spatial = data, spatial
    mesh, state, step, perc = _setup(config, jax.devices()[:8])
    # A spatially split step is traced with XLA's convolutions, not the CPU tap convs
    # (their slices along the split axis would gather): k3 convolutions only then.
    text = step.lower(state, _put(batch, mesh), perc).as_text()
    k3_convs = re.findall(r"stablehlo.convolution[^\n]*tensor<3x3x3x", text)
    assert bool(k3_convs) == (spatial > 1 or jax.default_backend() != "cpu")
    state, m = step(state, _put(batch, mesh), perc)
    assert abs(float(m["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert _rel_norm(jax.device_get(state.g_params), ref_state.g_params) < 1e-5
    assert _rel_norm(jax.device_get(state.d_params), ref_state.d_params) < 1e-5


def test_batch_entries_other_than_volumes_split_over_data_only():
    """Volumes split over data and spatial; labels (B,) and contexts (B, S, D) have no
    spatial axis and split over data only, whether placed per process or shared."""
    import ml_collections
    from jax.sharding import PartitionSpec as P

    from ldm_jax import sharding
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "spatial": 2}))
    assert sharding.put_global_batch(np.zeros((4, 4, 2, 2, 1)), mesh).sharding.spec == \
        P("data", "spatial")
    labels = sharding.put_global_batch(np.arange(4), mesh)
    assert labels.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(labels), np.arange(4))
    assert sharding.put_shared_batch(np.zeros((4, 3, 5)), mesh).sharding.spec == P("data")
