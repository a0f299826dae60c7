"""Chunked attention (ldm_jax.models.chunked_attention) is plain softmax attention, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.chunked_attention import chunked_attention
from ldm_jax.models.layers import attention


def _qkvw(t, s, h=2, d=8, b=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, d))
    k = 2.0 * rng.normal(size=(b, s, h, d))  # peaked softmax: the online max matters
    v = rng.normal(size=(b, s, h, d))
    w = rng.normal(size=(b, t, h, d))  # a loss weighting so every output has its own cotangent
    return [jnp.asarray(a, jnp.float32) for a in (q, k, v, w)]


def _plain(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    out = jax.jit(fn)(q, k, v)
    return [out] + list(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("t,s,qc,kc", [(37, 29, 8, 7), (24, 24, 8, 8), (9, 40, 16, 6)])
def test_float32_values_and_gradients_equal_plain_attention(t, s, qc, kc):
    # T and S not divisible by the chunks (padded queries, masked keys), several blocks.
    q, k, v, w = _qkvw(t, s)
    ref = _value_and_grads(_plain, q, k, v, w)
    got = _value_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, query_chunk=qc, key_chunk=kc), q, k, v, w)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))
    # The dispatcher's "chunked" path is the same function.
    via = attention(q, k, v, "chunked", query_chunk=qc, key_chunk=kc)
    np.testing.assert_array_equal(np.asarray(via), np.asarray(got[0]))


def test_bfloat16_is_as_accurate_as_plain_bfloat16():
    q, k, v, w = _qkvw(45, 38, seed=1)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    # Reference: exact attention of the bf16-rounded inputs, computed in float32.
    ref = _value_and_grads(_plain, *[x.astype(jnp.float32) for x in bf], w)
    plain = _value_and_grads(_plain, *bf, w)
    ours = _value_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, query_chunk=16, key_chunk=10), *bf, w)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref):
        assert o.dtype == jnp.bfloat16, name
        e_ours, e_plain = _rel(o, r), _rel(p, r)
        assert e_ours <= max(2 * e_plain, 8e-3), (name, e_ours, e_plain)


def test_one_key_gives_v_and_its_gradient():
    q, k, v, w = _qkvw(11, 1)
    out, dq, dk, dv = _value_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, query_chunk=4, key_chunk=3), q, k, v, w)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(v), out.shape),
                               rtol=1e-6)
    assert _rel(dv, np.asarray(w).sum(1, keepdims=True)) <= 1e-6
    assert float(jnp.abs(dq).max()) < 1e-5 and float(jnp.abs(dk).max()) < 1e-5


def _temp_bytes(fn, t, d=8):
    x = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


def test_gradient_memory_is_linear_in_tokens():
    def chunked(q, k, v):
        return attention(q, k, v, query_chunk=128, key_chunk=128)

    t = 2048
    square = t * t * 4  # one float32 score matrix
    assert _temp_bytes(_plain, t) >= square  # plain attention keeps T x T matrices
    small, big = _temp_bytes(chunked, t), _temp_bytes(chunked, 2 * t)
    assert small < square / 8
    assert big <= 2.2 * small  # twice the tokens, about twice the memory


def test_dispatch_uses_plain_attention_within_one_chunk():
    q, k, v, _ = _qkvw(20, 20)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, query_chunk=32,
                                                          key_chunk=32))(q, k, v))
    assert "custom_vjp" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, query_chunk=8,
                                                          key_chunk=32))(q, k, v))
    assert "custom_vjp" in jaxpr


def test_bad_shapes_and_chunks_raise():
    q, k, v, _ = _qkvw(8, 8)
    with pytest.raises(ValueError, match="same B, H, D"):
        chunked_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="chunk sizes"):
        chunked_attention(q, k, v, query_chunk=0)
