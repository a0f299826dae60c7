"""Losses against numpy hand computations and, where installed, MONAI/torch references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from ldm_jax.autoencoder import losses
from ldm_jax.errors import ConfigError


def _cfg(**overrides):
    cfg = default.get_config().loss
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _pair(seed=0, shape=(2, 6, 5, 4, 1)):
    rs = np.random.RandomState(seed)
    target = rs.rand(*shape).astype(np.float32)
    target[target < 0.7] = 0.0  # sparse foreground, like filaments
    recon = (target + 0.2 * rs.randn(*shape)).astype(np.float32)
    return recon, target


# ---------------------------------------------------------------- reconstruction
def test_l1_and_mse_match_numpy():
    r, t = _pair()
    np.testing.assert_allclose(losses.reconstruction_loss(r, t, _cfg(recon="l1")),
                               np.mean(np.abs(r - t)), rtol=1e-6)
    np.testing.assert_allclose(losses.reconstruction_loss(r, t, _cfg(recon="mse")),
                               np.mean((r - t) ** 2), rtol=1e-6)


def test_weighted_l1_matches_numpy_and_weights_foreground():
    r, t = _pair()
    cfg = _cfg(recon="weighted", fg_weight=10.0, fg_threshold=0.1)
    w = np.where(t > 0.1, 10.0, 1.0)
    expected = np.sum(w * np.abs(r - t)) / np.sum(w)
    got = losses.reconstruction_loss(r, t, cfg)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Same error placed on foreground vs background: foreground costs more.
    t2 = np.zeros((1, 4, 4, 4, 1), np.float32)
    t2[0, 0, 0, 0, 0] = 1.0
    err_fg = t2.copy()
    err_fg[0, 0, 0, 0, 0] = 0.0  # miss the foreground voxel by 1
    err_bg = t2.copy()
    err_bg[0, 1, 1, 1, 0] = 1.0  # false positive of 1
    assert losses.reconstruction_loss(err_fg, t2, cfg) > 5 * losses.reconstruction_loss(
        err_bg, t2, cfg)
    # fg_weight=1 is plain L1.
    np.testing.assert_allclose(
        losses.reconstruction_loss(r, t, _cfg(recon="weighted", fg_weight=1.0)),
        np.mean(np.abs(r - t)), rtol=1e-6)


def _np_dice(r, t, s):
    p = np.clip(r, 0, 1)
    per = []
    for b in range(r.shape[0]):
        per.append(1 - (2 * np.sum(p[b] * t[b]) + s) / (np.sum(p[b]) + np.sum(t[b]) + s))
    return np.mean(per)


def test_dice_matches_numpy_per_sample_mean():
    r, t = _pair(shape=(3, 6, 5, 4, 1))
    cfg = _cfg(recon="dice", dice_smooth=1e-5)
    np.testing.assert_allclose(losses.reconstruction_loss(r, t, cfg),
                               _np_dice(r, t, 1e-5), rtol=1e-5)
    # Perfect binary prediction -> 0; disjoint -> ~1.
    mask = (t > 0).astype(np.float32)
    assert float(losses.reconstruction_loss(mask, mask, cfg)) < 1e-6
    a = np.zeros((1, 4, 4, 4, 1), np.float32)
    b = a.copy()
    a[0, :2] = 1
    b[0, 2:] = 1
    np.testing.assert_allclose(losses.reconstruction_loss(a, b, cfg), 1.0, atol=1e-6)


def test_dice_is_bounded_for_negative_predictions():
    """Unclipped, negative outputs drive the denominator to 0 and the loss to -inf."""
    t = np.zeros((1, 4, 4, 4, 1), np.float32)
    t[0, 0] = 1.0
    r = np.full_like(t, -0.2)
    r[0, 0] = 1.0
    loss = float(losses.reconstruction_loss(r, t, _cfg(recon="dice")))
    assert 0.0 <= loss <= 1.0


def test_combined_is_weighted_sum():
    r, t = _pair()
    cfg = _cfg(recon="combined", l1_weight=0.7, mse_weight=0.3, dice_weight=0.5,
               dice_smooth=1e-5)
    expected = (0.7 * np.mean(np.abs(r - t)) + 0.3 * np.mean((r - t) ** 2)
                + 0.5 * _np_dice(r, t, 1e-5))
    np.testing.assert_allclose(losses.reconstruction_loss(r, t, cfg), expected, rtol=1e-5)


def test_unknown_recon_lists_valid_names():
    r, t = _pair()
    with pytest.raises(ValueError, match="l1, mse, weighted, dice, combined"):
        losses.reconstruction_loss(r, t, _cfg(recon="huber"))
    with pytest.raises(ConfigError, match="recon"):
        losses.check_loss_config(_cfg(recon="huber"))
    with pytest.raises(ConfigError, match="noise"):
        losses.check_loss_config(_cfg(noise="salt"))
    losses.check_loss_config(_cfg())  # defaults are valid


def test_losses_are_float32_under_jit_with_bf16_inputs():
    r, t = _pair()
    for name in losses.RECON_LOSSES:
        cfg = _cfg(recon=name)
        f = jax.jit(lambda a, b, cfg=cfg: losses.reconstruction_loss(a, b, cfg))
        out = f(jnp.asarray(r, jnp.bfloat16), jnp.asarray(t))
        assert out.dtype == jnp.float32 and out.shape == () and np.isfinite(out)
        g = jax.grad(lambda a, cfg=cfg: losses.reconstruction_loss(a, t, cfg))(jnp.asarray(r))
        assert np.all(np.isfinite(g)) and np.any(g != 0)


# ---------------------------------------------------------------- KL
def _np_kl(mu, sigma):
    per = 0.5 * np.sum(mu ** 2 + sigma ** 2 - np.log(sigma ** 2) - 1,
                       axis=tuple(range(1, mu.ndim)))
    return per.mean()


def test_kl_matches_numpy_and_is_zero_at_prior():
    rs = np.random.RandomState(1)
    mu = rs.randn(3, 4, 4, 2, 3).astype(np.float32)
    sigma = np.exp(0.5 * rs.randn(3, 4, 4, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.kl_loss(mu, sigma), _np_kl(mu.astype(np.float64),
                                                                  sigma.astype(np.float64)),
                               rtol=1e-5)
    assert abs(float(losses.kl_loss(np.zeros_like(mu), np.ones_like(sigma)))) < 1e-6
    # The model's smallest sigma, exp(-30/2), stays finite in value and gradient.
    tiny = np.full_like(sigma, np.exp(-15.0))
    assert np.isfinite(losses.kl_loss(mu, tiny))
    g = jax.grad(lambda s: losses.kl_loss(mu, s))(jnp.asarray(tiny))
    assert np.all(np.isfinite(g))


def test_kl_matches_monai_tutorial_torch_formula():
    torch = pytest.importorskip("torch")
    rs = np.random.RandomState(2)
    mu = rs.randn(2, 4, 3, 2, 3).astype(np.float32)
    sigma = np.exp(0.5 * rs.randn(2, 4, 3, 2, 3)).astype(np.float32)
    # MONAI tutorials (channels-first there; the sum over all non-batch axes is layout-free).
    z_mu = torch.from_numpy(mu).permute(0, 4, 1, 2, 3)
    z_sigma = torch.from_numpy(sigma).permute(0, 4, 1, 2, 3)
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1,
                         dim=[1, 2, 3, 4])
    ref = (torch.sum(kl) / kl.shape[0]).item()
    np.testing.assert_allclose(losses.kl_loss(mu, sigma), ref, rtol=1e-5)


# ---------------------------------------------------------------- adversarial
def _logits(seed):
    rs = np.random.RandomState(seed)
    feats = [rs.randn(2, 4, 4, 2, 8).astype(np.float32) for _ in range(2)]
    return feats + [(1.5 * rs.randn(2, 3, 3, 2, 1)).astype(np.float32)]


def test_adversarial_losses_match_numpy():
    fake, real = _logits(0), _logits(1)

    def act(x):
        return np.where(x >= 0, x, 0.05 * x)

    np.testing.assert_allclose(losses.generator_adv_loss(fake),
                               np.mean((act(fake[-1]) - 1) ** 2), rtol=1e-6)
    np.testing.assert_allclose(
        losses.discriminator_loss(fake, real),
        0.5 * (np.mean(act(fake[-1]) ** 2) + np.mean((act(real[-1]) - 1) ** 2)), rtol=1e-6)
    # A bare logits array is the same as a list ending in it.
    np.testing.assert_allclose(losses.generator_adv_loss(fake[-1]),
                               losses.generator_adv_loss(fake), rtol=0)


def test_adversarial_losses_match_monai():
    torch = pytest.importorskip("torch")
    adv = pytest.importorskip("monai.losses.adversarial_loss")
    loss = adv.PatchAdversarialLoss(criterion="least_squares")
    fake, real = _logits(3), _logits(4)

    def to_t(feats):  # MONAI's discriminator is channels-first
        return [torch.from_numpy(f).permute(0, 4, 1, 2, 3).contiguous() for f in feats]

    tf, tr = to_t(fake), to_t(real)
    # MONAI tutorials: logits = discriminator(x)[-1].
    gen_ref = loss(tf[-1], target_is_real=True, for_discriminator=False).item()
    d_ref = 0.5 * (loss(tf[-1], target_is_real=False, for_discriminator=True)
                   + loss(tr[-1], target_is_real=True, for_discriminator=True)).item()
    np.testing.assert_allclose(losses.generator_adv_loss(fake), gen_ref, rtol=1e-5)
    np.testing.assert_allclose(losses.discriminator_loss(fake, real), d_ref, rtol=1e-5)


def test_adv_weight_warmup_with_traced_step():
    cfg = _cfg(adv_weight=0.01, adv_warmup_steps=5)
    f = jax.jit(lambda s: losses.adv_weight_at(s, cfg))
    got = [float(f(jnp.int32(s))) for s in (0, 4, 5, 100)]
    np.testing.assert_allclose(got, [0.0, 0.0, 0.01, 0.01], rtol=1e-6)
    assert float(losses.adv_weight_at(0, _cfg(adv_weight=0.3, adv_warmup_steps=0))) == \
        pytest.approx(0.3)


# ---------------------------------------------------------------- noise
def _noisy(x, seed, **cfg):
    loss_cfg = _cfg(**cfg)
    return np.asarray(jax.jit(lambda a, k: losses.add_noise(a, k, loss_cfg))(
        x, jax.random.key(seed)))


def test_noise_none_is_identity():
    x = np.random.RandomState(0).rand(2, 8, 8, 4, 1).astype(np.float32)
    out = losses.add_noise(x, jax.random.key(0), _cfg(noise=None))
    np.testing.assert_array_equal(out, x)


def test_gaussian_noise_has_configured_std_and_leaves_input_untouched():
    x = np.random.RandomState(0).rand(2, 16, 16, 8, 1).astype(np.float32)
    x_copy = x.copy()
    diff = _noisy(x, 1, noise="gaussian", noise_std=0.2) - x
    assert abs(diff.std() - 0.2) < 0.01 and abs(diff.mean()) < 0.01
    np.testing.assert_array_equal(x, x_copy)


def test_dropout_noise_zeroes_fraction_p():
    x = np.ones((2, 16, 16, 8, 1), np.float32)
    out = _noisy(x, 2, noise="dropout", noise_dropout=0.3)
    assert abs(np.mean(out == 0) - 0.3) < 0.02
    assert set(np.unique(out)) <= {0.0, 1.0}


def test_mixed_noise_picks_one_mode_per_sample():
    x = np.full((32, 4, 4, 4, 1), 0.5, np.float32)
    out = _noisy(x, 3, noise="mixed", noise_std=0.1, noise_dropout=0.3)
    modes = []
    for b in range(x.shape[0]):
        vals = out[b]
        is_dropout = np.all((vals == 0) | (vals == 0.5))
        is_gauss = np.all(vals != 0.5)
        assert is_dropout != is_gauss, "each sample is exactly one of the two modes"
        modes.append(is_dropout)
    assert 0 < sum(modes) < len(modes)


def test_noise_and_losses_equal_on_sharded_batch():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    mesh = jax.make_mesh((2, 2), ("data", "spatial"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    sh = NamedSharding(mesh, P("data", "spatial"))
    r, t = _pair(shape=(2, 8, 4, 4, 1))
    cfg = _cfg(noise="mixed", recon="combined", mse_weight=0.5)

    def f(a, b, k):
        return losses.add_noise(b, k, cfg), losses.reconstruction_loss(a, b, cfg)

    key = jax.random.key(5)
    ref = jax.jit(f)(r, t, key)
    got = jax.jit(f)(jax.device_put(r, sh), jax.device_put(t, sh), key)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
