"""Our ControlNet is MONAI's (spatial_dims=3), weight for weight, float32; so is the UNet
fed its residuals, and the UNet -> ControlNet weight copy.

MONAI models get random weights with every tensor perturbed (the zero convs would
otherwise hide the whole network), the converter maps them, and both run on the same
inputs (NCDHW for torch, (B, X, Y, Z, C) for us).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from ldm_jax.errors import ConversionError
from ldm_jax.models import build_unet
from ldm_jax.models.controlnet import build_controlnet, controlnet_from_unet
from ldm_jax.models.controlnet_convert import (
    controlnet_from_monai,
    controlnet_to_monai,
)
from ldm_jax.models.unet_convert import unet_from_monai

TOL = 1e-5
TINY = {"in_channels": 2, "num_res_blocks": 1, "num_channels": (8, 16),
        "attention_levels": (False, True), "num_head_channels": (0, 8), "norm_num_groups": 4,
        "conditioning_embedding_num_channels": (4, 8)}
CASES = {
    "plain": TINY,
    "cond_channels_3_factor_4": dict(TINY, conditioning_embedding_in_channels=3,
                                     conditioning_embedding_num_channels=(4, 4, 8)),
    "class_embeds": dict(TINY, num_class_embeds=5, num_res_blocks=(2, 1)),
    "cross_attention": dict(TINY, with_conditioning=True, cross_attention_dim=6,
                            transformer_num_layers=2),
    "resblock_updown_three_levels": dict(TINY, num_channels=(8, 8, 16), resblock_updown=True,
                                         attention_levels=(False, False, True),
                                         num_head_channels=(0, 0, 8),
                                         conditioning_embedding_num_channels=(8,)),
}


def _perturb(m, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_((0.1 if p.ndim == 1 else p[0].numel() ** -0.5) * torch.randn_like(p))
    return m.eval()


def _monai_controlnet(cfg, seed=0):
    kw = {k: v for k, v in cfg.items() if k != "num_channels"}
    torch.manual_seed(seed)
    return _perturb(monai_nets.ControlNet(spatial_dims=3, channels=cfg["num_channels"], **kw), seed)


def _unet_cfg(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("conditioning_embedding")} | {
        "out_channels": cfg["in_channels"]}


def _monai_unet(cfg, seed=1):
    u = _unet_cfg(cfg)
    kw = {k: v for k, v in u.items() if k != "num_channels"}
    torch.manual_seed(seed)
    return _perturb(monai_nets.DiffusionModelUNet(spatial_dims=3, channels=u["num_channels"],
                                                  **kw), seed)


def _inputs(cfg, spatial=(8, 8, 4), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    f = 2 ** (len(cfg["conditioning_embedding_num_channels"]) - 1)
    ours = {"x": rng.standard_normal((batch, *spatial, cfg["in_channels"])).astype(np.float32),
            "timesteps": rng.integers(0, 1000, batch),
            "controlnet_cond": rng.standard_normal(
                (batch, *(s * f for s in spatial),
                 cfg.get("conditioning_embedding_in_channels", 1))).astype(np.float32)}
    if cfg.get("with_conditioning"):
        ours["context"] = rng.standard_normal((batch, 3, cfg["cross_attention_dim"])).astype(
            np.float32)
    if cfg.get("num_class_embeds"):
        ours["class_labels"] = rng.integers(0, cfg["num_class_embeds"], batch)
    theirs = {k: torch.from_numpy(v) for k, v in ours.items()}
    for k in ("x", "controlnet_cond"):
        theirs[k] = theirs[k].permute(0, 4, 1, 2, 3)
    return ours, theirs


def _rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _cl(t):
    return t.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_and_unet_with_residuals_match_monai(case):
    cfg = CASES[case]
    m = _monai_controlnet(cfg)
    params = controlnet_from_monai(m.state_dict(), cfg)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == sum(
        p.numel() for p in m.parameters())
    ours, theirs = _inputs(cfg)
    with torch.no_grad():
        down_ref, mid_ref = m(**theirs, conditioning_scale=0.7)
    model = build_controlnet(cfg)
    down, mid = jax.jit(model.apply)({"params": params}, **ours, conditioning_scale=0.7)
    assert len(down) == len(down_ref)
    errs = [_rel(np.asarray(d), _cl(r)) for d, r in zip(down, down_ref)]
    errs.append(_rel(np.asarray(mid), _cl(mid_ref)))
    print(f"{case}: ControlNet max rel err {max(errs):.2e} over {len(errs)} residuals")
    assert max(errs) <= TOL, errs

    # The UNet taking those residuals (MONAI's down_block_additional_residuals=...).
    mu = _monai_unet(cfg)
    uin = {k: v for k, v in theirs.items() if k != "controlnet_cond"}
    with torch.no_grad():
        ref = mu(**uin, down_block_additional_residuals=tuple(down_ref),
                 mid_block_additional_residual=mid_ref)
        plain = mu(**uin)
    unet = build_unet(dict(_unet_cfg(cfg), dtype="float32"))
    uparams = unet_from_monai(mu.state_dict(), _unet_cfg(cfg))
    uo = {k: v for k, v in ours.items() if k != "controlnet_cond"}
    out = np.asarray(jax.jit(unet.apply)({"params": uparams}, **uo,
                                         down_block_additional_residuals=down,
                                         mid_block_additional_residual=mid))
    err = _rel(out, _cl(ref))
    print(f"{case}: UNet with residuals max rel err {err:.2e}")
    assert err <= TOL, err
    assert _rel(_cl(plain), _cl(ref)) > 1e-2  # the residuals changed the output


@pytest.mark.parametrize("case", ["plain", "cross_attention", "class_embeds"])
def test_round_trip_and_monai_loads_ours(case):
    cfg = CASES[case]
    sd = _monai_controlnet(cfg).state_dict()
    back = controlnet_to_monai(controlnet_from_monai(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # ours -> MONAI from params that never were MONAI's: MONAI computes what we compute.
    model = build_controlnet(cfg)
    ours_params = model.init(jax.random.key(3), **model.dummy_inputs())["params"]
    ours_params = jax.tree.map(lambda a: a + 0.05 * np.cos(np.arange(a.size)).reshape(a.shape)
                               .astype(np.float32), ours_params)  # no zero convs left
    fresh = monai_nets.ControlNet(spatial_dims=3, channels=cfg["num_channels"],
                                  **{k: v for k, v in cfg.items() if k != "num_channels"}).eval()
    fresh.load_state_dict(controlnet_to_monai(ours_params, cfg), strict=True)
    ours, theirs = _inputs(cfg, seed=4)
    with torch.no_grad():
        down_ref, mid_ref = fresh(**theirs)
    down, mid = model.apply({"params": ours_params}, **ours)
    errs = [_rel(np.asarray(d), _cl(r)) for d, r in zip(down, down_ref)]
    assert max(errs + [_rel(np.asarray(mid), _cl(mid_ref))]) <= TOL


def test_old_out_proj_names_load():
    cfg = CASES["cross_attention"]
    sd = _monai_controlnet(cfg).state_dict()
    old = {k.replace(".out_proj.", ".to_out.0."): v for k, v in sd.items()}
    assert set(old) != set(sd)
    a, b = controlnet_from_monai(sd, cfg), controlnet_from_monai(old, cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", ["plain", "class_embeds"])
def test_copy_from_unet_is_monai_load_state_dict_strict_false(case):
    """MONAI's tutorials initialise with controlnet.load_state_dict(unet.state_dict(),
    strict=False); `controlnet_from_unet` gives the same params."""
    cfg = CASES[case]
    mu, mc = _monai_unet(cfg), _monai_controlnet(cfg)
    mc.load_state_dict(mu.state_dict(), strict=False)
    want = controlnet_from_monai(mc.state_dict(), cfg)
    fresh = controlnet_from_monai(_monai_controlnet(cfg).state_dict(), cfg)  # mc before the copy
    got = controlnet_from_unet(fresh, unet_from_monai(mu.state_dict(), _unet_cfg(cfg)))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A freshly initialised ControlNet copied from the UNet adds exactly nothing.
    model = build_controlnet(cfg)
    init = model.init(jax.random.key(0), **model.dummy_inputs())["params"]
    ours, _ = _inputs(cfg)
    down, mid = model.apply({"params": controlnet_from_unet(init, want)}, **ours)
    assert all(float(np.abs(np.asarray(d)).max()) == 0.0 for d in [*down, mid])


def test_conversion_errors_name_the_key():
    cfg = CASES["plain"]
    sd = _monai_controlnet(cfg).state_dict()
    with pytest.raises(ConversionError, match=r"missing, first: 'controlnet_down_blocks.0.weight'"):
        controlnet_from_monai({k: v for k, v in sd.items()
                               if k != "controlnet_down_blocks.0.weight"}, cfg)
    with pytest.raises(ConversionError, match=r"shape mismatch|does not fit"):
        controlnet_from_monai(sd, dict(cfg, conditioning_embedding_in_channels=2))
    with pytest.raises(ValueError, match="embeds to"):
        model = build_controlnet(cfg)
        inp = model.dummy_inputs(spatial=(4, 4, 4))
        inp["controlnet_cond"] = inp["controlnet_cond"][:, :4]
        model.init(jax.random.key(0), **inp)
