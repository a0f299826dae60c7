"""Aligned conditions end to end on tiny sizes: voxel-space diffusion (no autoencoder)
conditioned on a projection through an astigmatic point-spread or on a coarse volume,
trained, resumed and sampled with `ldm-jax sample --condition` (and its refusals); the
same projection conditioning on a tiny autoencoder's latents (the 2D image folded into
channels). 8x8x4 volumes, a 1-level UNet, 2-4 steps, 2 sampling steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli import sample as sample_cli
from ldm_jax.cli.train import make_task
from ldm_jax.trainer import loop as trainer
from tests.tiny import changed

VOLUME = (8, 8, 4)


def voxel_config(kind="projection"):
    """configs/diffusion/projection.py (or coarse.py) at a tiny size: 8x8x4 filament
    volumes, a 1-level UNet without attention in its level, 4 steps."""
    from configs.diffusion import coarse, projection
    c = (projection if kind == "projection" else coarse).get_config()
    d = c.data
    d.volume_size = VOLUME
    d.num_train_volumes, d.num_val_volumes, d.num_filaments = 4, 1, (1, 2)
    u = c.unet
    u.num_channels, u.attention_levels, u.num_head_channels = (4,), (False,), (4,)
    u.norm_num_groups, u.num_res_blocks, u.dtype = 4, 1, "float32"
    c.scheduler.num_train_timesteps = 100
    if kind == "coarse":
        c.conditioning.coarse.factor = 2  # 4x4x2
    elif kind is None:
        c.conditioning.aligned = ""
    c.conditioning.projection.astigmatism = 1.0
    c.conditioning.projection.depth_of_focus = 1.0
    c.conditioning.projection.focal_plane = -3.0  # just below the 4 planes, as the config's
    t = c.train
    t.num_steps, t.batch_size, t.learning_rate, t.ema_decay = 4, 2, 3e-3, 0.5
    t.log_every_steps, t.eval_every_steps, t.save_every_steps = 1, 4, 2
    t.num_eval_batches = 1
    c.eval.num_samples, c.eval.sampling_steps, c.eval.num_timesteps = 1, 2, 2
    c.mesh.data = 1
    return c


@pytest.fixture(scope="module")
def proj_run(tmp_path_factory):
    """(workdir, task, final state) of 4 voxel-space steps conditioned on a projection."""
    wd = str(tmp_path_factory.mktemp("vox_proj"))
    task = make_task(voxel_config("projection"))
    state = trainer.train(task, wd, progress=False)
    return wd, task, state


def _rows(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _sample(wd, out, *extra):
    return sample_cli.main(["x", f"--workdir={wd}", "--step=latest", f"--output={out}",
                            "--num_samples=2", "--num_inference_steps=2", "--noprogress",
                            *extra])


def _check_written(out, n=2):
    rec = json.load(open(os.path.join(out, "samples.json")))
    assert rec["num_samples"] == n
    for name in rec["files"]:
        assert os.path.exists(os.path.join(out, name + ".nii.gz"))
    assert os.path.exists(os.path.join(out, "samples.png"))
    return rec


def _image(seed=0, shape=VOLUME[:2]):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# ------------------------------------------------------------------ voxel space: training


def test_voxel_space_trains_and_writes_checkpoints(proj_run):
    from ldm_jax import checkpoint as ckpt
    from ldm_jax.diffusion.voxel_space import VoxelSpace

    wd, task, state = proj_run
    assert isinstance(task.ae, VoxelSpace) and task.voxel_space
    assert task.aligned == "projection" and task.scale_factor == 1.0
    assert task.unet.in_channels == 1 + 1 + 1  # noisy volume, projection, its z coordinate
    assert int(state.step) == 4 and int(state.skipped_steps) == 0
    rows = _rows(wd)
    assert len([r for r in rows if "loss" in r]) == 4
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in rows)
    assert os.path.exists(os.path.join(wd, "images", "step_4.png"))
    m = ckpt.make_manager(wd, read_only=True)
    assert sorted(m.all_steps()) == [2, 4]
    cfg = ckpt.restore_config(m, 4)
    m.close()
    assert cfg["stage"] == "diffusion" and cfg["conditioning"]["aligned"] == "projection"
    assert not cfg["latents"].get("autoencoder_workdir")
    assert "voxel space" in task.describe() and "astigmatic" in task.describe()


def test_plan_counts_the_condition_channels(proj_run):
    """`ldm-jax plan` and the trainer's plan of a voxel-space projection model: the volume
    grid as the UNet's, the 2 condition channels, and the parameters the model has."""
    import math

    from ldm_jax.cli.plan import diffusion_plan

    _, task, state = proj_run
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
    for text in (task.describe(), diffusion_plan(voxel_config("projection"))):
        assert "x".join(map(str, VOLUME)) + " x 1 + 2 condition channel(s)" in text, text
        assert f"diffusion UNet {n:,} " in text, text


def test_voxel_space_resume_is_exact(proj_run, tmp_path):
    _, task, straight = proj_run
    with changed(task.config.eval, num_samples=0), changed(task.config.train, num_steps=2) as t:
        trainer.train(task, str(tmp_path / "b"), progress=False)
        t.num_steps = 4
        resumed = trainer.train(task, str(tmp_path / "b"), progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight.ema_params), jax.tree.leaves(resumed.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_task_conditions_and_dropout(proj_run, monkeypatch):
    """raw_condition is compute_condition; model_condition lifts to the UNet's input grid;
    train_step hands the UNet the lifted zero condition for dropped rows (drop_prob 1) and
    the volume's own condition otherwise (drop_prob 0)."""
    from ldm_jax.diffusion import aligned

    _, task, state = proj_run
    images = np.random.default_rng(0).random((2, *VOLUME, 1)).astype(np.float32)
    raw = task.raw_condition(images)
    np.testing.assert_array_equal(raw, aligned.compute_condition(images, task.config.conditioning))
    assert raw.shape == (2, 8, 8, 1, 1)
    lifted = np.asarray(task.model_condition(jnp.asarray(raw)))
    assert lifted.shape == (2, *task.padded_shape, 2)

    seen = []

    def loss(params, z, noise, t, labels, context=None, controlnet=None, aligned=None):
        seen.append(np.asarray(aligned))
        return jnp.sum(jax.tree.leaves(params)[0]) * 0.0

    monkeypatch.setattr(task, "_loss", loss)
    monkeypatch.setattr(task, "_apply_update", lambda *a: None)
    batch = {"image": jnp.asarray(images)}
    with changed(task.config.conditioning, drop_prob=1.0):
        task.train_step(state, batch)
    zero = np.asarray(task.model_condition(jnp.zeros_like(raw)))
    np.testing.assert_array_equal(seen[-1], zero)
    assert not seen[-1][..., 0].any() and seen[-1][..., 1].any()  # the coordinate stays
    with changed(task.config.conditioning, drop_prob=0.0), \
            changed(task.config.conditioning.projection, noise=0.0):
        task.train_step(state, batch)
    np.testing.assert_allclose(seen[-1], lifted, atol=1e-6)


# ------------------------------------------------------------------ voxel space: sampling


def test_sample_with_a_2d_npy_png_folder_and_volume(proj_run, tmp_path):
    wd = proj_run[0]
    np.save(tmp_path / "p.npy", _image(0))
    png = (_image(1) * 255).astype(np.uint8)
    Image.fromarray(png).save(tmp_path / "p.png")
    folder = tmp_path / "two"
    folder.mkdir()
    Image.fromarray(png).save(folder / "a.png")
    np.save(folder / "b.npy", _image(2))
    vol = np.random.default_rng(3).random((*VOLUME, 1)).astype(np.float32)
    np.save(tmp_path / "vol4d.npy", vol)
    lat = {}
    for name, cond in (("npy", tmp_path / "p.npy"), ("png", tmp_path / "p.png"),
                       ("folder", folder), ("volume", tmp_path / "vol4d.npy")):
        out = str(tmp_path / f"s_{name}")
        assert _sample(wd, out, f"--condition={cond}") == 0, name
        rec = _check_written(out)
        assert rec["condition"] == os.path.abspath(str(cond))
        lat[name] = np.load(os.path.join(out, "latents", "sample_0000.npy"))
        assert lat[name].shape == (*VOLUME, 1)
    assert rec["condition_files"] is None or len(rec["condition_files"]) == 2
    folder_rec = json.load(open(os.path.join(str(tmp_path / "s_folder"), "samples.json")))
    assert folder_rec["condition_files"] == [str(folder / "a.png"), str(folder / "b.npy")]
    # The PNG and the folder's first file are the same condition: the same first sample
    # (the same seed); another condition steers it elsewhere.
    np.testing.assert_allclose(lat["png"], lat["folder"], atol=1e-5)
    assert np.abs(lat["npy"] - lat["png"]).max() > 0


def test_sample_with_a_3d_volume_without_channel_axis(proj_run, tmp_path):
    vol = np.random.default_rng(3).random(VOLUME).astype(np.float32)
    np.save(tmp_path / "vol.npy", vol)
    assert _sample(proj_run[0], str(tmp_path / "s"), f"--condition={tmp_path / 'vol.npy'}") == 0


def test_volume_condition_is_the_volume_projection(proj_run):
    """A volume on the volume grid and its own (noise-free) projection as a 2D image are
    the same condition."""
    import ldm_jax
    from ldm_jax.diffusion import aligned
    pipe = ldm_jax.load_pipeline(proj_run[0], "latest")
    assert pipe.aligned == "projection" and pipe.aligned_grid() == (8, 8, 1)
    vol = np.random.default_rng(3).random((*VOLUME, 1)).astype(np.float32)
    proj = aligned.project(vol[None], pipe.config.conditioning.projection)[0, :, :, 0, 0]
    a = pipe.aligned_for(2, vol)
    b = pipe.aligned_for(2, proj)
    assert a.shape == b.shape == (2, 8, 8, 1, 1)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert b.min() == 0.0 and abs(b.max() - 1.0) < 1e-6  # normalised like training's
    per_sample = pipe.aligned_for(2, np.stack([proj, 2 * proj + 1]))
    np.testing.assert_allclose(per_sample[0], per_sample[1], atol=1e-6)  # min-max


def test_sample_refusals(proj_run, tmp_path, capsys):
    wd = proj_run[0]
    np.save(tmp_path / "wrong.npy", np.ones((5, 8), np.float32))
    np.save(tmp_path / "nan.npy", np.where(np.eye(8) > 0, np.nan, 1.0).astype(np.float32))
    Image.new("RGB", (8, 8)).save(tmp_path / "colour.png")
    cases = [
        (None, "this model is conditioned on"),
        (tmp_path / "wrong.npy", "the condition has shape (5, 8)"),
        (tmp_path / "colour.png", "colour"),
        (tmp_path / "nan.npy", "NaN or Inf"),
        (tmp_path / "missing.npy", "neither a condition file"),
    ]
    for cond, msg in cases:
        out = str(tmp_path / "refused")
        capsys.readouterr()
        assert _sample(wd, out, *([f"--condition={cond}"] if cond else [])) == 2, msg
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert not os.path.exists(out), msg


def test_guidance_with_a_conditioned_model(proj_run, tmp_path):
    np.save(tmp_path / "p.npy", _image(0))
    out = str(tmp_path / "g")
    assert _sample(proj_run[0], out, f"--condition={tmp_path / 'p.npy'}",
                   "--guidance_scale=2") == 0
    rec = _check_written(out)
    assert rec["guidance_scale"] == 2.0


def test_unconditional_voxel_space_refuses_a_condition(tmp_path, capsys):
    c = voxel_config(None)
    c.train.num_steps = c.train.save_every_steps = c.train.eval_every_steps = 1
    c.eval.num_samples = 0
    wd = str(tmp_path / "plain")
    trainer.train(make_task(c), wd, progress=False)
    np.save(tmp_path / "p.npy", _image(0))
    out = str(tmp_path / "refused")
    capsys.readouterr()
    assert _sample(wd, out, f"--condition={tmp_path / 'p.npy'}") == 2
    err = capsys.readouterr().err
    assert "takes no condition" in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


# ------------------------------------------------------------------ coarse


def test_coarse_trains_and_samples(tmp_path):
    c = voxel_config("coarse")
    c.train.num_steps = c.train.save_every_steps = c.train.eval_every_steps = 2
    wd = str(tmp_path / "coarse")
    task = make_task(c)
    assert task.aligned == "coarse" and task.unet.in_channels == 2  # repeated, no coordinate
    state = trainer.train(task, wd, progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    assert os.path.exists(os.path.join(wd, "images", "step_2.png"))
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((4, 4, 2)).astype(np.float32))
    np.save(tmp_path / "v.npy", np.random.default_rng(1).random(VOLUME).astype(np.float32))
    for cond in ("c.npy", "v.npy"):  # the coarse grid; the volume grid (coarsened)
        out = str(tmp_path / f"s_{cond}")
        assert _sample(wd, out, f"--condition={tmp_path / cond}") == 0, cond
        _check_written(out)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 2), np.float32))
    assert _sample(wd, str(tmp_path / "r"), f"--condition={tmp_path / 'bad.npy'}") == 2
    assert _sample(wd, str(tmp_path / "r")) == 2


# ------------------------------------------------------------------ latent space


def test_projection_conditioning_in_latent_space(ae_workdir, tmp_path):
    """On a tiny 2x autoencoder (16x16x8 -> 8x8x4x2): the 16x16 projection is folded into
    4 channels (+ its z coordinate) of the latent grid."""
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    c = tiny_diffusion_config(ae_workdir, None)
    c.conditioning.aligned = "projection"
    c.conditioning.projection.psf = "astigmatic"
    c.train.num_steps = c.train.save_every_steps = c.train.eval_every_steps = 2
    c.eval.num_samples, c.eval.sampling_steps = 1, 2
    task = make_task(c)
    assert task.unet.in_channels == 2 + 4 + 1
    wd = str(tmp_path / "latent")
    state = trainer.train(task, wd, progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    assert os.path.exists(os.path.join(wd, "images", "step_2.png"))
    np.save(tmp_path / "p.npy", _image(0, (16, 16)))
    out = str(tmp_path / "s")
    assert _sample(wd, out, f"--condition={tmp_path / 'p.npy'}") == 0
    _check_written(out)
    assert np.load(os.path.join(out, "latents", "sample_0000.npy")).shape == (8, 8, 4, 2)
    np.save(tmp_path / "small.npy", _image(0))  # the latent grid's size: refused
    assert _sample(wd, str(tmp_path / "r"), f"--condition={tmp_path / 'small.npy'}") == 2


def _paired_config(ae_workdir, latents_dir, folder):
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.conditioning.aligned = "projection"
    c.conditioning.aligned_dir = folder
    c.train.num_steps = c.train.save_every_steps = c.train.eval_every_steps = 2
    c.eval.num_samples, c.eval.sampling_steps = 1, 2
    return c


def test_paired_condition_files_with_extracted_latents(ae_workdir, latents_dir, tmp_path):
    """conditioning.aligned_dir: one 8-bit PNG (the z projection) per extracted latent
    NAME, read as --condition reads it, split as the latents, fed to the training step,
    written as the held-out conditions; a missing or misshapen file is one DataError."""
    from ldm_jax.diffusion.aligned import compute_condition
    from ldm_jax.errors import DataError

    vols = os.path.join(os.path.dirname(latents_dir), "vols")
    folder = tmp_path / "conds"
    folder.mkdir()
    names = sorted(f[:-4] for f in os.listdir(vols) if f.endswith(".npy"))
    c = _paired_config(ae_workdir, latents_dir, str(folder))
    expected = {}
    for n in names:
        v = np.load(os.path.join(vols, n + ".npy"))[..., None]
        img = compute_condition(v[None], c.conditioning)[0, :, :, 0, 0]
        Image.fromarray(np.round(255 * img).astype(np.uint8)).save(folder / f"{n}.png")
        expected[n] = np.round(255 * img) / 255
    task = make_task(c)
    assert task.volume_grid == (16, 16, 8)
    by_name = dict(zip(task.names, np.concatenate([task.val_aligned, task.train_aligned])))
    for n in names:
        np.testing.assert_allclose(by_name[n][:, :, 0, 0], expected[n], atol=1e-6)
    batch = next(iter(task.train_loader(2)))
    assert batch["condition"].shape == (2, 16, 16, 1, 1)
    wd = str(tmp_path / "run")
    state = trainer.train(task, wd, progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    assert len(os.listdir(os.path.join(wd, "conditions"))) >= 2
    out = str(tmp_path / "s")
    assert _sample(wd, out, f"--condition={folder / (names[1] + '.png')}") == 0
    _check_written(out)
    assert f"paired files in {folder}" in task.describe()
    c1 = _paired_config(ae_workdir, latents_dir, str(folder / f"{names[1]}.png"))
    with pytest.raises(DataError, match="is not a folder"):  # one file for all: no pairing
        make_task(c1)
    os.remove(folder / f"{names[0]}.png")
    with pytest.raises(DataError, match=names[0]) as e:
        make_task(c)
    assert "one file for all" not in str(e.value)
    np.save(folder / f"{names[0]}.npy", np.zeros((8, 8), np.float32))  # the latent grid
    with pytest.raises(DataError, match=r"\(16, 16\)"):
        make_task(c)


def test_paired_condition_files_refusals(ae_workdir, latents_dir, tmp_path):
    from ldm_jax.errors import ConfigError

    c = _paired_config(ae_workdir, None, str(tmp_path))  # on the fly: computed instead
    with pytest.raises(ConfigError, match="latents.dir"):
        make_task(c)
    c = _paired_config(ae_workdir, latents_dir, str(tmp_path))
    c.conditioning.aligned = ""
    with pytest.raises(ConfigError, match="conditioning.aligned=projection"):
        make_task(c)
    c = _paired_config(ae_workdir, latents_dir, None)
    with pytest.raises(ConfigError, match="aligned_dir=DIR"):
        make_task(c)
