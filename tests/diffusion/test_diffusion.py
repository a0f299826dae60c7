"""Stage 2 end to end on tiny sizes: training (on the fly and from extracted latents),
exact resume, sampling, guidance, padding and the user errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_jax
from ldm_jax.cli import sample as sample_cli
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.data import DataError
from ldm_jax.data.synthetic.filaments import render_filaments
from ldm_jax.errors import CheckpointNotFoundError, ConfigError
from tests.tiny import changed, extract_filament_latents


def tiny_diffusion_config(ae_workdir, latents_dir=None, levels=1):
    """The stage-2 tests' config: a UNet of `levels` levels (1, the default, compiles
    fastest; 2 downsamples once) on tiny_config's latents, 4 steps, 3 sampling steps."""
    from configs.diffusion import default
    c = default.get_config()
    u = c.unet
    u.in_channels = u.out_channels = 2  # tiny_config's latent_channels
    u.num_channels = (8, 16, 16, 16)[:levels]
    u.attention_levels = (False, True, False, False)[:levels]
    # The middle block always attends: the last level's heads (it uses them) are never 0.
    u.num_head_channels = (0, 8, 0, 8)[:levels - 1] + (8,)
    u.norm_num_groups = 4
    u.num_res_blocks = 1
    u.dtype = "float32"
    c.scheduler.num_train_timesteps = 100
    c.latents.autoencoder_workdir = ae_workdir
    c.latents.autoencoder_step = "latest"
    c.latents.dir = latents_dir
    c.latents.val_fraction = 0.25
    c.latents.scale_num_volumes = 4
    t = c.train
    t.num_steps, t.batch_size, t.learning_rate, t.ema_decay = 4, 2, 3e-3, 0.5
    t.log_every_steps, t.eval_every_steps, t.save_every_steps = 1, 2, 2
    c.eval.num_samples, c.eval.sampling_steps, c.eval.num_timesteps = 1, 3, 3
    c.mesh.data = 1
    return c


@pytest.fixture(scope="module")
def ldm_run(ae_workdir, latents_dir, tmp_path_factory):
    """(workdir, task) of 30 steps (evaluations and checkpoints at 15 and 30). Tests that
    train the same model again pass the task to `ldm_jax.trainer.train`, which reuses its
    compiled step and evaluation."""
    from ldm_jax.cli.train import make_task
    from ldm_jax.trainer import loop as trainer
    wd = str(tmp_path_factory.mktemp("ldm"))
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.train.num_steps = 30
    c.train.eval_every_steps = c.train.save_every_steps = 15
    task = make_task(c)
    trainer.train(task, wd, progress=False)
    return wd, task


@pytest.fixture(scope="module")
def ldm_workdir(ldm_run):
    return ldm_run[0]


def _rows(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_loss_falls_and_writes_everything(ldm_workdir):
    losses = [r["loss"] for r in _rows(ldm_workdir) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    vals = [r["val_loss"] for r in _rows(ldm_workdir) if "val_loss" in r]
    assert len(vals) == 2 and all(np.isfinite(vals))
    assert os.path.exists(os.path.join(ldm_workdir, "images", "step_30.png"))
    from ldm_jax import checkpoint as ckpt
    m = ckpt.make_manager(ldm_workdir, read_only=True)
    cfg = ckpt.restore_config(m, 30)
    m.close()
    assert cfg["stage"] == "diffusion" and cfg["latents"]["scale_factor"] > 0
    assert cfg["latents"]["latent_shape"] == [8, 8, 4, 2]


def test_resume_is_exact(ldm_run, tmp_path):
    from ldm_jax.trainer import loop as trainer

    _, task = ldm_run  # its compiled step and evaluation serve the three runs here
    with changed(task.config.eval, num_samples=0), changed(
            task.config.train, num_steps=4, eval_every_steps=2, save_every_steps=2) as t:
        straight = trainer.train(task, str(tmp_path / "a"), progress=False)
        t.num_steps = 2
        trainer.train(task, str(tmp_path / "b"), progress=False)
        t.num_steps = 4
        resumed = trainer.train(task, str(tmp_path / "b"), progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(straight.ema_params), jax.tree.leaves(resumed.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_resume_refuses_a_changed_unet_or_latents(ae_workdir, latents_dir, ldm_workdir,
                                                  tmp_path):
    import hashlib

    def hashes(path):
        return {os.path.join(r, f): hashlib.sha256(open(os.path.join(r, f), "rb").read())
                .hexdigest() for r, _, files in os.walk(path) for f in files}

    wd = tmp_path / "run"
    shutil.copytree(ldm_workdir, wd)
    before = hashes(wd / "checkpoints")
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.train.num_steps = 31
    c.unet.num_channels = (16,)
    c.latents.encode = "mu"
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(c, str(wd), progress=False)
    msg = str(err.value)
    assert "unet.num_channels: checkpoint [8], config [16]" in msg
    assert "latents.encode: checkpoint sample, config mu" in msg
    assert "train.num_steps" not in msg and "\n" not in msg
    assert hashes(wd / "checkpoints") == before


def test_resume_changes_of_the_diffusion_task():
    from ldm_jax.diffusion.config import prepare_config
    from ldm_jax.diffusion.task import DiffusionTask
    from ldm_jax.trainer import resume
    task = DiffusionTask.__new__(DiffusionTask)
    task.config = prepare_config(tiny_diffusion_config("runs/ae"))
    saved = json.loads(task.config.to_json())
    saved["unet"]["remat"] = "blocks"
    saved["unet"]["dtype"] = "bfloat16"
    saved["unet"]["num_res_blocks"] = 2
    saved["scheduler"]["name"] = "ddim"
    saved["latents"]["autoencoder_step"] = "7"
    saved["latents"]["scale_factor"] = 0.5
    saved["conditioning"]["num_classes"] = 3
    saved["train"]["learning_rate"] = 1.0
    refused, accepted = resume.resume_changes(task, saved)
    assert [k for k, *_ in refused] == ["conditioning.num_classes", "latents.autoencoder_step",
                                        "scheduler.name", "unet.num_res_blocks"]
    assert [k for k, *_ in accepted] == ["latents.scale_factor", "train.learning_rate",
                                         "unet.dtype", "unet.remat"]


def test_on_the_fly_encoding_trains(ae_workdir, tmp_path):
    c = tiny_diffusion_config(ae_workdir, None)
    c.train.num_steps = 2
    c.eval.num_samples = 0
    state = train_and_evaluate(c, str(tmp_path / "otf"), progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    rows = _rows(str(tmp_path / "otf"))
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in rows)


def test_sampling_is_deterministic_and_cli_writes(ldm_workdir, tmp_path):
    pipe = ldm_jax.load_pipeline(ldm_workdir, "latest")
    a = pipe.sample(2, jax.random.PRNGKey(0), steps=3)
    b = pipe.sample(2, jax.random.PRNGKey(0), steps=3)
    c = pipe.sample(2, jax.random.PRNGKey(1), steps=3)
    assert a.shape == (2, 16, 16, 8, 1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0
    out = str(tmp_path / "s")
    args = ["x", f"--workdir={ldm_workdir}", f"--output={out}", "--num_samples=3",
            "--num_inference_steps=3", "--batch_size=2", "--format=both", "--noprogress"]
    assert sample_cli.main(args) == 0
    rec = json.load(open(os.path.join(out, "samples.json")))
    assert rec["num_samples"] == 3 and rec["scheduler"] == "ddim"
    for n in rec["files"]:
        assert os.path.exists(os.path.join(out, n + ".nii.gz"))
        assert np.load(os.path.join(out, "latents", n + ".npy")).shape == (8, 8, 4, 2)
    assert os.path.exists(os.path.join(out, "samples.png"))
    assert sample_cli.main(args) == 0  # the same settings: complete, reused
    assert sample_cli.main(args + ["--seed=1"]) == 2  # other settings: refused, kept
    assert json.load(open(os.path.join(out, "samples.json"))) == rec
    # A refused request (here a class for an unconditional model, a sampler it was not
    # trained for, too many steps) leaves no --output folder behind.
    for bad in ("--class_label=0", "--scheduler=rflow", "--num_inference_steps=1000"):
        refused = str(tmp_path / "refused")
        assert sample_cli.main(["x", f"--workdir={ldm_workdir}", f"--output={refused}",
                                "--noprogress", bad]) == 2
        assert not os.path.exists(refused), bad


def test_scale_factor_round_trip(ldm_workdir, ae_workdir):
    """encode -> x sf -> / sf -> decode equals the plain reconstruction."""
    pipe = ldm_jax.load_pipeline(ldm_workdir, "latest")
    ae = ldm_jax.load_autoencoder(ae_workdir, "latest")
    vol = render_filaments((16, 16, 8), seed=9, index=0, num_filaments=(3, 3))[..., None]
    z = np.asarray(ae.encode_volume(vol.astype(np.float32)))
    plain = np.asarray(ae.decode_volume(z))
    through = pipe.decode([(z * pipe.scale_factor) / pipe.scale_factor])[0]
    np.testing.assert_allclose(through, plain, rtol=1e-5, atol=1e-5)


def test_guidance_one_equals_conditional_model():
    from ldm_jax.diffusion.sampling import make_sampler
    from ldm_jax.models import build_unet
    from ldm_jax.schedulers import build_scheduler, sample_loop
    c = tiny_diffusion_config("unused")
    c.unet.num_class_embeds = 4
    unet = build_unet(c.unet)
    sched = build_scheduler(c.scheduler, name="ddim")
    x = jnp.zeros((1, 8, 8, 4, 2))
    params = jax.jit(unet.init)(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                                class_labels=jnp.zeros((1,), jnp.int32))["params"]
    labels = jnp.array([1, 2], jnp.int32)
    key = jax.random.PRNGKey(3)
    shape = (8, 8, 4, 2)
    guided = make_sampler(unet, sched, shape=shape, steps=4, guidance_scale=1.0,
                          null_label=3)(params, key, labels, n=2)
    k0, k1 = jax.random.split(key)
    x_t = jax.random.normal(k0, (2, *shape))
    state = sched.set_timesteps(sched.create_state(), 4)
    plain = jax.jit(lambda: sample_loop(sched, state, lambda x, t: unet.apply(
        {"params": params}, x, jnp.broadcast_to(t, (2,)), class_labels=labels), x_t, k1,
        eta=0.0))()
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), rtol=1e-5, atol=1e-5)
    strong = make_sampler(unet, sched, shape=shape, steps=4, guidance_scale=3.0,
                          null_label=3)(params, key, labels, n=2)
    assert np.isfinite(np.asarray(strong)).all()


def test_odd_latents_are_padded_and_cropped(ae_workdir, tmp_path):
    from ldm_jax.diffusion.latent_space import crop, pad_widths
    w = pad_widths((6, 8, 5), (8, 8, 8))
    assert w == ((1, 1), (0, 0), (1, 2))
    z = np.random.rand(1, 6, 8, 5, 2)
    np.testing.assert_array_equal(crop(np.pad(z, ((0, 0), *w, (0, 0))), w), z)
    # 14x14x6 volumes encode to 7x7x3 latents, which the 2-level UNet (factor 2) pads to
    # 8x8x4 for training and sampling, and crops back.
    lat = extract_filament_latents(ae_workdir, str(tmp_path), 4, shape=(14, 14, 6))
    c = tiny_diffusion_config(ae_workdir, lat, levels=2)
    c.train.num_steps = 1
    c.eval.num_samples = 0
    wd = str(tmp_path / "pad")
    train_and_evaluate(c, wd, progress=False)
    pipe = ldm_jax.load_pipeline(wd, "latest")
    assert pipe.latent_shape == (7, 7, 3, 2) and pipe.padded_shape == (8, 8, 4)
    z = pipe.sample_latents(1, jax.random.PRNGKey(0), steps=2)
    assert z.shape == (1, 7, 7, 3, 2)


def test_bad_inputs_have_clear_messages(ae_workdir, latents_dir, ldm_workdir, tmp_path):
    from ldm_jax.cli.train import make_task
    c = tiny_diffusion_config(str(tmp_path / "nothing"), None)
    with pytest.raises(CheckpointNotFoundError, match="Train stage 1 first: python train.py"):
        make_task(c)
    # Latents whose latents.json names another autoencoder's model hash.
    other = tmp_path / "other_latents"
    shutil.copytree(latents_dir, other)
    with open(other / "latents.json") as f:
        meta = json.load(f)
    meta["checkpoint"]["config_hash"] = "0" * 16
    with open(other / "latents.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(DataError, match="come from another autoencoder"):
        make_task(tiny_diffusion_config(ae_workdir, str(other)))
    pipe = ldm_jax.load_pipeline(ldm_workdir, "latest")
    with pytest.raises(ConfigError, match="unconditional"):
        pipe.sample_latents(1, jax.random.PRNGKey(0), steps=2, class_label=0)
    with pytest.raises(ConfigError, match="must be >= 1"):
        pipe.sample_latents(0, jax.random.PRNGKey(0), steps=2)
    with pytest.raises(ConfigError, match=r"must be in \[1, 100\]"):
        pipe.sample_latents(1, jax.random.PRNGKey(0), steps=101)
    with pytest.raises(ConfigError, match="trained with the ddpm scheduler"):
        pipe.sample_latents(1, jax.random.PRNGKey(0), steps=2, scheduler="rflow")
    with pytest.raises(ConfigError, match="stage-1"):
        ldm_jax.load_pipeline(ae_workdir, "latest")


def _files(path):
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def test_sample_interrupted_then_rerun_equals_one_run(ldm_workdir, tmp_path, monkeypatch,
                                                      capsys):
    """Ctrl-C after the first sample: the rerun draws only the batch with missing ones and
    the folder ends byte for byte as one uninterrupted run's; NaN samples are an error
    naming the batch, nothing of it written."""

    from ldm_jax import outputs as vf
    from ldm_jax.diffusion.pipeline import Pipeline
    args = ["x", f"--workdir={ldm_workdir}", "--num_samples=3", "--num_inference_steps=2",
            "--batch_size=2", "--noprogress", "--step=latest"]
    once, cut = str(tmp_path / "once"), str(tmp_path / "cut")
    assert sample_cli.main(args + [f"--output={once}"]) == 0
    real = vf.Outputs.write

    def write_then_sigint(self, *a, **k):  # as Ctrl-C there (see tests/cli/test_reruns.py)
        real(self, *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(vf.Outputs, "write", write_then_sigint)
    assert sample_cli.main(args + [f"--output={cut}"]) == 130
    monkeypatch.undo()
    assert json.load(open(os.path.join(cut, "samples.json")))["files"] == ["sample_0000"]
    capsys.readouterr()
    assert sample_cli.main(args + [f"--output={cut}"]) == 0
    assert "Reusing 1 complete sample(s) made the same way (sample_0000); making the 2 " \
        "missing." in capsys.readouterr().out
    assert _files(cut) == _files(once)

    monkeypatch.setattr(Pipeline, "sample_batch",
                        lambda self, rng, k, b, **kw: np.full((b, 8, 8, 4, 2), np.nan,
                                                              np.float32))
    nan = str(tmp_path / "nan")
    assert sample_cli.main(args + [f"--output={nan}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "samples sample_0000..sample_0001 (batch 0) came out " \
        "NaN or Inf as latents" in err and "seed 0" in err
    assert not [f for f in os.listdir(nan) if f.endswith(".nii.gz")]


def test_sample_flags_are_checked_first_and_a_moved_autoencoder_is_named(
        ldm_workdir, ae_workdir, tmp_path, capsys):
    out = str(tmp_path / "s")
    for flag, text in (("--eta=-2", "--eta=-2.0 must be in [0, 1]"),
                       ("--eta=2", "--eta=2.0 must be in [0, 1]"),
                       ("--batch_size=0", "--batch_size=0 must be >= 1"),
                       ("--batch_size=-1", "--batch_size=-1 must be >= 1")):
        assert sample_cli.main(["x", "--workdir=/nowhere", f"--output={out}", flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err, err
    assert not os.path.exists(out)
    # A stage-2 run whose stage-1 workdir moved: the message names the flag that fixes it.
    moved = tmp_path / "ldm"
    shutil.copytree(ldm_workdir, moved)
    for meta in moved.glob("checkpoints/*/config/metadata"):
        cfg = json.loads(meta.read_text())
        cfg["latents"]["autoencoder_workdir"] = str(tmp_path / "gone")
        meta.write_text(json.dumps(cfg))
    args = ["x", f"--workdir={moved}", f"--output={out}", "--num_samples=1",
            "--num_inference_steps=2", "--noprogress", "--step=latest"]
    assert sample_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "If that run moved, pass its new folder: " \
        "--autoencoder_workdir=DIR." in err and "--config." not in err
    assert sample_cli.main(args + [f"--autoencoder_workdir={ae_workdir}"]) == 0
    rec = json.load(open(os.path.join(out, "samples.json")))
    assert rec["autoencoder_checkpoint"]["workdir"] == ae_workdir


def test_sample_skips_a_damaged_latest_and_refuses_it_by_number(ldm_workdir, tmp_path,
                                                                capsys):
    wd = tmp_path / "ldm"
    shutil.copytree(ldm_workdir, wd)
    os.remove(wd / "checkpoints" / "30" / "state" / "_METADATA")
    args = ["x", f"--workdir={wd}", "--num_samples=1", "--num_inference_steps=2",
            "--noprogress"]
    assert sample_cli.main(args + [f"--output={tmp_path / 'a'}", "--step=latest"]) == 0
    err = capsys.readouterr().err
    assert "warning: the checkpoint at step 30" in err and "using step 15" in err
    assert json.load(open(tmp_path / "a" / "samples.json"))["diffusion_checkpoint"][
        "step"] == 15
    assert sample_cli.main(args + [f"--output={tmp_path / 'b'}", "--step=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "step 30" in err and "30/state/_METADATA is missing" in err


def test_extract_on_a_stage_2_run_names_its_autoencoder(ldm_workdir, ae_workdir, tmp_path,
                                                        capsys):
    from ldm_jax.cli import extract as extract_cli
    np.save(tmp_path / "v.npy", np.zeros((16, 16, 8), np.float32))
    assert extract_cli.main(["x", f"--workdir={ldm_workdir}", f"--input={tmp_path}/v.npy",
                             f"--output={tmp_path / 'o'}", "--noprogress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a stage-2 (diffusion) run; this command reads a " \
        f"stage-1 (autoencoder) run's workdir: this run's autoencoder is --workdir " \
        f"{ae_workdir}" in err and "not written by" not in err
