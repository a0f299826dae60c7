"""The VQ-VAE stage-1 task (`autoencoder.kind = "vqvae"`): the switch and its checks,
codebook usage, dead-code restarts, the training step, validation and exact resume."""

import json
import os

import jax
import numpy as np
import pytest

import ldm_jax.data
from ldm_jax import sharding
from ldm_jax.autoencoder.config import prepare_config
from ldm_jax.autoencoder.kinds import make_task
from ldm_jax.autoencoder.task import AutoencoderTask
from ldm_jax.autoencoder.vq_codebook import code_counts, restart_dead_codes, usage
from ldm_jax.autoencoder.vq_task import VQVAETask
from ldm_jax.errors import ConfigError
from ldm_jax.trainer import loop as trainer
from ldm_jax.trainer.loop import compile_train_step, init_train_state
from tests.tiny import tiny_config


def vq_config(restart_threshold=0.0):
    """tests/tiny.py's run (16x16x8 filaments, 4 steps) with a tiny VQ-VAE: channels
    (8, 16), latent 4x4x2 x 4 channels, 16 codes."""
    config = tiny_config()
    config.autoencoder.kind = "vqvae"
    vq = config.autoencoder.vqvae
    vq.channels = (8, 16)
    vq.num_res_layers = 1
    vq.num_res_channels = (8, 16)
    vq.downsample_parameters = ((2, 4, 1, 1), (2, 4, 1, 1))
    vq.upsample_parameters = ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0))
    vq.num_embeddings = 16
    vq.embedding_dim = 4
    vq.decay = 0.9
    vq.restart_threshold = restart_threshold
    config.loss.adv_weight = 0.0
    return config


def _batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 16, 16, 8, 1)).astype(np.float32)
    return (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, 1, 3)) / 4


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree.leaves(jax.device_get(tree))]


# ---------------------------------------------------------------- the switch and checks

def test_kind_picks_the_task_and_kl_stays_the_default():
    assert type(make_task(prepare_config(tiny_config()))) is AutoencoderTask
    assert tiny_config().autoencoder.kind == "kl"
    assert type(make_task(prepare_config(vq_config()))) is VQVAETask


def test_unknown_kind_is_one_line_naming_the_valid_ones():
    config = tiny_config()
    config.autoencoder.kind = "maisi_v2"
    with pytest.raises(ConfigError) as err:
        prepare_config(config)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("autoencoder.kind='maisi_v2' is not a known stage-1 model; valid: "
                          "'kl', 'vqvae'")


def test_vqvae_checks_name_the_fields():
    config = vq_config()
    config.data.volume_size = (16, 16, 6)  # 6 -> 3 -> 1 -> decoded 4: not whole
    config.autoencoder.vqvae.decay = 1.5
    config.autoencoder.vqvae.restart_threshold = -1.0
    with pytest.raises(ConfigError) as err:
        prepare_config(config)
    msg = str(err.value)
    assert "autoencoder.vqvae.decay must be a number in [0, 1); got 1.5" in msg
    assert "autoencoder.vqvae.restart_threshold must be a number >= 0" in msg
    config.autoencoder.vqvae.decay = 0.9
    config.autoencoder.vqvae.restart_threshold = 0.0
    with pytest.raises(ConfigError) as err:
        prepare_config(config)
    msg = str(err.value)
    assert "\n" not in msg and "data.volume_size (16, 16, 6) does not come back whole" in msg
    assert "16x16x4" in msg and "total factor 4" in msg


def test_vqvae_4x_config_is_valid_and_described():
    from ldm_jax.config import load_config
    task = make_task(prepare_config(load_config("configs/vqvae_4x.py")))
    text = task.describe()
    assert "latent: 16x16x8 x 8 channels" in text and "one of 256 codes" in text
    assert "dead-code restarts every 1 step(s) below EMA cluster size 1" in text


# ---------------------------------------------------------------- codebook usage, restarts

def test_usage_of_known_counts():
    u = usage(np.array([4, 4, 4, 4, 0, 0, 0, 0], np.float32))
    np.testing.assert_allclose(float(u["perplexity"]), 4.0, rtol=1e-5)
    assert float(u["codes_used"]) == 0.5
    u = usage(code_counts(np.full((2, 3, 3), 5), 8))  # collapse: one code for all
    np.testing.assert_allclose(float(u["perplexity"]), 1.0, rtol=1e-5)
    assert float(u["codes_used"]) == 1 / 8
    task = VQVAETask.__new__(VQVAETask)  # validation: the counts of all batches together
    out = task.summarize_eval({"code_counts": np.array([3, 0, 3, 0], np.float32)})
    np.testing.assert_allclose(out["val_perplexity"], 2.0, rtol=1e-5)
    assert out["val_codes_used"] == 0.5


def test_restarts_replace_only_dead_codes_with_encoder_outputs():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    cb = {"embedding": emb, "ema_cluster_size": np.array([5.0, 0.1, 3.0, 0.0], np.float32),
          "ema_w": emb * 2}
    z = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32) + 100
    new, n = restart_dead_codes(cb, z, jax.random.PRNGKey(0), threshold=1.0)
    assert int(n) == 2
    rows = {tuple(r) for r in z.reshape(-1, 3)}
    for k in (0, 2):  # live: unchanged
        np.testing.assert_array_equal(new["embedding"][k], emb[k])
        np.testing.assert_array_equal(new["ema_w"][k], emb[k] * 2)
    for k in (1, 3):  # dead: onto a batch vector, with EMA mass `threshold`
        assert tuple(np.asarray(new["embedding"][k])) in rows
        np.testing.assert_array_equal(new["ema_w"][k], new["embedding"][k] * 1.0)
        assert float(new["ema_cluster_size"][k]) == 1.0
    np.testing.assert_array_equal(np.asarray(new["ema_cluster_size"])[[0, 2]], [5.0, 3.0])


# ---------------------------------------------------------------- the training step

def _steps(config, n, batch):
    task = make_task(prepare_config(config))
    mesh = sharding.make_mesh(task.config.mesh, devices=jax.devices()[:1])
    state, abstract = init_train_state(task, mesh)
    step = compile_train_step(task, mesh, abstract)
    put = {"image": sharding.put_global_batch(batch, mesh)}
    cb0 = _leaves(state.codebook)
    rows = []
    for _ in range(n):
        state, m = step(state, put, task.step_consts())
        rows.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, rows, cb0


def test_steps_learn_update_the_codebook_and_restarts_revive_codes():
    """Without restarts: the loss falls and the EMA moves the codebook (MONAI's update;
    its parity is tests/models/test_vqvae_parity_monai.py). With restarts at a threshold
    of 1 vector per step the first step restarts the unused codes and the batch then uses
    more codes than without (13 of 16 against 1 at step 3 when written)."""
    batch = _batch()
    state, rows, cb0 = _steps(vq_config(), 8, batch)
    # Collapsed (one code for every latent voxel, as MONAI's init gives here) the decoder
    # sees a constant: the loss falls slowly (0.498 -> 0.449 in 8 steps when written).
    assert rows[-1]["recon_loss"] < 0.95 * rows[0]["recon_loss"], [r["loss"] for r in rows]
    assert all(r["codes_restarted"] == 0 for r in rows)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(_leaves(state.codebook), cb0)) > 0
    assert {"vq_loss", "perplexity", "codes_used", "recon_loss"} <= set(rows[0])

    _, with_restarts, _ = _steps(vq_config(restart_threshold=1.0), 3, batch)
    assert with_restarts[0]["codes_restarted"] > 0
    assert with_restarts[-1]["codes_used"] > rows[2]["codes_used"], (with_restarts, rows[:3])


def test_non_finite_step_keeps_the_codebook():
    config = vq_config()
    task = make_task(prepare_config(config))
    mesh = sharding.make_mesh(task.config.mesh, devices=jax.devices()[:1])
    state, abstract = init_train_state(task, mesh)
    step = compile_train_step(task, mesh, abstract)
    bad = _batch()
    bad[0, 0, 0, 0, 0] = np.nan
    before = _leaves(state.codebook)
    state, m = step(state, {"image": sharding.put_global_batch(bad, mesh)}, None)
    assert float(m["finite"]) == 0.0
    for a, b in zip(_leaves(state.codebook), before):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- the loop: eval, resume

class _Interrupt:
    """The data iterator, raising KeyboardInterrupt when batch `at` is asked for."""

    def __init__(self, it, at):
        self.it, self.at, self.i = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        if self.i == self.at:
            raise KeyboardInterrupt
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def start_prefetch(self):
        self.it.start_prefetch()


def test_interrupted_run_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch):
    """4 steps (checkpoints at 2 and 4) against a run killed while fetching batch 3 and
    run again: the same params and codebook, exactly. The run also logs codebook usage at
    validation and draws its images."""
    config = vq_config(restart_threshold=1.0)
    config.autoencoder.vqvae.restart_every = 2
    task = make_task(prepare_config(config))
    whole = trainer.train(task, str(tmp_path / "whole"), progress=False)

    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    val = [r for r in rows if "val_codes_used" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(0 < r["val_codes_used"] <= 1 and 1 <= r["val_perplexity"] <= 16 for r in val)
    assert all("val_dice" in r and "val_psnr_blank" in r for r in val)
    assert os.path.exists(tmp_path / "whole" / "images" / "step_4.png")
    restarted = {r["step"]: r["codes_restarted"] for r in rows if "codes_restarted" in r}
    assert restarted[1] == 0 and restarted[3] == 0  # every 2 steps only

    real = ldm_jax.data.make_train_loader

    class Loader:
        def __init__(self, *a, **k):
            self.loader = real(*a, **k)

        def __iter__(self):
            return _Interrupt(iter(self.loader), 3)

    monkeypatch.setattr(ldm_jax.data, "make_train_loader", Loader)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(task, str(tmp_path / "cut"), progress=False)
    monkeypatch.undo()
    resumed = trainer.train(task, str(tmp_path / "cut"), progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(_leaves((whole.g_params, whole.codebook)),
                    _leaves((resumed.g_params, resumed.codebook))):
        np.testing.assert_array_equal(a, b)
