"""Our DiffusionModelUNet is MONAI's (spatial_dims=3), weight for weight, float32.

MONAI models get random weights with every tensor perturbed (its zero-initialised layers
would otherwise hide half the network), `unet_from_monai` maps them, and both run on the
same input (NCDHW for torch, (B, X, Y, Z, C) for us).
"""

import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from ldm_jax.errors import ConversionError  # noqa: E402
from ldm_jax.models import build_unet  # noqa: E402
from ldm_jax.models.unet_convert import unet_from_monai, unet_to_monai  # noqa: E402

TOL = 1e-5
TUTORIAL = dict(in_channels=3, out_channels=3, num_res_blocks=1, num_channels=(32, 64, 64),
                attention_levels=(False, True, True), num_head_channels=(0, 64, 64))
TINY = dict(in_channels=2, out_channels=3, num_res_blocks=1, num_channels=(8, 16),
            attention_levels=(False, True), num_head_channels=(0, 8), norm_num_groups=4)
CASES = {
    "tutorial": TUTORIAL,
    "per_level_res_blocks": dict(TINY, num_res_blocks=(2, 1)),
    "resblock_updown": dict(TINY, resblock_updown=True),
    "class_embeds": dict(TINY, num_class_embeds=5),
    "cross_attention": dict(TINY, with_conditioning=True, cross_attention_dim=6,
                            transformer_num_layers=2),
    "per_level_heads": dict(TINY, num_channels=(8, 16, 16), attention_levels=(True, False, True),
                            num_head_channels=(4, 0, 8)),
}
PARAM_COUNTS = {"tutorial": 2_974_051}  # MONAI's tutorial UNet (the others compare to MONAI)


def _monai(cfg, seed=0):
    kw = {k: v for k, v in cfg.items() if k not in ("num_channels", "dtype", "remat")}
    torch.manual_seed(seed)
    m = monai_nets.DiffusionModelUNet(spatial_dims=3, channels=cfg["num_channels"], **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_((0.1 if p.ndim == 1 else p[0].numel() ** -0.5) * torch.randn_like(p))
    return m


def _inputs(cfg, spatial=(8, 8, 8), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    ours = dict(x=rng.standard_normal((batch, *spatial, cfg["in_channels"])).astype(np.float32),
                timesteps=rng.integers(0, 1000, batch))
    if cfg.get("with_conditioning"):
        ours["context"] = rng.standard_normal((batch, 3, cfg["cross_attention_dim"])).astype(
            np.float32)
    if cfg.get("num_class_embeds"):
        ours["class_labels"] = rng.integers(0, cfg["num_class_embeds"], batch)
    theirs = {k: torch.from_numpy(v) for k, v in ours.items()}
    theirs["x"] = theirs["x"].permute(0, 4, 1, 2, 3)
    return ours, theirs


def _parity(m, cfg, params):
    ours, theirs = _inputs(cfg)
    with torch.no_grad():
        ref = m(**theirs).permute(0, 2, 3, 4, 1).numpy()
    model = build_unet(dict(cfg, dtype="float32"))
    out = np.asarray(jax.jit(model.apply)({"params": params}, **ours))
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("case", list(CASES))
def test_parity_and_param_count(case):
    cfg = CASES[case]
    m = _monai(cfg)
    params = unet_from_monai(m.state_dict(), cfg)
    n_ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert n_ours == sum(p.numel() for p in m.parameters())
    if case in PARAM_COUNTS:
        assert n_ours == PARAM_COUNTS[case]
    err = _parity(m, cfg, params)
    print(f"{case}: max|diff|/max|ref| = {err:.2e}, {n_ours} params")
    assert err <= TOL, err


@pytest.mark.parametrize("case", ["tutorial", "cross_attention"])
def test_parity_with_chunked_attention(case, monkeypatch):
    """The chunked attention (forced: several padded, masked query and key blocks per
    layer; cross-attention keys from the context) is MONAI's attention too."""
    from ldm_jax.models import layers
    monkeypatch.setattr(layers, "default_chunks", lambda: (16, 24))
    cfg = CASES[case]
    m = _monai(cfg)
    assert _parity(m, cfg, unet_from_monai(m.state_dict(), cfg)) <= TOL


@pytest.mark.parametrize("case", ["tutorial", "cross_attention", "resblock_updown"])
def test_round_trip_monai_ours_monai(case):
    cfg = CASES[case]
    sd = _monai(cfg).state_dict()
    back = unet_to_monai(unet_from_monai(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    fresh = monai_nets.DiffusionModelUNet(
        spatial_dims=3, channels=cfg["num_channels"],
        **{k: v for k, v in cfg.items() if k != "num_channels"})
    fresh.load_state_dict(back, strict=True)  # MONAI accepts it as is
    as_np = unet_to_monai(unet_from_monai(sd, cfg), cfg, as_torch=False)
    assert all(isinstance(v, np.ndarray) for v in as_np.values())
    np.testing.assert_array_equal(as_np["conv_in.conv.weight"], sd["conv_in.conv.weight"].numpy())


def _generative_models_names(sd):
    """Rename MONAI >= 1.4 keys to MONAI GenerativeModels' (the inverse of MONAI's
    DiffusionModelUNet.load_old_state_dict)."""
    out = {}
    for k, v in sd.items():
        if ".transformer_blocks." in k:
            k = k.replace(".out_proj.", ".to_out.0.")
        else:
            k = re.sub(r"\.attn\.(to_[qkv])\.", r".\1.", k).replace(".attn.out_proj.", ".proj_attn.")
        out[k.replace(".upsampler.postconv.", ".upsampler.conv.")] = v
    return out


@pytest.mark.parametrize("case", ["tutorial", "cross_attention"])
def test_generative_models_key_names_load(case):
    cfg = CASES[case]
    m = _monai(cfg)
    sd = m.state_dict()
    old = _generative_models_names(sd)
    assert len(set(old) - set(sd)) > 0  # really renamed
    check = monai_nets.DiffusionModelUNet(
        spatial_dims=3, channels=cfg["num_channels"],
        **{k: v for k, v in cfg.items() if k != "num_channels"})
    check.load_old_state_dict(dict(old))  # MONAI reads it as an old checkpoint
    new_params = unet_from_monai(sd, cfg)
    old_params = unet_from_monai(old, cfg)
    assert jax.tree.structure(new_params) == jax.tree.structure(old_params)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(old_params)):
        np.testing.assert_array_equal(a, b)  # so the outputs are the parity-tested ones


def test_conversion_errors_name_the_key():
    cfg = CASES["per_level_res_blocks"]
    sd = _monai(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "middle_block.attention.attn.to_k.bias"}
    with pytest.raises(ConversionError, match=r"missing, first: 'middle_block.attention.attn.to_k.bias'"):
        unet_from_monai(missing, cfg)
    with pytest.raises(ConversionError, match=r"unknown, first: 'extra.weight'"):
        unet_from_monai(dict(sd, **{"extra.weight": torch.zeros(1)}), cfg)
    # Wrapped as people save them: DDP prefix inside a training checkpoint.
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
    for a, b in zip(jax.tree.leaves(unet_from_monai(wrapped, cfg)),
                    jax.tree.leaves(unet_from_monai(sd, cfg))):
        np.testing.assert_array_equal(a, b)
    bad = dict(sd, **{"time_embed.0.weight": torch.zeros(32, 9)})
    with pytest.raises(ConversionError, match=r"shape mismatch at 'time_embed.0.weight': the "
                                              r"state_dict gives \(32, 9\), .* expects \(32, 8\)"):
        unet_from_monai(bad, cfg)
    # A state_dict of a different architecture: the first key the config lacks is named.
    with pytest.raises(ConversionError, match=r"down_blocks.0.resnets.1"):
        unet_from_monai(sd, dict(cfg, num_res_blocks=1))
    params = unet_from_monai(sd, cfg)
    with pytest.raises(ConversionError, match=r"params lack middle_block"):
        unet_to_monai({k: v for k, v in params.items() if k != "middle_block"}, cfg)
