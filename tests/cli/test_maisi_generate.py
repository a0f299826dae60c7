"""`ldm-jax maisi generate` end to end on CPU with tiny random networks written by MONAI's
own MAISI classes in MAISI's released file layouts (autoencoder state dict, `{"unet_state_dict",
"scale_factor"}`, `{"controlnet_state_dict"}`), described by a network JSON in MAISI's format:
NIfTI of the requested shape with the spacing in the affine, the decoded volume equal to
MONAI's decode of the same latent, reruns, and one-line refusals of missing or mismatched
weight files. Random weights: the volumes are noise-like, only the plumbing is tested."""

import json

import numpy as np
import pytest

from ldm_jax.__main__ import main
from ldm_jax.diffusion.maisi import binarize_labels

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")
networks = pytest.importorskip("monai.apps.generation.maisi.networks")
helpers = pytest.importorskip("tests.models.maisi_helpers")
perturb, to_ours, to_torch = helpers.perturb, helpers.to_ours, helpers.to_torch
AutoencoderKlMaisi = pytest.importorskip(
    "monai.apps.generation.maisi.networks.autoencoderkl_maisi").AutoencoderKlMaisi
ControlNetMaisi = pytest.importorskip(
    "monai.apps.generation.maisi.networks.controlnet_maisi").ControlNetMaisi
DiffusionModelUNetMaisi = pytest.importorskip(
    "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi").DiffusionModelUNetMaisi

ENC = {"in_channels": "@latent_channels", "num_channels": [8, 16],
       "attention_levels": [False, True], "num_head_channels": [0, 8], "num_res_blocks": 1,
       "norm_num_groups": 4, "num_class_embeds": 4, "resblock_updown": True, "include_fc": True,
       "use_flash_attention": False}
# MAISI's config_network_rflow.json, shrunk: 4x autoencoder, 2-level UNet and ControlNet.
NETWORK = {
    "spatial_dims": 3, "image_channels": 1, "latent_channels": 4,
    "autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@image_channels",
        "out_channels": "@image_channels", "latent_channels": "@latent_channels",
        "num_channels": [8, 8, 8], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4,
        "norm_eps": 1e-06, "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False, "use_convtranspose": False, "norm_float16": False,
        "num_splits": 1, "dim_split": 1},
    "diffusion_unet_def": {
        "_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi."
                    "DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims", **ENC, "out_channels": "@latent_channels",
        "include_top_region_index_input": False, "include_bottom_region_index_input": False,
        "include_spacing_input": True},
    "controlnet_def": {
        "_target_": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": "@spatial_dims", **ENC, "conditioning_embedding_in_channels": 8,
        "conditioning_embedding_num_channels": [4, 8, 8]},
}
SCALE = 0.8


def _kwargs(d):
    out = {k: v for k, v in d.items() if k != "_target_"}
    return {k: (NETWORK[v[1:]] if isinstance(v, str) and v.startswith("@") else v)
            for k, v in out.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """MONAI's classes, randomly perturbed, saved as MAISI releases them."""
    d = tmp_path_factory.mktemp("maisi_files")
    ae = perturb(AutoencoderKlMaisi(**_kwargs(NETWORK["autoencoder_def"])), 0)
    unet = perturb(DiffusionModelUNetMaisi(**_kwargs(NETWORK["diffusion_unet_def"])), 1)
    cn = perturb(ControlNetMaisi(**_kwargs(NETWORK["controlnet_def"])), 2)
    out = {"autoencoder": d / "autoencoder_v1.pt", "unet": d / "diff_unet_3d_rflow-ct.pt",
           "controlnet": d / "controlnet_3d_rflow-ct.pt", "network": d / "config_network.json",
           "ae_module": ae, "unet_module": unet, "cn_module": cn}
    torch.save(ae.state_dict(), out["autoencoder"])
    torch.save({"epoch": 3, "loss": 0.1, "num_train_timesteps": 1000,
                "scale_factor": torch.tensor(SCALE), "unet_state_dict": unet.state_dict()},
               out["unet"])
    torch.save({"epoch": 2, "controlnet_state_dict": cn.state_dict()}, out["controlnet"])
    out["network"].write_text(json.dumps(NETWORK))
    return out


def _args(files, out, *extra):
    return ["ldm-jax", "maisi", "generate", f"--autoencoder={files['autoencoder']}",
            f"--diffusion_unet={files['unet']}", f"--network={files['network']}",
            f"--output={out}", "--noprogress", *extra]


def test_generate_writes_nifti_with_spacing_and_monai_decode(files, tmp_path, capsys):
    out = tmp_path / "gen"
    args = _args(files, out, "--output_size=16,16,8", "--spacing=1.5,1.5,2", "--num_samples=2",
                 "--seed=3")
    assert main(args) == 0, capsys.readouterr().err
    for i in range(2):
        img = nib.load(out / f"sample_{i:04d}.nii.gz")
        assert img.shape == (16, 16, 8)
        np.testing.assert_allclose(img.header.get_zooms()[:3], (1.5, 1.5, 2.0))
        np.testing.assert_allclose(img.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
        vol = np.asarray(img.dataobj)
        assert np.isfinite(vol).all() and vol.min() >= -1000 and vol.max() <= 1000
        assert np.load(out / "latents" / f"sample_{i:04d}.npy").shape == (4, 4, 2, 4)
    a, b = (np.asarray(nib.load(out / f"sample_{i:04d}.nii.gz").dataobj) for i in (0, 1))
    assert not np.array_equal(a, b)
    # the volume is MONAI's decode of the same latent / scale_factor, then MAISI's HU mapping
    z = np.load(out / "latents" / "sample_0000.npy")
    with torch.no_grad():
        ref = to_ours(files["ae_module"].decode_stage_2_outputs(to_torch(z[None]) / SCALE))[0]
    ref = np.clip(ref[..., 0], 0, 1) * 2000 - 1000
    assert np.abs(ref - a).max() <= 1e-2  # HU, float32 through a 2000x scale
    record = json.loads((out / "generate.json").read_text())
    assert record["files"] == ["sample_0000", "sample_0001"]
    assert record["spacing_mm"] == [1.5, 1.5, 2]
    assert record["num_inference_steps"] == 30 and record["scheduler"] == "rflow"
    assert record["scale_factor"] == pytest.approx(SCALE)
    assert len(record["weights"]["diffusion_unet"]["sha256"]) == 64
    assert (out / "samples.png").is_file() and (out / "provenance.jsonl").is_file()
    capsys.readouterr()
    # a rerun reuses; other settings are refused in one line; --overwrite replaces
    assert main(args) == 0 and "Reusing 2" in capsys.readouterr().out
    assert main([*args, "--seed=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--overwrite" in err
    assert main([*args, "--seed=4", "--overwrite", "--num_inference_steps=2"]) == 0
    assert not np.array_equal(a, np.asarray(nib.load(out / "sample_0000.nii.gz").dataobj))


def test_controlnet_mask_sets_shape_spacing_and_background(files, tmp_path, capsys):
    labels = np.zeros((16, 16, 8), np.int16)
    labels[4:12, 4:12, 2:6] = 200  # body
    labels[6:9, 6:9, 3:5] = 1  # liver
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.diag([0.8, 0.8, 2.5, 1.0])), mask)
    out = tmp_path / "cn"
    args = _args(files, out, f"--controlnet={files['controlnet']}", f"--condition={mask}",
                 "--num_inference_steps=4", "--window=8,8,8", "--conditioning_scale=0.5")
    assert main(args) == 0, capsys.readouterr().err
    img = nib.load(out / "sample_0000.nii.gz")
    assert img.shape == (16, 16, 8)
    np.testing.assert_allclose(img.header.get_zooms()[:3], (0.8, 0.8, 2.5))
    vol = np.asarray(img.dataobj)
    assert np.all(vol[labels == 0] == -1000) and np.isfinite(vol).all()
    record = json.loads((out / "generate.json").read_text())
    assert "windows of (8, 8, 8)" in record["decoding"] and record["conditioning_scale"] == 0.5


def test_latent_is_maisis_loop_with_monai(files, tmp_path, capsys):
    """The sampled latent equals MAISI's ControlNet loop (utils_infer.py) run with MONAI's
    classes and RFlowScheduler from the same noise: spacing x100 (float16), modality as
    class_labels, residuals into the UNet, step to the next timestep (0 after the last)."""
    import jax
    from monai.networks.schedulers import RFlowScheduler

    labels = np.zeros((16, 16, 8), np.int64)
    labels[2:14, 3:13, 1:7] = 200
    labels[5:9, 5:9, 2:5] = 3
    mask = tmp_path / "mask.npy"
    np.save(mask, labels)
    out = tmp_path / "parity"
    steps, seed, spacing, modality = 10, 5, (0.75, 0.75, 0.66667), 2
    assert main(_args(files, out, f"--controlnet={files['controlnet']}", f"--condition={mask}",
                      f"--num_inference_steps={steps}", f"--seed={seed}", f"--modality={modality}",
                      "--spacing=" + ",".join(map(str, spacing)))) == 0, capsys.readouterr().err
    ours = np.load(out / "latents" / "sample_0000.npy")
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)  # sample 0
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (1, 4, 4, 2, 4)))
    sched = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False,
                           use_timestep_transform=True, sample_method="uniform", scale=1.4)
    sched.set_timesteps(steps, input_img_size_numel=torch.prod(torch.tensor((4, 4, 2))))
    ts = sched.timesteps
    nexts = torch.cat((ts[1:], torch.tensor([0], dtype=ts.dtype)))
    bits = 2 ** torch.arange(8)
    cond = torch.from_numpy(labels)[None, None].unsqueeze(-1).bitwise_and(bits).ne(0).byte()
    cond = cond.squeeze(1).permute(0, 4, 1, 2, 3).float()
    spacing_t = torch.from_numpy(np.array(spacing) * 1e2)[None].half().float()
    cls = torch.tensor([modality])
    x = to_torch(noise)
    with torch.no_grad():
        for t, nt in zip(ts, nexts):
            tt = torch.Tensor((t,))
            down, mid = files["cn_module"](x=x, timesteps=tt, controlnet_cond=cond,
                                           class_labels=cls)
            v = files["unet_module"](x=x, timesteps=tt, spacing_tensor=spacing_t,
                                     class_labels=cls, down_block_additional_residuals=down,
                                     mid_block_additional_residual=mid)
            x, _ = sched.step(v, t, x, nt)
    ref = to_ours(x)[0]
    assert np.abs(ref - ours).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_binarize_labels_is_maisis():
    lab = np.random.default_rng(0).integers(0, 256, (3, 4, 5))
    t = torch.from_numpy(lab)[None, None]  # MAISI's (B, 1, X, Y, Z) long
    mask = 2 ** torch.arange(8)
    ref = t.unsqueeze(-1).bitwise_and(mask).ne(0).byte().squeeze(1).permute(0, 4, 1, 2, 3)
    np.testing.assert_array_equal(binarize_labels(lab), to_ours(ref.float())[0])


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_missing_or_mismatched_weight_files_are_one_line(files, tmp_path, capsys):
    out = tmp_path / "bad"
    args = _args(files, out, "--output_size=16,16,8", "--num_inference_steps=2")
    missing = [a if not a.startswith("--autoencoder=") else
               f"--autoencoder={tmp_path / 'autoencoder_v1.pt'}" for a in args]
    assert main(missing) == 2
    _one_line_error(capsys, "--autoencoder", "no such file", "autoencoder_v1.pt")
    # the UNet file given as the autoencoder
    swapped = [a if not a.startswith("--autoencoder=") else f"--autoencoder={files['unet']}"
               for a in args]
    assert main(swapped) == 2
    err = _one_line_error(capsys, "--autoencoder", "Expected AutoencoderKlMaisi weights",
                          "--network", "its keys are a diffusion UNet's")
    assert len(err) - len(str(files["unet"])) < 500
    # a bare state dict where MAISI's UNet file (with scale_factor) is expected
    bare = tmp_path / "bare_unet.pt"
    torch.save(torch.load(files["unet"], weights_only=True)["unet_state_dict"], bare)
    assert main([a if not a.startswith("--diffusion_unet=") else f"--diffusion_unet={bare}"
                 for a in args]) == 2
    _one_line_error(capsys, "--diffusion_unet", "unet_state_dict")
    # tiny weights against MAISI's full-size released networks
    assert main([a for a in args if not a.startswith("--network=")] + ["--network=rflow"]) == 2
    _one_line_error(capsys, "--autoencoder", "'rflow' networks")
    # a ControlNet without its mask
    assert main([*args, f"--controlnet={files['controlnet']}"]) == 2
    _one_line_error(capsys, "--condition")
    assert not out.exists()  # nothing written for refused requests


def test_subcommand_is_required(capsys):
    assert main(["ldm-jax", "maisi"]) == 2
    _one_line_error(capsys, "generate")
    assert main(["ldm-jax", "maisi", "genrate"]) == 2
    _one_line_error(capsys, "'genrate'")
