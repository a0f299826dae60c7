"""Process plumbing shared by the benches: measurements in fresh processes, SIGTERM-safe
command lines, saved rows.

Why fresh processes: device peak counters cannot be reset within a process, and JAX and
PyTorch must not share an allocator. Why SIGTERM handling: `timeout` (benchmarks/gpu_run.sh)
sends SIGTERM, and the bench must exit through the `finally` blocks that kill its workers
rather than leave one holding a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_exiting_on_sigterm(body, args):
    """body(args), with SIGTERM turned into sys.exit(143) meanwhile (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return body(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return body(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags every bench command shares: where rows run (a fresh worker per row, or
    in this process), on how many cores, for how long, and where they are saved to / read
    back from."""
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


def read_rows(paths) -> list[dict]:
    """The result rows of JSON files written with --json, concatenated."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)
    return rows


def in_fresh_process(module, flag, spec, marker, timeout=None, env=None):
    """Runs `python -m module flag SPEC.json` (spec written to a temporary file) from the
    repository root, which is put first on PYTHONPATH; returns the JSON the process prints
    after `marker`, or {"error": ...} (timeout, crash). `env`: the environment (default
    this process's)."""
    from benchmarks.bench import _subprocess_json

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        return _subprocess_json([sys.executable, "-m", module, flag, f.name], marker, env=env,
                                timeout=timeout)
    finally:
        os.unlink(f.name)
