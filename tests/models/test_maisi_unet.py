"""Our DiffusionModelUNetMaisi is MONAI's (spatial_dims=3), weight for weight, float32: every
conditioning input (spacing, top / bottom region index, class labels, cross-attention
context), include_fc and use_combined_linear."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
maisi_unet = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")

from ldm_jax.models.maisi import DiffusionModelUNetMaisi
from ldm_jax.models.maisi.convert import unet_maisi_from_monai, unet_maisi_to_monai
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch

TOL = 1e-5
BASE = {"in_channels": 2, "out_channels": 2, "num_res_blocks": 1, "num_channels": (8, 16),
        "attention_levels": (False, True), "num_head_channels": (0, 8), "norm_num_groups": 4}
REGIONS = {"include_top_region_index_input": True, "include_bottom_region_index_input": True,
           "include_spacing_input": True}
CASES = {
    "all_inputs_modality": dict(BASE, **REGIONS, num_class_embeds=5),
    "released_like_fc_combined_linear": dict(BASE, include_spacing_input=True,
                                             num_class_embeds=4, resblock_updown=True,
                                             include_fc=True, use_combined_linear=True,
                                             num_res_blocks=(2, 1)),
    "cross_attention_combined_linear": dict(BASE, with_conditioning=True,
                                            cross_attention_dim=6, use_combined_linear=True,
                                            include_top_region_index_input=True),
    "no_extra_inputs": BASE,
}


def monai_unet(cfg, seed=1):
    return perturb(maisi_unet.DiffusionModelUNetMaisi(spatial_dims=3, **cfg), seed)


def unet_inputs(cfg, spatial=(8, 8, 4), batch=2, seed=0):
    """Our call's keyword arguments (numpy, channels-last) for `cfg`."""
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, *spatial, cfg["in_channels"])).astype(np.float32),
           "timesteps": rng.integers(0, 1000, batch)}
    if cfg.get("with_conditioning"):
        out["context"] = rng.standard_normal((batch, 3, cfg["cross_attention_dim"])).astype(
            np.float32)
    if cfg.get("num_class_embeds"):
        out["class_labels"] = rng.integers(0, cfg["num_class_embeds"], batch)
    for field, arg, dim in (("include_top_region_index_input", "top_region_index_tensor", 4),
                            ("include_bottom_region_index_input", "bottom_region_index_tensor", 4),
                            ("include_spacing_input", "spacing_tensor", 3)):
        if cfg.get(field):
            out[arg] = rng.random((batch, dim)).astype(np.float32)
    return out


def monai_inputs(ours: dict) -> dict:
    """The same inputs for MONAI's forward (NCDHW, torch)."""
    out = {}
    for k, v in ours.items():
        out[k] = to_torch(v) if k == "x" else torch.from_numpy(np.asarray(v))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_monai(name):
    cfg = CASES[name]
    m = monai_unet(cfg)
    model = DiffusionModelUNetMaisi(**cfg)
    params = unet_maisi_from_monai(m.state_dict(), model)
    inputs = unet_inputs(cfg)
    with torch.no_grad():
        ref = to_ours(m(**monai_inputs(inputs)))
    got = model.apply({"params": params}, **{k: jnp.asarray(v) for k, v in inputs.items()})
    assert rel_err(ref, got) <= TOL, (name, rel_err(ref, got))


def test_round_trip_both_ways_and_required_inputs():
    cfg = CASES["all_inputs_modality"]
    m = monai_unet(cfg)
    model = DiffusionModelUNetMaisi(**cfg)
    params = unet_maisi_from_monai(m.state_dict(), model)
    m2 = maisi_unet.DiffusionModelUNetMaisi(spatial_dims=3, **cfg)
    m2.load_state_dict(unet_maisi_to_monai(params, model), strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    inputs = unet_inputs(cfg)
    del inputs["spacing_tensor"]
    with pytest.raises(ValueError, match="spacing_tensor"):
        model.apply({"params": params}, **inputs)


def test_spacing_changes_the_output():
    cfg = CASES["all_inputs_modality"]
    model = DiffusionModelUNetMaisi(**cfg)
    params = unet_maisi_from_monai(monai_unet(cfg).state_dict(), model)
    inputs = unet_inputs(cfg)
    a = model.apply({"params": params}, **inputs)
    inputs["spacing_tensor"] = inputs["spacing_tensor"] + 1.0
    b = model.apply({"params": params}, **inputs)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
