"""Training stops honestly: strict metrics.jsonl, every counted step logged, true messages,
absurd losses reported with their batch's files, no orbax noise."""

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

from ldm_jax import options, trainer
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.errors import TrainingDivergedError
from ldm_jax.trainer.loop import AbsurdLossWatch
from tests.cli.test_messages import check_suggestions
from tests.tiny import changed, tiny_config
from tests.trainer.test_train_loop import _hooked_loader


def _strict_rows(path):
    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")
    return [json.loads(line, parse_constant=no_constants) for line in open(path)]


def test_overflowing_volume_stops_with_a_true_message(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    nib.save(nib.Nifti1Image(np.full((16, 16, 8), 3e38, np.float32), np.eye(4)),
             str(d / "huge.nii.gz"))
    config = tiny_config()
    config.data.source = "nifti"
    config.data.train_dir = str(d)
    config.data.clip = False
    config.train.max_bad_steps = 2
    config.train.log_every_steps = 10  # the bad steps are logged anyway
    config.train.num_steps = 10
    work = tmp_path / "run"
    with options.command(options.TRAIN), pytest.warns(UserWarning, match="Only 1 file"), \
            pytest.raises(TrainingDivergedError) as err:
        train_and_evaluate(config, work, progress=False)
    msg = str(err.value)
    assert "Stopped at step 2: 2 steps in a row" in msg
    assert "No checkpoint was written before" in msg and "untouched" not in msg
    found = dict(check_suggestions(msg, {"workdir", "config"}, config=config))
    assert found["config.data.clip"] == "True"  # the fix that applies to this data
    rows = _strict_rows(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # both skipped steps, incl. the stopping one
    assert all(r["finite"] == 0.0 and r["loss"] is None for r in rows)
    assert rows[-1]["skipped_steps"] == 2


def test_divergence_after_a_checkpoint_names_it(tiny_run, tmp_path, monkeypatch):
    wd = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, wd)

    def poison(i, batch):
        batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    _hooked_loader(monkeypatch, poison)
    task = tiny_run.task  # max_bad_steps=2; its compiled step is reused
    with changed(task.config.train, num_steps=10), pytest.raises(TrainingDivergedError) as err:
        trainer.train(task, str(wd), progress=False)
    # tiny_run's workdir ends with a checkpoint at step 4; steps 5 and 6 are poisoned.
    assert f"The last good checkpoint, step 4 in {wd / 'checkpoints'}, is untouched" in str(
        err.value)
    steps = [r["step"] for r in _strict_rows(wd / "metrics.jsonl")]
    assert steps[-2:] == [5, 6]


def test_absurd_loss_is_reported_with_its_files(tmp_path, monkeypatch, capsys):
    def spike(i, batch):
        if i == 8:  # a finite but absurd batch
            batch["image"] = batch["image"] * np.float32(1e9)
        return batch

    _hooked_loader(monkeypatch, spike)
    config = tiny_config()
    config.loss.adv_weight = 0.0
    config.train.num_steps = 9
    config.train.log_every_steps = 100
    config.train.eval_every_steps = 100
    config.train.save_every_steps = 100
    train_and_evaluate(config, tmp_path, progress=False)
    out = capsys.readouterr().out
    warning = next(l for l in out.splitlines() if l.startswith("warning: step 8:"))
    assert "times the median" in warning and "batch files: filaments[0:" in warning
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    # 1: a run's first step; 8: off the cadence; 9: the last
    assert [r["step"] for r in train_rows] == [1, 8, 9]
    assert train_rows[1]["loss"] > 1e6 > train_rows[2]["loss"]


def test_absurd_loss_watch():
    watch = AbsurdLossWatch(ratio=100, window=10)
    assert all(watch.check(v) is None for v in [1.0, 2.0, 1.5, 1.0, 2.0, 1.2])
    assert watch.check(1000.0) == pytest.approx(np.median([1.0, 2.0, 1.5, 1.0, 2.0, 1.2]))
    assert watch.check(float("nan")) is None and watch.check(120.0) is None


def test_no_orbax_warning_for_saves_before_the_first_evaluation(tiny_run, tmp_path, caplog):
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)  # the CLIs, run in-process, lower it
    try:
        _check_no_orbax_warning(tiny_run.task, tmp_path, caplog)
    finally:
        absl_logging.set_verbosity(verbosity)


def _check_no_orbax_warning(task, tmp_path, caplog):
    with caplog.at_level(logging.WARNING), changed(
            task.config.train, num_steps=2, save_every_steps=1, eval_every_steps=2):
        trainer.train(task, str(tmp_path), progress=False)
        import ldm_jax
        ldm_jax.load_autoencoder(tmp_path)  # a read-only manager: quiet as well
    assert not [r for r in caplog.records if r.name == "absl"], [
        r.getMessage() for r in caplog.records]
    # The filter is narrow: other absl warnings still show.
    from absl import logging as absl_logging
    with caplog.at_level(logging.WARNING):
        absl_logging.warning("something else")
    assert any(r.getMessage() == "something else" for r in caplog.records)


def test_orbax_warning_filter_lets_non_string_messages_through():
    """orbax logs dicts as messages at INFO (seen with --verbosity=1): the filter must pass
    them (it raised TypeError: unhashable type, failing the checkpoint save) and drop only
    its two exact templates."""
    from ldm_jax.checkpoint import _ExpectedOrbaxWarnings

    def record(msg, level=logging.INFO):
        return logging.LogRecord("absl", level, __file__, 1, msg, None, None)

    f = _ExpectedOrbaxWarnings()
    assert f.filter(record({"event_type": "save", "step": 2}))
    assert f.filter(record("Saving checkpoint at step %d"))
    assert not f.filter(record("Requested `tracked_metric`; did not provide metrics.",
                               logging.WARNING))
