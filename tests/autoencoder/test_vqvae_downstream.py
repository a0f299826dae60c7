"""A VQ-VAE workdir downstream (issue 31, item 3): `ldm-jax extract` writes the continuous
pre-quantisation latents; decode, reconstruct and stage-2 sampling quantise them (nearest
vector of the checkpoint's EMA codebook) before decoding; stage 2 trains on them, from an
extracted folder or encoding on the fly."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import ldm_jax
from ldm_jax import checkpoint as ckpt
from ldm_jax.autoencoder.inference import VQAutoencoder
from ldm_jax.cli import decode as decode_cli
from ldm_jax.cli import reconstruct as reconstruct_cli
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.data import load_volume
from ldm_jax.models.vqvae import build_vqvae
from tests.autoencoder.test_vqvae_task import vq_config
from tests.diffusion.test_diffusion import tiny_diffusion_config
from tests.tiny import extract_filament_latents


@pytest.fixture(scope="module")
def vq_workdir(tmp_path_factory):
    """A tiny VQ-VAE (16x16x8 -> 4x4x2 x 4 channels, 16 codes) trained 2 steps, with
    dead-code restarts so its latents map to several codes."""
    wd = str(tmp_path_factory.mktemp("vq"))
    config = vq_config(restart_threshold=1.0)
    config.train.num_steps = 2
    train_and_evaluate(config, wd, progress=False)
    return wd


@pytest.fixture(scope="module")
def vq_latents(vq_workdir, tmp_path_factory):
    """`ldm-jax extract` of 4 filament volumes (npy) with the VQ-VAE: the latents folder."""
    return extract_filament_latents(vq_workdir, str(tmp_path_factory.mktemp("vqlat")), 4)


def _saved(workdir):
    """(model, {"params", "codebook"}, config) read straight from the checkpoint."""
    step, config, params = ckpt.open_step(workdir, "latest", item="g_params",
                                          stage="autoencoder")
    _, _, codebook = ckpt.open_step(workdir, step, item="codebook", stage="autoencoder")
    config = ml_collections.ConfigDict(config)
    return build_vqvae(config.autoencoder), {"params": params, "codebook": codebook}, config


def _quantise_decode(model, variables, z):
    """MONAI's way: model.decode(quantize(z)) (the quantizer's straight-through output)."""
    q, _, _ = model.apply(variables, z, method="quantize")
    return np.asarray(model.apply(variables, q, method="decode"))


def test_extract_writes_the_pre_quantisation_latents(vq_workdir, vq_latents):
    model, variables, config = _saved(vq_workdir)
    meta = json.load(open(os.path.join(vq_latents, "latents.json")))
    assert meta["model"]["total_factor"] == [4, 4, 4]
    assert meta["model"]["latent_channels"] == 4
    vols = os.path.join(os.path.dirname(vq_latents), "vols")
    zs = []
    for i in range(4):
        z = np.load(os.path.join(vq_latents, f"v{i}.npy"))
        assert z.shape == (4, 4, 2, 4)
        x, _ = load_volume(os.path.join(vols, f"v{i}.npy"), config)
        expected = np.asarray(model.apply({"params": variables["params"]}, x[None],
                                          method="encode"))[0]
        np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
        zs.append(z)
    zs = np.stack(zs)
    # Continuous: not the codebook vectors they quantise to.
    q, _, idx = model.apply(variables, zs, method="quantize")
    assert np.abs(np.asarray(q) - zs).max() > 1e-3
    assert len(np.unique(np.asarray(idx))) > 1  # several codes, not a collapsed codebook
    # The scale factor as for KL latents: 1 / std over every value.
    np.testing.assert_allclose(meta["scale_factor"], 1.0 / np.std(zs.astype(np.float64)),
                               rtol=1e-6)


def test_decode_quantises_then_decodes(vq_workdir, vq_latents, tmp_path):
    model, variables, _ = _saved(vq_workdir)
    out = str(tmp_path / "dec")
    assert decode_cli.main(["x", f"--workdir={vq_workdir}", f"--input={vq_latents}",
                            f"--output={out}", "--step=latest", "--format=npy",
                            "--noprogress"]) == 0
    for i in range(4):
        z = np.load(os.path.join(vq_latents, f"v{i}.npy"))
        vol = np.load(os.path.join(out, f"v{i}.npy"))
        expected = _quantise_decode(model, variables, z[None])[0]
        assert vol.shape == expected.shape == (16, 16, 8, 1)
        np.testing.assert_allclose(vol, expected, rtol=1e-5, atol=1e-5)
        unquantised = np.asarray(model.apply(variables, z[None], method="decode"))[0]
        assert np.abs(vol - unquantised).max() > 1e-4  # the quantiser was applied


def test_reconstruct_goes_through_the_quantiser(vq_workdir, vq_latents, tmp_path):
    model, variables, config = _saved(vq_workdir)
    vols = os.path.join(os.path.dirname(vq_latents), "vols")
    out = str(tmp_path / "rec")
    assert reconstruct_cli.main(["x", f"--workdir={vq_workdir}", f"--input={vols}",
                                 f"--output={out}", "--step=latest", "--noprogress"]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics["files"]) == {f"v{i}" for i in range(4)}
    assert np.isfinite(metrics["mean"]["psnr"])
    import nibabel as nib
    x, _ = load_volume(os.path.join(vols, "v0.npy"), config)
    z = model.apply({"params": variables["params"]}, x[None], method="encode")
    expected = _quantise_decode(model, variables, z)[0]
    recon = np.asarray(nib.load(os.path.join(out, "v0.nii.gz")).dataobj, np.float32)
    np.testing.assert_allclose(recon.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def _vq_diffusion_config(vq_workdir, latents_dir):
    c = tiny_diffusion_config(vq_workdir, latents_dir)
    c.unet.in_channels = c.unet.out_channels = 4  # the VQ-VAE's embedding_dim
    c.train.num_steps = c.train.eval_every_steps = c.train.save_every_steps = 2
    return c


def test_stage_2_on_vq_latents_and_sampling_decodes_through_the_quantiser(
        vq_workdir, vq_latents, tmp_path):
    model, variables, _ = _saved(vq_workdir)
    wd = str(tmp_path / "ldm")
    state = train_and_evaluate(_vq_diffusion_config(vq_workdir, vq_latents), wd,
                               progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    assert os.path.exists(os.path.join(wd, "images", "step_2.png"))  # a decoded sample
    pipe = ldm_jax.load_pipeline(wd, "latest")
    assert isinstance(pipe.autoencoder, VQAutoencoder)
    assert pipe.latent_shape == (4, 4, 2, 4)
    z = pipe.sample_latents(2, jax.random.PRNGKey(0), steps=2)
    assert z.shape == (2, 4, 4, 2, 4) and np.isfinite(z).all()
    vols = pipe.decode(z)
    np.testing.assert_allclose(vols, _quantise_decode(model, variables, z), rtol=1e-5,
                               atol=1e-5)
    assert np.abs(vols - np.asarray(model.apply(variables, z, method="decode"))).max() > 1e-4


def test_stage_2_encodes_vq_volumes_on_the_fly(vq_workdir, tmp_path):
    from ldm_jax.cli.train import make_task
    from ldm_jax.trainer import loop as trainer

    model, variables, _ = _saved(vq_workdir)
    c = _vq_diffusion_config(vq_workdir, None)
    c.eval.num_samples = 0
    task = make_task(c)
    assert task.latent_shape == (4, 4, 2, 4)
    x = np.random.default_rng(0).random((2, 16, 16, 8, 1)).astype(np.float32)
    z = task._latents_of({"image": x}, task.step_consts(), jax.random.PRNGKey(0))
    pre = np.asarray(model.apply({"params": variables["params"]}, x, method="encode"))
    # The continuous latents times the scale factor (sigma 0: "sample" is z itself).
    np.testing.assert_allclose(np.asarray(z), pre * task.scale_factor, rtol=1e-5, atol=1e-5)
    state = trainer.train(task, str(tmp_path / "otf"), progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0


def test_vq_windows_follow_its_own_memory_estimate(vq_workdir):
    """`--window auto` on a VQ-VAE sizes windows by the VQ-VAE's estimate (not the KL
    model's fields, which a VQ config also carries) and slides when the whole volume does
    not fit."""
    from ldm_jax.autoencoder.vq_config import vq_call_bytes

    ae = ldm_jax.load_autoencoder(vq_workdir, "latest")
    whole = vq_call_bytes(ae.model, (16, 16, 8), "decode")
    assert whole > vq_call_bytes(ae.model, (8, 8, 8), "decode") > 0
    assert ae.layout((16, 16, 8), op="decode").window is None
    small = ldm_jax.load_autoencoder(vq_workdir, "latest", memory_budget=whole // 2)
    lay = small.layout((16, 16, 8), op="decode")
    assert lay.window is not None
    assert vq_call_bytes(ae.model, lay.window, "decode") <= whole // 2
    x = np.random.default_rng(1).random((16, 16, 8)).astype(np.float32)
    z = small.encode_volume(x)
    assert z.shape == (4, 4, 2, 4)
    vol = small.decode_volume(z)
    assert vol.shape == (16, 16, 8, 1) and np.isfinite(vol).all()
