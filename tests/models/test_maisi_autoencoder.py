"""Our AutoencoderKlMaisi is MONAI's (spatial_dims=3), weight for weight, float32, and
MAISI's memory tactics (num_splits / dim_split / save_mem / print_info) leave MONAI's
function unchanged, so one model of ours matches every setting; norm_float16 rounds
within half precision."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
maisi_ae = pytest.importorskip("monai.apps.generation.maisi.networks.autoencoderkl_maisi")

from ldm_jax.errors import ConversionError
from ldm_jax.models.maisi import AutoencoderKlMaisi
from ldm_jax.models.maisi.autoencoder import MaisiGroupNorm3D, trilinear_upsample2
from ldm_jax.models.maisi.convert import autoencoder_maisi_from_monai, autoencoder_maisi_to_monai
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch

TOL = 1e-5
BASE = {"in_channels": 1, "out_channels": 1, "num_res_blocks": (1, 1), "num_channels": (8, 16),
        "attention_levels": (False, False), "latent_channels": 4, "norm_num_groups": 4}
CASES = {
    "released_like": BASE,  # MAISI's release: no attention, no non-local blocks
    "attention_fc_combined_linear": dict(BASE, attention_levels=(False, True),
                                         with_encoder_nonlocal_attn=True,
                                         with_decoder_nonlocal_attn=True, include_fc=True,
                                         use_combined_linear=True, num_res_blocks=(1, 2)),
    "attention_without_fc": dict(BASE, attention_levels=(True, False),
                                 with_encoder_nonlocal_attn=True, include_fc=False),
    "convtranspose_three_levels": dict(BASE, in_channels=2, out_channels=3,
                                       num_channels=(4, 8, 8), num_res_blocks=(1, 2, 1),
                                       attention_levels=(False, False, False),
                                       use_convtranspose=True, with_decoder_nonlocal_attn=True),
}


def _pair(cfg, seed=0, **monai_kw):
    m = perturb(maisi_ae.AutoencoderKlMaisi(spatial_dims=3, **cfg, **monai_kw), seed)
    ours = AutoencoderKlMaisi(**cfg)
    return m, ours, autoencoder_maisi_from_monai(m.state_dict(), ours)


def _run_monai(m, x):
    with torch.no_grad():
        mu, sigma = m.encode(to_torch(x))
        return to_ours(mu), to_ours(sigma), to_ours(m.decode(mu))


def _run_ours(model, params, x):
    mu, sigma = model.apply({"params": params}, jnp.asarray(x), method="encode")
    return mu, sigma, model.apply({"params": params}, mu, method="decode")


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_monai(name):
    cfg = CASES[name]
    m, ours, params = _pair(cfg, num_splits=1)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4, cfg["in_channels"])).astype(
        np.float32)
    for ref, got, what in zip(_run_monai(m, x), _run_ours(ours, params, x),
                              ("z_mu", "z_sigma", "decoded")):
        assert rel_err(ref, got) <= TOL, (name, what, rel_err(ref, got))


def test_round_trip_both_ways():
    cfg = CASES["attention_fc_combined_linear"]
    m, ours, params = _pair(cfg, num_splits=1)
    sd = autoencoder_maisi_to_monai(params, ours)
    assert set(sd) == set(m.state_dict())
    m2 = maisi_ae.AutoencoderKlMaisi(spatial_dims=3, **cfg)
    m2.load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    with pytest.raises(ConversionError, match="missing|unexpected|does not fit"):
        autoencoder_maisi_from_monai(m.state_dict(), AutoencoderKlMaisi(**BASE))


@pytest.mark.parametrize("dim_split", [0, 1, 2])
def test_memory_tactics_do_not_change_the_function(dim_split):
    """MONAI's split convolutions (2 and 4 slabs along each axis), save_mem and print_info:
    the same outputs as ours (and as MONAI unsplit)."""
    cfg = dict(BASE, num_channels=(4, 8))
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
    m, ours, params = _pair(cfg, num_splits=1)
    want = _run_ours(ours, params, x)
    for num_splits, save_mem, print_info in ((2, True, False), (4, False, True)):
        ms = maisi_ae.AutoencoderKlMaisi(spatial_dims=3, **cfg, num_splits=num_splits,
                                         dim_split=dim_split, save_mem=save_mem,
                                         print_info=print_info).eval()
        ms.load_state_dict(m.state_dict())
        for ref, got in zip(_run_monai(ms, x), want):
            assert rel_err(ref, got) <= TOL, (num_splits, dim_split)


def test_norm_float16_matches_monai_norm_and_stays_within_half_precision():
    rng = np.random.default_rng(2)
    x = (3 * rng.standard_normal((2, 4, 4, 6, 8)) + 1).astype(np.float32)
    norm = maisi_ae.MaisiGroupNorm3D(4, 8, eps=1e-6, norm_float16=True)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
        norm.bias.copy_(torch.linspace(-1, 1, 8))
        ref = norm(to_torch(x))
    assert ref.dtype == torch.float16
    params = {"scale": np.linspace(0.5, 2, 8, dtype=np.float32),
              "bias": np.linspace(-1, 1, 8, dtype=np.float32)}
    got = MaisiGroupNorm3D(4, 1e-6, norm_float16=True).apply({"params": params}, jnp.asarray(x))
    assert got.dtype == jnp.float16
    diff = np.abs(to_ours(ref.float()) - np.asarray(got, np.float32))
    assert diff.max() <= 2e-3  # at most one half-precision ulp at |y| < 4

    cfg = CASES["attention_fc_combined_linear"]
    _, ours, params = _pair(cfg, num_splits=1)
    half = AutoencoderKlMaisi(**cfg, norm_float16=True)
    x = rng.standard_normal((1, 8, 8, 8, 1)).astype(np.float32)
    full = np.asarray(ours.apply({"params": params}, jnp.asarray(x), method="reconstruct"))
    rounded = np.asarray(half.apply({"params": params}, jnp.asarray(x), method="reconstruct"))
    err = rel_err(full, rounded)
    assert 0 < err <= 1e-2, err  # rounding happened, and only at half precision


def test_trilinear_upsample_is_torch_interpolate():
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5, 2)).astype(np.float32)
    ref = torch.nn.functional.interpolate(to_torch(x), scale_factor=2.0, mode="trilinear")
    assert rel_err(to_ours(ref), trilinear_upsample2(jnp.asarray(x))) <= 1e-6


def test_bad_input_shape_is_refused():
    model = AutoencoderKlMaisi(**BASE)
    _, _, params = _pair(BASE, num_splits=1)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply({"params": params}, jnp.zeros((1, 7, 8, 8, 1)), method="encode")
