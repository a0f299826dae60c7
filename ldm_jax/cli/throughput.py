"""Measure the training loader's volumes/s for a config (compile-free: numpy + grain only).

  ldm-jax throughput --config configs/balanced.py --num_batches 20
  ldm-jax throughput --config configs/balanced.py \\
      --config.data.source=nifti --config.data.train_dir=/data/vols --config.data.num_workers=2

The first batches (worker start-up, imports, caches) are excluded: timing starts after
`--warmup` batches.
"""

from __future__ import annotations

import time


def measure(config, batch_size: int, num_batches: int, warmup: int = 2) -> dict:
    """{'volumes_per_s', 'batches', 'batch_shape', 'startup_s', 'cpu_s_per_volume'}."""
    from ldm_jax.data.pipeline import make_train_loader

    t0 = time.perf_counter()
    it = iter(make_train_loader(config, batch_size=batch_size, seed=0, process_index=0, process_count=1))
    try:
        for _ in range(warmup):
            shape = next(it)["image"].shape
        startup = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            shape = next(it)["image"].shape
        dt, cpu = time.perf_counter() - t1, time.process_time() - c1
    finally:
        it.close()
    return {
        "volumes_per_s": num_batches * batch_size / dt,
        "batches": num_batches,
        "batch_shape": shape,
        "startup_s": startup,
        # CPU seconds of this process (all its threads) per volume; with num_workers=0 it
        # is the whole cost, independent of other load on the machine.
        "cpu_s_per_volume": cpu / (num_batches * batch_size),
    }


def _body(fv):
    from ldm_jax import cli
    from ldm_jax import data as data_lib
    cli.check_range("batch_size", fv.batch_size, 1)
    cli.check_range("num_batches", fv.num_batches, 1)
    cli.check_range("warmup", fv.warmup, 0)
    cfg = fv.config
    data_lib.check_data_config(cfg.data)
    r = measure(cfg, fv.batch_size, fv.num_batches, fv.warmup)
    print(
        f"data.source={cfg.data.source!r} num_workers={cfg.data.num_workers}: "
        f"{r['volumes_per_s']:.2f} volumes/s over {r['batches']} batches of {r['batch_shape']} "
        f"(first {fv.warmup} batches took {r['startup_s']:.1f} s, excluded); "
        f"{r['cpu_s_per_volume']:.3f} CPU-s/volume in this process"
    )


def _define(fv):
    from absl import flags

    flags.DEFINE_integer("batch_size", 2, "Per-process batch size.", flag_values=fv)
    flags.DEFINE_integer("num_batches", 20, "Batches timed after warm-up.", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Batches before timing starts.", flag_values=fv)


def main(argv=None) -> int:
    from ldm_jax import cli

    return cli.run("ldm-jax throughput", __doc__, _define, _body, argv, config="required")
