"""extract / reconstruct / decode and load_autoencoder on a tiny checkpoint trained 2 steps."""

import json
import os
import shutil

import jax
import ml_collections
import nibabel as nib
import numpy as np
import pytest

import ldm_jax
from ldm_jax.autoencoder.inference import latent_affine, model_config_hash
from ldm_jax.cli import decode as decode_cli
from ldm_jax.cli import extract as extract_cli
from ldm_jax.cli import reconstruct as reconstruct_cli
from ldm_jax.data import load_volume
from ldm_jax.data.synthetic.filaments import render_filaments
from ldm_jax.errors import (
    ChannelMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    OutputDirError,
)
from tests.tiny import tiny_config

FACTOR = (2, 2, 2)  # tiny_config: stem 1, one level factor 2


@pytest.fixture(scope="module")
def workdir(tiny_run, tmp_path_factory):
    """The session's tiny run as it was after 2 steps (its step-4 checkpoint removed)."""
    wd = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(tiny_run.workdir, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    return str(wd)


@pytest.fixture(scope="module")
def ae(workdir):
    return ldm_jax.load_autoencoder(workdir, "latest")


def _filaments(shape, seed):
    return render_filaments(shape, seed=seed, index=0, num_filaments=(6, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Twice the training patch (NIfTI), an odd size (NIfTI) and the patch size (.npy)."""
    d = tmp_path_factory.mktemp("vols")
    aff = np.array([[0.5, 0, 0, 10.0], [0, 0.75, 0, -4.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(_filaments((32, 32, 16), 1), aff), str(d / "big.nii.gz"))
    nib.save(nib.Nifti1Image(_filaments((17, 15, 9), 2), aff), str(d / "odd.nii.gz"))
    np.save(d / "small.npy", _filaments((16, 16, 8), 3))
    return {"dir": str(d), "affine": aff,
            "shapes": {"big": (32, 32, 16), "odd": (17, 15, 9), "small": (16, 16, 8)}}


def _run(module, *args):
    return module.main(["prog", *args, "--progress=false"])


@pytest.fixture(scope="module")
def extracted(workdir, volumes, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    assert _run(extract_cli, f"--workdir={workdir}", f"--input={volumes['dir']}",
                f"--output={out}", "--format=both", "--step=latest") == 0
    return out


def test_extract_writes_latents_with_scaled_affines(extracted, volumes, ae):
    for name, shape in volumes["shapes"].items():
        want = tuple(-(-s // f) for s, f in zip(shape, FACTOR)) + (2,)
        z = np.load(os.path.join(extracted, name + ".npy"))
        assert z.shape == want and z.dtype == np.float32
        img = nib.load(os.path.join(extracted, name + ".nii.gz"))
        assert img.shape == want
        np.testing.assert_allclose(np.asarray(img.dataobj), z)
        if name != "small":  # .npy inputs have no affine
            np.testing.assert_allclose(img.affine, latent_affine(volumes["affine"], FACTOR),
                                       atol=1e-6)
            np.testing.assert_allclose(img.header.get_zooms()[:3], [1.0, 1.5, 4.0])
        # The CLI computes exactly what the API computes.
        vol, _ = load_volume(os.path.join(volumes["dir"], name + (
            ".npy" if name == "small" else ".nii.gz")), ae.config)
        np.testing.assert_allclose(z, ae.encode_volume(vol), atol=1e-5)


def test_latents_json_statistics_match_numpy(extracted, volumes, workdir, ae):
    meta = json.load(open(os.path.join(extracted, "latents.json")))
    zs = [np.load(os.path.join(extracted, n + ".npy")) for n in sorted(volumes["shapes"])]
    flat = np.concatenate([z.reshape(-1, 2) for z in zs]).astype(np.float64)
    np.testing.assert_allclose(meta["mean"], flat.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(meta["std"], flat.std(0), rtol=1e-6)
    assert meta["scale_factor"] == pytest.approx(1.0 / flat.std(), rel=1e-6)
    np.testing.assert_allclose(meta["scale_factor_per_channel"], 1.0 / flat.std(0), rtol=1e-6)
    assert meta["checkpoint"]["step"] == 2 and meta["num_files"] == 3
    assert meta["checkpoint"]["config_hash"] == model_config_hash(ae.config)
    odd = meta["files"]["odd"]
    assert odd["input_shape"] == [17, 15, 9] and odd["padded_shape"] == [18, 16, 10]
    assert odd["latent_shape"] == [9, 8, 5, 2]
    # By default each volume goes through in one pass when it fits the memory budget.
    assert all(f["windows"] == 1 for f in meta["files"].values())


def test_decode_and_reconstruct_round_trip(extracted, volumes, workdir, ae, tmp_path):
    dec, rec = str(tmp_path / "dec"), str(tmp_path / "rec")
    assert _run(decode_cli, f"--workdir={workdir}", f"--input={extracted}",
                f"--output={dec}", "--step=latest") == 0
    assert _run(reconstruct_cli, f"--workdir={workdir}", f"--input={volumes['dir']}",
                f"--output={rec}", "--step=latest") == 0
    metrics = json.load(open(os.path.join(rec, "metrics.json")))
    for name, shape in volumes["shapes"].items():
        d = nib.load(os.path.join(dec, name + ".nii.gz"))
        r = nib.load(os.path.join(rec, name + ".nii.gz"))
        assert d.shape == r.shape == shape  # padded sizes cropped back
        if name != "small":
            np.testing.assert_allclose(d.affine, volumes["affine"], atol=1e-6)
            np.testing.assert_allclose(r.affine, volumes["affine"], atol=1e-6)
        # latents -> volume == volume -> volume
        np.testing.assert_allclose(np.asarray(d.dataobj), np.asarray(r.dataobj), atol=1e-4)
        assert os.path.getsize(os.path.join(rec, name + ".png")) > 0
        x, _ = load_volume(os.path.join(volumes["dir"], name + (
            ".npy" if name == "small" else ".nii.gz")), ae.config)
        mse = np.mean((np.asarray(r.dataobj)[..., None] - x) ** 2)
        assert metrics["files"][name]["psnr"] == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-4)
        assert -1.0 <= metrics["files"][name]["ssim"] <= 1.0


def test_decode_unscale_undoes_scale_factor(extracted, workdir, tmp_path):
    meta = json.load(open(os.path.join(extracted, "latents.json")))
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    shutil.copy(os.path.join(extracted, "latents.json"), scaled / "latents.json")
    z = np.load(os.path.join(extracted, "odd.npy"))
    np.save(scaled / "odd.npy", z * meta["scale_factor"])  # what the diffusion stage sees
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [f"--workdir={workdir}", "--step=latest", "--format=npy"]
    assert _run(decode_cli, *common, f"--input={scaled}", f"--output={out_a}", "--unscale") == 0
    assert _run(decode_cli, *common, f"--input={extracted}/odd.npy", f"--output={out_b}") == 0
    a, b = np.load(os.path.join(out_a, "odd.npy")), np.load(os.path.join(out_b, "odd.npy"))
    assert a.shape == (17, 15, 9, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_decode_says_when_latents_json_has_no_entry(extracted, workdir, tmp_path, capsys):
    meta = json.load(open(os.path.join(extracted, "latents.json")))
    del meta["files"]["small"]
    d = tmp_path / "lat"
    d.mkdir()
    json.dump(meta, open(d / "latents.json", "w"))
    shutil.copy(os.path.join(extracted, "small.npy"), d / "small.npy")
    capsys.readouterr()
    assert _run(decode_cli, f"--workdir={workdir}", f"--input={d}", "--step=latest",
                f"--output={tmp_path / 'out'}") == 0
    assert ("note: small has no entry in latents.json and a .npy latent has no affine: "
            "identity affine") in capsys.readouterr().out
    np.testing.assert_array_equal(nib.load(tmp_path / "out" / "small.nii.gz").affine, np.eye(4))


def test_sliding_window_on_twice_the_patch(ae):
    """Latents of a 32x32x16 volume from 16x16x8 windows vs one whole-volume pass.

    Tolerance: correlation >= 0.5 and mean |diff| <= 1.0 std away from the border (one
    latent voxel). Not tighter because the model is not local: its receptive field is
    larger than the 16x16x8 window and GroupNorm statistics are per window (measured on
    2-step checkpoints: correlation 0.73-0.79, mean |diff| 0.66-0.71 std). Placement and
    blending are checked tightly with local models in tests/autoencoder/test_sliding.py.
    """
    x = (_filaments((32, 32, 16), 7) / 255.0)[..., None]
    lay = ae.layout(x.shape, window="training")
    assert lay.window == (16, 16, 8) and lay.num_windows == 27
    z_whole = ae.encode_volume(x, window="whole")
    z = ae.encode_volume(x, window="training", windows_per_batch=4)
    inner = (slice(1, -1),) * 3
    assert np.corrcoef(z[inner].ravel(), z_whole[inner].ravel())[0, 1] >= 0.5
    assert np.abs(z - z_whole)[inner].mean() <= 1.0 * z_whole.std()
    r = ae.decode_volume(z, window="training")  # sliding: latent 16x8x8 > window 8x8x4
    r_whole = ae.decode_volume(z, window="whole")
    assert r.shape == x.shape
    assert np.corrcoef(r.ravel(), r_whole.ravel())[0, 1] >= 0.5


def test_rerun_reuses_refuses_a_changed_file_and_overwrite_replaces(workdir, volumes,
                                                                   tmp_path, capsys):
    out = str(tmp_path / "lat")
    args = [f"--workdir={workdir}", f"--input={volumes['dir']}/small.npy", f"--output={out}",
            "--step=latest"]
    assert _run(extract_cli, *args) == 0
    path = os.path.join(out, "small.npy")
    fresh = np.load(path)
    capsys.readouterr()
    assert _run(extract_cli, *args) == 0  # same model, options and input: reused
    assert "reused 1 complete" in capsys.readouterr().out
    np.save(path, np.zeros_like(fresh))  # changed since it was written: not ours any more
    assert _run(extract_cli, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not record in provenance.jsonl, or that changed " \
        "since (e.g. small.npy)" in err and "--overwrite" in err
    assert not np.load(path).any()  # refused: left as it was
    assert _run(extract_cli, *args, "--overwrite") == 0
    np.testing.assert_allclose(np.load(path), fresh)
    meta = json.load(open(os.path.join(out, "latents.json")))
    flat = fresh.reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(meta["mean"], flat.mean(0), rtol=1e-6)


def test_sample_is_seeded_and_differs_from_mu(ae):
    x = (_filaments((16, 16, 8), 4) / 255.0)[..., None]
    mu = ae.encode_volume(x)
    a = ae.encode_volume(x, sample=True, key=jax.random.PRNGKey(3))
    b = ae.encode_volume(x, sample=True, key=jax.random.PRNGKey(3))
    c = ae.encode_volume(x, sample=True, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - mu).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_load_autoencoder_api(workdir):
    from ldm_jax.models import AutoencoderKL
    ae = ldm_jax.load_autoencoder(workdir)  # step="best"
    assert ae.step == 2 and ae.factor == FACTOR and ae.window == "auto"
    assert ldm_jax.load_autoencoder(workdir, window="training").window == (16, 16, 8)
    assert isinstance(ae.model, AutoencoderKL) and ae.model.downsample_factors == (2,)
    assert ae.config.autoencoder.num_channels == [8, 16]
    mu, sigma = ae.encode(np.zeros((1, 16, 16, 8, 1), np.float32))
    assert mu.shape == sigma.shape == (1, 8, 8, 4, 2) and (np.asarray(sigma) > 0).all()
    assert ae.decode(mu).shape == (1, 16, 16, 8, 1)
    assert jax.tree.leaves(ae.params)[0].dtype == np.float32


# ------------------------------------------------------------------ bad input


def test_workdir_without_checkpoints(tmp_path, volumes, capsys):
    with pytest.raises(CheckpointNotFoundError, match="has no 'checkpoints' folder"):
        ldm_jax.load_autoencoder(tmp_path)
    assert _run(extract_cli, f"--workdir={tmp_path / 'nope'}", f"--input={volumes['dir']}",
                f"--output={tmp_path / 'o'}") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing created for a run that cannot start


def test_missing_step_lists_saved_steps(workdir):
    with pytest.raises(CheckpointNotFoundError, match="saved steps: 2"):
        ldm_jax.load_autoencoder(workdir, step=7)


def test_channel_mismatch(ae, volumes, tmp_path, capsys):
    with pytest.raises(ChannelMismatchError, match="in_channels is 1"):
        ae.encode_volume(np.zeros((16, 16, 8, 2), np.float32))
    with pytest.raises(ChannelMismatchError, match="latent_channels is 2"):
        ae.decode_volume(np.zeros((8, 8, 4, 3), np.float32))
    d = tmp_path / "two"
    d.mkdir()
    np.save(d / "two.npy", np.zeros((16, 16, 8, 2), np.float32))
    assert _run(extract_cli, f"--workdir={ae.workdir}", f"--input={d}",
                f"--output={tmp_path / 'o'}", "--step=latest") == 2
    err = capsys.readouterr().err
    assert "the model takes 1 channel" in err and "--frame=K" in err


def test_output_dir_errors(workdir, volumes, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="Cannot create"):
        extract_cli.extract(workdir, volumes["dir"], str(blocker / "sub"), progress=False)
    with pytest.raises(OutputDirError, match="directory of the input files"):
        extract_cli.extract(workdir, volumes["dir"], volumes["dir"], progress=False)
    assert sorted(os.listdir(volumes["dir"])) == ["big.nii.gz", "odd.nii.gz", "small.npy"]


def test_unreadable_volume_is_an_error_or_skipped(workdir, volumes, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(os.path.join(volumes["dir"], "small.npy"), d / "small.npy")
    (d / "broken.nii.gz").write_bytes(b"not a nifti")
    args = [f"--workdir={workdir}", f"--input={d}", "--step=latest"]
    assert _run(extract_cli, *args, f"--output={tmp_path / 'a'}") == 2
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "--skip_bad_files" in err
    assert _run(extract_cli, *args, f"--output={tmp_path / 'b'}", "--skip-bad-files") == 0
    meta = json.load(open(tmp_path / "b" / "latents.json"))
    assert meta["num_files"] == 1 and len(meta["skipped_bad_files"]) == 1
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_config_that_differs_from_the_checkpoint(workdir, tmp_path):
    other = tiny_config()
    other.autoencoder.latent_channels = 4
    other.data.a_max = 100.0
    with pytest.raises(ConfigError) as e:
        ldm_jax.load_autoencoder(workdir, config=other)
    assert "autoencoder.latent_channels: checkpoint 2 vs --config 4" in str(e.value)
    assert "data.a_max: checkpoint 255.0 vs --config 100.0" in str(e.value)
    same = ml_collections.ConfigDict(tiny_config().to_dict())
    assert ldm_jax.load_autoencoder(workdir, config=same).step == 2


def test_non_finite_latent_is_an_error_and_nothing_is_written(workdir, volumes, tmp_path,
                                                              capsys, monkeypatch):
    from ldm_jax.autoencoder.inference import Autoencoder
    monkeypatch.setattr(Autoencoder, "encode_volume",
                        lambda self, vol, **kw: np.full((8, 8, 4, 2), np.nan, np.float32))
    out = str(tmp_path / "lat")
    assert _run(extract_cli, f"--workdir={workdir}", f"--input={volumes['dir']}/small.npy",
                f"--output={out}", "--step=latest") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "small.npy: its latent from checkpoint step 2" in err
    assert "holds NaN or Inf values" in err and "--dtype float32" in err
    assert not os.path.exists(os.path.join(out, "small.npy"))


def test_a_second_writer_into_the_same_output_is_refused(workdir, volumes, tmp_path, capsys):
    from ldm_jax import lock
    from ldm_jax import outputs as vf
    out = tmp_path / "lat"
    out.mkdir()
    held = lock.acquire(str(out), "output folder", name=vf.LOCK)  # another run's
    try:
        assert _run(extract_cli, f"--workdir={workdir}", f"--input={volumes['dir']}",
                    f"--output={out}", "--step=latest") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out} is in use by process {os.getpid()}" in err
    finally:
        held.release()
    assert os.listdir(out) == []
