"""Training a ControlNet on a frozen tiny stage-2 UNet, sampling it with --condition, and
the refusals of both (tiny: 16x16x8 volumes, a 1-level UNet, 2-3 steps)."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.cli import edit as edit_cli
from ldm_jax.cli import sample as sample_cli
from ldm_jax.cli.train import make_task
from ldm_jax.errors import ConfigError
from tests.diffusion.test_diffusion import tiny_diffusion_config


def controlnet_config(ae_workdir, unet_workdir, latents_dir=None):
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.controlnet.unet_workdir = unet_workdir
    c.controlnet.unet_step = "latest"
    c.controlnet.conditioning_embedding_num_channels = (4, 8)  # 2x the latent: the volume
    c.train.num_steps, c.train.eval_every_steps, c.train.save_every_steps = 3, 3, 1
    c.eval.num_samples = 1
    return c


@pytest.fixture(scope="module")
def unet_workdir(ae_workdir, latents_dir, tmp_path_factory):
    """A 2-step stage-2 run (its UNet is what the ControlNet steers)."""
    from ldm_jax.trainer import loop as trainer
    wd = str(tmp_path_factory.mktemp("cn_unet"))
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.train.num_steps, c.eval.num_samples = 2, 0
    trainer.train(make_task(c), wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def cn_run(ae_workdir, unet_workdir, tmp_path_factory):
    """(workdir, task, final state) of a 3-step ControlNet run (foreground masks, on the
    fly)."""
    from ldm_jax.trainer import loop as trainer
    wd = str(tmp_path_factory.mktemp("cn"))
    task = make_task(controlnet_config(ae_workdir, unet_workdir))
    state = trainer.train(task, wd, progress=False)
    return wd, task, state


def _json(path):
    with open(path) as f:
        return json.load(f)


def _unet_ema(workdir):
    from ldm_jax import checkpoint as ckpt
    return ckpt.open_step(workdir, "latest", item="ema_params", stage="diffusion",
                          best_metric="val_loss")[2]


def test_controlnet_trains_only_the_controlnet(cn_run, unet_workdir):
    from ldm_jax.diffusion.controlnet_task import ControlNetTask

    wd, task, state = cn_run
    assert isinstance(task, ControlNetTask) and int(state.step) == 3
    assert int(state.skipped_steps) == 0
    # The frozen UNet: the task's constant is the UNet run's EMA params, bit for bit.
    for a, b in zip(jax.tree.leaves(task.unet_params), jax.tree.leaves(_unet_ema(unet_workdir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    init = jax.device_get(task.init_state(jax.random.PRNGKey(0)).params)
    # MONAI's initialisation: the shared encoder is the UNet's, the zero convs are zero.
    for a, b in zip(jax.tree.leaves(init["conv_in"]), jax.tree.leaves(task.unet_params["conv_in"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    zero = [k for k in init if k.startswith("controlnet_down_blocks")]
    assert zero and all(not np.any(np.asarray(x)) for k in zero
                        for x in jax.tree.leaves(init[k]))
    trained = jax.device_get(state.params)
    # Training moved the ControlNet: its zero convs are no longer zero.
    assert any(np.any(np.asarray(x)) for k in zero for x in jax.tree.leaves(trained[k]))
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in rows)
    assert os.path.exists(os.path.join(wd, "images", "step_3.png"))


def test_controlnet_resume_is_exact(cn_run, tmp_path):
    from ldm_jax.trainer import loop as trainer

    _, task, straight = cn_run
    n, ev = task.config.train.num_steps, task.config.eval.num_samples
    try:
        task.config.eval.num_samples = 0
        task.config.train.num_steps = 2
        trainer.train(task, str(tmp_path / "b"), progress=False)
        task.config.train.num_steps = 3
        resumed = trainer.train(task, str(tmp_path / "b"), progress=False)
    finally:
        task.config.train.num_steps, task.config.eval.num_samples = n, ev
    assert int(resumed.step) == 3
    for a, b in zip(jax.tree.leaves(straight.ema_params), jax.tree.leaves(resumed.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_pipeline_of_a_controlnet_run(cn_run, unet_workdir):
    import ldm_jax
    wd = cn_run[0]
    pipe = ldm_jax.load_pipeline(wd, "latest")
    assert pipe.controlnet is not None and pipe.condition_grid() == (16, 16, 8)
    assert pipe.unet_checkpoint == {"workdir": os.path.abspath(unet_workdir), "step": 2}
    for a, b in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(_unet_ema(unet_workdir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mask = np.zeros((16, 16, 8), np.float32)
    mask[4:12, 4:12, 2:6] = 1
    a = pipe.sample(1, jax.random.PRNGKey(0), steps=2, condition=mask)
    b = pipe.sample(1, jax.random.PRNGKey(0), steps=2, condition=mask)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="steered by a ControlNet"):
        pipe.sample(1, jax.random.PRNGKey(0), steps=2)
    with pytest.raises(ConfigError, match="the condition has shape"):
        pipe.sample(1, jax.random.PRNGKey(0), steps=2, condition=np.zeros((8, 8, 8)))


def _write_conditions(folder, n):
    import nibabel as nib
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        m = np.zeros((16, 16, 8), np.uint8)
        m[2 + i:10 + i, 4:12, 2:6] = 1
        nib.save(nib.Nifti1Image(m, np.eye(4)), os.path.join(folder, f"mask_{i}.nii.gz"))


def test_sample_condition_end_to_end(cn_run, tmp_path):
    from ldm_jax.diffusion.condition import sha256
    wd = cn_run[0]
    conds = str(tmp_path / "conds")
    _write_conditions(conds, 2)
    out = str(tmp_path / "s")
    args = ["x", f"--workdir={wd}", "--step=latest", f"--output={out}", "--num_samples=2",
            "--num_inference_steps=2", "--noprogress", f"--condition={conds}"]
    assert sample_cli.main(args) == 0
    rec = _json(os.path.join(out, "samples.json"))
    files = [os.path.join(conds, f"mask_{i}.nii.gz") for i in range(2)]
    assert rec["condition_files"] == files
    assert rec["condition_sha256"] == [sha256(f) for f in files]
    assert os.path.exists(os.path.join(out, "samples.png"))
    one = str(tmp_path / "one")  # one file for all samples, and .npy
    np.save(str(tmp_path / "m.npy"), np.ones((16, 16, 8, 1), np.float32))
    assert sample_cli.main(args[:3] + [f"--output={one}", "--num_samples=1",
                                       "--num_inference_steps=2", "--noprogress",
                                       f"--condition={tmp_path / 'm.npy'}"]) == 0
    v_dir = np.load(os.path.join(out, "latents", "sample_0000.npy"))
    v_one = np.load(os.path.join(one, "latents", "sample_0000.npy"))
    assert np.abs(v_dir - v_one).max() > 0  # the condition steers the sample


def test_condition_refusals(cn_run, unet_workdir, tmp_path, capsys):
    wd = cn_run[0]
    conds = str(tmp_path / "conds")
    _write_conditions(conds, 1)
    np.save(str(tmp_path / "bad.npy"), np.ones((12, 16, 8), np.float32))
    np.save(str(tmp_path / "two.npy"), np.ones((16, 16, 8, 2), np.float32))
    cases = [
        (wd, None, "steered by a ControlNet"),
        (wd, conds, "holds 1 condition file"),
        (wd, str(tmp_path / "bad.npy"), "(16, 16, 8)"),
        (wd, str(tmp_path / "two.npy"), "has 2 channel"),
        (wd, str(tmp_path / "missing.npy"), "neither a condition file"),
        (unet_workdir, str(tmp_path / "bad.npy"), "takes no condition"),
    ]
    for workdir, cond, msg in cases:
        out = str(tmp_path / "refused")
        args = ["x", f"--workdir={workdir}", "--step=latest", f"--output={out}",
                "--num_samples=2", "--num_inference_steps=2", "--noprogress"]
        capsys.readouterr()
        assert sample_cli.main(args + ([f"--condition={cond}"] if cond else [])) == 2, msg
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
        assert not os.path.exists(out), msg


def test_edit_with_condition(cn_run, tmp_path):
    import nibabel as nib

    from ldm_jax.data.synthetic.filaments import render_filaments
    wd = cn_run[0]
    ins, conds = tmp_path / "in", tmp_path / "c"
    ins.mkdir(), conds.mkdir()
    v = render_filaments((16, 16, 8), seed=5, index=0, num_filaments=(2, 4)) / 255.0
    nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), str(ins / "v0.nii.gz"))
    nib.save(nib.Nifti1Image((v > 0.1).astype(np.uint8), np.eye(4)), str(conds / "v0.nii.gz"))
    base = ["x", f"--workdir={wd}", "--step=latest", f"--input={ins}", "--mode=sdedit",
            "--strength=0.5", "--num_inference_steps=2", "--noprogress"]
    out = str(tmp_path / "e")
    assert edit_cli.main(base + [f"--output={out}", f"--condition={conds}"]) == 0
    rec = _json(os.path.join(out, "edits.json"))
    assert rec["condition"] == str(conds) and os.path.exists(os.path.join(out, "v0.nii.gz"))
    assert edit_cli.main(base + [f"--output={tmp_path / 'r'}"]) == 2  # no condition
    assert not os.path.exists(tmp_path / "r")


def test_config_refusals(ae_workdir, unet_workdir, latents_dir):
    from ldm_jax.diffusion.config import prepare_config
    c = controlnet_config(ae_workdir, unet_workdir, latents_dir)
    with pytest.raises(ConfigError, match="extracted latents .latents.dir. do not carry"):
        prepare_config(c)
    c = controlnet_config(ae_workdir, unet_workdir)
    c.controlnet.condition.kind = "files"
    c.controlnet.condition.dir = "/nowhere"
    with pytest.raises(ConfigError, match="needs latents.dir"):
        prepare_config(c)
    c.controlnet.unet_workdir = None  # switched off: the same config is a plain stage 2
    prepare_config(c)
    from configs.diffusion import controlnet_4x
    c = prepare_config(controlnet_4x.get_config())  # the shipped config passes its checks
    assert c.controlnet.unet_workdir == "runs/ldm" and not c.latents.dir


def test_paired_condition_files_train(ae_workdir, unet_workdir, latents_dir, tmp_path):
    from ldm_jax.data.latents import read_latent_folder
    from ldm_jax.errors import DataError
    from ldm_jax.trainer import loop as trainer
    names = read_latent_folder(latents_dir)[0]
    c = controlnet_config(ae_workdir, unet_workdir, latents_dir)
    c.controlnet.condition.kind = "files"
    c.controlnet.condition.dir = str(tmp_path / "conds")
    os.makedirs(c.controlnet.condition.dir)
    for i, n in enumerate(names[1:]):  # the first is missing: refused, named
        np.save(os.path.join(c.controlnet.condition.dir, n + ".npy"),
                np.full((16, 16, 8), i % 2, np.float32))
    with pytest.raises(DataError, match=f"e.g. {names[0]}"):
        make_task(c)
    np.save(os.path.join(c.controlnet.condition.dir, names[0] + ".npy"),
            np.zeros((8, 8, 4, 1), np.float32))  # the condition grid's coarser twin: refused
    with pytest.raises(DataError, match="has shape"):
        make_task(c)
    np.save(os.path.join(c.controlnet.condition.dir, names[0] + ".npy"),
            np.zeros((16, 16, 8), np.float32))
    c.train.num_steps, c.eval.num_samples = 2, 0
    task = make_task(c)
    assert task.train_conditions.shape[1:] == (16, 16, 8, 1)
    state = trainer.train(task, str(tmp_path / "wd"), progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0


def test_editing_benchmark_pairs_controlnet_and_plain(cn_run, unet_workdir, tmp_path):
    """benchmarks/editing.py at a tiny size: runs, pairs the two models, scores in [0, 1]
    (no quality claim: the ControlNet here trained 3 steps)."""
    from benchmarks import editing
    out = editing.main(["--controlnet_workdir", cn_run[0], "--step", "latest", "--num", "2",
                        "--steps", "2", "--out", str(tmp_path)])
    assert out["unet_checkpoint"]["workdir"] == os.path.abspath(unet_workdir)
    assert len(out["rows"]) == 2 and 0 <= out["controlnet_wins"] <= 2
    assert all(0.0 <= r[k] <= 1.0 for r in out["rows"] for k in ("dice_controlnet", "dice_plain"))
    assert all(r["foreground"] > 0 for r in out["rows"])  # the masks are not empty
    assert _json(str(tmp_path / "editing_controlnet.json"))["rows"] == out["rows"]
    assert editing.dice(np.ones((2, 2, 2, 1)), np.ones((2, 2, 2, 1)), 0.5) == 1.0
    assert editing.dice(np.ones((2, 2, 2)), np.zeros((2, 2, 2)), 0.5) == 0.0


def test_inpainting_controlnet_trains_and_fills_from_the_mask(ae_workdir, unet_workdir,
                                                             tmp_path):
    """kind 'inpainting': 2-channel conditions built in the step (random boxes), the
    validation condition blanks the centre box, and `edit --mode inpaint` on the run
    builds the condition from the input and --box (no --condition), keeping the voxels
    outside the box exactly."""
    import nibabel as nib

    from ldm_jax.data.synthetic.filaments import render_filaments
    from ldm_jax.trainer import loop as trainer
    c = controlnet_config(ae_workdir, unet_workdir)
    c.controlnet.condition.kind = "inpainting"
    with pytest.raises(ConfigError, match="conditioning_embedding_in_channels=2"):
        make_task(c)
    c.controlnet.conditioning_embedding_in_channels = 2
    c.train.num_steps, c.eval.num_samples = 2, 0
    task = make_task(c)
    task._val_latents()  # validation volumes and their conditions, built once
    vc = task.val_conditions
    assert vc.shape[1:] == (16, 16, 8, 2)
    hole = vc[..., 1]
    assert hole[:, 4:12, 4:12, 2:6].min() == 1 and hole.sum() == len(vc) * 8 * 8 * 4
    assert np.all(vc[..., 0][hole == 1] == 0)  # the truth in the hole is not an input
    wd = str(tmp_path / "wd")
    state = trainer.train(task, wd, progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    ins = tmp_path / "in"
    ins.mkdir()
    v = render_filaments((16, 16, 8), seed=5, index=0, num_filaments=(2, 4)) / 255.0
    nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), str(ins / "v0.nii.gz"))
    out = str(tmp_path / "e")
    assert edit_cli.main(["x", f"--workdir={wd}", "--step=latest", f"--input={ins}",
                          "--mode=inpaint", "--box=4:12,4:12,2:6", "--jump_n_sample=1",
                          "--num_inference_steps=2", f"--output={out}", "--noprogress"]) == 0
    from ldm_jax.data.pointcloud import volumes as pc
    seen = pc.load_input(str(ins / "v0.nii.gz"), task.ae.config)[0]  # preprocessed input
    got = np.asarray(nib.load(os.path.join(out, "v0.nii.gz")).dataobj).reshape(seen.shape)
    keep = np.ones(seen.shape, bool)
    keep[4:12, 4:12, 2:6] = False
    np.testing.assert_array_equal(got[keep], seen[keep])
    assert not np.array_equal(got[~keep], seen[~keep])  # the box was filled
    assert _json(os.path.join(out, "edits.json"))["condition"] is None


def test_controlnet_encodes_as_its_unet_saw_latents(tmp_path):
    """On the fly a ControlNet encodes latents as its UNet's run did: that run's
    latents.encode, or an extracted folder's encoding (the mean when unrecorded)."""
    import ml_collections

    from ldm_jax.diffusion.controlnet_task import adopt_unet_run, unet_encoding
    assert unet_encoding({"encode": "sample"}) == "sample"
    assert unet_encoding({"encode": "mu"}) == "mu"
    assert unet_encoding({"dir": str(tmp_path / "none")}) == "mu"
    with open(tmp_path / "latents.json", "w") as f:
        json.dump({"encoding": {"mode": "sample"}}, f)
    assert unet_encoding({"dir": str(tmp_path), "encode": "mu"}) == "sample"
    c = ml_collections.ConfigDict({"latents": {"encode": "sample"}})
    adopt_unet_run(c, {"latents": {"dir": str(tmp_path / "none"), "scale_factor": 1.5}})
    assert c.latents.encode == "mu" and c.latents.scale_factor == 1.5


def test_a_controlnet_run_on_another_encoding_resumes(cn_run):
    """latents.encode is adopted from the UNet's run, so a ControlNet run saved with
    another encoding resumes (the change is listed, not refused)."""
    from ldm_jax.trainer.resume import resume_changes
    task = cn_run[1]
    saved = json.loads(task.config.to_json())
    saved["latents"]["encode"] = "sample" if task.config.latents.encode == "mu" else "mu"
    refused, accepted = resume_changes(task, saved)
    assert not refused and [k for k, _, _ in accepted] == ["latents.encode"]
