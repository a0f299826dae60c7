"""GN -> SiLU -> conv with the normalisation and activation recomputed in the backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.layers import ResBlock
from ldm_jax.models.unet import ResnetBlock

pytestmark = pytest.mark.tap_conv  # the recomputation as CPU runs trace it (tap convs)


class Chain(nn.Module):
    """A few ResBlocks, as a level of the autoencoder stacks them."""

    recompute: bool
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, c in enumerate((16, 16, 8)):
            x = ResBlock(c, 4, 1e-6, self.dtype, self.recompute, name=f"res_{i}")(x)
        return x


def _setup(dtype=jnp.float32, shape=(1, 8, 8, 4, 8)):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = jax.jit(Chain(False).init)(jax.random.key(0), x)["params"]
    # Non-trivial norm affines so a wrong scale/bias gradient shows.
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                          params)
    w = jnp.asarray(rng.normal(size=shape[:-1] + (8,)), jnp.float32)
    return x, params, w


def _loss(recompute, dtype):
    def loss(params, x, w):
        y = Chain(recompute, dtype).apply({"params": params}, x.astype(dtype))
        return jnp.sum(y.astype(jnp.float32) * w)
    return loss


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_same_params_values_and_gradients(dtype, tol):
    x, params, w = _setup()
    assert jax.tree.structure(jax.eval_shape(Chain(True).init, jax.random.key(0), x)) == \
        jax.tree.structure(jax.eval_shape(Chain(False).init, jax.random.key(0), x))
    results = {}
    for r in (True, False):
        y = jax.jit(lambda p, x: Chain(r, dtype).apply({"params": p}, x.astype(dtype)))(params, x)
        grads = jax.jit(jax.grad(_loss(r, dtype), argnums=(0, 1)))(params, x, w)
        results[r] = (y, grads)
    assert results[True][0].dtype == dtype and _rel(results[True][0], results[False][0]) <= tol
    for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1])):
        assert a.shape == b.shape and _rel(a, b) <= tol


def test_backward_keeps_less():
    x, params, w = _setup(shape=(1, 16, 16, 16, 8))
    temp = {}
    for r in (True, False):
        grad = jax.jit(jax.grad(_loss(r, jnp.float32)))
        temp[r] = grad.lower(params, x, w).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.8 * temp[False], temp


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_unet_resnet_block_same_params_values_and_gradients(dtype, tol):
    """The diffusion UNet's resnet (timestep embedding between the halves, zero-initialised
    conv2): recomputing norm and activation changes neither its params nor its values."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 8, 8, 4, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(1, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 8, 8, 4, 16)), jnp.float32)

    def block(r):
        return ResnetBlock(16, 4, 1e-6, dtype=dtype, recompute_norm_act=r)

    init = {r: jax.jit(block(r).init)(jax.random.key(0), x, emb)["params"] for r in (True, False)}
    assert jax.tree.structure(init[True]) == jax.tree.structure(init[False])
    assert not np.any(np.asarray(init[True]["conv2"]["kernel"]))  # MONAI's zero_module
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                          init[False])
    out = {}
    for r in (True, False):
        def loss(p, x, emb, r=r):
            y = block(r).apply({"params": p}, x.astype(dtype), emb.astype(dtype))
            return jnp.sum(y.astype(jnp.float32) * w)
        out[r] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, emb)
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
        assert a.shape == b.shape and _rel(a, b) <= tol
