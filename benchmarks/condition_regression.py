"""A supervised baseline for projection -> 3D (benchmarks/CONDITIONING.md): a small 2D CNN
trained with mean squared error to predict the volume's planes from its projection.

It estimates what the condition can say at all: its prediction approximates the
conditional mean E[volume | image], so its Dice and depth error bound from above what the
mean of many samples of a perfect conditional model reaches, and show how much depth a
point-spread cue carries beyond back-projection.

    train_regressor(data_cfg, cond_cfg, steps, batch, seed) -> predict
    predict(conditions (B, X, Y, 1, C)) -> volumes (B, X, Y, Z, C) float32

Only projections along the last axis (axis 2); other axes raise SystemExit.
"""

from __future__ import annotations

import copy

import numpy as np

WIDTH = 32
DILATIONS = (1, 2, 4, 1)  # receptive field 17 pixels: a point-spread's tails and a crossing


def _model(depth: int, channels: int):
    import flax.linen as nn

    class PlaneRegressor(nn.Module):
        """(B, X, Y, C) image -> (B, X, Y, depth, C) planes."""

        @nn.compact
        def __call__(self, x):
            for d in DILATIONS:
                x = nn.silu(nn.Conv(WIDTH, (3, 3), kernel_dilation=d)(x))
            x = nn.Conv(depth * channels, (3, 3))(x)
            return x.reshape(*x.shape[:3], depth, channels)

    return PlaneRegressor()


def train_regressor(data_cfg, cond_cfg, steps: int = 1200, batch: int = 16, seed: int = 0,
                    learning_rate: float = 1e-3, log=print):
    """Train on the run's training volumes (random crops/flips as in training), conditions
    with the config's noise; returns predict(conditions) -> volumes (numpy float32)."""
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax import data as data_lib
    from ldm_jax.diffusion.aligned import compute_condition

    if int(cond_cfg.projection.get("axis", 2)) != 2:
        raise SystemExit("the regression baseline takes projections along axis 2 only")
    cfg = copy.deepcopy(data_cfg)
    cfg.data.num_workers = 0
    loader = iter(data_lib.make_train_loader(cfg, batch_size=int(batch), seed=int(seed)))
    first = np.asarray(next(loader)["image"], np.float32)
    depth, channels = first.shape[3], first.shape[4]
    model = _model(depth, channels)
    params = model.init(jax.random.PRNGKey(seed), first[:1, :, :, 0])
    opt = optax.adam(learning_rate)
    state = opt.init(params)

    @jax.jit
    def step(params, state, volumes, key):
        image = compute_condition(volumes, cond_cfg, key)[:, :, :, 0]

        def loss_fn(p):
            return jnp.mean((model.apply(p, image) - volumes) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    volumes = first
    for i in range(int(steps)):
        if i:
            volumes = np.asarray(next(loader)["image"], np.float32)
        params, state, loss = step(params, state, jnp.asarray(volumes),
                                   jax.random.fold_in(jax.random.PRNGKey(seed + 7), i))
        if (i + 1) % max(1, int(steps) // 4) == 0:
            log(f"regression step {i + 1}/{steps}: train mse {float(loss):.5f}")
    apply = jax.jit(model.apply)

    def predict(conditions):
        return np.asarray(apply(params, jnp.asarray(conditions[:, :, :, 0], jnp.float32)),
                          np.float32)

    return predict
