"""ldm_jax.diffusion.aligned: conditions computed from volumes (a projection through a
depth-dependent point-spread, a coarse volume), their config checks and `lift` to the
UNet's input grid. Pure numpy / jax on tiny arrays (no model)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import aligned
from ldm_jax.errors import ConfigError


def cond_cfg(kind="projection", **fields):
    """The `conditioning` section of configs/diffusion/default.py with `aligned` = kind and
    `fields` set in its projection (kind "projection") or coarse section."""
    from configs.diffusion import default
    c = default.get_config().conditioning
    c.aligned = kind
    if kind in ("projection", "coarse", "inpainting"):
        c[kind].update(fields)
    return c


def stage2(kind, mode="concat", **fields):
    from configs.diffusion import default
    config = default.get_config()
    config.conditioning = cond_cfg(kind, **fields)
    config.conditioning.aligned_mode = mode
    return config


def _vol(shape=(2, 6, 5, 4, 1), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _minmax(a):
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    hi = a.max(axis=(1, 2, 3), keepdims=True)
    return (a - lo) / (hi - lo)


# ------------------------------------------------------------------ projection


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_projection_without_psf_is_the_normalised_sum(axis):
    v = _vol((2, 6, 5, 4, 2))
    c = aligned.compute_condition(v, cond_cfg(axis=axis))
    want = _minmax(v.sum(axis=1 + axis, keepdims=True))
    expected_shape = list(v.shape)
    expected_shape[1 + axis] = 1
    assert c.shape == tuple(expected_shape) and c.dtype == np.float32
    assert isinstance(c, np.ndarray)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-6)
    # min-max per volume and channel: each image spans exactly [0, 1]
    np.testing.assert_allclose(c.min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(c.max(axis=(1, 2, 3)), 1.0, atol=1e-6)
    assert aligned.condition_grid(cond_cfg(axis=axis), v.shape[1:4]) == tuple(
        expected_shape[1:4])


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_projection_other_reductions(reduce):
    v = _vol()
    c = aligned.compute_condition(v, cond_cfg(reduce=reduce, normalize=False))
    np.testing.assert_allclose(c, getattr(v, reduce)(axis=3, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("fields", [
    {}, {"psf": "astigmatic", "blur": 0.7}, {"psf": "defocus", "axis": 0},
])
def test_numpy_and_jax_inputs_give_the_same_values(fields):
    v = _vol()
    cfg = cond_cfg(**fields)
    a = aligned.compute_condition(v, cfg)
    b = aligned.compute_condition(jnp.asarray(v), cfg)
    assert isinstance(a, np.ndarray) and not isinstance(b, np.ndarray)
    np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-6)
    cc = cond_cfg("coarse", factor=(2, 1, 2), blur=0.5)
    np.testing.assert_allclose(np.asarray(aligned.compute_condition(jnp.asarray(v[:, :, :4]), cc)),
                               aligned.compute_condition(v[:, :, :4], cc), rtol=1e-5, atol=1e-6)


def _spot(depth_index, shape=(17, 17, 9)):
    v = np.zeros((1, *shape, 1), np.float32)
    v[0, shape[0] // 2, shape[1] // 2, depth_index, 0] = 1.0
    return v


def _second_moments(img):
    """(variance along the first in-plane axis, along the second) of a 2D image."""
    img = np.asarray(img, np.float64)
    img = img / img.sum()
    i = np.arange(img.shape[0])[:, None]
    j = np.arange(img.shape[1])[None, :]
    mi, mj = (img * i).sum(), (img * j).sum()
    return float((img * (i - mi) ** 2).sum()), float((img * (j - mj) ** 2).sum())


def test_astigmatic_psf_is_the_depth_cue():
    cfg = cond_cfg(psf="astigmatic", psf_sigma=1.0, astigmatism=3.0, depth_of_focus=3.0,
                   normalize=False)
    above = aligned.compute_condition(_spot(7), cfg)[0, :, :, 0, 0]  # u = +3 = g
    below = aligned.compute_condition(_spot(1), cfg)[0, :, :, 0, 0]  # u = -3 = -g
    middle = aligned.compute_condition(_spot(4), cfg)[0, :, :, 0, 0]
    ax, ay = _second_moments(above)
    bx, by = _second_moments(below)
    mx, my = _second_moments(middle)
    # Above the middle plane: in focus along the first axis, elongated along the second.
    assert ay > 2 * ax, (ax, ay)
    # Below: the other way round.
    assert bx > 2 * by, (bx, by)
    np.testing.assert_allclose([ax, ay], [by, bx], rtol=1e-3)  # mirror images
    assert abs(mx - my) < 1e-3 * mx  # the middle plane: round
    # The variances are the point-spread's: sigma_x(3) = 1, sigma_y(3) = sqrt(5).
    sx, sy = aligned.psf_sigmas(cfg.projection, 9)
    np.testing.assert_allclose([sx[7], sy[7]], [1.0, np.sqrt(5.0)])
    np.testing.assert_allclose([ax, ay], [1.0, 5.0], rtol=0.05)
    # A single voxel's projection keeps its mass (the field is large enough).
    np.testing.assert_allclose(above.sum(), 1.0, rtol=1e-3)


def test_astigmatic_along_another_axis_uses_its_depth():
    """axis 0: the depth is X; the in-plane axes are (Y, Z)."""
    cfg = cond_cfg(psf="astigmatic", axis=0, astigmatism=3.0, depth_of_focus=3.0,
                   normalize=False)
    v = np.zeros((1, 9, 17, 17, 1), np.float32)
    v[0, 7, 8, 8, 0] = 1.0
    img = aligned.compute_condition(v, cfg)
    assert img.shape == (1, 1, 17, 17, 1)
    vy, vz = _second_moments(img[0, 0, :, :, 0])
    assert vz > 2 * vy


def test_defocus_psf_is_symmetric_in_depth():
    cfg = cond_cfg(psf="defocus", psf_sigma=1.0, depth_of_focus=2.0, normalize=False)
    above = aligned.compute_condition(_spot(7), cfg)
    below = aligned.compute_condition(_spot(1), cfg)
    middle = aligned.compute_condition(_spot(4), cfg)
    np.testing.assert_allclose(above, below, rtol=1e-6, atol=1e-8)
    a, b = _second_moments(above[0, :, :, 0, 0])
    assert abs(a - b) < 1e-6  # round
    assert _second_moments(middle[0, :, :, 0, 0])[0] < a  # sharper in focus


def test_focal_plane_beyond_the_volume_orders_every_depth():
    """With the focus below the volume the blur grows with depth on both axes (no plane
    above focus mimics one below it); the spots' widths follow the formula at u - f."""
    cfg = cond_cfg(psf="astigmatic", psf_sigma=0.7, astigmatism=3.0, depth_of_focus=3.0,
                   focal_plane=-10.0, normalize=False)
    sx, sy = aligned.psf_sigmas(cfg.projection, 9)
    assert np.all(np.diff(sx) > 0) and np.all(np.diff(sy) > 0)
    u = np.arange(9) - 4.0 + 10.0
    np.testing.assert_allclose(sx, 0.7 * np.sqrt(1 + ((u - 3.0) / 3.0) ** 2))
    widths = [sum(_second_moments(aligned.compute_condition(_spot(k), cfg)[0, :, :, 0, 0]))
              for k in (1, 4, 7)]
    assert widths[0] < widths[1] < widths[2], widths
    assert "focus -10 voxels from the middle" in aligned.describe(cfg, (17, 17, 9))
    # At the middle focus (the default) planes at +-u blur alike (the ambiguity it removes).
    s0x, s0y = aligned.psf_sigmas(cond_cfg(psf="astigmatic").projection, 9)
    np.testing.assert_allclose(s0x, s0y[::-1])


def test_noise_only_with_a_key():
    v = _vol()
    cfg = cond_cfg(noise=0.1)
    import jax
    clean = aligned.compute_condition(v, cfg)
    noisy = aligned.compute_condition(v, cfg, jax.random.PRNGKey(0))
    np.testing.assert_allclose(clean, aligned.compute_condition(v, cond_cfg()))
    assert 0.05 < np.std(noisy - clean) < 0.2


# ------------------------------------------------------------------ coarse


@pytest.mark.parametrize("factor,grid", [(2, (4, 4, 2)), ((4, 2, 1), (2, 4, 4))])
def test_coarse_is_the_block_mean(factor, grid):
    v = _vol((2, 8, 8, 4, 1))
    c = aligned.compute_condition(v, cond_cfg("coarse", factor=factor))
    f = (factor,) * 3 if isinstance(factor, int) else factor
    want = v.reshape(2, 8 // f[0], f[0], 8 // f[1], f[1], 4 // f[2], f[2], 1).mean(axis=(2, 4, 6))
    assert c.shape == (2, *grid, 1)
    np.testing.assert_allclose(c, want, rtol=1e-6)
    assert aligned.condition_grid(cond_cfg("coarse", factor=factor), (8, 8, 4)) == grid


# ------------------------------------------------------------------ inpainting


def test_inpainting_condition_is_the_blanked_volume_and_its_box():
    import jax
    v = _vol((3, 8, 8, 4, 1)) + 0.5  # no zeros: a blanked voxel is one in the box
    cfg = cond_cfg("inpainting", box_fraction=(0.25, 0.75))
    c = aligned.compute_condition(v, cfg)  # no key: the centred half of each axis
    assert isinstance(c, np.ndarray) and c.shape == (3, 8, 8, 4, 2)
    box = np.zeros((8, 8, 4), bool)
    box[2:6, 2:6, 1:3] = True
    np.testing.assert_array_equal(c[..., 1], np.broadcast_to(box, (3, 8, 8, 4)))
    np.testing.assert_array_equal(c[..., 0], np.where(box, 0.0, v[..., 0]))
    r = np.asarray(aligned.compute_condition(jnp.asarray(v), cfg, jax.random.PRNGKey(3)))
    for vol, cc in zip(v, r):
        m = cc[..., 1] != 0
        np.testing.assert_array_equal(cc[..., 0], np.where(m, 0.0, vol[..., 0]))
        sides = [np.ptp(np.nonzero(m)[a]) + 1 for a in range(3)]  # one box per volume
        assert m.sum() == np.prod(sides)
        assert all(round(0.25 * n) <= s <= round(0.75 * n) for s, n in zip(sides, (8, 8, 4)))
    assert len({cc[..., 1].tobytes() for cc in r}) > 1  # drawn per volume
    assert aligned.condition_grid(cfg, (8, 8, 4)) == (8, 8, 4)
    assert aligned.condition_channels(cfg, 1) == 2
    assert aligned.lifted_channels(cfg, (8, 8, 4), (2, 2, 1), 1) == 2 * 64
    assert "box blanked" in aligned.describe(cfg, (8, 8, 4))


def test_inpainting_condition_from_a_file():
    cfg = cond_cfg("inpainting")
    v = _vol((1, 8, 8, 4, 1))[0]
    np.testing.assert_array_equal(aligned.condition_from_array(v, cfg, (8, 8, 4), 1),
                                  aligned.compute_condition(v[None], cfg)[0])
    c = aligned.compute_condition(_vol((1, 8, 8, 4, 1), seed=1), cfg)[0]
    np.testing.assert_array_equal(aligned.condition_from_array(c, cfg, (8, 8, 4), 1), c)
    assert aligned.condition_from_array(np.zeros((8, 8, 4, 3)), cfg, (8, 8, 4), 1) is None
    assert "one channel more" in aligned.accepted_shapes(cfg, (8, 8, 4))


# ------------------------------------------------------------------ config checks


def test_problems_are_one_line_each():
    assert aligned.aligned_problems(stage2("")) == []
    assert aligned.aligned_problems(stage2("projection", psf="astigmatic")) == []
    assert aligned.aligned_problems(stage2("coarse", factor=2), (8, 8, 4)) == []
    assert aligned.aligned_problems(stage2("coarse", factor=(4, 2, 1)), (8, 8, 4)) == []
    assert aligned.aligned_problems(stage2("inpainting")) == []

    def one(config, grid=None):
        p = aligned.aligned_problems(config, grid)
        assert len(p) == 1 and "\n" not in p[0], p
        return p[0]

    assert "conditioning.aligned='volume' is not known" in one(stage2("volume"))
    assert "takes 2D projections only" in one(stage2("coarse", mode="pooled"))
    assert "aligned_mode='add' is not known" in one(stage2("projection", mode="add"))
    msg = one(stage2("coarse", factor=3), (8, 8, 4))
    assert "does not divide the volume size (8, 8, 4)" in msg
    assert "(3, 3, 3)" in msg
    assert "does not divide" in one(stage2("coarse", factor=(2, 2, 3)), (8, 8, 4))
    assert "positive int or 3" in one(stage2("coarse", factor=(2, 2)))
    assert "positive int or 3" in one(stage2("coarse", factor=0))
    assert "axis must be 0, 1 or 2" in one(stage2("projection", axis=3))
    assert "reduce='median' is not known" in one(stage2("projection", reduce="median"))
    assert "psf='gauss' is not known" in one(stage2("projection", psf="gauss"))
    assert "psf_sigma must be > 0" in one(stage2("projection", psf="defocus", psf_sigma=0.0))
    assert "noise must be >= 0" in one(stage2("projection", noise=-1.0))
    assert "coarse.blur must be >= 0" in one(stage2("coarse", blur=-1.0), (8, 8, 4))
    assert "0 < min <= max <= 1" in one(stage2("inpainting", box_fraction=(0.5, 0.25)))


# ------------------------------------------------------------------ lift


def test_lift_broadcasts_a_projection_and_adds_its_coordinate():
    cfg = cond_cfg()  # axis 2
    c = aligned.compute_condition(_vol((2, 8, 8, 4, 1)), cfg)  # (2, 8, 8, 1, 1)
    out = aligned.lift(c, cfg, (8, 8, 4))
    assert out.shape == (2, 8, 8, 4, 2) and out.dtype == np.float32
    for z in range(4):
        np.testing.assert_array_equal(out[..., z, 0], c[..., 0, 0])
    np.testing.assert_allclose(out[0, 3, 5, :, 1], np.linspace(-1, 1, 4), atol=1e-7)
    assert np.all(out[..., 1] == out[:1, :1, :1, :, 1])  # the same at every (b, x, y)
    assert aligned.lifted_channels(cfg, (8, 8, 4), (8, 8, 4), 1) == 2
    # axis 0: the coordinate runs along X
    cfg0 = cond_cfg(axis=0)
    c0 = aligned.compute_condition(_vol((1, 4, 6, 2, 1)), cfg0)
    out0 = aligned.lift(c0, cfg0, (4, 6, 2))
    np.testing.assert_allclose(out0[0, :, 2, 1, 1], np.linspace(-1, 1, 4), atol=1e-7)
    np.testing.assert_array_equal(out0[0, 2, ..., 0], c0[0, 0, ..., 0])
    # jax in, jax out, the same values
    np.testing.assert_allclose(np.asarray(aligned.lift(jnp.asarray(c), cfg, (8, 8, 4))), out,
                               atol=1e-7)  # linspace: numpy's and jax's differ by an ulp


def test_lift_folds_a_finer_projection_into_channels_and_keeps_every_value():
    cfg = cond_cfg()
    c = aligned.compute_condition(_vol((2, 16, 16, 8, 1)), cfg)  # (2, 16, 16, 1, 1)
    out = aligned.lift(c, cfg, (8, 8, 4))  # the latent grid of a 2x autoencoder
    assert out.shape == (2, 8, 8, 4, 4 + 1)
    assert aligned.lifted_channels(cfg, (16, 16, 8), (8, 8, 4), 1) == 5
    for b in range(2):
        for z in range(4):
            np.testing.assert_array_equal(np.sort(out[b, :, :, z, :4].ravel()),
                                          np.sort(c[b].ravel()))
    # space-to-depth: each latent voxel holds its own 2x2 block of the image
    block = c[0, 2:4, 6:8, 0, 0].ravel()
    np.testing.assert_array_equal(np.sort(out[0, 1, 3, 0, :4]), np.sort(block))


def test_lift_repeats_a_coarser_condition():
    cfg = cond_cfg("coarse", factor=4)
    c = aligned.compute_condition(_vol((1, 8, 8, 4, 2)), cfg)  # (1, 2, 2, 1, 2)
    out = aligned.lift(c, cfg, (8, 8, 4))
    assert out.shape == (1, 8, 8, 4, 2)  # no coordinate channel for a coarse volume
    np.testing.assert_array_equal(out, np.repeat(np.repeat(np.repeat(c, 4, 1), 4, 2), 4, 3))
    assert aligned.lifted_channels(cfg, (8, 8, 4), (8, 8, 4), 2) == 2
    # mixed: repeated along X and Y, folded along Z (factor (4, 4, 1) on a 2x latent grid)
    cfg = cond_cfg("coarse", factor=(4, 4, 1))
    c = aligned.compute_condition(_vol((1, 8, 8, 4, 1)), cfg)  # (1, 2, 2, 4, 1)
    out = aligned.lift(c, cfg, (4, 4, 2))
    assert out.shape == (1, 4, 4, 2, 2)
    assert aligned.lifted_channels(cfg, (8, 8, 4), (4, 4, 2), 1) == 2
    np.testing.assert_array_equal(out[0, 1, 1, 1], c[0, 0, 0, 2:4, 0])


@pytest.mark.parametrize("kind,fields,vgrid,ugrid,channels", [
    ("projection", {"axis": 1}, (16, 8, 8), (8, 4, 4), 1),
    ("projection", {"axis": 2}, (8, 8, 4), (8, 8, 4), 2),
    ("coarse", {"factor": 2}, (16, 16, 8), (4, 4, 2), 1),
    ("coarse", {"factor": (8, 4, 1)}, (16, 16, 8), (4, 4, 4), 3),
])
def test_lifted_channels_is_what_lift_returns(kind, fields, vgrid, ugrid, channels):
    cfg = cond_cfg(kind, **fields)
    c = aligned.compute_condition(_vol((1, *vgrid, channels)), cfg)
    out = aligned.lift(c, cfg, ugrid)
    assert out.shape[1:4] == ugrid
    assert out.shape[-1] == aligned.lifted_channels(cfg, vgrid, ugrid, channels)


def test_lift_pads_with_zeros_and_refuses_non_multiples():
    cfg = cond_cfg()
    c = aligned.compute_condition(_vol((1, 8, 8, 4, 1)), cfg)
    pad = ((0, 0), (1, 2), (0, 2))
    out = aligned.lift(c, cfg, (8, 8, 4), pad)
    assert out.shape == (1, 8, 11, 6, 2)
    np.testing.assert_array_equal(out[:, :, 1:9, :4], aligned.lift(c, cfg, (8, 8, 4)))
    assert not out[:, :, :1].any() and not out[:, :, 9:].any() and not out[:, :, :, 4:].any()
    with pytest.raises(ConfigError, match="not integer multiples on axis 0"):
        aligned.lift(c, cfg, (3, 8, 4))


def test_pooled_input_and_describe():
    cfg = cond_cfg(axis=1, psf="astigmatic")
    c = aligned.compute_condition(_vol((2, 6, 5, 4, 1)), cfg)
    assert aligned.pooled_input(c, cfg).shape == (2, 6, 4, 1)
    d = aligned.describe(cfg, (6, 5, 4))
    assert "axis 1" in d and "6x1x4" in d and "depth cue" in d and "\n" not in d
    assert "no depth cue" in aligned.describe(cond_cfg(), (6, 5, 4))
    assert "3x5x2" in aligned.describe(cond_cfg("coarse", factor=(2, 1, 2)), (6, 5, 4))


def test_build_unet_for_adds_the_lifted_channels():
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    config = tiny_diffusion_config("unused")
    config.unet.in_channels = config.unet.out_channels = 1
    plain = aligned.build_unet_for(config, (16, 16, 8), (16, 16, 8, 1), 1)
    assert plain.in_channels == 1
    config.conditioning = cond_cfg()
    unet = aligned.build_unet_for(config, (16, 16, 8), (8, 8, 4, 1), 1)
    assert unet.in_channels == 1 + 4 + 1  # latent + folded 2x2 image + coordinate
    assert config.unet.in_channels == 1  # the config keeps the latent channels
    config.conditioning.aligned_mode = "pooled"
    from ldm_jax.models.pooled_condition import PooledConditionUNet
    assert isinstance(aligned.build_unet_for(config, (16, 16, 8), (8, 8, 4, 1), 1),
                      PooledConditionUNet)
