"""Softmax attention in memory linear in the number of tokens: chunked, with a recomputing backward.

`chunked_attention(q, k, v)` computes `softmax(q k^T / sqrt(D)) v` -- the same function as
`jax.nn.dot_product_attention` without mask or bias -- without ever holding the T x S
score matrix:

- forward: queries in blocks of `query_chunk` (`lax.map`), keys and values in blocks of
  `key_chunk` (`lax.scan`) with the online softmax (running max `m`, running sum `l`,
  rescaled accumulator): Rabe & Staats 2021, "Self-attention does not need O(n^2)
  memory"; Dao 2023, FlashAttention-2, Algorithm 1. Saved for the backward: q, k, v, the
  output and the log-sum-exp per query (B, H, T) -- O(T), no T x S array.
- backward (`jax.custom_vjp`): FlashAttention-2 Algorithm 2. Per key block, per query
  block, the scores are recomputed, P = exp(s - lse), dV += P^T dO, dP = dO V^T,
  dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q; one block of scores at a time.

Memory: a few (B, H, query_chunk, key_chunk) float32 blocks plus O(T + S) per-token
arrays. Compute: 7 (block) matmuls per query-key pair against plain attention's 6 (the
scores are recomputed once in the backward).

Precision: logits, softmax, the running statistics and all accumulators are float32
whatever the input dtype; probabilities and dS are cast to the value/key dtype for their
matmuls (as `jax.nn.dot_product_attention` casts its probabilities), and results are
returned in the input dtypes. Padding (T or S not a multiple of the chunk) is masked
exactly: padded keys get -inf logits, padded queries are dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
QUERY_CHUNK = 1024
KEY_CHUNK = 1024


def _n_blocks(t: int, size: int) -> int:
    return -(-t // size)


def _to_blocks(x, size):
    """(B, T, H, D) -> (n, B, size, H, D), zero-padded at the end of T."""
    b, t, h, d = x.shape
    n = _n_blocks(t, size)
    if n * size != t:
        x = jnp.pad(x, ((0, 0), (0, n * size - t), (0, 0), (0, 0)))
    return x.reshape(b, n, size, h, d).transpose(1, 0, 2, 3, 4)


def _from_blocks(x, t):
    """(n, B, size, H, D) -> (B, T, H, D), padding dropped."""
    n, b, size, h, d = x.shape
    return x.transpose(1, 0, 2, 3, 4).reshape(b, n * size, h, d)[:, :t]


def _key_mask(s: int, size: int):
    """(n, size) bool, False on padded keys; None when s divides into blocks exactly."""
    n = _n_blocks(s, size)
    if n * size == s:
        return None
    return (jnp.arange(n * size) < s).reshape(n, size)


def _scores(qi, kj, valid, scale):
    """(B, Qc, H, D) x (B, Kc, H, D) -> float32 logits (B, H, Qc, Kc), padded keys -inf."""
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, kj, preferred_element_type=F32) * scale
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    return s


def _forward(q, k, v, query_chunk, key_chunk):
    """(output (B, T, H, D) in q.dtype, log-sum-exp blocks (nq, B, H, Qc) float32)."""
    b, t, h, d = q.shape
    s_len = k.shape[1]
    scale = d ** -0.5
    qc, kc = min(query_chunk, t), min(key_chunk, s_len)
    kb, vb = _to_blocks(k, kc), _to_blocks(v, kc)
    mask = _key_mask(s_len, kc)

    def one_query_block(qi):
        def step(carry, j):
            m, l, acc = carry
            s = _scores(qi, kb[j], None if mask is None else mask[j], scale)
            m_new = jnp.maximum(m, s.max(-1))  # finite: every key block has a real key
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), vb[j],
                            preferred_element_type=F32)
            acc = acc * alpha.transpose(0, 2, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((b, h, qc), -jnp.inf, F32), jnp.zeros((b, h, qc), F32),
                jnp.zeros((b, qc, h, d), F32))
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(kb.shape[0]))
        out = acc / l.transpose(0, 2, 1)[..., None]
        return out.astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(one_query_block, _to_blocks(q, qc))
    return _from_blocks(out, t), lse


def _backward(q, k, v, out, lse, g, query_chunk, key_chunk):
    b, t, h, d = q.shape
    s_len = k.shape[1]
    scale = d ** -0.5
    qc, kc = min(query_chunk, t), min(key_chunk, s_len)
    qb, gb = _to_blocks(q, qc), _to_blocks(g.astype(q.dtype), qc)
    kb, vb = _to_blocks(k, kc), _to_blocks(v, kc)
    mask = _key_mask(s_len, kc)
    # rowsum(dO * O) per query, float32, blocked like lse: (nq, B, H, Qc).
    delta = jnp.sum(g.astype(F32) * out.astype(F32), axis=-1)  # (B, T, H)
    delta = _to_blocks(delta[..., None], qc)[..., 0].transpose(0, 1, 3, 2)

    def one_key_block(dq, j):
        kj, vj = kb[j], vb[j]
        valid = None if mask is None else mask[j]

        def step(carry, i):
            dq, dk, dv = carry
            qi, gi = qb[i], gb[i]
            p = jnp.exp(_scores(qi, kj, valid, scale) - lse[i][..., None])  # (B, H, Qc, Kc)
            dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(g.dtype), gi,
                                 preferred_element_type=F32)
            dp = jnp.einsum("bqhd,bkhd->bhqk", gi, vj, preferred_element_type=F32)
            ds = p * (dp - delta[i][..., None]) * scale
            dq = dq.at[i].add(jnp.einsum("bhqk,bkhd->bqhd", ds.astype(k.dtype), kj,
                                         preferred_element_type=F32))
            dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q.dtype), qi,
                                 preferred_element_type=F32)
            return (dq, dk, dv), None

        zeros = jnp.zeros((b, kc, h, d), F32)
        (dq, dk, dv), _ = jax.lax.scan(step, (dq, zeros, zeros), jnp.arange(qb.shape[0]))
        return dq, (dk, dv)

    dq0 = jnp.zeros(qb.shape, F32)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, jnp.arange(kb.shape[0]))
    return (_from_blocks(dq, t).astype(q.dtype), _from_blocks(dk, s_len).astype(k.dtype),
            _from_blocks(dv, s_len).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, query_chunk, key_chunk):
    return _forward(q, k, v, query_chunk, key_chunk)[0]


def _attention_fwd(q, k, v, query_chunk, key_chunk):
    out, lse = _forward(q, k, v, query_chunk, key_chunk)
    return out, (q, k, v, out, lse)


def _attention_bwd(query_chunk, key_chunk, residuals, g):
    return _backward(*residuals, g, query_chunk, key_chunk)


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q, k, v, *, query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
    """softmax(q k^T / sqrt(D)) v over (B, T, H, D) queries and (B, S, H, D) keys/values.

    Returns (B, T, H, D) in q's dtype. Memory O((T + S) * H * D + query_chunk * key_chunk
    * B * H) in the forward and the backward (see the module docstring). Raises ValueError
    for mismatched shapes or chunk sizes < 1.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[::2] != k.shape[::2] \
            or q.shape[3] != k.shape[3]:
        raise ValueError(f"chunked_attention needs q (B, T, H, D) and k, v (B, S, H, D) with "
                         f"the same B, H, D; got {q.shape}, {k.shape}, {v.shape}")
    if int(query_chunk) < 1 or int(key_chunk) < 1:
        raise ValueError(f"chunk sizes must be >= 1; got query_chunk={query_chunk}, "
                         f"key_chunk={key_chunk}")
    return _attention(q, k, v, int(query_chunk), int(key_chunk))
