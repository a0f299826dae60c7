"""`ldm-jax edit` end to end on a tiny trained stage-2 run: inpaint (box and mask file),
sdedit, likelihood; reruns complete, other settings are refused, bad flags are one line."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ldm_jax.cli import edit as edit_cli


@pytest.fixture(scope="module")
def ldm_workdir(ae_workdir, latents_dir, tmp_path_factory):
    from ldm_jax.cli.train import make_task
    from ldm_jax.trainer import loop as trainer
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    wd = str(tmp_path_factory.mktemp("ldm_edit"))
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    trainer.train(make_task(c), wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from ldm_jax.data.synthetic.filaments import render_filaments
    d = tmp_path_factory.mktemp("edit_in")
    for i in range(3):
        v = render_filaments((16, 16, 8), seed=4, index=i, num_filaments=(2, 4))
        nib.save(nib.Nifti1Image(v.astype(np.float32), np.eye(4)), str(d / f"v{i}.nii.gz"))
    return str(d)


def _run(wd, inputs, out, *extra):
    return edit_cli.main(["x", f"--workdir={wd}", f"--input={inputs}", f"--output={out}",
                          "--noprogress", "--num_inference_steps=3", "--batch_size=2", *extra])


def test_inpaint_sdedit_likelihood(ldm_workdir, inputs, tmp_path):
    out = str(tmp_path / "inp")
    args = ("--mode=inpaint", "--box=4:12,4:12,2:6", "--jump_length=1", "--jump_n_sample=2")
    assert _run(ldm_workdir, inputs, out, *args) == 0
    with open(os.path.join(out, "edits.json")) as f:
        rec = json.load(f)
    assert sorted(rec["outputs"]) == ["v0", "v1", "v2"] and rec["jump_n_sample"] == 2
    edited = np.asarray(nib.load(os.path.join(out, "v1.nii.gz")).dataobj)
    assert edited.shape == (16, 16, 8) and np.isfinite(edited).all()
    assert os.path.exists(os.path.join(out, "latents", "v1.npy"))
    assert _run(ldm_workdir, inputs, out, *args) == 0  # complete: reused
    assert _run(ldm_workdir, inputs, out, *args, "--seed=1") == 2  # other settings: refused

    mask = np.zeros((16, 16, 8), np.float32)
    mask[2:6, 2:6, 2:6] = 1
    mpath = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), mpath)
    assert _run(ldm_workdir, inputs, str(tmp_path / "m"), "--mode=inpaint",
                f"--mask={mpath}") == 0

    assert _run(ldm_workdir, inputs, str(tmp_path / "sd"), "--mode=sdedit",
                "--strength=0.4", "--format=both") == 0
    assert os.path.exists(str(tmp_path / "sd" / "v0.npy"))

    lk = str(tmp_path / "lk")
    assert _run(ldm_workdir, inputs, lk, "--mode=likelihood") == 0
    with open(os.path.join(lk, "edits.json")) as f:
        rec = json.load(f)
    assert all(np.isfinite(r["total_kl"]) for r in rec["outputs"].values())
    kl = np.asarray(nib.load(os.path.join(lk, "v0_kl.nii.gz")).dataobj)
    assert kl.shape == (16, 16, 8) and (kl >= 0).all()

    an = str(tmp_path / "an")
    assert _run(ldm_workdir, inputs, an, "--mode=anomaly", "--num_repeats=2") == 0
    with open(os.path.join(an, "edits.json")) as f:
        rec = json.load(f)
    assert rec["strength"] == 0.5 and rec["num_repeats"] == 2
    amap = np.asarray(nib.load(os.path.join(an, "v2_anomaly.nii.gz")).dataobj)
    healthy = np.asarray(nib.load(os.path.join(an, "v2_healthy.nii.gz")).dataobj)
    import ldm_jax
    from ldm_jax.data.pointcloud import volumes as pc
    cfg = ldm_jax.load_pipeline(ldm_workdir, "best").autoencoder.config
    given = pc.load_input(os.path.join(inputs, "v2.nii.gz"), cfg)[0][..., 0]  # preprocessed
    assert amap.shape == healthy.shape == (16, 16, 8)
    np.testing.assert_allclose(amap, np.abs(healthy - given), atol=1e-5)
    np.testing.assert_allclose(rec["outputs"]["v2"]["anomaly_score"], amap.mean(), rtol=1e-5)
    assert not os.path.exists(os.path.join(an, "latents"))


@pytest.mark.parametrize("extra,msg", [
    (("--mode=inpaint",), "needs one of --mask FILE or --box"),
    (("--mode=inpaint", "--box=1:2"), "three voxel ranges"),
    (("--mode=sdedit", "--strength=2"), "--strength=2.0 must be in"),
    (("--mode=sdedit", "--box=1:2,1:2,1:2"), "--box is for --mode inpaint"),
    (("--mode=inpaint", "--box=0:16,0:16,0:8"), "covers the whole volume"),
    (("--mode=anomaly", "--num_repeats=0"), "--num_repeats=0 must be >= 1"),
    (("--mode=sdedit", "--num_repeats=2"), "--num_repeats is for --mode anomaly"),
    (("--mode=likelihood", "--strength=0.5"), "--strength is for --mode sdedit or anomaly"),
    (("--mode=sdedit", "--patch=4"), "--patch is for --mode anomaly"),
    (("--mode=anomaly", "--stride=4"), "are for an inpainting model's anomaly map"),
])
def test_bad_flags_are_one_line_and_write_nothing(ldm_workdir, inputs, tmp_path, capsys,
                                                  extra, msg):
    out = str(tmp_path / "bad")
    assert _run(ldm_workdir, inputs, out, *extra) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def inpaint_workdir(ae_workdir, tmp_path_factory):
    """A tiny inpainting UNet (conditioning.aligned="inpainting"), 2 steps on the fly."""
    from ldm_jax.cli.train import make_task
    from ldm_jax.trainer import loop as trainer
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    wd = str(tmp_path_factory.mktemp("inpaint_edit"))
    c = tiny_diffusion_config(ae_workdir)
    c.conditioning.aligned = "inpainting"
    c.train.num_steps, c.eval.num_samples = 2, 0
    trainer.train(make_task(c), wd, progress=False)
    return wd


def test_an_inpainting_unet_inpaints_and_maps_anomalies(inpaint_workdir, inputs, tmp_path,
                                                         capsys):
    """--mode inpaint builds its condition from the inputs and the box (no --condition);
    --mode anomaly inpaints boxes (--patch, --stride); --strength and the likelihood map
    are refused in one line."""
    import ldm_jax
    from ldm_jax.data.pointcloud import volumes as pc
    out = str(tmp_path / "filled")
    assert _run(inpaint_workdir, inputs, out, "--mode=inpaint", "--box=4:12,4:12,2:6") == 0
    cfg = ldm_jax.load_pipeline(inpaint_workdir, "best").autoencoder.config
    given = pc.load_input(os.path.join(inputs, "v0.nii.gz"), cfg)[0][..., 0]
    filled = nib.load(os.path.join(out, "v0.nii.gz")).get_fdata()
    hole = np.zeros(given.shape, bool)
    hole[4:12, 4:12, 2:6] = True
    assert np.abs(filled - given)[~hole].max() < 1e-6 and np.abs(filled - given)[hole].max() > 0
    mean = str(tmp_path / "mean")
    assert _run(inpaint_workdir, inputs, mean, "--mode=inpaint", "--box=4:12,4:12,2:6",
                "--num_repeats=2") == 0
    averaged = nib.load(os.path.join(mean, "v0.nii.gz")).get_fdata()
    assert np.abs(averaged - given)[~hole].max() < 1e-6
    assert np.abs(averaged - filled)[hole].max() > 0
    an = str(tmp_path / "maps")
    assert _run(inpaint_workdir, inputs, an, "--mode=anomaly", "--patch=4", "--stride=4") == 0
    with open(os.path.join(an, "edits.json")) as f:
        rec = json.load(f)
    assert rec["method"] == "patched inpainting" and rec["patch"] == 4 and "strength" not in rec
    amap = nib.load(os.path.join(an, "v0_anomaly.nii.gz")).get_fdata()
    healthy = nib.load(os.path.join(an, "v0_healthy.nii.gz")).get_fdata()
    np.testing.assert_allclose(amap, np.abs(healthy - given), atol=1e-5)
    for extra, msg in ((("--mode=anomaly", "--strength=0.5"), "no --strength; drop it"),
                       (("--mode=likelihood",), "likelihood maps take an unconditioned"),
                       (("--mode=anomaly", "--patch=8"), "smaller than the volume")):
        bad = str(tmp_path / "bad")
        assert _run(inpaint_workdir, inputs, bad, *extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and not os.path.exists(bad)
