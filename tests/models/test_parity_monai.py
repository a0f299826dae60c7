"""Our AutoencoderKL / PatchDiscriminator are MONAI's, weight for weight (float32).

MONAI models get random weights (torch.manual_seed), `ldm_jax.convert` maps them, and both
run on the same input (NCDHW for torch, NDHWC = (B, X, Y, Z, C) for us).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from ldm_jax.models import build_autoencoder, build_discriminator  # noqa: E402
from ldm_jax.models.convert import ConversionError, discriminator_from_monai, from_monai  # noqa: E402

pytestmark = pytest.mark.tap_conv  # the convolutions CPU runs use, against MONAI's

TOL = 1e-5

CASES = {
    "plain": dict(num_channels=(8, 16), num_res_blocks=1, attention_levels=(False, False),
                  with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True,
                  use_convtranspose=False),
    "attn_deconv_3lvl": dict(num_channels=(8, 16, 16), num_res_blocks=(1, 2, 1),
                             attention_levels=(False, True, True),
                             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=True,
                             use_convtranspose=True),
    "attn_first_no_mid": dict(num_channels=(8, 16), num_res_blocks=(2, 1),
                              attention_levels=(True, False), in_channels=2, out_channels=3,
                              latent_channels=4, with_encoder_nonlocal_attn=True,
                              with_decoder_nonlocal_attn=False, use_convtranspose=False),
}


def _ae_cfg(case):
    cfg = dict(in_channels=1, out_channels=1, latent_channels=3, norm_num_groups=4,
               norm_eps=1e-6, initial_downsample_factor=1, downsample_factors=None,
               use_conv_downsample=True, upsample_head="nearest_conv", strided_kernel=None,
               dtype="float32", remat="none")
    cfg.update(case)
    return cfg


def _monai_ae(cfg, seed=0):
    torch.manual_seed(seed)
    m = monai_nets.AutoencoderKL(
        spatial_dims=3, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        num_res_blocks=cfg["num_res_blocks"], channels=cfg["num_channels"],
        attention_levels=cfg["attention_levels"], latent_channels=cfg["latent_channels"],
        norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
        with_encoder_nonlocal_attn=cfg["with_encoder_nonlocal_attn"],
        with_decoder_nonlocal_attn=cfg["with_decoder_nonlocal_attn"],
        use_convtranspose=cfg["use_convtranspose"])
    # Non-trivial norm affines (MONAI inits them to 1 and 0) so a swapped scale/bias shows.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case,chunks", [(c, None) for c in sorted(CASES)]
                         + [("attn_deconv_3lvl", (16, 24))])
def test_autoencoder_matches_monai(case, chunks, monkeypatch):
    # chunks: force the chunked attention with several (padded, masked) blocks per layer.
    if chunks is not None:
        from ldm_jax.models import layers
        monkeypatch.setattr(layers, "default_chunks", lambda: chunks)
    cfg = _ae_cfg(CASES[case])
    tm = _monai_ae(cfg)
    torch.manual_seed(1)
    xt = torch.randn(2, cfg["in_channels"], 16, 16, 8)
    with torch.no_grad():
        mu_t, sigma_t = tm.encode(xt)
        rec_t = tm.reconstruct(xt)

    model = build_autoencoder(cfg)
    params = from_monai(tm.state_dict(), cfg)
    x = xt.numpy().transpose(0, 2, 3, 4, 1)

    def run(params, x):
        v = {"params": params}
        mu, sigma = model.apply(v, x, method=model.encode)
        return mu, sigma, model.apply(v, mu, method=model.decode)

    # XLA's cheap backend optimisation: this test compiles far more than it runs.
    mu, sigma, rec = jax.jit(run).lower(params, x).compile(
        compiler_options={"xla_backend_optimization_level": 0})(params, x)
    to_ndhwc = (0, 2, 3, 4, 1)
    errs = dict(mu=_rel(mu, mu_t.numpy().transpose(to_ndhwc)),
                sigma=_rel(sigma, sigma_t.numpy().transpose(to_ndhwc)),
                recon=_rel(rec, rec_t.numpy().transpose(to_ndhwc)))
    print(f"parity {case}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert rec.shape == (2, 16, 16, 8, cfg["out_channels"])
    assert all(e <= TOL for e in errs.values()), errs


def test_from_monai_names_the_problem():
    cfg = _ae_cfg(CASES["plain"])
    sd = _monai_ae(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "encoder.blocks.1.norm1.weight"}
    with pytest.raises(ConversionError, match="encoder.blocks.1.norm1.weight"):
        from_monai(missing, cfg)
    extra = dict(sd, **{"decoder.blocks.99.weight": sd["decoder.blocks.0.conv.bias"]})
    with pytest.raises(ConversionError, match="decoder.blocks.99.weight"):
        from_monai(extra, cfg)
    with pytest.raises(ConversionError, match="shape mismatch"):
        from_monai(sd, dict(cfg, latent_channels=4))
    with pytest.raises(ValueError, match="initial_downsample_factor must be 1"):
        from_monai(sd, dict(cfg, initial_downsample_factor=2))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_discriminator_matches_monai(norm):
    torch.manual_seed(0)
    tm = monai_nets.PatchDiscriminator(spatial_dims=3, num_layers_d=3, channels=8,
                                       in_channels=1, out_channels=1, norm=norm.upper())
    if norm == "batch":  # non-trivial running statistics
        with torch.no_grad():
            for i in range(3):
                bn = getattr(tm, str(i)).adn.N
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
    cfg = dict(in_channels=1, out_channels=1, num_layers_d=3, num_channels=8, kernel_size=4,
               norm=norm, dtype="float32")
    model = build_discriminator(cfg)
    variables = discriminator_from_monai(tm.state_dict(), cfg)
    torch.manual_seed(1)
    xt = torch.randn(2, 1, 32, 32, 24)
    x = xt.numpy().transpose(0, 2, 3, 4, 1)
    for train in (True, False):
        tm.train(train)
        with torch.no_grad():
            ref = tm(xt)
        if train and norm == "batch":
            # MONAI updated its running statistics in place; ours come back as the update,
            # which the eval pass below then uses: equal outputs there check the update too.
            out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            variables = {**variables, **updates}
        else:
            out = model.apply(variables, x, train=train)
        assert len(out) == len(ref) == 3 + 2
        errs = [_rel(o, r.numpy().transpose(0, 2, 3, 4, 1)) for o, r in zip(out, ref)]
        print(f"parity discriminator {norm} train={train}: max {max(errs):.2e}")
        assert max(errs) <= TOL, errs
