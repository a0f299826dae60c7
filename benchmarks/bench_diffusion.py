"""What stage 2 costs -- memory, FLOPs, step and sampling time -- and against MONAI.

    python -m benchmarks.bench_diffusion --config configs/diffusion/monai_3d_ldm.py \\
        [--dtype float32|bfloat16] [--batch 1] [--steps 5] [--warmup 1] [--sample-steps 50] \\
        [--threads N] [--vs-monai] [--compile-only] [--json out.json]

The step measured is the one `python train.py --config configs/diffusion/X.py` jits:
`ldm_jax.diffusion.task.DiffusionTask.train_step` (scaled latents -> noise at uniform
timesteps -> UNet -> MSE on the scheduler's target -> Adam with clipping -> EMA -> the
non-finite guard, state donated) through `ldm_jax.trainer.compile_train_step`, on a
shapes-only task (`DiffusionTask(config, autoencoder=None)`: latents of
`config.latents.latent_shape`, no data, no autoencoder). Sampling is
`ldm_jax.diffusion.sampling.make_sampler` with DDIM: noise -> `--sample-steps` UNet calls
in one jitted `fori_loop` -> one latent.

What the numbers are (also printed under every table):
- peak_memory_bytes / sample_peak_memory_bytes: XLA memory analysis of the compiled
  training step / sampler (`benchmarks.common.memory_analysis`, the stage-1 bench's method:
  argument + output - alias + temp).
- flops: XLA cost analysis of the training step, plus the while-loop iterations it leaves
  out (loop_flops; `benchmarks.common.cost_analysis`).
- compile_s / sample_compile_s: XLA compile time of each (lowering not included).
- step_s / step_cpu_s: median wall / process CPU time of --steps steps after --warmup.
- sample_s / sample_cpu_s: wall / process CPU time of one sampling of one latent (after
  one untimed sampling when --warmup > 0).
- With --vs-monai: MONAI's DiffusionModelUNet + DDPMScheduler step and DDIMScheduler
  sampling, same architecture, shapes, optimiser and step count, in a separate process
  (`benchmarks.bench_diffusion_monai`); ratios are ours / MONAI (< 1: ours is faster).

Each configuration runs in a fresh worker process (device peak counters cannot be reset
within a process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import (
    HOST_METHOD,
    MEMORY_METHOD,
    HostPeak,
    add_run_args,
    cost_analysis,
    count_params,
    fmt_float,
    in_fresh_process,
    like_train_py,
    limit_threads,
    load,
    machine_name,
    memory_analysis,
    read_rows,
    run_exiting_on_sigterm,
    write_json,
)
from ldm_jax.errors import ConfigError

WORKER_MARK = "BENCH_DIFFUSION_JSON"
MONAI_MARK = "BENCH_MONAI_JSON"
DTYPES = ("float32", "bfloat16")


def bench_config(config, *, batch=None, dtype=None):
    """A copy of a stage-2 `config` with the bench's overrides (None keeps the config's),
    on one device (mesh 1 x 1)."""
    config = config.copy_and_resolve_references()
    if batch is not None:
        config.train.batch_size = int(batch)
    if dtype is not None:
        config.unet.dtype = dtype
    config.mesh.data, config.mesh.spatial = 1, 1
    return config


def _timed(fn, n):
    """(wall seconds, process CPU seconds) of n calls of fn, each blocked on; last result."""
    import jax
    times, cpu_times, out = [], [], None
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    return times, cpu_times, out


def measure(config, *, name="config", steps=5, warmup=1, sample_steps=50, compile_only=False,
            threads=None):
    """Compiles (and unless compile_only, runs) the stage-2 training step and a DDIM
    sampler of `config` (from `bench_config`); one result row (JSON-able dict).

    Raises ConfigError for an invalid config or a missing `latents.latent_shape`.
    """
    import jax
    import jax.numpy as jnp

    from ldm_jax import sharding
    from ldm_jax.diffusion.config import prepare_config
    from ldm_jax.diffusion.sampling import make_sampler, sampler_for
    from ldm_jax.diffusion.task import DiffusionTask
    from ldm_jax.trainer.loop import abstract_train_state, compile_train_step, init_train_state

    config = prepare_config(config)
    task = DiffusionTask(config, autoencoder=None)
    dev0 = jax.devices()[0]
    mesh = sharding.make_mesh(config.mesh, [dev0])
    batch_size = int(config.train.batch_size)
    batch_sh = sharding.batch_sharding(mesh)
    batch_shape = (batch_size, *task.latent_shape)
    abstract = abstract_train_state(task, mesh)
    abstract_batch = {"latent": jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=batch_sh)}
    if task.num_classes:
        abstract_batch["class_label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                                             sharding=batch_sh)

    step_fn = compile_train_step(task, mesh, abstract)
    t0 = time.perf_counter()
    lowered = step_fn.lower(abstract, abstract_batch, None)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    peak, raw = memory_analysis(compiled)
    flops, bytes_accessed, loop_flops = cost_analysis(compiled)

    row = dict(
        name=name, stage=2, latent_shape=list(task.latent_shape),
        padded_shape=list(task.padded_shape), batch=batch_size, dtype=str(config.unet.dtype),
        unet=config.unet.to_dict(), params=count_params(abstract.params), flops=flops,
        loop_flops=loop_flops, bytes_accessed=bytes_accessed, peak_memory_bytes=peak,
        memory_method=MEMORY_METHOD,
        xla_memory=raw, lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3),
        step_s=None, step_cpu_s=None, step_times=[], device_peak_bytes=None,
        host_peak_bytes=None, sample_steps=int(sample_steps), sample_s=None, sample_cpu_s=None,
        backend=dev0.platform, device_kind=dev0.device_kind, jax_version=jax.__version__,
        machine=machine_name(dev0),
        threads=(threads or len(os.sched_getaffinity(0))) if dev0.platform == "cpu" else None,
        date=datetime.date.today().isoformat())

    sampler = labels = None
    if sample_steps > 0:
        fn = make_sampler(task.unet, sampler_for(config.scheduler, "ddim"),
                          shape=task.sample_shape()[1:], steps=int(sample_steps))
        labels = jnp.zeros((1,), jnp.int32) if task.num_classes else None
        key = jax.random.PRNGKey(2)
        t0 = time.perf_counter()
        sampler = fn.lower(abstract.ema_params, key, labels, n=1).compile()
        row["sample_compile_s"] = round(time.perf_counter() - t0, 3)
        row["sample_peak_memory_bytes"] = memory_analysis(sampler)[0]
    if compile_only or steps <= 0:
        return row

    host = HostPeak()
    host.baseline()
    state, _ = init_train_state(task, mesh)
    batch = {"latent": jax.device_put(jax.random.normal(jax.random.PRNGKey(1), batch_shape),
                                      batch_sh)}
    if task.num_classes:
        batch["class_label"] = jax.device_put(jnp.zeros((batch_size,), jnp.int32), batch_sh)
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch, None)
        return holder[0], metrics

    _timed(step, max(int(warmup), 0))
    host.start()
    times, cpu_times, (_, metrics) = _timed(step, int(steps))
    row.update(step_times=[round(t, 4) for t in times], step_s=round(statistics.median(times), 4),
               step_cpu_s=round(statistics.median(cpu_times), 4), loss=float(metrics["loss"]))
    stats = dev0.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        row["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    elif dev0.platform == "cpu":
        row["host_peak_bytes"] = host.peak_delta()
        row["host_memory_method"] = HOST_METHOD
    if sampler is not None:
        params = holder[0].ema_params
        run = lambda: sampler(params, key, labels)  # noqa: E731
        _timed(run, 1 if warmup > 0 else 0)
        s_times, s_cpu, out = _timed(run, 1)
        row.update(sample_s=round(s_times[0], 4), sample_cpu_s=round(s_cpu[0], 4),
                   sample_finite=bool(jnp.all(jnp.isfinite(out))))
    return row


# ----------------------------------------------------------------------------------------
# Fresh processes: ours (a worker) and MONAI's.


def _run_worker(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    threads = limit_threads(spec.get("threads"))  # before JAX sizes its thread pools
    like_train_py()
    import ml_collections
    try:
        row = measure(ml_collections.ConfigDict(spec["config"]), name=spec["name"],
                      steps=spec["steps"], warmup=spec["warmup"],
                      sample_steps=spec["sample_steps"], compile_only=spec["compile_only"],
                      threads=threads)
    except ConfigError as e:
        row = dict(name=spec["name"], error=f"ConfigError: {e}")
    except Exception as e:  # report the row as failed (e.g. out of memory) and go on
        row = dict(name=spec["name"], error=f"{type(e).__name__}: {str(e)[:2000]}")
    print(f"{WORKER_MARK} " + json.dumps(row), flush=True)


def measure_isolated(config, *, name, steps, warmup, sample_steps, compile_only, threads=None,
                     timeout=None):
    """`measure` in a fresh `python -m benchmarks.bench_diffusion --_worker` process."""
    spec = dict(config=config.to_dict(), name=name, steps=steps, warmup=warmup,
                sample_steps=sample_steps, compile_only=compile_only, threads=threads)
    row = in_fresh_process("benchmarks.bench_diffusion", "--_worker", spec, WORKER_MARK,
                           timeout)
    row.setdefault("name", name)
    return row


def measure_monai(config, row, *, steps, warmup, sample_steps, threads=None, timeout=None):
    """MONAI's side for `config`, at our row's padded latent shape and resolved UNet, in a
    fresh `python -m benchmarks.bench_diffusion_monai` process; {"error": ...} if it fails."""
    spec = dict(config=dict(config.to_dict(), unet=row["unet"]),
                shape=[*row["padded_shape"], row["latent_shape"][-1]], batch=row["batch"],
                steps=steps, warmup=warmup, sample_steps=sample_steps, dtype=row["dtype"],
                device="auto", threads=threads)
    return in_fresh_process("benchmarks.bench_diffusion_monai", "--spec", spec, MONAI_MARK,
                            timeout)


RATIOS = (("step", "step_s"), ("step_cpu", "step_cpu_s"), ("sample", "sample_s"),
          ("sample_cpu", "sample_cpu_s"))


def add_monai_ratios(row, monai):
    """Ours / MONAI for step and sampling time (wall and CPU) and host/device memory."""
    row["monai"] = monai
    if "error" in monai:
        return row
    for label, key in RATIOS:
        if row.get(key) and monai.get(key):
            row[f"vs_monai_{label}"] = round(row[key] / monai[key], 3)
    ours = row.get("device_peak_bytes") or row.get("host_peak_bytes")
    if ours and monai.get("peak_memory_bytes"):
        row["vs_monai_memory"] = round(ours / monai["peak_memory_bytes"], 3)
    return row


# ----------------------------------------------------------------------------------------
# Output.


def _mb(b):
    return "-" if b is None else f"{b / 1e6:,.0f}"


def _pair(a, b):
    return "-" if a is None and b is None else f"{fmt_float(a)} / {fmt_float(b)}"


def format_table(rows):
    """Markdown table of result rows, plus what its columns mean."""
    monai = any("monai" in r for r in rows)
    head = ["config", "dtype", "latent (padded)", "batch", "params", "GFLOP/step",
            "step peak MB (XLA)", "sample peak MB (XLA)", "host/device peak MB", "compile s",
            "step CPU-s / wall s", "sample CPU-s / wall s"]
    if monai:
        head += ["MONAI step CPU-s / wall s", "MONAI sample CPU-s / wall s", "MONAI peak MB",
                 "ours/MONAI step (CPU / wall)", "ours/MONAI sample (CPU / wall)",
                 "ours/MONAI memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "params" not in r:
            lines.append(f"| {r['name']} | error: {r.get('error', '?')[:200]} |")
            continue
        shape = "x".join(map(str, r["latent_shape"]))
        if r["padded_shape"] != r["latent_shape"][:3]:
            shape += f" ({'x'.join(map(str, r['padded_shape']))})"
        cells = [r["name"], r["dtype"], shape, str(r["batch"]), f"{r['params'] / 1e6:.2f} M",
                 "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.1f}",
                 _mb(r["peak_memory_bytes"]), _mb(r.get("sample_peak_memory_bytes")),
                 _mb(r.get("device_peak_bytes") or r.get("host_peak_bytes")),
                 f"{fmt_float(r['compile_s'], 1)} + {fmt_float(r.get('sample_compile_s'), 1)}",
                 _pair(r.get("step_cpu_s"), r.get("step_s")),
                 _pair(r.get("sample_cpu_s"), r.get("sample_s"))]
        if monai:
            m = r.get("monai") or {}
            if "error" in m:
                cells += [m["error"][:120], "", "", "", "", ""]
            elif m:
                cells += [_pair(m.get("step_cpu_s"), m.get("step_s")),
                          _pair(m.get("sample_cpu_s"), m.get("sample_s")),
                          _mb(m.get("peak_memory_bytes")),
                          _pair(r.get("vs_monai_step_cpu"), r.get("vs_monai_step")),
                          _pair(r.get("vs_monai_sample_cpu"), r.get("vs_monai_sample")),
                          fmt_float(r.get("vs_monai_memory"))]
            else:
                cells += ["-"] * 6
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", notes(rows)]
    return "\n".join(lines)


def notes(rows):
    ok = [r for r in rows if "backend" in r]
    where = sorted({f"{r['machine']} ({r['backend']}, jax {r['jax_version']}, "
                    f"{r['threads'] or 'all'} thread(s)), {r['date']}" for r in ok})
    steps = sorted({r["sample_steps"] for r in ok})
    text = [f"Measured on: {'; '.join(where) or '-'}.",
            f"peak MB (XLA) = {MEMORY_METHOD} (MB = 1e6 bytes); host/device peak = after "
            f"real steps: GPU memory_stats()['peak_bytes_in_use'], CPU {HOST_METHOD}.",
            "Step = DiffusionTask.train_step: noise at uniform timesteps, UNet, MSE on the "
            "noise, Adam + clipping, EMA, state donated; median of the timed steps. CPU-s = "
            "process CPU time (all threads).",
            f"Sample = one latent, DDIM, {'/'.join(map(str, steps)) or '-'} UNet calls in a "
            "jitted loop; compile s = training step + sampler."]
    if any("monai" in r for r in rows):
        text.append("MONAI side: DiffusionModelUNet from the same unet section, DDPMScheduler "
                    "add_noise, MSE, Adam with the same clipping (no EMA), DDIMScheduler "
                    "sampling; separate process, same threads. Ratios ours / MONAI "
                    "(< 1: ours faster or smaller).")
    return "\n".join(text)


# ----------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_diffusion",
        description="Memory, FLOPs, step and sampling time of the stage-2 diffusion UNet.")
    p.add_argument("--config", action="append", default=[],
                   help="stage-2 config file (repeatable), e.g. configs/diffusion/monai_3d_ldm.py")
    p.add_argument("--dtype", choices=DTYPES, help="UNet compute dtype (default: the config's)")
    p.add_argument("--batch", type=int, default=1, help="global batch size (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (and one untimed "
                                                         "sampling) before them")
    p.add_argument("--sample-steps", type=int, default=50,
                   help="DDIM steps of the timed sampling (0: no sampling)")
    p.add_argument("--vs-monai", action="store_true",
                   help="also time MONAI's DiffusionModelUNet + DDPM step and DDIM sampling")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and analyse only; no real steps")
    add_run_args(p)
    args = p.parse_args(argv)
    if not args.config and not args._worker and not args.from_json:
        p.error("give --config FILE (repeatable) or --from-json FILE")
    for flag in ("batch", "steps", "warmup", "sample_steps"):
        if getattr(args, flag) < (1 if flag == "batch" else 0):
            p.error(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'batch' else 0}")
    return args


def _row_name(path, config):
    return f"{Path(path).stem} {config.unet.dtype}"


def main(argv=None):
    return run_exiting_on_sigterm(_main, _parse_args(argv))


def _main(args):
    if args._worker:
        _run_worker(args._worker)
        return 0
    if args.from_json:
        print(format_table(read_rows(args.from_json)))
        return 0
    try:
        todo = [(p, bench_config(load(p), batch=args.batch, dtype=args.dtype))
                for p in args.config]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        args.threads = limit_threads(args.threads)
        like_train_py()
    results = []
    for path, cfg in todo:
        name = _row_name(path, cfg)
        print(f"[bench_diffusion] {name}: batch {cfg.train.batch_size} ...", file=sys.stderr,
              flush=True)
        kw = dict(name=name, steps=args.steps, warmup=args.warmup,
                  sample_steps=args.sample_steps, compile_only=args.compile_only,
                  threads=args.threads)
        if args.in_process:
            try:
                row = measure(cfg, **kw)
            except ValueError as e:  # ConfigError or a model's size check
                row = dict(name=name, error=f"{type(e).__name__}: {e}")
        else:
            row = measure_isolated(cfg, timeout=args.row_timeout, **kw)
        if args.vs_monai:
            if args.compile_only or args.steps <= 0:
                row["monai"] = {"error": "skipped: --vs-monai compares real steps; drop "
                                         "--compile-only"}
            elif "params" not in row:
                row["monai"] = {"error": "skipped: our side failed"}
            else:
                add_monai_ratios(row, measure_monai(
                    cfg, row, steps=args.steps, warmup=args.warmup,
                    sample_steps=args.sample_steps, threads=args.threads,
                    timeout=args.row_timeout))
        results.append(row)
        print(f"[bench_diffusion] {name}: " + (
            row.get("error", "")[:300] if "params" not in row else
            f"peak {_mb(row['peak_memory_bytes'])} MB (XLA), compile {row['compile_s']} s, "
            f"step {row['step_cpu_s']} CPU-s, sample {row['sample_cpu_s']} CPU-s"),
            file=sys.stderr, flush=True)
        if args.json:  # after every row: a killed run keeps what it measured
            write_json(args.json, results)
    print(format_table(results))
    return 0 if all("params" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
