"""ldm_jax.metrics.conditioning against closed forms (issue 27)."""

import numpy as np
import pytest

from ldm_jax.metrics import conditioning as cm


def _filaments(seed=0, shape=(2, 12, 10, 16, 1)):
    """Sparse bright dots on a dim background: one structure per column at most."""
    rs = np.random.RandomState(seed)
    v = (0.05 * rs.rand(*shape)).astype(np.float32)
    b, x, y, z, _ = shape
    for i in range(b):
        for _ in range(20):
            v[i, rs.randint(x), rs.randint(y), rs.randint(3, z - 6), 0] = 0.5 + 0.5 * rs.rand()
    return v


def test_pearson_affine_and_anti():
    x = np.random.RandomState(0).rand(3, 5, 4, 1)
    np.testing.assert_allclose(cm.pearson(x, 2 * x + 1), 1.0, atol=1e-12)
    np.testing.assert_allclose(cm.pearson(x, -x), -1.0, atol=1e-12)
    y = np.random.RandomState(1).rand(3, 5, 4, 1)
    r = cm.pearson(x, y)
    assert r.shape == (3,) and np.all(np.abs(r) < 0.9)
    np.testing.assert_allclose(r[0], np.corrcoef(x[0].ravel(), y[0].ravel())[0, 1])
    # A constant item is undefined, the others are not.
    y[1] = 0.3
    r = cm.pearson(x, y)
    assert np.isnan(r[1]) and np.isfinite(r[0])
    with pytest.raises(ValueError, match="shapes differ"):
        cm.pearson(x, y[:, :4])


def test_psnr_minmax_ignores_scale_and_offset():
    x = np.random.RandomState(0).rand(2, 6, 6, 1, 1)
    assert np.all(cm.psnr_minmax(x, 5 * x + 2) > 250)  # equal up to rounding
    # One pixel (not the min or the max) moved by 0.25 of the range: 10 log10(N / 0.0625).
    xn = cm.minmax(x)
    flat = xn[1].ravel()
    i = int(np.argsort(flat)[len(flat) // 2])
    y = xn.copy().reshape(2, -1)
    y[1, i] += 0.25 if flat[i] < 0.5 else -0.25
    out = cm.psnr_minmax(x, y.reshape(x.shape))
    assert np.isposinf(out[0])
    np.testing.assert_allclose(out[1], 10 * np.log10(flat.size / 0.0625), rtol=1e-9)
    np.testing.assert_allclose(cm.minmax(np.full((1, 3), 7.0)), 0.0)
    np.testing.assert_allclose(cm.minmax(np.array([[1.0, 3.0, 2.0]])), [[0, 1, 0.5]])


def test_psnr_and_dice_wrap_image_metrics():
    t = _filaments()
    np.testing.assert_allclose(cm.psnr(t + 0.1, t), 20.0, rtol=1e-4)
    np.testing.assert_allclose(cm.dice(t, t), 1.0)
    empty = np.zeros_like(t)
    np.testing.assert_allclose(cm.dice(empty, t), 0.0)
    np.testing.assert_allclose(cm.dice(empty, empty), 1.0)


def test_depth_centroid_known_columns():
    v = np.zeros((1, 2, 2, 8, 1), np.float32)
    v[0, 0, 0, 3] = 1.0  # one voxel at z=3
    v[0, 0, 1, 2] = 1.0  # weights 1 at z=2, 3 at z=6 -> (2 + 18) / 4 = 5
    v[0, 0, 1, 6] = 3.0
    v[0, 1, 0, 1] = 0.05  # below threshold only: no depth
    v[0, 1, 1, :] = 0.5  # constant column: the middle, 3.5
    c = cm.depth_centroid(v, axis=2, threshold=0.1)
    assert c.shape == (1, 2, 2)
    np.testing.assert_allclose(c[0, 0], [3.0, 5.0])
    assert np.isnan(c[0, 1, 0])
    np.testing.assert_allclose(c[0, 1, 1], 3.5)
    # Another axis: columns along X, output (B, Y, Z).
    cx = cm.depth_centroid(v, axis=0)
    assert cx.shape == (1, 2, 8)
    np.testing.assert_allclose(cx[0, 0, 3], 0.0)


def test_depth_error_self_and_shift():
    t = _filaments()
    np.testing.assert_allclose(cm.depth_error(t, t), 0.0)
    np.testing.assert_allclose(cm.depth_coverage(t, t), 1.0)
    for shift in (1, 3):
        s = np.roll(t, shift, axis=3)  # structures at z in [3, 10]: no wrap-around
        np.testing.assert_allclose(cm.depth_error(s, t), float(shift), atol=1e-9)
        np.testing.assert_allclose(cm.depth_error(t, s), float(shift), atol=1e-9)
    # Half the true columns missing in the sample: coverage 0.5, error over the rest.
    s = np.roll(t, 2, axis=3)
    s[:, : t.shape[1] // 2] = 0.0
    cov = cm.depth_coverage(s, t)
    assert np.all((cov > 0.2) & (cov < 0.8))
    np.testing.assert_allclose(cm.depth_error(s, t), 2.0, atol=1e-9)
    # Nothing at all: NaN error, zero coverage.
    blank = np.zeros_like(t)
    assert np.all(np.isnan(cm.depth_error(blank, t)))
    np.testing.assert_allclose(cm.depth_coverage(blank, t), 0.0)
    np.testing.assert_allclose(cm.voxels_to_nm([1.5]), [30.0])
    np.testing.assert_allclose(cm.voxels_to_nm(2.0, voxel_size=10.0), 20.0)


def test_depth_error_of_back_projection_is_distance_to_middle():
    v = np.zeros((1, 4, 4, 9, 1), np.float32)
    v[0, 0, 0, 1] = 1.0  # |1 - 4| = 3
    v[0, 2, 3, 6] = 1.0  # |6 - 4| = 2
    proj = v.sum(axis=3, keepdims=True)
    bp = cm.back_projection(proj, axis=2, size=9, scale=1.0)
    assert bp.shape == v.shape
    np.testing.assert_allclose(cm.depth_error(bp, v), 2.5)


def test_back_projection_and_scale_fit():
    rs = np.random.RandomState(0)
    cond = rs.rand(3, 6, 5, 1, 2).astype(np.float32)
    bp = cm.back_projection(cond, axis=2, size=7, scale=0.5)
    assert bp.shape == (3, 6, 5, 7, 2)
    np.testing.assert_allclose(bp[:, :, :, 4], 0.5 * cond[:, :, :, 0])
    # Volumes that ARE a scaled smear: least squares recovers the scale exactly.
    vols = cm.back_projection(cond, axis=2, size=7, scale=0.125)
    assert abs(cm.fit_back_projection_scale(cond, vols, axis=2) - 0.125) < 1e-6
    # Plus zero-mean noise independent of the smear: close.
    noisy = vols + rs.normal(0, 0.01, vols.shape).astype(np.float32)
    assert abs(cm.fit_back_projection_scale(cond, noisy) - 0.125) < 2e-3
    # Along X.
    cx = rs.rand(2, 1, 4, 3, 1)
    vx = 3.0 * np.repeat(cx, 5, axis=1)
    assert abs(cm.fit_back_projection_scale(cx, vx, axis=0) - 3.0) < 1e-6
    with pytest.raises(ValueError, match="size 1 on axis 2"):
        cm.back_projection(vols, axis=2, size=7)
    with pytest.raises(ValueError, match="objective"):
        cm.fit_back_projection_scale(cond, vols, objective="l1")


def test_back_projection_dice_scale_puts_the_threshold_right():
    # Truth: every column holds one voxel of value 1 -> sum projection 1 per pixel, but
    # columns of varying brightness in the condition. The smear is above 0.1 where
    # scale * cond > 0.1; the best Dice scale keeps the bright columns, not all.
    t = _filaments(seed=3)
    cond = t.sum(axis=3, keepdims=True)
    s_dice = cm.fit_back_projection_scale(cond, t, objective="dice", threshold=0.1)
    s_mse = cm.fit_back_projection_scale(cond, t, objective="mse")
    d_dice = cm.dice(cm.back_projection(cond, 2, t.shape[3], s_dice), t).mean()
    d_mse = cm.dice(cm.back_projection(cond, 2, t.shape[3], s_mse), t).mean()
    assert d_dice >= d_mse and s_dice > 0


def test_trilinear_reproduces_a_ramp_from_its_block_means():
    x, y, z, f = 16, 12, 8, 4
    ramp = (np.arange(x)[:, None, None] * 0.02 + np.arange(y)[None, :, None] * 0.03
            + np.arange(z)[None, None, :] * 0.05).astype(np.float32)
    v = ramp[None, ..., None]
    coarse = cm.block_mean(v, f)
    assert coarse.shape == (1, 4, 3, 2, 1)
    # Block means of a linear ramp are the ramp at block centres ((i + 0.5) * f - 0.5).
    np.testing.assert_allclose(coarse[0, 1, 1, 0, 0],
                               0.02 * 5.5 + 0.03 * 5.5 + 0.05 * 1.5, rtol=1e-6)
    up = cm.trilinear_upsample(coarse, (x, y, z))
    assert up.shape == v.shape and up.dtype == np.float32
    # Interior: between the first and last coarse centres (1.5 and n - 2.5) on every
    # axis, i.e. voxels 2 .. n - 3, the ramp exactly; a corner-aligned resampling (coarse
    # voxel i at fine voxel i * (n - 1) / (m - 1)) would be off there.
    sl = (slice(2, x - 2), slice(2, y - 2), slice(2, z - 2))
    np.testing.assert_allclose(up[0][sl][..., 0], ramp[sl], atol=1e-5)
    # Outside: the edge value is held (the first coarse centre's value at voxels 0, 1).
    np.testing.assert_allclose(up[0, 0, 5, 5, 0], up[0, 2, 5, 5, 0] - 0.0, atol=0.05)
    with pytest.raises(ValueError):
        cm.trilinear_upsample(coarse[0], (x, y, z))


def test_diversity():
    t = _filaments()[:1]
    same = np.repeat(t, 3, axis=0)
    d = cm.diversity(same)
    assert d["voxel_std"] == 0.0 and d["pairwise_dice"] == 1.0
    assert np.isposinf(d["pairwise_psnr"]) and d["fg_voxel_std"] == 0.0
    two = np.concatenate([t, t + 0.2])
    d = cm.diversity(two)
    np.testing.assert_allclose(d["voxel_std"], 0.1, rtol=1e-6)  # ddof 0: |a - b| / 2
    np.testing.assert_allclose(d["pairwise_psnr"], 10 * np.log10(1 / 0.04), rtol=1e-6)
    assert d["num_samples"] == 2
    apart = np.concatenate([t, np.roll(t, 5, axis=1)])
    assert cm.diversity(apart)["pairwise_dice"] < 0.5
    assert np.isnan(cm.diversity(t)["voxel_std"])
