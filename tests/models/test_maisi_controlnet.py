"""Our ControlNetMaisi is MONAI's, weight for weight, float32; its residuals steer our
DiffusionModelUNetMaisi as MONAI's (including MONAI's in-place addition that also feeds
the last residual to the middle block); MAISI's UNet -> ControlNet weight copy."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
maisi_cn = pytest.importorskip("monai.apps.generation.maisi.networks.controlnet_maisi")
monai_utils = pytest.importorskip("monai.networks.utils")

from ldm_jax.models.maisi import (
    ControlNetMaisi,
    DiffusionModelUNetMaisi,
    controlnet_maisi_from_unet,
)
from ldm_jax.models.maisi.convert import (
    controlnet_maisi_from_monai,
    controlnet_maisi_to_monai,
    unet_maisi_from_monai,
)
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch
from tests.models.test_maisi_unet import CASES as UNET_CASES
from tests.models.test_maisi_unet import monai_inputs, monai_unet, unet_inputs

TOL = 1e-5
BASE = {"in_channels": 2, "num_res_blocks": 1, "num_channels": (8, 16),
        "attention_levels": (False, True), "num_head_channels": (0, 8), "norm_num_groups": 4,
        "conditioning_embedding_in_channels": 3, "conditioning_embedding_num_channels": (4, 8)}
CASES = {
    "released_like_modality_updown": dict(BASE, num_class_embeds=5, resblock_updown=True),
    "fc_combined_linear_factor_4": dict(BASE, include_fc=True, use_combined_linear=True,
                                        conditioning_embedding_num_channels=(4, 4, 8),
                                        num_res_blocks=(2, 1)),
    "cross_attention": dict(BASE, with_conditioning=True, cross_attention_dim=6),
}


def _inputs(cfg, spatial=(8, 8, 4), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    f = 2 ** (len(cfg["conditioning_embedding_num_channels"]) - 1)
    out = {"x": rng.standard_normal((batch, *spatial, cfg["in_channels"])).astype(np.float32),
           "timesteps": rng.integers(0, 1000, batch),
           "controlnet_cond": rng.standard_normal(
               (batch, *(s * f for s in spatial), cfg["conditioning_embedding_in_channels"])
           ).astype(np.float32)}
    if cfg.get("with_conditioning"):
        out["context"] = rng.standard_normal((batch, 3, 6)).astype(np.float32)
    if cfg.get("num_class_embeds"):
        out["class_labels"] = rng.integers(0, cfg["num_class_embeds"], batch)
    return out


def _pair(cfg, seed=0):
    m = perturb(maisi_cn.ControlNetMaisi(spatial_dims=3, **cfg), seed)
    model = ControlNetMaisi(**cfg)
    return m, model, controlnet_maisi_from_monai(m.state_dict(), model)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_monai(name):
    cfg = CASES[name]
    m, model, params = _pair(cfg)
    inputs = _inputs(cfg)
    t_in = {k: to_torch(v) if k in ("x", "controlnet_cond") else torch.from_numpy(v)
            for k, v in inputs.items()}
    with torch.no_grad():
        down, mid = m(**t_in, conditioning_scale=0.7)
    got_down, got_mid = model.apply({"params": params}, **inputs, conditioning_scale=0.7)
    assert len(got_down) == len(down)
    errs = [rel_err(to_ours(r), g) for r, g in zip(down, got_down)]
    errs.append(rel_err(to_ours(mid), got_mid))
    assert max(errs) <= TOL, (name, errs)


def test_round_trip_both_ways():
    cfg = CASES["fc_combined_linear_factor_4"]
    m, model, params = _pair(cfg)
    m2 = maisi_cn.ControlNetMaisi(spatial_dims=3, **cfg)
    m2.load_state_dict(controlnet_maisi_to_monai(params, model), strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_residuals_steer_the_maisi_unet_as_monai():
    ucfg = dict(UNET_CASES["all_inputs_modality"], resblock_updown=True)
    ccfg = CASES["released_like_modality_updown"]
    m_cn, cn, cn_params = _pair(ccfg)
    m_unet = monai_unet(ucfg)
    unet = DiffusionModelUNetMaisi(**ucfg)
    unet_params = unet_maisi_from_monai(m_unet.state_dict(), unet)
    uin = unet_inputs(ucfg)
    cin = _inputs(ccfg)
    cin.update(x=uin["x"], timesteps=uin["timesteps"], class_labels=uin["class_labels"])
    with torch.no_grad():
        down, mid = m_cn(to_torch(cin["x"]), torch.from_numpy(cin["timesteps"]),
                         to_torch(cin["controlnet_cond"]), 1.3,
                         class_labels=torch.from_numpy(cin["class_labels"]))
        ref = to_ours(m_unet(**monai_inputs(uin), down_block_additional_residuals=down,
                             mid_block_additional_residual=mid))
    d, mm = cn.apply({"params": cn_params}, **cin, conditioning_scale=1.3)
    got = unet.apply({"params": unet_params}, **uin, down_block_additional_residuals=d,
                     mid_block_additional_residual=mm)
    assert rel_err(ref, got) <= TOL, rel_err(ref, got)


def test_copy_from_unet_is_monai_copy_model_state():
    ucfg = dict(UNET_CASES["all_inputs_modality"], resblock_updown=True)
    ccfg = CASES["released_like_modality_updown"]
    m_cn, cn, cn_params = _pair(ccfg)
    m_unet = monai_unet(ucfg)
    unet_params = unet_maisi_from_monai(m_unet.state_dict(), DiffusionModelUNetMaisi(**ucfg))
    monai_utils.copy_model_state(m_cn, m_unet.state_dict())
    want = controlnet_maisi_from_monai(m_cn.state_dict(), cn)
    got = controlnet_maisi_from_unet(cn_params, unet_params)
    flat_w = dict(jax.tree_util.tree_leaves_with_path(want))
    flat_g = dict(jax.tree_util.tree_leaves_with_path(got))
    assert flat_w.keys() == flat_g.keys()
    for k, value in flat_w.items():
        np.testing.assert_array_equal(np.asarray(flat_g[k]), value, err_msg=str(k))
    # the spacing / region inputs widen the UNet's embedding: those projections stay ours
    proj = got["down_blocks_0"]["resnets_0"]["time_emb_proj"]["kernel"]
    np.testing.assert_array_equal(
        proj, cn_params["down_blocks_0"]["resnets_0"]["time_emb_proj"]["kernel"])
    assert not np.array_equal(got["conv_in"]["kernel"], cn_params["conv_in"]["kernel"])
