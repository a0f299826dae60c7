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


def _damage(step_dir, how):
    """Truncates the largest array file of a step to half (every one to 16 bytes:
    "truncated arrays"), or removes its state's _METADATA."""
    import glob
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    if how == "truncated arrays":
        for f in files:
            os.truncate(f, 16)
        return "OUT_OF_RANGE"
    if how == "truncated array":
        big = max(files, key=os.path.getsize)
        os.truncate(big, os.path.getsize(big) // 2)
        return "OUT_OF_RANGE"
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
    return "4/state/_METADATA is missing"


@pytest.mark.parametrize("how", ["truncated array", "missing _METADATA"])
def test_damaged_latest_is_set_aside_and_the_run_resumes_from_the_last_intact(
        tiny_run, tmp_path, capsys, how):
    """A damaged step 4 (found when restoring, or from its files): one line naming it and
    its cause, the folder renamed aside with every file kept, and the run resumes from
    step 2 to exactly the uninterrupted run's step 4."""
    import jax
    import numpy as np

    wd = _copy(tiny_run.workdir, tmp_path)
    cause = _damage(str(wd / "checkpoints" / "4"), how)
    damaged = _hashes(wd / "checkpoints" / "4")
    capsys.readouterr()
    state = trainer.train(tiny_run.task, str(wd), progress=False)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines()
                if ln.startswith("warning: the checkpoint at step 4"))
    assert "is damaged (" in line and cause in line
    assert f"renamed to {wd / 'checkpoints' / '4.damaged'} (kept, not deleted)" in line
    assert "resuming from step 2" in line or how == "truncated array"
    assert "does not fit" not in out and "Resuming from the checkpoint at step 2" in out
    assert _hashes(wd / "checkpoints" / "4.damaged") == damaged  # nothing deleted or changed
    for x, y in zip(jax.tree.leaves(tiny_run.params),
                    jax.tree.leaves(jax.device_get(state.g_params))):
        np.testing.assert_array_equal(x, y)


def test_readers_skip_a_damaged_latest_and_refuse_it_by_number(tiny_run, tmp_path, capsys):
    from ldm_jax.cli import extract as extract_cli
    wd = _copy(tiny_run.workdir, tmp_path)
    _damage(str(wd / "checkpoints" / "4"), "truncated arrays")  # the params' too
    vols = tmp_path / "vols"
    vols.mkdir()
    import numpy as np
    np.save(vols / "v.npy", np.zeros((16, 16, 8), np.float32))
    base = ["x", f"--workdir={wd}", f"--input={vols}", "--noprogress"]
    capsys.readouterr()
    assert extract_cli.main(base + [f"--output={tmp_path / 'a'}", "--step=latest"]) == 0
    captured = capsys.readouterr()
    warning = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "step 4" in warning[0] and "using step 2, the newest " \
        "intact one" in warning[0]
    import json
    assert json.load(open(tmp_path / "a" / "latents.json"))["checkpoint"]["step"] == 2
    assert extract_cli.main(base + [f"--output={tmp_path / 'b'}", "--step=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: The checkpoint at step 4 in "
                                              f"{wd / 'checkpoints'} is damaged (")
    assert "pick an intact one: --step latest, --step best or one of 2" in err
    assert not os.path.exists(tmp_path / "b")
    assert os.path.isdir(wd / "checkpoints" / "4")  # readers never rename
