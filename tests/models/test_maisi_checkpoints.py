"""MAISI's released file layouts (NV-Generate-CTMR's inference / training scripts), written
by MONAI's own classes with torch.save, load into our networks and compute MONAI's
outputs; ours write the same layouts back; MAISI's network definitions build our modules
with MONAI's key names and shapes at full size."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai.apps.generation.maisi.networks")

from types import SimpleNamespace

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi as _MA
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi as _MC
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
    DiffusionModelUNetMaisi as _MU,
)

maisi = SimpleNamespace(AutoencoderKlMaisi=_MA, ControlNetMaisi=_MC, DiffusionModelUNetMaisi=_MU)

from ldm_jax.errors import ConfigError, ConversionError
from ldm_jax.models.maisi import (
    AutoencoderKlMaisi,
    ControlNetMaisi,
    DiffusionModelUNetMaisi,
    build_autoencoder_maisi,
    build_controlnet_maisi,
    build_unet_maisi,
)
from ldm_jax.models.maisi.convert import (
    autoencoder_maisi_from_monai,
    load_maisi_controlnet,
    load_maisi_unet,
    maisi_controlnet_checkpoint,
    maisi_unet_checkpoint,
    monai_shapes,
)
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch
from tests.models.test_maisi_controlnet import CASES as CN_CASES
from tests.models.test_maisi_unet import CASES as UNET_CASES
from tests.models.test_maisi_unet import monai_inputs, monai_unet, unet_inputs

AE = {"in_channels": 1, "out_channels": 1, "num_res_blocks": (1, 1), "num_channels": (8, 16),
      "attention_levels": (False, False), "latent_channels": 4, "norm_num_groups": 4}


def _tree_equal(a, b):
    import jax
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in fa] == [p for p, _ in fb] and all(
        np.array_equal(x, y) for (_, x), (_, y) in zip(fa, fb))


@pytest.mark.parametrize("layout", ["bare", "unet_state_dict"])
def test_autoencoder_files(tmp_path, layout):
    m = perturb(maisi.AutoencoderKlMaisi(spatial_dims=3, num_splits=1, **AE))
    sd = m.state_dict()
    obj = sd if layout == "bare" else {"epoch": 3, "unet_state_dict": sd, "epoch_finished": True}
    path = tmp_path / "autoencoder.pt"
    torch.save(obj, path)
    model = AutoencoderKlMaisi(**AE)
    params = autoencoder_maisi_from_monai(str(path), model)
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8, 1)).astype(np.float32)
    with torch.no_grad():
        ref = to_ours(m.reconstruct(to_torch(x)))
    got = model.apply({"params": params}, jnp.asarray(x), method="reconstruct")
    assert rel_err(ref, got) <= 1e-5


def test_unet_file_loads_with_scale_factor_and_writes_back(tmp_path):
    cfg = UNET_CASES["all_inputs_modality"]
    m = monai_unet(cfg)
    path = tmp_path / "diff_unet_ckpt.pt"
    torch.save({"epoch": 5, "loss": 0.12, "num_train_timesteps": 1000,
                "scale_factor": torch.tensor(0.875), "unet_state_dict": m.state_dict()}, path)
    model = DiffusionModelUNetMaisi(**cfg)
    params, scale_factor = load_maisi_unet(path, model)
    assert scale_factor == pytest.approx(0.875)
    inputs = unet_inputs(cfg)
    with torch.no_grad():
        ref = to_ours(m(**monai_inputs(inputs)))
    assert rel_err(ref, model.apply({"params": params}, **inputs)) <= 1e-5

    out = tmp_path / "ours.pt"
    torch.save(maisi_unet_checkpoint(params, model, scale_factor, epoch=6), out)
    ckpt = torch.load(out, weights_only=True)  # as MAISI's inference.py reads it
    m2 = maisi.DiffusionModelUNetMaisi(spatial_dims=3, **cfg)
    m2.load_state_dict(ckpt["unet_state_dict"], strict=True)
    assert float(ckpt["scale_factor"]) == pytest.approx(0.875) and ckpt["epoch"] == 6
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())


def test_controlnet_file_round_trip(tmp_path):
    cfg = CN_CASES["released_like_modality_updown"]
    m = perturb(maisi.ControlNetMaisi(spatial_dims=3, **cfg))
    path = tmp_path / "controlnet.pt"
    torch.save({"epoch": 2, "loss": torch.tensor(0.3),
                "controlnet_state_dict": m.state_dict()}, path)
    model = ControlNetMaisi(**cfg)
    params = load_maisi_controlnet(path, model)
    back = maisi_controlnet_checkpoint(params, model, epoch=2)
    assert set(back) == {"epoch", "controlnet_state_dict"}
    assert all(torch.equal(v, back["controlnet_state_dict"][k]) for k, v in m.state_dict().items())
    assert _tree_equal(params, load_maisi_controlnet(back, model))


def test_wrong_or_missing_files_are_refused(tmp_path):
    cfg = UNET_CASES["no_extra_inputs"]
    m = monai_unet(cfg)
    model = DiffusionModelUNetMaisi(**cfg)
    bare = tmp_path / "bare.pt"
    torch.save(m.state_dict(), bare)
    with pytest.raises(ConversionError, match="unet_state_dict"):
        load_maisi_unet(bare, model)
    with pytest.raises(ConversionError, match="scale_factor"):
        load_maisi_unet({"unet_state_dict": m.state_dict()}, model)
    with pytest.raises(FileNotFoundError):
        load_maisi_unet(tmp_path / "absent.pt", model)
    other = DiffusionModelUNetMaisi(**UNET_CASES["all_inputs_modality"])
    with pytest.raises(ConversionError, match="missing|does not fit"):
        load_maisi_unet({"unet_state_dict": m.state_dict(), "scale_factor": 1.0}, other)


# NV-Generate-CTMR configs/config_network_rflow.json, "@" references substituted.
RELEASED = {
    "autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4,
        "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32,
        "norm_eps": 1e-06, "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False, "use_convtranspose": False, "norm_float16": True,
        "num_splits": 4, "dim_split": 1},
    "diffusion_unet_def": {
        "_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi."
                    "DiffusionModelUNetMaisi",
        "spatial_dims": 3, "in_channels": 4, "out_channels": 4,
        "num_channels": [64, 128, 256, 512], "attention_levels": [False, False, True, True],
        "num_head_channels": [0, 0, 32, 32], "num_res_blocks": 2, "use_flash_attention": True,
        "include_top_region_index_input": False, "include_bottom_region_index_input": False,
        "include_spacing_input": True, "num_class_embeds": 128, "resblock_updown": True,
        "include_fc": True},
    "controlnet_def": {
        "_target_": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": 3, "in_channels": 4, "num_channels": [64, 128, 256, 512],
        "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
        "num_res_blocks": 2, "use_flash_attention": True,
        "conditioning_embedding_in_channels": 8, "conditioning_embedding_num_channels": [8, 32, 64],
        "num_class_embeds": 128, "resblock_updown": True, "include_fc": True},
}
BUILDERS = {"autoencoder_def": (build_autoencoder_maisi, maisi.AutoencoderKlMaisi),
            "diffusion_unet_def": (build_unet_maisi, maisi.DiffusionModelUNetMaisi),
            "controlnet_def": (build_controlnet_maisi, maisi.ControlNetMaisi)}


@pytest.mark.parametrize("which", list(RELEASED))
def test_released_definitions_have_monai_keys_and_shapes(which):
    build, monai_cls = BUILDERS[which]
    definition = RELEASED[which]
    model = build(definition)
    kw = {k: v for k, v in definition.items() if k != "_target_"}
    kw["use_flash_attention"] = False  # MONAI refuses it without CUDA; no weights involved
    with torch.device("meta"):  # shapes only: full size without allocating
        m = monai_cls(**kw)
    want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert monai_shapes(model) == want


def test_definitions_are_checked():
    with pytest.raises(ConfigError, match="_target_"):
        build_unet_maisi(RELEASED["controlnet_def"])
    with pytest.raises(ConfigError, match="unknown"):
        build_autoencoder_maisi({**RELEASED["autoencoder_def"], "channels": [1]})
    with pytest.raises(ConfigError, match="references"):
        build_unet_maisi({**RELEASED["diffusion_unet_def"], "in_channels": "@latent_channels"})
