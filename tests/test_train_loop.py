"""train_and_evaluate end to end: outputs in the workdir, exact resume, keep policy, guard."""

import hashlib
import json
import os
import re

import jax
import numpy as np
import pytest

from ldm_jax import checkpoint as ckpt
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.trainer import TrainingDivergedError
from tests.tiny import tiny_config


def _params(state):
    return jax.tree.leaves(jax.device_get(state.g_params))


def _bf16_tiny():
    config = tiny_config()
    config.autoencoder.dtype = "bfloat16"
    config.discriminator.dtype = "bfloat16"
    return config


def test_run_writes_outputs_and_resume_is_exact(tmp_path, capsys):
    config = _bf16_tiny()
    one_run = train_and_evaluate(config, tmp_path / "a", progress=False)
    # On a CPU the trainer says what the first (compiling) and later steps cost.
    out = capsys.readouterr().out
    assert re.search(r"CPU only: the first step \(compiling it\) took \d+ s, then "
                     r"\d+\.\d\d s per step", out)
    assert "--config.data.volume_size='(32,32,32)'" in out  # tiny's factor 2 divides 32

    config.train.num_steps = 2
    train_and_evaluate(config, tmp_path / "b", progress=False)
    config.train.num_steps = 4
    capsys.readouterr()
    resumed = train_and_evaluate(config, tmp_path / "b", progress=False)
    assert "Resuming from the checkpoint at step 2" in capsys.readouterr().out
    for x, y in zip(_params(one_run), _params(resumed)):
        np.testing.assert_array_equal(x, y)

    work = tmp_path / "a"
    rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
    assert any("val_psnr" in r for r in rows) and any("recon_loss" in r for r in rows)
    assert (work / "images" / "step_2.png").exists() and (work / "images" / "step_4.png").exists()
    assert any(n.startswith("events") for n in os.listdir(work / "tb"))
    manager = ckpt.make_manager(work, read_only=True)
    assert manager.latest_step() == 4
    saved = ckpt.restore_config(manager, 4)
    assert saved["autoencoder"]["num_channels"] == [8, 16]


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


def _tree_hash(path):
    """{relative file path: sha256} of everything under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


class _Poisoned:
    """Wraps the data iterator (state and all) but puts a NaN into every batch."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.it))
        batch["image"] = np.array(batch["image"])
        batch["image"][..., 0, 0, 0, :] = np.nan
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def start_prefetch(self):
        self.it.start_prefetch()


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = _bf16_tiny()
    config.train.num_steps = 2
    train_and_evaluate(config, tmp_path, progress=False)
    before = _tree_hash(tmp_path / "checkpoints")

    import ldm_jax.data
    real = ldm_jax.data.make_train_loader

    class PoisonedLoader:
        def __init__(self, *a, **k):
            self.loader = real(*a, **k)

        def __iter__(self):
            return _Poisoned(iter(self.loader))

    monkeypatch.setattr(ldm_jax.data, "make_train_loader", PoisonedLoader)
    config.train.num_steps = 20
    config.train.max_bad_steps = 3
    with pytest.raises(TrainingDivergedError, match="3 steps in a row"):
        train_and_evaluate(config, tmp_path, progress=False)
    assert _tree_hash(tmp_path / "checkpoints") == before


def test_quick_volume_is_small_and_divisible():
    from ldm_jax.config import load_config, smallest_volume, total_factor

    def quick_volume(config, smallest=32):
        return smallest_volume(total_factor(config.autoencoder), smallest)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vol = {name: quick_volume(load_config(os.path.join(root, "configs", f"{name}.py")))
           for name in ("monai_3d_ldm", "balanced", "extreme")}
    assert vol == {"monai_3d_ldm": (32, 32, 32), "balanced": (32, 32, 32),
                   "extreme": (64, 64, 64)}
    config = load_config(os.path.join(root, "configs", "balanced.py"))
    config.autoencoder.initial_downsample_factor = (2, 2, 1)  # thick slices: Z factor 8
    assert quick_volume(config, smallest=20) == (32, 32, 24)
