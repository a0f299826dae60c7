"""The trainer end to end: outputs in the workdir, stopping by signal and exact resume,
finished workdirs, metrics.jsonl, the keep policy, the non-finite guard, the CPU hint.

Runs share the session's `tiny_run` (tests/conftest.py) and its task, so the step is
traced and compiled once."""

import hashlib
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from PIL import Image

import ldm_jax.data
from ldm_jax import checkpoint as ckpt
from ldm_jax.errors import TrainingDivergedError
from ldm_jax.trainer import TrainingStopped
from ldm_jax.trainer import loop as trainer
from ldm_jax.trainer.writers import Writers, dropped_note
from tests.tiny import changed


def _params(tree):
    return jax.tree.leaves(jax.device_get(tree))


class _Wrapped:
    """The data iterator (state and all), with `hook(i, batch)` called on the i-th batch."""

    def __init__(self, it, hook):
        self.it, self.hook, self.i = it, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.hook(self.i, dict(next(self.it)))

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def start_prefetch(self):
        self.it.start_prefetch()


def _hooked_loader(monkeypatch, hook):
    real = ldm_jax.data.make_train_loader

    class Loader:
        def __init__(self, *a, **k):
            self.loader = real(*a, **k)

        def __iter__(self):
            return _Wrapped(iter(self.loader), hook)

    monkeypatch.setattr(ldm_jax.data, "make_train_loader", Loader)


def test_run_writes_outputs(tiny_run):
    work = tiny_run.workdir
    rows = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
    assert rows[0]["step"] == 1 and "recon_loss" in rows[0]  # the first row at step 1
    assert any("val_psnr" in r for r in rows)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    for step in (2, 4):
        img = Image.open(os.path.join(work, "images", f"step_{step}.png"))
        # 2 volumes x (input, reconstruction, |error|), panels >= 128 px, 4 views wide
        assert img.size[0] > 4 * 128 and img.size[1] > 2 * 3 * 128
    assert any(n.startswith("events") for n in os.listdir(os.path.join(work, "tb")))
    manager = ckpt.make_manager(work, read_only=True)
    assert sorted(manager.all_steps()) == [2, 4]
    assert ckpt.restore_config(manager, 4)["autoencoder"]["num_channels"] == [8, 16]
    out = tiny_run.output
    assert "Data: built-in synthetic filaments (data.source='synthetic_filaments'), 8 " \
           "training and 2 validation volumes of 16x16x8" in out
    assert "CPU only" not in out  # a short run gets no quick-run hint


def test_sigterm_saves_then_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch,
                                                        capsys):
    """SIGTERM during step 3: that step finishes, is saved, training stops; a re-run
    resumes at 3 and ends with the uninterrupted run's params; one more says finished.
    The first run also saves by wall-clock time (step 1, not a multiple of 2)."""
    task, work = tiny_run.task, str(tmp_path / "run")

    def sigterm_on_third(i, batch):
        if i == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    _hooked_loader(monkeypatch, sigterm_on_third)
    monkeypatch.setattr(trainer, "LONG_RUN_HOURS", 0.0)  # the hint on any CPU run
    # Checkpoints by wall-clock time too: every step here (save_every_steps is 2).
    with changed(task.config.train, save_every_minutes=1e-9), \
            pytest.raises(TrainingStopped) as stopped:
        trainer.train(task, work, progress=False)
    assert (stopped.value.step, stopped.value.signum, stopped.value.saved) == (
        3, signal.SIGTERM, True)
    assert sorted(ckpt.make_manager(work, read_only=True).all_steps()) == [1, 2, 3]
    assert f"checkpoint saved in {os.path.join(work, 'checkpoints', '3')}" in str(
        stopped.value)
    out = capsys.readouterr().out
    assert "SIGTERM: stopping after the current step and saving a checkpoint" in out
    # The CPU hint: its own line, the real config path, the quick run named.
    hint = next(l for l in out.splitlines() if l.startswith("CPU only"))
    assert "the 4 steps to go" in hint
    assert 'quick CPU run (docs/training.md, "Quick CPU run")' in hint
    assert ("  python train.py --config tests/tiny.py --workdir runs/quick_tiny "
            "--config.data.volume_size='(32,32,32)' --config.train.num_steps=1000") in out

    monkeypatch.undo()
    resumed = trainer.train(task, work, progress=False)
    assert "Resuming from the checkpoint at step 3" in capsys.readouterr().out
    for x, y in zip(_params(tiny_run.params), _params(resumed.g_params)):
        np.testing.assert_array_equal(x, y)
    steps = [json.loads(l)["step"] for l in open(os.path.join(work, "metrics.jsonl"))
             if "loss" in l]
    assert steps == [1, 2, 3, 4]  # one run, the resumed part appended once

    again = trainer.train(task, work, progress=False)
    assert f"{work} is finished: its latest checkpoint is step 4" in capsys.readouterr().out
    for x, y in zip(_params(again.g_params), _params(resumed.g_params)):
        np.testing.assert_array_equal(x, y)


def test_train_cli_says_how_to_resume(monkeypatch, capsys):
    from ldm_jax.cli import train as train_cli

    def stopped(*a, **k):
        raise TrainingStopped("Stopped by SIGINT after step 7 of 9; checkpoint saved in "
                              "w/checkpoints/7.", 7, signal.SIGINT, True)

    monkeypatch.setattr(train_cli, "train_and_evaluate", stopped)
    argv = ["train.py", "--config=configs/balanced.py", "--workdir=w"]
    assert train_cli.main(argv) == 130
    out = capsys.readouterr().out
    assert "To resume, run the same command again:\n  python train.py " \
           "--config=configs/balanced.py --workdir=w" in out


def _tree_hash(path):
    """{relative file path: sha256} of everything under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path, monkeypatch,
                                                         capsys):
    work = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, work)
    shutil.rmtree(work / "checkpoints" / "4")  # resume from step 2, metrics rows to step 4
    before = _tree_hash(work / "checkpoints")

    def poison(i, batch):
        batch["image"] = np.array(batch["image"])
        batch["image"][..., 0, 0, 0, :] = np.nan
        return batch

    _hooked_loader(monkeypatch, poison)
    with pytest.raises(TrainingDivergedError, match="2 steps in a row"):
        trainer.train(tiny_run.task, str(work), progress=False)  # max_bad_steps=2
    assert _tree_hash(work / "checkpoints") == before
    out = capsys.readouterr().out
    assert "note: dropped 3 metrics.jsonl row(s) (up to step 4) written after the " \
           "checkpoint at step 2" in out
    rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
    # 3, 4: the skipped steps, both logged (4, the one that stops, too)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rows[-1]["loss"] is None  # non-finite -> null, valid JSON


def test_metrics_rows_without_checkpoint_are_dropped_and_nan_is_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 10, "loss": 0.4}\n{"step": 1')
    writers = Writers(str(tmp_path), 0)
    assert (writers.dropped, writers.last_dropped_step) == (3, 10)
    note = dropped_note(str(tmp_path), writers, 0)
    assert "has 3 metrics.jsonl row(s) (up to step 10) but no checkpoint" in note
    writers.write(1, {"loss": float("nan"), "x": math.inf, "y": 2.0})
    writers.close()
    text = path.read_text()
    assert json.loads(text) == {"step": 1, "loss": None, "x": None, "y": 2.0}
    assert "NaN" not in text and "Infinity" not in text


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch when installed (1.3 s of a run's start); the trainer
    keeps it from doing so. In a fresh interpreter: this one may have torch loaded."""
    import subprocess
    import sys
    code = ("import sys; from ldm_jax.trainer.writers import Writers; "
            f"w = Writers({str(tmp_path)!r}, 0); w.write(1, {{'loss': 0.5}}); w.close(); "
            "print('torch loaded:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch loaded: False" in out.stdout
    events = os.listdir(tmp_path / "tb")
    assert len(events) == 1 and os.path.getsize(tmp_path / "tb" / events[0]) > 0


def test_keep_policy_keeps_latest_and_best(tmp_path):
    import ml_collections
    config = ml_collections.ConfigDict({"a": 1})
    manager = ckpt.make_manager(tmp_path, keep=1)
    for step, val in zip([1, 2, 3, 4], [0.5, 0.1, 0.3, 0.4]):
        ckpt.save(manager, step, {"w": np.full(3, step, np.float32)}, config,
                  metrics={"val_l1": val})
    assert sorted(manager.all_steps()) == [2, 4]
    assert ckpt.best_step(manager) == 2
    assert ckpt.resolve_step(manager, "best") == 2
    with pytest.raises(FileNotFoundError, match="saved steps: 2, 4"):
        ckpt.resolve_step(manager, 3)


def test_quick_volume_is_small_and_divisible():
    from ldm_jax.autoencoder.geometry import smallest_volume, total_factor
    from ldm_jax.config import load_config
    def quick_volume(config, smallest=32):
        return smallest_volume(total_factor(config.autoencoder), smallest)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    vol = {name: quick_volume(load_config(os.path.join(root, "configs", f"{name}.py")))
           for name in ("monai_3d_ldm", "balanced", "extreme")}
    assert vol == {"monai_3d_ldm": (32, 32, 32), "balanced": (32, 32, 32),
                   "extreme": (64, 64, 64)}
    config = load_config(os.path.join(root, "configs", "balanced.py"))
    config.autoencoder.initial_downsample_factor = (2, 2, 1)  # thick slices: Z factor 8
    assert quick_volume(config, smallest=20) == (32, 32, 24)
