"""AutoencoderKL / PatchDiscriminator: shapes, voxel coverage, heads, bf16, remat, errors.

Params come from numpy (shapes via jax.eval_shape) so that tests compile only the
function under test, not a random initialiser.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import ConfigError
from ldm_jax.models import build_autoencoder, build_discriminator
from ldm_jax.models.autoencoder import DecoderHead
from ldm_jax.models.layers import (
    Downsample,
    Upsample,
    depth_to_space,
    nearest_upsample,
    skips_voxels,
    strided_axis_geometry,
)

TINY = dict(in_channels=1, out_channels=1, num_channels=(4, 8), latent_channels=3,
            num_res_blocks=1, norm_num_groups=2, norm_eps=1e-6,
            attention_levels=(False, False), with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False, initial_downsample_factor=1,
            downsample_factors=None, use_conv_downsample=True, use_convtranspose=False,
            upsample_head="nearest_conv", strided_kernel=None, dtype="float32", remat="none")


def ae(**kw):
    return build_autoencoder(dict(TINY, **kw))


def abstract_init(module, *shapes, **kw):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    keys = {"params": jax.random.key(0), "sample": jax.random.key(1)}
    return jax.eval_shape(lambda *a: module.init(keys, *a, **kw), *args)


def compiled(f, *args):
    """jit + compile with XLA's cheap backend optimisation: these tests compile far more
    than they run, and the numerics they compare are compiled the same way."""
    return jax.jit(f).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})


def numpy_params(module, *shapes, seed=0, **kw):
    """Random params with init-like scales, without compiling an initialiser."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            bound = 1.0 / np.sqrt(np.prod(s.shape[:-1]))
            return rng.uniform(-bound, bound, s.shape).astype(np.float32)
        if "scale" in name:
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_init(module, *shapes, **kw))


# ----------------------------------------------------------------------------------------
# Geometry of strided stages (pure python: the coverage proof for every stride).


def covered(n, stride, kernel, pad):
    lo, hi = pad
    out = (n + lo + hi - kernel) // stride + 1
    seen = {o * stride - lo + t for o in range(out) for t in range(kernel)}
    return out, {i for i in seen if 0 <= i < n}


@pytest.mark.parametrize("stride", range(1, 9))
def test_default_geometry_covers_every_voxel_and_divides_exactly(stride):
    k, pad = strided_axis_geometry(stride)
    assert k >= stride
    for n in (stride, 2 * stride, 8 * stride):
        out, seen = covered(n, stride, k, pad)
        assert out == n // stride
        assert seen == set(range(n))


def test_geometry_matches_monai_for_stride_1_and_2():
    assert strided_axis_geometry(1) == (3, (1, 1))  # conv_in k3 p1
    assert strided_axis_geometry(2) == (3, (0, 1))  # AEKLDownsample: pad end, k3 s2 p0
    assert strided_axis_geometry(2, kernel=3) == (3, (0, 1))


@pytest.mark.parametrize("stride,skipped", [(4, 1 - 27 / 64), (8, 1 - 27 / 512)])
def test_seed_kernel_3_skips_voxels(stride, skipped):
    k, pad = strided_axis_geometry(stride, kernel=3)
    out, seen = covered(64, stride, k, pad)
    assert out == 64 // stride
    assert 1 - (len(seen) / 64) ** 3 == pytest.approx(skipped, abs=0.03)
    assert skips_voxels(stride, 3) and not skips_voxels(stride, None)


# ----------------------------------------------------------------------------------------
# Shapes.


@pytest.mark.parametrize("head,convtranspose,conv_down", [
    ("nearest_conv", False, True), ("subpixel", True, True), ("nearest_conv", True, False)])
def test_per_axis_factors_give_the_right_shapes(head, convtranspose, conv_down):
    m = ae(num_channels=(4, 8, 8), initial_downsample_factor=(2, 2, 1),
           downsample_factors=((2, 2, 1), (2, 2, 2)), attention_levels=(False, False, True),
           upsample_head=head, use_convtranspose=convtranspose, use_conv_downsample=conv_down,
           with_encoder_nonlocal_attn=True)
    x = jax.ShapeDtypeStruct((2, 32, 24, 8, 1), jnp.float32)
    v = abstract_init(m, x.shape, sample=False)
    rec, mu, sigma = jax.eval_shape(lambda v, x: m.apply(v, x, sample=False), v, x)
    assert m.total_factor == (8, 8, 2)
    assert mu.shape == sigma.shape == (2, 4, 3, 4, 3)
    assert rec.shape == x.shape and rec.dtype == jnp.float32
    assert ("down" in v["params"]["encoder"]["level_0"]) == conv_down  # avg pool: no params


def test_subpixel_and_nearest_heads_agree_in_shape_and_differ_in_cost():
    shapes = {}
    for head in ("nearest_conv", "subpixel"):
        m = ae(initial_downsample_factor=4, upsample_head=head)
        v = abstract_init(m, (1, 32, 32, 16, 1), sample=False)
        shapes[head] = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 32, 32, 16, 1)),
                                                        sample=False)[0], v).shape
        shapes[head + "_kernel"] = v["params"]["decoder"]["head"]["conv_out"]["kernel"].shape
    assert shapes["nearest_conv"] == shapes["subpixel"] == (1, 32, 32, 16, 1)
    assert shapes["nearest_conv_kernel"] == (3, 3, 3, 4, 1)
    assert shapes["subpixel_kernel"] == (3, 3, 3, 4, 64)


def test_subpixel_head_starts_as_nearest_upsample_icnr():
    head = DecoderHead(out_channels=2, factor=(2, 4, 1), head="subpixel", norm_num_groups=2,
                       norm_eps=1e-6)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 4, 4)), jnp.float32)
    y, v = jax.jit(lambda x: head.init_with_output(jax.random.key(0, impl="rbg"), x))(x)
    assert y.shape == (1, 6, 8, 4, 2)
    blocks = np.asarray(y).reshape(1, 3, 2, 2, 4, 4, 1, 2)
    np.testing.assert_allclose(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape),
                               atol=1e-6)
    assert np.std(np.asarray(y)) > 0


def test_resampling_helpers():
    x = jnp.arange(2 * 3 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 3, 2, 2, 3)
    up = nearest_upsample(x, (2, 1, 3))
    expect = jnp.repeat(jnp.repeat(x, 2, axis=1), 3, axis=3)
    np.testing.assert_array_equal(up, expect)
    d2s = depth_to_space(jnp.tile(x, (1, 1, 1, 1, 4)), (2, 2, 1))
    assert d2s.shape == (2, 6, 4, 2, 3)
    np.testing.assert_array_equal(d2s[:, ::2, ::2], x)


# ----------------------------------------------------------------------------------------
# Every input voxel reaches the latent.


def _latent_grad(m, shape, seed=0):
    params = numpy_params(m, shape, sample=False)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    mu_shape = jax.eval_shape(lambda p, x: m.apply(p, x, method=m.encode)[0],
                              params, x).shape
    proj = np.random.default_rng(seed + 1).standard_normal(mu_shape).astype(np.float32)

    @jax.jit
    def g(p, x):
        return jax.grad(lambda x: jnp.sum(m.apply(p, x, method=m.encode)[0] * proj))(x)

    return np.asarray(g(params, x))


@pytest.mark.parametrize("initial", [1, 2, 4, 8, (4, 2, 1)])
def test_every_input_voxel_reaches_the_latent(initial):
    m = ae(num_channels=(4,), attention_levels=(False,), initial_downsample_factor=initial,
           downsample_factors=())
    grad = _latent_grad(m, (1, 16, 16, 8, 1))
    assert np.count_nonzero(grad == 0) == 0


def test_seed_stem_kernel_3_misses_voxels(caplog):
    m = ae(num_channels=(4,), attention_levels=(False,), initial_downsample_factor=4,
           downsample_factors=(), strided_kernel=3)
    with caplog.at_level(logging.WARNING):
        grad = _latent_grad(m, (1, 16, 16, 8, 1))
    # Exactly the voxels that no stem window covers get a zero gradient.
    seen = [np.isin(np.arange(n), sorted(covered(n, 4, *strided_axis_geometry(4, 3))[1]))
            for n in (16, 16, 8)]
    expected = seen[0][:, None, None] & seen[1][None, :, None] & seen[2][None, None, :]
    np.testing.assert_array_equal(grad[0, ..., 0] != 0, expected)
    assert np.mean(grad == 0) > 0.5
    assert "skips" in caplog.text or "never reach" in caplog.text


@pytest.mark.parametrize("factor,kernel,complete", [
    ((4, 8, 2), None, True), ((8, 4, 1), None, True), (4, 3, False)])
def test_level_downsample_sees_every_voxel(factor, kernel, complete):
    down = Downsample(factor, use_conv=True, strided_kernel=kernel)
    shape = (1, 16, 16, 8, 4)
    params = numpy_params(down, shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y_shape = jax.eval_shape(lambda p: down.apply(p, x), params).shape
    assert y_shape == (1, *(s // f for s, f in zip((16, 16, 8), np.broadcast_to(factor, 3))), 4)
    proj = np.random.default_rng(1).standard_normal(y_shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(down.apply(params, x) * proj)))(x)
    assert (np.count_nonzero(np.asarray(grad) == 0) == 0) == complete


def test_convtranspose_and_nearest_upsample_fill_every_output():
    for use_ct in (False, True):
        up = Upsample((4, 2, 1), use_convtranspose=use_ct)
        params = numpy_params(up, (1, 2, 3, 4, 4))
        y = jax.jit(up.apply)(params, jnp.ones((1, 2, 3, 4, 4)))
        assert y.shape == (1, 8, 6, 4, 4)
        assert np.all(np.isfinite(y))


# ----------------------------------------------------------------------------------------
# Precision and remat.


def test_bfloat16_close_to_float32_with_float32_params():
    kw = dict(num_channels=(8, 16), norm_num_groups=4, initial_downsample_factor=2,
              attention_levels=(False, True))
    shape = (2, 16, 16, 8, 1)
    m32, m16 = ae(dtype="float32", **kw), ae(dtype="bfloat16", **kw)
    abstract = abstract_init(m16, shape, sample=False)["params"]
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(abstract))
    params = numpy_params(m32, shape, sample=False)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = {}
    for name, m in (("f32", m32), ("bf16", m16)):
        fwd = lambda p, x: m.apply(p, x, sample=False)  # noqa: E731
        out[name] = compiled(fwd, params, x)(params, x)
    for a, b in zip(out["bf16"], out["f32"]):
        assert a.dtype == jnp.float32
        assert np.all(np.isfinite(a))
        rel = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert rel < 2e-2, rel
    assert not np.array_equal(out["bf16"][0], out["f32"][0])  # really ran in bf16


def test_remat_variants_give_identical_outputs_and_gradients():
    kw = dict(num_channels=(2, 2), norm_num_groups=1, with_decoder_nonlocal_attn=True)
    shape = (1, 8, 8, 4, 1)
    params = numpy_params(ae(**kw), shape, sample=False)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    results = {}
    for mode in ("none", "res_blocks", "levels"):
        m = ae(remat=mode, **kw)

        def loss(p):
            rec, mu, sigma = m.apply(p, x, sample=False)
            return jnp.mean(jnp.abs(rec - x)) + jnp.mean(mu ** 2 + sigma ** 2)

        results[mode] = compiled(jax.value_and_grad(loss), params)(params)
    ref_val, ref_grad = results["none"]
    for mode in ("res_blocks", "levels"):
        val, grad = results[mode]
        np.testing.assert_allclose(val, ref_val, rtol=1e-6)
        # Same math; recomputation may round differently in the last bits (gradients that
        # are mathematically zero, e.g. of a conv bias feeding a GroupNorm, are pure noise).
        scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(ref_grad))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6 * scale), grad, ref_grad)


def test_sampling_uses_the_sample_rng():
    m = ae(num_channels=(4,), attention_levels=(False,), downsample_factors=())
    shape = (1, 8, 8, 8, 1)
    params = numpy_params(m, shape, sample=False)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    @jax.jit
    def run(p, key):
        rec, mu, sigma = m.apply(p, x, rngs={"sample": key})
        z = m.apply(p, mu, sigma, key, method=m.sampling)
        return rec, mu, sigma, z, m.apply(p, x, method=m.reconstruct)

    rec1, mu, sigma, z, recon_mu = run(params, jax.random.key(0, impl="rbg"))
    rec2 = run(params, jax.random.key(1, impl="rbg"))[0]
    assert not np.allclose(rec1, rec2)
    assert np.all(sigma > 0) and not np.allclose(z, mu)
    assert not np.allclose(rec1, recon_mu)


# ----------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("kw,match", [
    (dict(norm_num_groups=3), "norm_num_groups"),
    (dict(downsample_factors=(2, 2)), "downsample_factors needs 1"),
    (dict(downsample_factors=((2, 0, 1),)), "downsample_factors"),
    (dict(dtype="float16"), "dtype"),
    (dict(upsample_head="bilinear"), "upsample_head"),
    (dict(remat="all"), "remat"),
    (dict(attention_levels=(True,)), "attention_levels"),
    (dict(num_res_blocks=(1, 0)), "num_res_blocks"),
])
def test_bad_config_raises_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        ae(**kw)


def test_input_not_divisible_raises():
    m = ae(initial_downsample_factor=(4, 4, 1))
    with pytest.raises(ValueError, match="not divisible"):
        abstract_init(m, (1, 16, 12, 5, 1), sample=False)


# ----------------------------------------------------------------------------------------
# Discriminator.


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_discriminator_feature_maps(norm):
    d = build_discriminator(dict(in_channels=1, out_channels=1, num_layers_d=3, num_channels=4,
                                 kernel_size=4, norm=norm, dtype="bfloat16"))
    shape = (2, 32, 32, 24, 1)
    variables = jax.eval_shape(lambda x: d.init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct(shape, jnp.float32))
    assert ("batch_stats" in variables) == (norm == "batch")
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32), variables)
    x = rng.standard_normal(shape).astype(np.float32)
    if norm == "batch":
        feats, upd = jax.jit(lambda v, x: d.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, x)
        assert not np.allclose(upd["batch_stats"]["norm_0"]["mean"],
                               variables["batch_stats"]["norm_0"]["mean"])
    else:
        feats = jax.jit(lambda v, x: d.apply(v, x, train=True))(variables, x)
    assert len(feats) == 3 + 2  # initial conv, num_layers_d layers, final conv (MONAI)
    assert [f.shape[-1] for f in feats] == [4, 8, 16, 32, 1]
    assert feats[-1].shape == (2, 2, 2, 1, 1)
    assert all(f.dtype == jnp.float32 and np.all(np.isfinite(f)) for f in feats)


def test_discriminator_too_small_input_raises():
    d = build_discriminator(dict(num_layers_d=3, num_channels=4, norm="instance"))
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(lambda x: d.init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 16, 16, 8, 1), jnp.float32))


def test_attention_over_one_voxel_is_v_and_compiles_in_bf16():
    # One key: softmax is exactly 1, the output is v. XLA:CPU cannot compile that bf16
    # dot (ALG_DOT_BF16_BF16_F32), which broke bf16 steps of configs whose attention
    # level is 1x1x1; the shortcut must give XLA's own result and a bf16 gradient.
    from ldm_jax.models.layers import attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 1, 1, 8)), jnp.float32) for _ in range(3))
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(np.asarray(attention(q, k, v)), np.asarray(ref), rtol=1e-6)
    q4 = jnp.asarray(rng.normal(size=(2, 4, 1, 8)), jnp.float32)
    ref4 = jax.nn.dot_product_attention(q4, k, v, implementation="xla")  # 4 queries, 1 key
    np.testing.assert_allclose(np.asarray(attention(q4, k, v)), np.asarray(ref4), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: attention(x, x, x).astype(jnp.float32).sum()))
    g = grad(v.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
