"""Resuming with a changed config: refused (one line naming each field) or accepted (logged)."""

import hashlib
import os
import shutil

import pytest

from ldm_jax import options
from ldm_jax.autoencoder.config import prepare_config
from ldm_jax.autoencoder.task import AutoencoderTask
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.errors import ConfigError
from ldm_jax.trainer import loop as trainer
from ldm_jax.trainer import resume
from tests.cli.test_messages import check_suggestions
from tests.tiny import tiny_config


def _copy(workdir, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(workdir, wd)
    return wd


def _hashes(path):
    return {os.path.relpath(os.path.join(r, f), path):
            hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, files in os.walk(path) for f in files}


def test_model_change_is_refused_before_anything_is_restored(tiny_run, tmp_path,
                                                              monkeypatch):
    wd = _copy(tiny_run.workdir, tmp_path)
    before = _hashes(wd / "checkpoints")
    config = tiny_config()
    config.train.num_steps = 5
    config.autoencoder.latent_channels = 4
    config.data.a_max = 100.0
    # Nothing is built or restored: a refused resume never gets to the state.
    monkeypatch.setattr(trainer, "init_train_state", lambda *a: pytest.fail("state built"))
    with options.command(options.TRAIN), pytest.raises(ConfigError) as err:
        train_and_evaluate(config, wd, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "autoencoder.latent_channels: checkpoint 2, config 4" in msg
    assert "data.a_max: checkpoint 255.0, config 100.0" in msg
    assert "train.num_steps" not in msg  # may change
    assert "new --workdir" in msg
    found = dict(check_suggestions(msg, {"workdir", "config"}, config=config))
    assert found["config.autoencoder.latent_channels"] == "2"
    assert _hashes(wd / "checkpoints") == before


def test_free_changes_are_accepted_and_logged(tiny_run, tmp_path, capsys):
    wd = _copy(tiny_run.workdir, tmp_path)
    config = tiny_config()
    config.train.num_steps = 5
    config.train.learning_rate = 5e-4
    config.train.log_every_steps = 5
    config.train.batch_size = 1
    config.autoencoder.remat = "res_blocks"  # recomputation only: the same state
    capsys.readouterr()
    train_and_evaluate(config, wd, progress=False)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("Resuming with"))
    assert "train.learning_rate 0.001 -> 0.0005" in line and "train.num_steps 4 -> 5" in line
    assert "train.batch_size 2 -> 1" in line and "autoencoder.remat none -> res_blocks" in line
    assert "Resuming from the checkpoint at step 4" in out


def test_change_of_state_structure_names_the_settings(tiny_run, tmp_path):
    wd = _copy(tiny_run.workdir, tmp_path)
    config = tiny_config()
    config.train.num_steps = 5
    config.train.grad_clip_norm = 0.0  # no clipping: another optimiser state tree
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(config, wd, progress=False)
    msg = str(err.value)
    assert "does not fit the state this config builds" in msg
    assert "train.grad_clip_norm: checkpoint 1.0, config 0.0" in msg


def test_resume_changes_classifies_by_task_sections():
    task = AutoencoderTask.__new__(AutoencoderTask)
    task.config = prepare_config(tiny_config())
    saved = tiny_config().to_dict()
    saved["train"]["num_steps"] = 99
    saved["autoencoder"]["num_channels"] = [8, 32]
    saved["autoencoder"]["dtype"] = "bfloat16"
    saved["data"]["frame"] = 1
    saved["stage"] = "diffusion"
    import json
    refused, accepted = resume.resume_changes(task, json.loads(json.dumps(saved)))
    assert [k for k, *_ in refused] == ["autoencoder.num_channels", "data.frame", "stage"]
    assert [k for k, *_ in accepted] == ["autoencoder.dtype", "train.num_steps"]
