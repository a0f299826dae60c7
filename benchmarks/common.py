"""What the benchmark scripts share: reading configs, XLA's memory and cost analyses, host
memory, the machine, fresh worker processes, SIGTERM-safe command lines, saved rows.

Every bench (`benchmarks.bench`, `benchmarks.bench_diffusion`, their MONAI sides, the
profiler and the study) imports these from here; this module imports no other bench, so
the benchmarks' imports have no circle.

Why fresh processes: device peak counters cannot be reset within a process, and JAX and
PyTorch must not share an allocator. Why SIGTERM handling: `timeout` (benchmarks/gpu_run.sh)
sends SIGTERM, and the bench must exit through the `finally` blocks that kill its workers
rather than leave one holding a GPU.

JAX and ldm_jax are imported inside functions on purpose: XLA_FLAGS (simulated devices)
must be set before the first `import jax` of a process, the MONAI sides never import JAX,
and `benchmarks.op_profile --code DIR` imports this module before it swaps in another
ldm_jax, so `load` must use the ldm_jax imported when it is called.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.hlo_flops import loop_flops_correction

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_METHOD = "XLA memory analysis: argument + output - alias + temp bytes, per device"
HOST_METHOD = ("peak RSS delta: VmHWM during the timed steps (reset via /proc/self/clear_refs "
               "after warm-up) minus VmRSS before the models were built, glibc heap trimmed")


# ----------------------------------------------------------------------------------------
# Configurations and arguments.


def parse_ints(text, name, count=None):
    """Takes "256,256,64" (or "256x256x64"), a flag name and an optional length; gives the
    tuple of positive ints, else raises ConfigError naming the flag."""
    from ldm_jax.errors import ConfigError
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count) or min(values) < 1:
        want = f"{count} positive ints" if count else "positive ints"
        raise ConfigError(f"{name} must be {want} separated by commas, like "
                          f"{'256,256,64' if count == 3 else '1,2,4,8'}; got {text!r}")
    return values


def load(path):
    """Takes a config file path (relative to the cwd or the repository root); gives its
    get_config()."""
    from ldm_jax import config as config_lib
    p = Path(path)
    if not p.is_file() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p
    return config_lib.load_config(str(p))


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Takes a parser; adds the flags every bench command shares: where rows run (a fresh
    worker per row, or in this process), on how many cores, for how long, and where they
    are saved to / read back from."""
    p.add_argument("--threads", type=int,
                   help="CPU only: pin each measurement (ours and MONAI's) to this many cores")
    p.add_argument("--in-process", action="store_true",
                   help="measure our side in this process (no fresh worker per row)")
    p.add_argument("--row-timeout", type=float, default=None,
                   help="seconds allowed per row (its worker is killed after)")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="print the table of rows saved earlier with --json")
    p.add_argument("--_worker", help=argparse.SUPPRESS)


def run_exiting_on_sigterm(body, args):
    """Takes a function and its argument; gives body(args), run with SIGTERM turned into
    sys.exit(143) meanwhile (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return body(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return body(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------
# The process and the machine.


def like_train_py():
    """Takes nothing; makes the process-wide JAX settings train.py makes, so the step
    measured is the one trained."""
    import jax
    if jax.default_backend() == "cpu":
        jax.config.update("jax_threefry_partitionable", False)


def limit_threads(n):
    """Takes a CPU count (None or 0: all); pins this process to its first n CPUs (XLA's and
    PyTorch's pools follow the mask) and gives the CPU count in effect.

    Why: on a shared CPU, spinning thread pools that lose their cores measure the
    neighbours, not the code; with the same n on both sides the comparison stays fair.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if n and 0 < int(n) < len(cpus):
        os.sched_setaffinity(0, set(cpus[:int(n)]))
        return int(n)
    return len(cpus)


def machine_name(dev):
    """Takes a JAX device; gives the machine it stands for: "<arch> CPU, <n> cores" on CPU,
    else the device kind."""
    if dev.platform == "cpu":
        return f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return dev.device_kind


def set_device_count(env, n):
    """Takes an environment dict and a device count; sets XLA_FLAGS in it to simulate at
    least n CPU devices (never fewer than it already asks for) and gives it back."""
    flags = env.get("XLA_FLAGS", "")
    key = "--xla_force_host_platform_device_count"
    parts = [p for p in flags.split() if not p.startswith(key)]
    have = [int(p.split("=")[1]) for p in flags.split() if p.startswith(key + "=")]
    parts.append(f"{key}={max([n] + have)}")
    env["XLA_FLAGS"] = " ".join(parts)
    return env


# ----------------------------------------------------------------------------------------
# Host memory on Linux: resident-set high-water mark that can be reset (clear_refs 5).


class HostPeak:
    """Peak resident memory of this process above a baseline, from /proc/self.

    `baseline()` trims glibc's free lists and records VmRSS; `start()` trims again and
    resets VmHWM (writing 5 to /proc/self/clear_refs, Linux >= 4.0); `peak_delta()` is
    max(0, VmHWM - baseline) in bytes. None where /proc is unavailable.
    """

    def __init__(self):
        self.base = None
        self.available = _read_status("VmRSS") is not None

    def baseline(self):
        _malloc_trim()
        self.base = _read_status("VmRSS")

    def start(self):
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.available = False

    def peak_delta(self):
        hwm = _read_status("VmHWM")
        if not self.available or hwm is None or self.base is None:
            return None
        # 0, not a negative number, when the process freed more since the baseline than
        # the timed steps used (a busy test process can; a bench worker is fresh).
        return max(0, hwm - self.base)


def _read_status(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------
# What XLA says about a compiled program.


def count_params(tree):
    """Takes a pytree of arrays (or shape structs); gives the total number of elements."""
    import jax
    return int(sum(int(x.size) for x in jax.tree.leaves(tree)))


def memory_analysis(compiled):
    """Takes a compiled program; gives (peak bytes per device by MEMORY_METHOD, XLA's raw
    memory analysis as {"argument": ..., "temp": ...}), or (None, {}) without one."""
    m = compiled.memory_analysis()
    if m is None:
        return None, {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
    raw = {f.replace("_size_in_bytes", "").replace("_in_bytes", ""): int(getattr(m, f))
           for f in fields if getattr(m, f, None) is not None}
    peak = raw["argument"] + raw["output"] - raw["alias"] + raw["temp"]
    return peak, raw


def cost_analysis(compiled):
    """Takes a compiled program; gives (FLOPs, bytes accessed, loop FLOPs added).

    XLA's cost analysis counts a while loop's body once (the chunked attention's scans),
    so the dot/conv FLOPs of the remaining iterations are added (benchmarks.hlo_flops).
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    flops = cost.get("flops")
    extra = loop_flops_correction(compiled.as_text()) if flops is not None else 0.0
    return (None if flops is None else float(flops) + extra,
            None if cost.get("bytes accessed") is None else float(cost["bytes accessed"]),
            extra)


# ----------------------------------------------------------------------------------------
# Fresh processes.


def subprocess_json(cmd, marker, env=None, timeout=None):
    """Takes a command line, a marker, an environment and a timeout; runs the command from
    the repository root, streaming its stderr, and gives the JSON after `marker` on its
    stdout, or {"error": ...} (timeout, crash)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                            cwd=str(REPO_ROOT))
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout} s"}
    finally:  # also on SIGTERM / Ctrl-C of the bench: never leave a worker holding a GPU
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for line in reversed(stdout.splitlines()):
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
    tail = stdout[-1500:]
    return {"error": f"exit code {proc.returncode} without a result (killed, out of memory?). "
                     f"Output tail: {tail}"}


def in_fresh_process(module, flag, spec, marker, timeout=None, env=None):
    """Takes a module, its flag, a JSON-able spec and a marker; runs `python -m module flag
    SPEC.json` (spec written to a temporary file) from the repository root, which is put
    first on PYTHONPATH, and gives what `subprocess_json` gives. `env`: the environment
    (default this process's)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        return subprocess_json([sys.executable, "-m", module, flag, f.name], marker, env=env,
                               timeout=timeout)
    finally:
        os.unlink(f.name)


# ----------------------------------------------------------------------------------------
# Saved rows and table cells.


def read_rows(paths) -> list[dict]:
    """Takes JSON files written with --json; gives their result rows, concatenated."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)
    return rows


def write_json(path, rows):
    """Takes a path and a JSON-able object; writes it there (indent 1) through a temporary
    file, so a killed run never leaves half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def fmt_float(v, digits=2):
    """Takes a number or None; gives it with `digits` decimals, or "-" for None."""
    return "-" if v is None else f"{v:.{digits}f}"
