"""DiffusionModelUNet without torch: shapes, init, precision, jit, remat, config validation.

Parity with MONAI itself is in test_unet_parity_monai.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.diffusion.default import get_config
from ldm_jax.errors import ConfigError
from ldm_jax.models import build_unet, unet_padded_shape, validate_unet
from ldm_jax.models.unet import timestep_embedding

TINY = dict(in_channels=2, out_channels=3, num_channels=(8, 16), attention_levels=(False, True),
            num_head_channels=(0, 8), norm_num_groups=4, num_res_blocks=1, dtype="float32")
COND = dict(TINY, with_conditioning=True, cross_attention_dim=6, num_class_embeds=3)


def _inputs(model, spatial=(4, 4, 4), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    kw = dict(x=jnp.asarray(rng.standard_normal((batch, *spatial, model.in_channels)), jnp.float32),
              timesteps=jnp.asarray(rng.integers(0, 1000, batch)))
    if model.with_conditioning:
        kw["context"] = jnp.asarray(rng.standard_normal((batch, 2, model.cross_attention_dim)),
                                    jnp.float32)
    if model.num_class_embeds:
        kw["class_labels"] = jnp.asarray(rng.integers(0, model.num_class_embeds, batch))
    return kw


def _init(model, seed=0):
    return jax.jit(model.init)(jax.random.key(seed), **model.dummy_inputs())["params"]


def _noisy_params(model, seed=0):
    """Init params plus noise on every leaf (the zero-initialised layers would hide bugs)."""
    @jax.jit  # one program and one draw for all leaves (a draw per leaf compiles 5x longer)
    def noisy(params, key):
        leaves, tree = jax.tree.flatten(params)
        noise = jax.random.normal(key, (sum(p.size for p in leaves),))
        out, start = [], 0
        for p in leaves:
            scale = 0.1 if p.ndim == 1 else 0.5 * (p.size // p.shape[-1]) ** -0.5
            out.append(p + scale * noise[start:start + p.size].reshape(p.shape))
            start += p.size
        return jax.tree.unflatten(tree, out)

    return noisy(_init(model, seed), jax.random.key(seed + 1))


def test_tutorial_config_builds_monai_sized_model():
    model = build_unet(get_config().unet)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.dummy_inputs()))
    leaves = jax.tree.leaves(shapes["params"])
    assert sum(int(np.prod(p.shape)) for p in leaves) == 2_974_051  # MONAI's count
    assert len(leaves) == 212


def test_timestep_embedding_cos_first():
    e = np.asarray(timestep_embedding(jnp.array([0, 5]), 8))
    np.testing.assert_array_equal(e[0], [1, 1, 1, 1, 0, 0, 0, 0])  # cos(0) then sin(0)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(e[1], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]),
                               rtol=1e-6, atol=1e-6)
    assert timestep_embedding(jnp.array([3]), 7).shape == (1, 7)  # odd dims zero-padded


def test_zero_initialised_layers_make_the_initial_output_zero():
    model = build_unet(COND)
    kw = _inputs(model)
    params = _init(model)
    apply = jax.jit(model.apply)
    assert not np.any(params["out_2"]["kernel"])
    assert not np.any(params["down_blocks_0"]["resnets_0"]["conv2"]["kernel"])
    assert not np.any(params["middle_block"]["attention"]["proj_out"]["kernel"])
    out = apply({"params": params}, **kw)
    assert out.shape == (2, 4, 4, 4, 3) and out.dtype == jnp.float32
    assert not np.any(np.asarray(out))
    # ...and with noisy params the output depends on every input.
    params = _noisy_params(model)
    base = np.asarray(apply({"params": params}, **kw))
    for name, other in (("timesteps", kw["timesteps"] + 7),
                        ("context", kw["context"] + 1.0),
                        ("class_labels", (kw["class_labels"] + 1) % 3)):
        moved = np.asarray(apply({"params": params}, **dict(kw, **{name: other})))
        assert np.abs(moved - base).max() > 1e-3, name


def test_bf16_forward_close_to_float32():
    model32 = build_unet(COND)
    model16 = build_unet(dict(COND, dtype="bfloat16"))
    params, kw = _noisy_params(model32), _inputs(model32)
    ref = np.asarray(jax.jit(model32.apply)({"params": params}, **kw))
    out = np.asarray(jax.jit(model16.apply)({"params": params}, **kw))
    assert np.isfinite(out).all()
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < rel <= 2e-2, rel  # > 0: bf16 really ran


def test_jit_with_traced_timesteps_and_scalar_broadcast():
    model = build_unet(TINY)
    params, kw = _noisy_params(model), _inputs(model)
    f = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    out = f(params, kw["x"], kw["timesteps"])
    # Traced timesteps give what the same timesteps as constants give. (Not op by op:
    # that compiles every primitive of the UNet on its own, seconds for nothing more.)
    fixed = jax.jit(lambda p, x: model.apply({"params": p}, x, np.asarray(kw["timesteps"])))
    np.testing.assert_allclose(out, fixed(params, kw["x"]), rtol=1e-5, atol=1e-5)
    other = f(params, kw["x"], kw["timesteps"] + 100)  # same program, new traced value
    assert np.abs(np.asarray(other - out)).max() > 1e-4
    # A scalar timestep means the same t for the whole batch.
    t0 = kw["timesteps"][0]
    both = f(params, kw["x"], jnp.stack([t0, t0]))
    np.testing.assert_allclose(f(params, kw["x"], t0), both, rtol=1e-5, atol=1e-5)


def test_remat_blocks_same_value_and_gradient():
    # COND's params (compiled once for the tests above). Up/down-sampling resnets are built
    # by the same `_Make.res`, so remat wraps them the same way.
    plain, remat = build_unet(COND), build_unet(dict(COND, remat="blocks"))
    params, kw = _noisy_params(plain), _inputs(plain)

    def loss(model):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean(model.apply({"params": p}, **kw) ** 2)))(params)

    (v0, g0), (v1, g1) = loss(plain), loss(remat)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_call_errors():
    model = build_unet(TINY)
    kw = _inputs(model)
    with pytest.raises(ValueError, match="with_conditioning=False"):
        jax.eval_shape(model.init, jax.random.key(0), **kw, context=jnp.zeros((2, 1, 4)))
    model = build_unet(dict(TINY, num_class_embeds=3))
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(model.init, jax.random.key(0), **kw)


@pytest.mark.parametrize("change, message", [
    (dict(num_channels=(8, 18)), r"norm_num_groups=4 must divide every entry of num_channels"),
    (dict(num_head_channels=(0, 6)), r"num_head_channels\[1\]=6 must be a positive divisor of "
                                     r"num_channels\[1\]=16 \(level 1 has attention\)"),
    (dict(num_head_channels=(3, 8), attention_levels=(True, True)),
     r"num_head_channels\[0\]=3 .* num_channels\[0\]=8"),
    (dict(attention_levels=(False, False), num_head_channels=(0, 0)),
     r"num_head_channels\[-1\]=0 .*middle block always has attention"),
    (dict(with_conditioning=True), r"with_conditioning=True needs cross_attention_dim"),
    (dict(cross_attention_dim=4), r"cross_attention_dim=4 is set but with_conditioning=False"),
    (dict(num_res_blocks=(1, 1, 1)), r"num_res_blocks needs one value per level \(2"),
    (dict(attention_levels=(True,)), r"attention_levels needs one bool per level \(2"),
    (dict(num_head_channels=(8,)), r"num_head_channels needs one value per level \(2"),
    (dict(remat="levels"), r"remat must be one of"),
    (dict(dtype="float16"), r"dtype must be 'float32' or 'bfloat16'"),
])
def test_validation_messages(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_unet(dict(TINY, **change))
    with pytest.raises(ConfigError, match=message):
        build_unet(dict(TINY, **change))


def test_latent_shape_validation_and_padding():
    cfg = get_config().unet  # 3 levels: factor 4
    validate_unet(cfg, (20, 20, 16))
    validate_unet(cfg, (20, 20, 16, 3))
    with pytest.raises(ConfigError, match=r"\(20, 20, 13\) is not divisible by 4 .* pad the "
                                          r"latents symmetrically to \(20, 20, 16\) \(pads "
                                          r"\(\(0, 0\), \(0, 0\), \(1, 2\)\)"):
        validate_unet(cfg, (20, 20, 13))
    with pytest.raises(ConfigError, match=r"latents have 4 channels but unet.in_channels=3"):
        validate_unet(cfg, (20, 20, 16, 4))
    assert unet_padded_shape((20, 21, 13), cfg) == (20, 24, 16)
    assert unet_padded_shape((5, 4, 1), TINY) == (6, 4, 2)
    with pytest.raises(ConfigError, match="2 problems"):
        validate_unet(dict(TINY, with_conditioning=True), (5, 4, 4))
