"""Where the stage-1 training step's time goes on CPU, per HLO op, from a profiler trace.

    python -m benchmarks.op_profile [--config configs/monai_3d_ldm.py] [--volume 96,96,64]
        [--batch 1] [--dtype float32] [--steps 2] [--threads 1] [--top 15] [--json out.json]
        [--code DIR]

Builds and runs the same step as `python -m benchmarks.bench` (`benchmarks.bench.measure`,
in this process) and records its timed steps under `jax.profiler.trace` (Python tracer off).
XLA:CPU's thunk executor writes one trace event per HLO instruction it runs, named by the
instruction (args hlo_op, hlo_module, run_id); these are read from the `*.trace.json.gz`
the profiler writes (no TensorBoard/xprof needed), kept for the step's module, turned into
self time (a `while`'s events contain its body's: the body's time is not counted twice)
and divided by the number of steps traced (distinct run_ids).

Each op is put in one category by its HLO instruction in the compiled module's text
(fusions by what their fused computation contains, first match wins):
  convolution   convolution (forward and its gradients: XLA emits them as convolutions)
  dot           dot / matmul (the tap convolutions of ldm_jax.models.tap_conv and attention)
  reduce        reduce, reduce-window, select-and-scatter (norm statistics, losses)
  dynamic-slice dynamic-slice, dynamic-update-slice, gather, scatter (loops' slicing)
  copy/layout   copy, transpose, pad, concatenate, slice, reshape, broadcast (layout only)
  elementwise   the other fusions and elementwise ops (norm apply, activations, optimiser)
  control       while / conditional / call: their self time (loop bookkeeping)
  other         the rest, and events whose name is not an instruction of the module
"step" is the median wall time of the traced steps; "outside ops" is step minus the sum of
op self times (dispatch, waiting, the profiler). With --threads 1 (default) ops run one at
a time on one core, so op times add up to the step (within a fraction of a percent: two
runtime threads time-sharing the core can make "outside ops" slightly negative); with more
threads they overlap.

--code DIR: import ldm_jax and configs from another checkout (e.g. an older commit's
worktree) while this tool and benchmarks.bench come from here: a before/after split.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

from benchmarks.hlo_flops import parse_computations

CATEGORIES = ("convolution", "dot", "reduce", "dynamic-slice", "copy/layout", "elementwise",
              "control", "other")
_CONV = {"convolution"}
_DOT = {"dot"}
_REDUCE = {"reduce", "reduce-window", "select-and-scatter"}
_DYN = {"dynamic-slice", "dynamic-update-slice", "gather", "scatter"}
_LAYOUT = {"copy", "transpose", "pad", "concatenate", "slice", "reshape", "broadcast",
           "bitcast", "parameter", "constant", "tuple", "get-tuple-element", "iota"}
_CONTROL = {"while", "conditional", "call"}
_OTHER = {"rng", "rng-bit-generator", "sort", "custom-call", "infeed", "outfeed",
          "all-reduce", "all-gather", "collective-permute", "after-all", "partition-id",
          "replica-id"}


def _ops_in(comps, name, memo):
    """The set of opcodes in computation `name` and the computations it calls."""
    if name in memo:
        return memo[name]
    memo[name] = set()
    ops = set()
    for inst in comps.get(name, []):
        ops.add(inst["op"])
        for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", inst["attrs"]):
            ops |= _ops_in(comps, called, memo)
    memo[name] = ops
    return ops


def _category(ops):
    for cat, members in (("convolution", _CONV), ("dot", _DOT), ("reduce", _REDUCE),
                         ("dynamic-slice", _DYN)):
        if ops & members:
            return cat
    if ops <= _LAYOUT:
        return "copy/layout"
    if ops & _OTHER:
        return "other"
    return "elementwise"


def categorize(hlo_text):
    """{instruction name: (category, opcode, JAX op_name)} for every instruction of an
    HLO module text (all computations, so a while body's ops are found too)."""
    comps, _ = parse_computations(hlo_text)
    memo = {}
    out = {}
    for insts in comps.values():
        for inst in insts:
            op = inst["op"]
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", inst["attrs"])
                cat = _category(_ops_in(comps, called.group(1), memo) if called else set())
            elif op in _CONTROL:
                cat = "control"
            elif op in _OTHER:
                cat = "other"
            else:
                cat = _category({op})
            where = re.search(r'op_name="([^"]*)"', inst["attrs"])
            out[inst["name"]] = (cat, op, where.group(1) if where else "")
    return out


def module_name(hlo_text):
    m = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    return m.group(1) if m else None


def op_self_times(events, module):
    """[(op name, self µs, run_id)] of the complete ('X') events of HLO module `module`:
    each event's duration less that of the events nested in it on the same thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        a = e.get("args") or {}
        if e.get("ph") == "X" and a.get("hlo_module") == module and "hlo_op" in a:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, index into out]
        for e in evs:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:  # nested: its time is not the parent's own
                out[stack[-1][1]][1] -= e["dur"]
            out.append([e["args"]["hlo_op"], e["dur"], e["args"].get("run_id")])
            stack.append((end, len(out) - 1))
    return [tuple(o) for o in out]


def split(events, hlo_text, step_s, top=15):
    """The per-step split of a trace: dict with the category table and the top ops."""
    module = module_name(hlo_text)
    cats = categorize(hlo_text)
    ops = op_self_times(events, module)
    runs = {r for _, _, r in ops}
    n = max(len(runs), 1)
    by_cat = collections.Counter()
    by_op = collections.Counter()
    for name, us, _ in ops:
        by_cat[cats.get(name, ("other",))[0]] += us
        by_op[name] += us
    ops_ms = sum(by_cat.values()) / n / 1e3
    step_ms = step_s * 1e3
    table = [dict(category=c, ms=by_cat[c] / n / 1e3, share=by_cat[c] / n / 1e3 / step_ms)
             for c in CATEGORIES]
    table.append(dict(category="outside ops", ms=step_ms - ops_ms,
                      share=(step_ms - ops_ms) / step_ms))
    top_ops = []
    for name, us in by_op.most_common(top):
        cat, op, where = cats.get(name, ("other", "?", ""))
        top_ops.append(dict(op=name, opcode=op, category=cat, ms=us / n / 1e3,
                            share=us / n / 1e3 / step_ms, jax_op=where))
    return dict(module=module, steps_traced=len(runs), step_ms=step_ms, ops_ms=ops_ms,
                events=len(ops), categories=table, top=top_ops)


def format_split(s, title=""):
    lines = [title] if title else []
    lines.append(f"{'category':<14} {'ms/step':>10} {'share':>7}")
    for r in s["categories"]:
        lines.append(f"{r['category']:<14} {r['ms']:>10.1f} {100 * r['share']:>6.1f}%")
    lines.append(f"{'step (wall)':<14} {s['step_ms']:>10.1f} {100.0:>6.1f}%   "
                 f"({s['steps_traced']} step(s) traced, {s['events']} op events)")
    lines += ["", f"Top {len(s['top'])} ops (self time per step):",
              f"{'ms':>9} {'share':>6}  {'category':<13} {'op':<40} JAX op"]
    for t in s["top"]:
        lines.append(f"{t['ms']:>9.1f} {100 * t['share']:>5.1f}%  {t['category']:<13} "
                     f"{t['op'][:40]:<40} {_short(t['jax_op'])}")
    return "\n".join(lines)


def _short(op_name, width=90):
    """The tail of a JAX op_name (the module path that matters), at most `width` chars."""
    if not op_name:
        return "(no op_name: made by XLA)"
    return op_name if len(op_name) <= width else "..." + op_name[-(width - 3):]


def read_trace(log_dir):
    """The traceEvents of the newest *.trace.json.gz under log_dir."""
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no *.trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)["traceEvents"]


def profile(config, *, steps=2, warmup=1, top=15, threads=None, log_dir=None):
    """Runs `config`'s step (from benchmarks.bench.bench_config) and returns (bench row,
    split). `log_dir`: where the trace goes (default a temporary directory, removed)."""
    import jax

    from benchmarks.bench import measure

    seen = {}
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python events would fill the trace's event cap
    opts.host_tracer_level = 2

    def around_steps(compiled):
        seen["hlo"] = compiled.as_text()
        return jax.profiler.trace(seen["dir"], profiler_options=opts)

    with tempfile.TemporaryDirectory() as tmp:
        seen["dir"] = log_dir or tmp
        row = measure(config, name="profile", steps=steps, warmup=warmup, threads=threads,
                      around_steps=around_steps)
        if row.get("step_s") is None:
            raise RuntimeError(f"no real steps ran: {row.get('note', row)}")
        events = read_trace(seen["dir"])
    return row, split(events, seen["hlo"], row["step_s"], top=top)


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile",
                                description="Per-op time split of the stage-1 step on CPU.")
    p.add_argument("--config", default="configs/monai_3d_ldm.py")
    p.add_argument("--volume", help="X,Y,Z override of data.volume_size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=2, help="traced steps (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untraced steps before them")
    p.add_argument("--threads", type=int, default=1,
                   help="CPUs the process may use (default 1: ops do not overlap)")
    p.add_argument("--top", type=int, default=15, help="individual ops listed (default 15)")
    p.add_argument("--code", help="checkout to import ldm_jax and configs from")
    p.add_argument("--trace-dir", help="keep the trace here (default: a temporary dir)")
    p.add_argument("--json", help="also write {row, split} to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    from benchmarks.common import limit_threads
    threads = limit_threads(args.threads)  # before JAX sizes its thread pools
    config_path = args.config
    if args.code:
        code = os.path.abspath(args.code)
        import benchmarks  # a namespace package: pin it here before `code` joins the path
        benchmarks.__path__ = [os.path.dirname(os.path.abspath(__file__))]
        sys.path.insert(0, code)
        for mod in [m for m in sys.modules if m.split(".")[0] in ("ldm_jax", "configs")]:
            del sys.modules[mod]
        if not os.path.isabs(config_path):
            config_path = os.path.join(code, config_path)
    from benchmarks.bench import bench_config
    from benchmarks.common import like_train_py, load, parse_ints
    like_train_py()
    import ldm_jax
    volume = parse_ints(args.volume, "--volume", 3) if args.volume else None
    config = bench_config(load(config_path), volume=volume, batch=args.batch, dtype=args.dtype)
    row, s = profile(config, steps=args.steps, warmup=args.warmup, top=args.top,
                     threads=threads, log_dir=args.trace_dir)
    title = (f"{config_path} {'x'.join(map(str, row['volume']))} batch {row['batch']} "
             f"{row['dtype']}, {threads} thread(s), ldm_jax from "
             f"{os.path.dirname(os.path.dirname(os.path.abspath(ldm_jax.__file__)))}; "
             f"step {row['step_s']:.2f} s wall, {row.get('step_cpu_s', 0):.2f} s CPU")
    print(format_split(s, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(row=row, split=s), f, indent=1)


if __name__ == "__main__":
    main()
