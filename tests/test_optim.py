"""ldm_jax.optim: the optimiser without accumulation equals optax.MultiSteps(k=1), and the
skipped-update guard."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax import optim


def _train_cfg(k, warmup_steps=2):
    return ml_collections.ConfigDict(dict(
        grad_accum_steps=k, grad_clip_norm=1.0, warmup_steps=warmup_steps, schedule="cosine",
        num_steps=10, b1=0.9, b2=0.999, eps=1e-8))


def test_every_step_equals_multisteps_of_one():
    cfg = _train_cfg(1)
    ours = optim.make_optimizer(1e-2, cfg)
    ref = optax.MultiSteps(optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optim.learning_rate_schedule(1e-2, cfg), b1=0.9, b2=0.999, eps=1e-8)),
        every_k_schedule=1)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    s_ours, s_ref = ours.init(params), ref.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    p_ours = p_ref = params
    for i in range(4):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1.0)) + 0.3 * (i - 1.5), p_ours)
        u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
        u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(s_ours.gradient_step) == 4 and int(s_ours.mini_step) == 0


def test_accumulation_still_uses_multisteps():
    tx = optim.make_optimizer(1e-2, _train_cfg(2, warmup_steps=0))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.ones(3)}
    u1, state = tx.update(grads, state, params)
    assert float(jnp.abs(u1["w"]).max()) == 0.0 and int(state.mini_step) == 1  # accumulated
    u2, state = tx.update(grads, state, params)
    assert float(jnp.abs(u2["w"]).max()) > 0.0 and int(state.gradient_step) == 1


def test_keep_if_and_all_finite():
    new = {"a": jnp.ones(3), "b": (jnp.full((2,), 2.0), jnp.int32(5))}
    old = jax.tree.map(jnp.zeros_like, new)
    for pred, want in ((True, new), (False, old)):
        got = jax.jit(optim.keep_if)(jnp.asarray(pred), new, old)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(optim.all_finite((new, jnp.float32(1.0))))
    assert not bool(optim.all_finite((new, {"x": jnp.array([1.0, jnp.nan])})))
    assert not bool(optim.all_finite((jnp.float32(jnp.inf),)))
