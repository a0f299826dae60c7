"""PooledConditionUNet (the pooled-embedding 2D-image conditioning baseline): shapes, param
tree, the condition's effect, errors, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.pooled_condition import (
    PooledConditionEncoder,
    PooledConditionUNet,
    from_unet,
    null_condition,
)
from ldm_jax.models.unet import DiffusionModelUNet

UNET = dict(in_channels=1, out_channels=1, num_channels=(8, 8), attention_levels=(False, False),
            num_head_channels=8, norm_num_groups=4, num_res_blocks=1, dtype="float32")


@pytest.fixture(scope="module")
def setup():
    unet = DiffusionModelUNet(**UNET)
    model = from_unet(unet)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4, 1)), jnp.float32)
    t = jnp.asarray([3, 700])
    cond = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x, t, cond)["params"]
    # MONAI's zero_module layers (every resnet's conv2, the final conv) are zero at init, so
    # the embedding -- and with it the condition -- would not reach the output: add noise to
    # every UNet leaf (the encoder and projection keep their init).
    @jax.jit  # one program for all leaves
    def noisy(tree, key):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([a + 0.1 * jax.random.normal(k, a.shape, a.dtype)
                                  for a, k in zip(leaves, keys)])

    params = dict(params, unet=noisy(params["unet"], jax.random.key(1)))
    # Every model call below goes through jax.jit: that is the jit-compatibility check.
    plain = jax.jit(unet.apply)({"params": params["unet"]}, x, t)
    return dict(unet=unet, model=model, x=x, t=t, cond=cond, params=params,
                apply=jax.jit(model.apply), plain=plain)


def test_param_tree_unet_subtree_is_a_plain_unets(setup):
    params = setup["params"]
    assert set(params) == {"unet", "condition_encoder", "condition_proj"}
    plain = jax.eval_shape(setup["unet"].init, jax.random.key(0),
                           **setup["unet"].dummy_inputs())["params"]
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert (jax.tree_util.tree_structure(params["unet"])
            == jax.tree_util.tree_structure(plain))
    assert shapes(params["unet"]) == shapes(plain)
    enc = params["condition_encoder"]
    assert [enc[f"conv_{i}"]["kernel"].shape for i in range(3)] == [
        (3, 3, 1, 64), (3, 3, 64, 128), (3, 3, 128, 256)]
    assert enc["dense"]["kernel"].shape == (256, 8)
    assert params["condition_proj"]["kernel"].shape == (8, 4 * UNET["num_channels"][0])


def test_output_shape_matches_plain_unet_under_jit(setup):
    s = setup
    out = s["apply"]({"params": s["params"]}, s["x"], s["t"], s["cond"])
    assert isinstance(out, jax.Array)
    assert out.shape == s["plain"].shape == (2, 8, 8, 4, 1)
    assert out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all())


def test_condition_changes_output_and_null_condition_is_plain_unet_at_init(setup):
    s = setup
    assert float(jnp.abs(s["params"]["condition_proj"]["kernel"]).max()) > 0  # not zero-init
    a = s["apply"]({"params": s["params"]}, s["x"], s["t"], s["cond"])
    b = s["apply"]({"params": s["params"]}, s["x"], s["t"], -2.0 * s["cond"])
    assert float(jnp.abs(a - b).max()) > 1e-4
    # Per sample: changing only sample 1's condition leaves sample 0's output alone.
    c = s["apply"]({"params": s["params"]}, s["x"], s["t"], s["cond"].at[1].multiply(-2.0))
    np.testing.assert_allclose(np.asarray(c[0]), np.asarray(a[0]), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(c[1] - a[1]).max()) > 1e-4
    # Zero biases at init: the null (zero) condition adds a zero offset -> the plain UNet.
    null = null_condition(s["cond"])
    assert null.shape == s["cond"].shape and not bool(null.any())
    z = s["apply"]({"params": s["params"]}, s["x"], s["t"], null)
    plain = s["plain"]
    np.testing.assert_allclose(np.asarray(z), np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(a - plain).max()) > 1e-4


def test_condition_must_be_4d(setup):
    s = setup
    with pytest.raises(ValueError, match="4-D"):
        s["model"].apply({"params": s["params"]}, s["x"], s["t"], s["cond"][..., 0])
    with pytest.raises(ValueError, match="batch"):
        s["model"].apply({"params": s["params"]}, s["x"], s["t"], s["cond"][:1])
    with pytest.raises(ValueError, match="4-D"):
        null_condition((2, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        PooledConditionEncoder().init(jax.random.key(0), jnp.zeros((2, 8, 8)))


def test_encoder_output_shape_dtype_and_from_unet():
    enc = PooledConditionEncoder(features=(4, 4, 4), out_features=5, dtype="bfloat16")
    y, _ = jax.jit(enc.init_with_output)(jax.random.key(0), jnp.ones((3, 9, 7, 2)))
    assert y.shape == (3, 5) and y.dtype == jnp.float32
    m = from_unet(DiffusionModelUNet(**UNET), embed_features=3)
    assert isinstance(m, PooledConditionUNet) and m.embed_features == 3
    assert m.unet.num_channels == UNET["num_channels"]
