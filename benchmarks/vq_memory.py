"""Compile-only training-step memory of any stage-1 kind (KL or VQ-VAE), side by side.

    python -m benchmarks.vq_memory --config configs/balanced_4x.py \\
        --config configs/vqvae_4x.py --volume 256,256,64 --dtype bfloat16 [--json out.json]
    python -m benchmarks.vq_memory --config configs/vqvae_4x.py --volume 256,256,64 \\
        --set autoencoder.vqvae.initial_downsample_factor=4 \\
        --set autoencoder.vqvae.downsample_factors=(1,) \\
        --set autoencoder.vqvae.upsample_head=subpixel

Why: `benchmarks.bench` measures the KL autoencoder's step (its rows read the KL model's
geometry); the VQ-VAE (issue 31) needs the same number to be compared with it. This
builds the trainer's own step for the config's `autoencoder.kind`
(`ldm_jax.autoencoder.kinds.make_task`: losses, optimisers, EMA codebook update, the
discriminator when `loss.adv_weight` > 0 -- from the first step, as `benchmarks.bench`
measures it --, state donation) from abstract shapes on one
device, compiles it without allocating and reads XLA's memory analysis:
argument + output - alias + temp bytes (`benchmarks.common.memory_analysis`, the
number of the README's configs table). `--set` overrides apply to every config, in order,
after `--volume` / `--dtype`; a field a config does not have is skipped for it.
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.common import count_params, like_train_py, load, memory_analysis, parse_ints


def step_memory(config) -> dict:
    """Compiles the stage-1 training step of `config` (a ConfigDict, any kind) on one
    device from abstract shapes; returns {"peak_bytes": XLA's argument + output - alias +
    temp bytes, "xla": the raw analysis, "params": autoencoder parameter count, "kind",
    "volume", "dtype"}. Raises ConfigError for an invalid config."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import sharding
    from ldm_jax.autoencoder.config import kind_of, prepare_config
    from ldm_jax.autoencoder.kinds import make_task
    from ldm_jax.trainer.loop import abstract_train_state, compile_train_step

    config = config.copy_and_resolve_references()
    config.loss.adv_warmup_steps = 0  # as benchmarks.bench: the step after the warm-up
    config = prepare_config(config)
    config.mesh.data, config.mesh.spatial = 1, 1
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    task = make_task(config)
    volume = tuple(int(v) for v in config.data.volume_size)
    shape = (int(config.train.batch_size), *volume, int(config.autoencoder.in_channels))
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    abstract = abstract_train_state(task, mesh)
    batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sh)}
    consts = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                          task.step_consts())
    compiled = compile_train_step(task, mesh, abstract).lower(abstract, batch, consts).compile()
    peak, raw = memory_analysis(compiled)
    return dict(kind=kind_of(config), volume=list(volume), dtype=str(config.autoencoder.dtype),
                peak_bytes=peak, xla=raw, params=count_params(abstract.g_params))


def _set(config, item: str) -> bool:
    """Applies one `section.field=value` (a Python literal, else a string); False when the
    config has no such field."""
    import ast

    key, _, text = item.partition("=")
    *path, last = key.strip().split(".")
    node = config
    for p in path:
        node = node.get(p) if hasattr(node, "get") else None
        if node is None:
            return False
    if last not in node:
        return False
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = text.strip()
    with node.ignore_type():
        node[last] = value
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="config file (repeat)")
    p.add_argument("--volume", type=lambda t: parse_ints(t, "--volume", 3),
                   help="X,Y,Z (default: the config's)")
    p.add_argument("--dtype", help="autoencoder.dtype and discriminator.dtype")
    p.add_argument("--set", action="append", default=[], help="section.field=value (repeat)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    like_train_py()
    rows = []
    for path in args.config:
        config = load(path)
        if args.volume:
            config.data.volume_size = tuple(args.volume)
        if args.dtype:
            config.autoencoder.dtype = config.discriminator.dtype = args.dtype
        applied = [s for s in args.set if _set(config, s)]
        row = dict(config=path, overrides=applied, **step_memory(config))
        rows.append(row)
        print(f"{path} {' '.join(applied)}: {row['kind']} {'x'.join(map(str, row['volume']))} "
              f"{row['dtype']}: peak {row['peak_bytes'] / 1e9:.3f} GB (XLA), "
              f"{row['params']:,} autoencoder parameters", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
