"""What a configuration costs -- memory, FLOPs, speed -- measured before you rent a GPU.

    python -m benchmarks.bench --config configs/balanced.py [--volume 256,256,64] [--batch 1]
        [--steps 3] [--compile-only] [--vs-monai] [--buffers 10] [--json out.json]
    python -m benchmarks.bench --table seed --compile-only  # original PyTorch project's table
    python -m benchmarks.bench --config configs/aggressive.py --volume 1024,1024,128 \\
        --head subpixel --spatial 1,8 --compile-only              # per-device memory

Why: users choose a configuration by its memory and speed, and the original PyTorch
project's memory tables were never measured. This builds the real stage-1 training step
(autoencoder + PatchGAN discriminator, the config's losses and optimisers, state donation,
the trainer's shardings) from abstract shapes, compiles it without allocating, and reads
XLA's memory and cost analyses; then, unless --compile-only, it runs real steps.

What the numbers are (also printed under every table):
- peak_memory_bytes: XLA memory analysis of the compiled step, per device:
  argument + output - alias + temp bytes. Arguments are the train state and the batch,
  outputs the new state and metrics, alias the donated state (counted once), temp the
  arena of intermediates. Generated code is not included.
- device_peak_bytes (GPU, real steps): max over the mesh's devices of
  memory_stats()["peak_bytes_in_use"], each row in a fresh process.
- host_peak_bytes (CPU, real steps): peak RSS delta (see benchmarks.common.HostPeak).
- flops: XLA cost analysis of the compiled step (per device for a sharded step), plus
  loop_flops: the dot/conv FLOPs of while-loop iterations the analysis leaves out (it
  counts a loop body once; benchmarks.hlo_flops).
- buffers (--buffers N): the N largest buffers live at the step's peak, with the HLO op
  and JAX op that made each (benchmarks.memory_listing; XLA's live-range dump).
- step_s: median wall time of --steps real steps after --warmup steps, each blocked on;
  step_cpu_s: the same steps' median process CPU time (all threads), steadier than wall
  time on a shared CPU.
The discriminator is trained from the first step (loss.adv_warmup_steps = 0), so the step
measured is the full one a run reaches after its warm-up.

Each configuration runs in a fresh worker process (python -m benchmarks.bench --_worker):
device peak counters cannot be reset within a process, and a simulated device count
(--spatial on CPU) must be set before JAX starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.bench_monai import unsupported_reasons
from benchmarks.common import (
    HOST_METHOD,
    MEMORY_METHOD,
    REPO_ROOT,
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
    parse_ints,
    read_rows,
    run_exiting_on_sigterm,
    set_device_count,
    write_json,
)
from benchmarks.memory_listing import compile_with_listing, format_buffers
from ldm_jax.autoencoder import config as ae_config
from ldm_jax.autoencoder import geometry
from ldm_jax.errors import ConfigError

# JAX is imported inside functions on purpose: XLA_FLAGS (simulated devices for --spatial)
# must be set before the first `import jax` of the process.

REMAT_MODES = ae_config.REMAT_MODES
HEADS = ae_config.UPSAMPLE_HEADS

# The original PyTorch project's table (256x256x64, batch 1, mixed precision), GB as
# printed. Its second table gives other numbers for the same settings (3.1 GB for "8x" =
# row A here, 1.8 GB for "16x" = row B) and 2.3 GB for 512^3 with stem 4 and levels (4, 2).
SEED_ROWS = (
    ("A", 1, (4, 2), 3.1),
    ("B", 2, (4, 2), 1.8),
    ("C", 4, (4, 2), 1.2),
    ("D", 2, (8, 2), 1.3),
)
SEED_AGGRESSIVE_CLAIM_GB = 2.3


# ----------------------------------------------------------------------------------------
# Building the list of configurations.


def bench_config(config, *, volume=None, batch=None, head=None, remat=None, dtype=None):
    """A copy of `config` with the bench's overrides applied (None keeps the config's)."""
    config = config.copy_and_resolve_references()
    if volume is not None:
        config.data.volume_size = tuple(int(v) for v in volume)
    if batch is not None:
        config.train.batch_size = int(batch)
    if head is not None:
        config.autoencoder.upsample_head = head
    if remat is not None:
        config.train.remat = remat
    if dtype is not None:
        config.autoencoder.dtype = dtype
        config.discriminator.dtype = dtype
    # The full step: discriminator updated and the generator's adversarial term on.
    config.loss.adv_warmup_steps = 0
    return config


def apply_override(config, item):
    """Sets one `section.field=value` (value parsed as a Python literal, else a string)."""
    import ast
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    node = config
    for p in parts[:-1]:
        node = node.get(p) if hasattr(node, "get") else None
        if node is None:
            break
    if not sep or node is None or parts[-1] not in node:
        raise ConfigError(f"--set {item!r}: expected an existing field as section.field=value, "
                          "e.g. discriminator.num_channels=16 (see configs/default.py)")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = text.strip()
    with config.ignore_type():
        node[parts[-1]] = value
    return config


def seed_table_configs(heads=HEADS):
    """The original PyTorch project's comparison as (name, config, claimed GB) rows, one
    per decoder head.

    A-D: configs/default.py's model (channels 32/64/64, latent 3) at 256x256x64, batch 1,
    bf16, with that project's stem and level factors; plus configs/aggressive.py at
    512x512x128. Row A has stem factor 1, where both heads are the same GN -> conv, so it
    appears once.
    """
    rows = []
    base = load(REPO_ROOT / "configs" / "default.py")
    for letter, init, factors, claim in SEED_ROWS:
        for head in (heads[:1] if init == 1 else heads):
            c = bench_config(base, volume=(256, 256, 64), batch=1, head=head, dtype="bfloat16")
            c.autoencoder.initial_downsample_factor = init
            c.autoencoder.downsample_factors = factors
            rows.append((_row_name(letter, c), c, claim))
    agg = load(REPO_ROOT / "configs" / "aggressive.py")
    for head in heads:
        c = bench_config(agg, batch=1, head=head, dtype="bfloat16")
        rows.append((_row_name("aggressive", c), c, SEED_AGGRESSIVE_CLAIM_GB))
    return rows


def _row_name(base, config, spatial=1):
    ae = config.autoencoder
    parts = [base]
    if geometry.initial_factor(ae) != (1, 1, 1):
        parts.append(ae.upsample_head)
    remat = config.train.get("remat") or ae.remat
    if remat != "none":
        parts.append(f"remat={remat}")
    if spatial > 1:
        parts.append(f"spatial={spatial}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------
# Measuring one configuration (in this process).


def _devices(n):
    """n devices of the default backend, else n (simulated) CPU devices; and whether simulated."""
    import jax
    devs = jax.devices()
    if len(devs) >= n:
        return devs[:n], False
    cpus = jax.devices("cpu")
    if len(cpus) >= n:
        return cpus[:n], devs[0].platform != "cpu"
    raise ConfigError(
        f"--spatial {n} needs {n} devices but {len(devs)} {devs[0].platform} device(s) are "
        f"visible. On CPU simulate them: XLA_FLAGS=--xla_force_host_platform_device_count={n} "
        "(the bench's worker processes set it for you).")


def measure(config, *, name="config", steps=3, warmup=1, compile_only=False, spatial=1,
            threads=None, buffers=0, around_steps=None):
    """Compiles (and unless compile_only, runs) the training step of `config`; one result row.

    `config` should come from `bench_config`. Needs `spatial` devices (simulated on CPU).
    `buffers` > 0 adds row["buffers"]: that many largest buffers live at the compiled
    step's peak (`benchmarks.memory_listing`; the compile then also writes XLA's dump to a
    temporary directory, so compile_s is a little higher).
    `around_steps(compiled)`, if given, returns a context manager the timed steps run in
    (benchmarks.op_profile traces them with it).
    """
    import jax
    import jax.numpy as jnp

    from ldm_jax import sharding
    from ldm_jax.autoencoder.config import prepare_config
    from ldm_jax.autoencoder.task import AutoencoderTask
    from ldm_jax.trainer.loop import abstract_train_state, compile_train_step, init_train_state

    config = prepare_config(config)
    config.mesh.data, config.mesh.spatial = 1, int(spatial)
    devices, simulated = _devices(int(spatial))
    mesh = sharding.make_mesh(config.mesh, devices)
    batch_size = int(config.train.batch_size)
    volume = tuple(int(v) for v in config.data.volume_size)
    sharding.check_batch_fits(mesh, batch_size, volume)
    ae = config.autoencoder
    batch_shape = (batch_size, *volume, int(ae.in_channels))

    stage = AutoencoderTask(config)
    perceptual_params = stage.step_consts()
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    abstract = abstract_train_state(stage, mesh)
    abstract_batch = {"image": jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=batch_sh)}
    abstract_perc = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), perceptual_params)

    step_fn = compile_train_step(stage, mesh, abstract)
    t0 = time.perf_counter()
    # Spatially sharded: traced with XLA's convolutions (`compile_train_step`).
    lowered = step_fn.lower(abstract, abstract_batch, abstract_perc)
    t1 = time.perf_counter()
    listing = None
    if buffers:
        compiled, listing = compile_with_listing(lowered, int(buffers))
    else:
        compiled = lowered.compile()
    t2 = time.perf_counter()
    peak, raw = memory_analysis(compiled)
    flops, bytes_accessed, loop_flops = cost_analysis(compiled)

    dev0 = devices[0]
    row = dict(
        name=name,
        volume=list(volume),
        batch=batch_size,
        dtype=str(ae.dtype),
        upsample_head=str(ae.upsample_head),
        remat=str(ae.remat),
        spatial=int(spatial),
        initial_factor=list(geometry.initial_factor(ae)),
        downsample_factors=[list(f) for f in geometry.level_factors(ae)],
        total_factor=list(geometry.total_factor(ae)),
        latent_shape=list(geometry.latent_shape(config)),
        params=count_params(abstract.g_params),
        disc_params=count_params(abstract.d_params),
        flops=flops,
        loop_flops=loop_flops,
        bytes_accessed=bytes_accessed,
        peak_memory_bytes=peak,
        memory_method=MEMORY_METHOD,
        xla_memory=raw,
        lower_s=round(t1 - t0, 3),
        compile_s=round(t2 - t1, 3),
        step_s=None,
        step_times=[],
        device_peak_bytes=None,
        host_peak_bytes=None,
        backend=dev0.platform,
        device_kind=dev0.device_kind,
        simulated_devices=bool(simulated or (dev0.platform == "cpu" and spatial > 1)),
        jax_version=jax.__version__,
        machine=machine_name(dev0),
        threads=(threads or len(os.sched_getaffinity(0))) if dev0.platform == "cpu" else None,
        date=datetime.date.today().isoformat(),
    )
    if listing is not None:
        row["buffers"] = [b.as_dict() for b in listing]
    if compile_only or steps <= 0:
        return row
    if simulated:
        row["note"] = "real steps skipped: simulated CPU devices on a non-CPU machine"
        return row

    host = HostPeak()
    host.baseline()
    state, _ = init_train_state(stage, mesh)
    make_batch = jax.jit(lambda k: jax.random.uniform(k, batch_shape, jnp.float32),
                         out_shardings=batch_sh)
    batch = {"image": make_batch(jax.random.PRNGKey(1))}
    for _ in range(max(int(warmup), 0)):
        state, metrics = compiled(state, batch, perceptual_params)
        jax.block_until_ready((state, metrics))
    host.start()
    times, cpu_times = [], []
    with (around_steps(compiled) if around_steps else contextlib.nullcontext()):
        for _ in range(int(steps)):
            t, c = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch, perceptual_params)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    row["step_times"] = [round(t, 4) for t in times]
    row["step_s"] = round(statistics.median(times), 4)
    # CPU seconds of this process per step: on a shared CPU less noisy than wall time.
    row["step_cpu_s"] = round(statistics.median(cpu_times), 4)
    row["loss"] = float(metrics["loss"])
    stats = [d.memory_stats() for d in devices]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        row["device_peak_bytes"] = max(int(s["peak_bytes_in_use"]) for s in stats)
    elif dev0.platform == "cpu":
        row["host_peak_bytes"] = host.peak_delta()
        row["host_memory_method"] = HOST_METHOD
    return row


# ----------------------------------------------------------------------------------------
# Worker processes: one fresh process per configuration.


def _run_worker(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    threads = limit_threads(spec.get("threads"))  # before JAX sizes its thread pools
    like_train_py()
    import ml_collections
    config = ml_collections.ConfigDict(spec["config"])
    try:
        row = measure(config, name=spec["name"], steps=spec["steps"], warmup=spec["warmup"],
                      compile_only=spec["compile_only"], spatial=spec["spatial"],
                      threads=threads, buffers=spec.get("buffers", 0))
    except ConfigError as e:
        row = dict(name=spec["name"], error=f"ConfigError: {e}")
    except Exception as e:  # report the row as failed (e.g. out of memory) and go on
        row = dict(name=spec["name"], error=f"{type(e).__name__}: {str(e)[:2000]}")
    print("BENCH_JSON " + json.dumps(row), flush=True)


def measure_isolated(config, *, name, steps, warmup, compile_only, spatial, threads=None,
                     timeout=None, buffers=0):
    """`measure` in a fresh `python -m benchmarks.bench --_worker` process."""
    spec = dict(config=config.to_dict(), name=name, steps=steps, warmup=warmup,
                compile_only=compile_only, spatial=spatial, threads=threads, buffers=buffers)
    env = dict(os.environ)
    if spatial > 1:
        set_device_count(env, spatial)
    row = in_fresh_process("benchmarks.bench", "--_worker", spec, "BENCH_JSON", timeout, env)
    row.setdefault("name", name)
    return row


def measure_monai(config, *, steps, warmup, threads=None, timeout=None):
    """MONAI's step for the same config in a fresh process; {"error": ...} when not comparable."""
    reasons = unsupported_reasons(config)
    if reasons:
        return {"error": "not comparable: MONAI supports initial factor 1 and factors 2 only; "
                         + "; ".join(reasons)}
    spec = dict(config=config.to_dict(), volume=list(config.data.volume_size),
                batch=int(config.train.batch_size), steps=steps, warmup=warmup,
                dtype=str(config.autoencoder.dtype), device="auto", threads=threads)
    return in_fresh_process("benchmarks.bench_monai", "--spec", spec, "BENCH_MONAI_JSON",
                            timeout)


def add_monai_ratios(row, monai):
    """MONAI / ours for step time and for peak memory measured the same way."""
    row["monai"] = monai
    if "error" in monai:
        return row
    ours = row.get("device_peak_bytes") or row.get("host_peak_bytes")
    if row.get("step_s") and monai.get("step_s"):
        row["monai_step_ratio"] = round(monai["step_s"] / row["step_s"], 3)
    if row.get("step_cpu_s") and monai.get("step_cpu_s"):
        row["monai_step_cpu_ratio"] = round(monai["step_cpu_s"] / row["step_cpu_s"], 3)
    if ours and monai.get("peak_memory_bytes"):
        row["monai_memory_ratio"] = round(monai["peak_memory_bytes"] / ours, 3)
    return row


# ----------------------------------------------------------------------------------------
# Output.


def _gb(b):
    return "-" if b is None else f"{b / 1e9:.2f}"


def _fmt_factor(t):
    return geometry.format_factor(tuple(t)) if t else "-"


def format_table(rows):
    """Markdown table of result rows, plus the definitions of its columns."""
    seed = any("seed_claim_gb" in r for r in rows)
    monai = any("monai" in r for r in rows)
    head = ["config", "volume", "batch", "total factor", "latent", "params", "GFLOP/step",
            "peak GB (XLA)", "device/host peak GB", "compile s", "step s"]
    if seed:
        head.append("seed claim GB")
    if monai:
        head += ["MONAI step s", "MONAI peak GB", "MONAI/ours time", "MONAI/ours memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r and "params" not in r:
            lines.append(f"| {r['name']} | error: {r['error'][:200]} |")
            continue
        measured = r.get("device_peak_bytes") or r.get("host_peak_bytes")
        cells = [r["name"], "x".join(map(str, r["volume"])), str(r["batch"]),
                 _fmt_factor(r["total_factor"]), "x".join(map(str, r["latent_shape"])),
                 f"{r['params'] / 1e6:.2f} M",
                 "-" if r["flops"] is None else f"{r['flops'] / 1e9:,.0f}",
                 _gb(r["peak_memory_bytes"]), _gb(measured), fmt_float(r["compile_s"], 1),
                 fmt_float(r["step_s"], 3)]
        if seed:
            cells.append(fmt_float(r.get("seed_claim_gb"), 1))
        if monai:
            m = r.get("monai") or {}
            if "error" in m:
                cells += [m["error"][:120], "", "", ""]
            else:
                cells += [fmt_float(m.get("step_s"), 3), _gb(m.get("peak_memory_bytes")),
                          fmt_float(r.get("monai_step_ratio")),
                          fmt_float(r.get("monai_memory_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(notes(rows))
    for r in rows:
        if r.get("buffers"):
            lines += ["", format_buffers(r["buffers"], f"Largest buffers live at the peak of "
                                                       f"{r['name']} (XLA live ranges):")]
    return "\n".join(lines)


def notes(rows):
    ok = [r for r in rows if "backend" in r]
    where = sorted({f"{r['machine']} ({r['backend']}, jax {r['jax_version']}), {r['date']}"
                    for r in ok})
    text = [f"Measured on: {'; '.join(where) or '-'}.",
            f"peak GB (XLA) = {MEMORY_METHOD} (GB = 1e9 bytes).",
            "device/host peak GB = after real steps: GPU memory_stats()['peak_bytes_in_use'] "
            f"(fresh process); CPU {HOST_METHOD}.",
            "Step = full stage-1 update: autoencoder + PatchGAN (adversarial term on), "
            "config losses, Adam, state donated."]
    if any(r.get("simulated_devices") for r in ok):
        text.append("spatial=N rows: N simulated CPU devices "
                    "(--xla_force_host_platform_device_count); memory is per device.")
    if any("monai" in r for r in rows):
        text.append("MONAI side: same architecture and losses in PyTorch, separate process; "
                    "ratios are MONAI / ours (>1: ours is faster / smaller), memory measured "
                    "the same way on both sides.")
    return "\n".join(text)


# ----------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Memory, FLOPs and speed of the stage-1 training step for configurations.")
    p.add_argument("--config", action="append", default=[],
                   help="config file (repeatable), e.g. configs/balanced.py")
    p.add_argument("--table", choices=["seed"],
                   help="seed: the seed's A-D comparison at 256x256x64 plus aggressive 512^3")
    p.add_argument("--volume", help="X,Y,Z override of data.volume_size, e.g. 256,256,64")
    p.add_argument("--batch", type=int, help="global batch size (default: the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed real steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and analyse only; no real steps (step_s is null)")
    p.add_argument("--head", choices=list(HEADS) + ["both"],
                   help="decoder head override; 'both' measures each")
    p.add_argument("--remat", help="comma list of remat policies: none,res_blocks,levels")
    p.add_argument("--spatial", default="1",
                   help="comma list of spatial shard counts, e.g. 1,2,4,8 (per-device memory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable), e.g. "
                        "--set discriminator.num_channels=16 --set loss.recon=mse")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype override for autoencoder and discriminator")
    p.add_argument("--vs-monai", action="store_true",
                   help="also time MONAI's PyTorch AutoencoderKL + PatchDiscriminator "
                        "(initial factor 1, factors 2 only)")
    p.add_argument("--buffers", type=int, default=0, metavar="N",
                   help="also list the N largest buffers live at the step's peak and the "
                        "op that made each (compiles with XLA's dump on)")
    p.add_argument("--only", help="comma list: measure only rows whose name starts with one "
                                  "of these, e.g. 'B,C nearest_conv'")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw peak memory against total factor per head (256x256x64 "
                        "rows; with --from-json too)")
    add_run_args(p)
    args = p.parse_args(argv)
    if not args.config and not args.table and not args._worker and not args.from_json:
        p.error("give --config FILE (repeatable), --table seed or --from-json FILE")
    return args


def plan_rows(args):
    """(name, config, seed claim or None, spatial) for every measurement the args ask for."""
    volume = parse_ints(args.volume, "--volume", 3) if args.volume else None
    spatials = parse_ints(args.spatial, "--spatial")
    remats = [None]
    if args.remat:
        remats = [r.strip() for r in args.remat.split(",") if r.strip()]
        bad = [r for r in remats if r not in REMAT_MODES]
        if bad:
            raise ConfigError(f"--remat {','.join(bad)} is not a policy; use a comma list of "
                              f"{', '.join(REMAT_MODES)}")
    heads = [None] if args.head is None else (list(HEADS) if args.head == "both" else [args.head])
    base = []
    if args.table == "seed":
        base += [(n, c, claim) for n, c, claim in seed_table_configs(
            HEADS if args.head in (None, "both") else (args.head,))]
    for path in args.config:
        cfg = load(path)
        stem = Path(path).stem
        for head in heads:
            base.append((stem, bench_config(cfg, head=head), None))
    rows = []
    for stem, cfg, claim in base:
        cfg = bench_config(cfg, volume=volume, batch=args.batch, dtype=args.dtype)
        for item in args.set:
            apply_override(cfg, item)
        ae_config.validate(cfg)
        for remat in remats:
            c = bench_config(cfg, remat=remat)
            if c.train.get("remat") is not None:
                c.autoencoder.remat = c.train.remat
            for n in spatials:
                name = " ".join([_row_name(stem.split(" ")[0], c, n)] + list(args.set))
                rows.append((name, c, claim, n))
    if args.only:
        keep = [k.strip() for k in args.only.split(",") if k.strip()]
        rows = [r for r in rows if any(r[0].startswith(k) for k in keep)]
        if not rows:
            raise ConfigError(f"--only {args.only!r} matches no row; names look like "
                              "'B subpixel' or 'balanced remat=levels'")
    return rows


def main(argv=None):
    # `timeout` sends SIGTERM: exit through the finally blocks that stop workers.
    return run_exiting_on_sigterm(_main, _parse_args(argv))


def _main(args):
    if args._worker:
        _run_worker(args._worker)
        return 0
    if args.from_json:
        rows = read_rows(args.from_json)
        print(format_table(rows))
        _maybe_plot(args.plot, rows)
        return 0
    try:
        todo = plan_rows(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        if max(n for *_, n in todo) > 1:
            set_device_count(os.environ, max(n for *_, n in todo))
        args.threads = limit_threads(args.threads)
        like_train_py()
    results = []
    for name, cfg, claim, spatial in todo:
        print(f"[bench] {name}: volume {tuple(cfg.data.volume_size)}, batch "
              f"{cfg.train.batch_size}, spatial {spatial} ...", file=sys.stderr, flush=True)
        kw = dict(name=name, steps=args.steps, warmup=args.warmup,
                  compile_only=args.compile_only, spatial=spatial, threads=args.threads,
                  buffers=args.buffers)
        if args.in_process:
            try:
                row = measure(cfg, **kw)
            except ValueError as e:  # ConfigError or a model's size check
                row = dict(name=name, error=f"{type(e).__name__}: {e}")
        else:
            row = measure_isolated(cfg, timeout=args.row_timeout, **kw)
        if claim is not None:
            row["seed_claim_gb"] = claim
        if args.vs_monai:
            if args.compile_only or args.steps <= 0:
                row["monai"] = {"error": "skipped: --vs-monai compares real steps; drop "
                                         "--compile-only"}
            elif "error" in row:
                row["monai"] = {"error": "skipped: our side failed"}
            else:
                add_monai_ratios(row, measure_monai(cfg, steps=args.steps, warmup=args.warmup,
                                                    threads=args.threads,
                                                    timeout=args.row_timeout))
        results.append(row)
        print(f"[bench] {name}: " + (row["error"][:300] if "error" in row and "params" not in row
                                     else f"peak {_gb(row['peak_memory_bytes'])} GB (XLA), "
                                          f"compile {row['compile_s']} s, step {row['step_s']} s"),
              file=sys.stderr, flush=True)
        if args.json:  # after every row: a killed run keeps what it measured
            write_json(args.json, results)
    print(format_table(results))
    _maybe_plot(args.plot, results)
    return 0 if all("error" not in r or "params" in r for r in results) else 1


def _maybe_plot(path, rows):
    if not path:
        return
    from benchmarks.bench_plot import plot_memory
    ok = [r for r in rows if "backend" in r]
    gpu = any(r.get("device_peak_bytes") for r in ok)
    key = "device_peak_bytes" if gpu else "peak_memory_bytes"
    where = "; ".join(sorted({f"{r['machine']} ({r['backend']}), {r['date']}" for r in ok}))
    what = ("memory_stats peak_bytes_in_use" if gpu else "XLA memory analysis "
            "(argument + output - alias + temp)")
    plot_memory(rows, path, "Peak memory of one training step, 256x256x64, batch 1",
                note=f"{what}; measured on {where}", key=key)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
