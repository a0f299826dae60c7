"""Optimisers for generator and discriminator: Adam, schedule, clipping, accumulation;
and the guard that skips a non-finite update (`all_finite`, `keep_if`)."""

import functools

import jax
import jax.numpy as jnp
import optax

from ldm_jax.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def train_problems(train_cfg) -> list[str]:
    """One-line problems of a `config.train` section (empty when valid)."""
    problems = []
    if train_cfg.get("schedule", "constant") not in SCHEDULES:
        problems.append(f"train.schedule={train_cfg.schedule!r} is not known; use "
                        f"{' or '.join(repr(s) for s in SCHEDULES)}.")
    for name in ("num_steps", "batch_size", "grad_accum_steps", "max_bad_steps",
                 "log_every_steps", "save_every_steps", "eval_every_steps",
                 "keep_checkpoints"):
        v = train_cfg.get(name, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"train.{name} must be a positive int, got {v!r}.")
    v = train_cfg.get("num_eval_batches", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        problems.append(f"train.num_eval_batches must be an int >= 0 (0: the whole "
                        f"validation set), got {v!r}.")
    for name in ("learning_rate", "disc_learning_rate", "warmup_steps", "grad_clip_norm",
                 "save_every_minutes"):
        v = train_cfg.get(name, 0)
        if v is not None and float(v) < 0:
            problems.append(f"train.{name} must be >= 0, got {v!r}.")
    return problems


def learning_rate_schedule(peak, train_cfg):
    """Constant or cosine decay, both with an optional linear warm-up."""
    warmup = int(train_cfg.warmup_steps)
    if train_cfg.schedule == "constant":
        if warmup <= 0:
            return peak
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
    if train_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, max(warmup, 0), max(int(train_cfg.num_steps), warmup + 1))
    raise ConfigError(
        f"train.schedule={train_cfg.schedule!r} is not known; use 'constant' or 'cosine'.")


def make_optimizer(peak_lr, train_cfg, *, multisteps_always=False):
    """Adam with global-norm clipping, wrapped in MultiSteps for gradient accumulation.

    The schedule counts optimizer updates, not micro-batches: MultiSteps only advances
    the inner optimizer every `grad_accum_steps` calls. With `grad_accum_steps` 1 the
    update is MultiSteps' without its cond (`_every_step`: same values, same state),
    unless `multisteps_always`. Raises ConfigError for `grad_accum_steps` < 1.
    """
    parts = []
    if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip_norm)))
    parts.append(optax.adam(learning_rate_schedule(float(peak_lr), train_cfg),
                            b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                            eps=float(train_cfg.eps)))
    tx = optax.chain(*parts)
    k = int(train_cfg.grad_accum_steps)
    if k < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, got {k}.")
    multi = optax.MultiSteps(tx, every_k_schedule=k)
    if k > 1 or multisteps_always:
        return multi
    return optax.GradientTransformation(multi.init, functools.partial(_every_step, tx))


def _every_step(inner, updates, state, params=None):
    """`optax.MultiSteps.update` at every_k_schedule=1, without its accumulation and its
    skip branch: the same updates, and a state of the same structure (acc_grads stay
    zero), so checkpoints of either resume with the other. MultiSteps puts the inner
    optimiser in a `lax.cond` with a skip branch that traces it again, which slows the
    compile of small steps (benchmarks/RESULTS.md, "Figures behind code comments")."""
    new_updates, inner_state = inner.update(updates, state.inner_opt_state, params)
    return new_updates, state._replace(
        gradient_step=optax.safe_increment(state.gradient_step), inner_opt_state=inner_state)


def all_finite(trees):
    """True (a scalar bool array) iff every entry of every tree in `trees` is finite, from
    one L2 norm per tree (non-finite iff some entry is). Per-leaf isfinite reductions, and
    equally a hand-written sum of squares over all trees, made XLA:CPU compile the step
    several times slower (benchmarks/QUALITY.md, "Compile time")."""
    return jnp.all(jnp.stack([jnp.isfinite(optax.tree_utils.tree_norm(t)) for t in trees]))


def keep_if(pred, new, old):
    """`new` if `pred` (a scalar bool array) is true, else `old`: pytrees of the same
    structure, shapes and dtypes (e.g. the updated and the previous params and optimiser
    state of a step that may be skipped).

    One `lax.cond` over the whole trees, not a `jnp.where` per leaf: the same values, and
    XLA:CPU compiles it several times faster (benchmarks/RESULTS.md, "Figures behind code
    comments"; benchmarks/QUALITY.md, "Compile time").
    """
    return jax.lax.cond(pred, lambda n, o: n, lambda n, o: o, new, old)
