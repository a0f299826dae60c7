"""Metrics against closed forms, MONAI's SSIMMetric and (if installed) skimage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.metrics import image as metrics


def _vol(seed=0, shape=(2, 16, 14, 12, 1)):
    rs = np.random.RandomState(seed)
    # Smooth-ish structure plus texture, in [0, 1].
    x = rs.rand(*shape).astype(np.float32)
    ramp = np.linspace(0, 1, shape[1], dtype=np.float32)[None, :, None, None, None]
    return np.clip(0.5 * x + 0.5 * ramp, 0, 1).astype(np.float32)


def test_psnr_closed_form_and_identical():
    x = _vol()
    out = np.asarray(metrics.psnr(x + 0.1, x))
    assert out.shape == (2,)
    np.testing.assert_allclose(out, 20.0, rtol=1e-4)  # 10 log10(1 / 0.01)
    np.testing.assert_allclose(metrics.psnr(x * 255 + 5.1, x * 255, data_range=255.0),
                               10 * np.log10(255.0 ** 2 / 5.1 ** 2), rtol=1e-4)
    same = np.asarray(metrics.psnr(x, x))
    assert np.all(np.isposinf(same))
    # Per sample: only the second sample is perturbed.
    y = x.copy()
    y[1] += 0.2
    out = np.asarray(jax.jit(metrics.psnr)(y, x))
    assert np.isposinf(out[0]) and abs(out[1] - 10 * np.log10(1 / 0.04)) < 1e-3


def test_mae_per_sample():
    x = _vol()
    y = x.copy()
    y[0] += 0.3
    y[1] -= 0.1
    np.testing.assert_allclose(metrics.mae(y, x), [0.3, 0.1], rtol=1e-5)


def test_dice_score_known_masks():
    a = np.zeros((3, 4, 4, 4, 1), np.float32)
    b = np.zeros_like(a)
    a[0, :2] = 1.0  # 32 voxels
    b[0, :1] = 0.9  # 16 voxels, all inside a -> 2*16/(32+16)
    a[1, 0, 0, 0] = 1.0  # disjoint
    b[1, 3, 3, 3] = 1.0
    # sample 2: both empty -> 1
    out = np.asarray(metrics.dice_score(a, b, threshold=0.5))
    np.testing.assert_allclose(out, [2 * 16 / 48, 0.0, 1.0], rtol=1e-6)
    # The threshold matters: 0.9 is not foreground at 0.95.
    np.testing.assert_allclose(metrics.dice_score(a, b, threshold=0.95)[0], 0.0)


def test_ssim_identity_and_monotone_in_noise():
    x = _vol()
    f = jax.jit(metrics.ssim3d)
    np.testing.assert_allclose(f(x, x), 1.0, atol=1e-5)
    rs = np.random.RandomState(1)
    n = rs.randn(*x.shape).astype(np.float32)
    values = [float(jnp.mean(f(x + s * n, x))) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_matches_monai():
    torch = pytest.importorskip("torch")
    regression = pytest.importorskip("monai.metrics.regression")
    x = _vol(2, shape=(2, 16, 14, 12, 2))
    y = np.clip(x + 0.1 * np.random.RandomState(3).randn(*x.shape), 0, 1).astype(np.float32)

    def t(a):
        return torch.from_numpy(a).permute(0, 4, 1, 2, 3).contiguous()

    for win in (7, 11):
        ref = regression.SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win,
                                    reduction="none")(t(y), t(x))
        np.testing.assert_allclose(metrics.ssim3d(y, x, win_size=win),
                                   ref.numpy().ravel(), rtol=1e-4, atol=1e-5)


def test_ssim_matches_skimage():
    sk = pytest.importorskip("skimage.metrics")
    x = _vol(4, shape=(1, 16, 14, 12, 1))
    y = np.clip(x + 0.1 * np.random.RandomState(5).randn(*x.shape), 0, 1).astype(np.float32)
    ref = sk.structural_similarity(y[0, ..., 0], x[0, ..., 0], data_range=1.0,
                                   gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
    np.testing.assert_allclose(metrics.ssim3d(y, x, win_size=11)[0], ref, rtol=1e-4)


def test_ssim_rejects_window_larger_than_volume():
    x = np.zeros((1, 16, 16, 5, 1), np.float32)
    with pytest.raises(ValueError, match="win_size"):
        metrics.ssim3d(x, x, win_size=7)


def test_metrics_equal_on_data_and_spatially_sharded_inputs():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    mesh = jax.make_mesh((2, 2), ("data", "spatial"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    x = _vol(6, shape=(2, 16, 14, 12, 1))
    y = np.clip(x + 0.1 * np.random.RandomState(7).randn(*x.shape), 0, 1).astype(np.float32)
    sh = NamedSharding(mesh, P("data", "spatial"))
    xs, ys = jax.device_put(x, sh), jax.device_put(y, sh)
    for f in (metrics.ssim3d, metrics.psnr, metrics.mae, metrics.dice_score):
        np.testing.assert_allclose(jax.jit(f)(ys, xs), f(y, x), rtol=1e-5, atol=1e-6)


def test_foreground_and_constant_psnr_match_numpy():
    x = _vol(8, shape=(2, 8, 8, 4, 1))
    y = np.where(x > 0.7, x, 0.0).astype(np.float32)  # sparse target
    r = np.clip(y + 0.05 * np.random.RandomState(9).randn(*y.shape), 0, 1).astype(np.float32)
    for b in range(2):
        fg = y[b] > 0.1
        mse = np.mean((r[b][fg] - y[b][fg]) ** 2)
        np.testing.assert_allclose(metrics.foreground_psnr(r, y, 0.1)[b], 10 * np.log10(1 / mse),
                                   rtol=1e-5)
        blank = np.mean(y[b] ** 2)
        np.testing.assert_allclose(metrics.constant_psnr(y, 0.0)[b], 10 * np.log10(1 / blank),
                                   rtol=1e-5)
        np.testing.assert_allclose(metrics.constant_psnr(y)[b], 10 * np.log10(1 / y[b].var()),
                                   rtol=1e-4)
        np.testing.assert_allclose(metrics.foreground_fraction(r, 0.1)[b], np.mean(r[b] > 0.1))
    # A blank reconstruction: whole-volume PSNR equals the blank baseline, Dice 0.
    zeros = np.zeros_like(y)
    np.testing.assert_allclose(metrics.psnr(zeros, y), metrics.constant_psnr(y, 0.0), rtol=1e-6)
    assert float(metrics.dice_score(zeros, y, 0.1)[0]) == 0.0
    assert np.isnan(metrics.foreground_psnr(r, np.zeros_like(y), 0.1)).all()
