"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard events, console lines."""

from __future__ import annotations

import json
import math
import os
import sys

import jax


def _json_value(v):
    """A metric as JSON: non-finite floats become null (JSON has no NaN or Infinity)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX.writer imports
    torch when it is installed, only to accept torch tensors (never logged here), which
    would add torch's import time to every training process. Raises ImportError without
    tensorboardX."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which it catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class Writers:
    """metrics.jsonl and TensorBoard events of one run, written by process 0 only.

    metrics.jsonl: one JSON object per row, {"step": int, name: float or null, ...}; a
    non-finite value (NaN, inf) is null. A run starting at `start_step` first drops the
    rows after that step (an earlier run's, written after its last checkpoint), so the
    file never interleaves two runs; `dropped` counts them (`last_dropped_step` is the
    highest). TensorBoard events after `start_step` are purged likewise.
    """

    def __init__(self, workdir, start_step=0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        self.dropped, self.last_dropped_step = 0, None
        if not self.active:
            return
        self._drop_rows_after(int(start_step))
        try:
            self.tb = _summary_writer_class()(os.path.join(workdir, "tb"),
                                              purge_step=int(start_step) + 1)
        except ImportError:  # events are optional; metrics.jsonl always written
            self.tb = None

    def _drop_rows_after(self, start_step):
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):  # a torn last line
                    step = None
                if step is not None and step <= start_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
                elif line.strip():
                    self.dropped += 1
                    if step is not None:
                        self.last_dropped_step = max(step, self.last_dropped_step or 0)
        if self.dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def write(self, step, values):
        """Appends {"step": step, **values}; non-finite values become null (strict JSON)."""
        if not self.active or not values:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def say(msg, bar=None):
    """Prints on process 0 only; above a progress bar, on its own line."""
    if jax.process_index() != 0:
        return
    if bar is not None:
        bar.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def dropped_note(workdir, writers, start):
    if not writers.dropped:
        return None
    rows = f"{writers.dropped} metrics.jsonl row(s)"
    upto = (f" (up to step {writers.last_dropped_step})"
            if writers.last_dropped_step is not None else "")
    if start == 0:
        return (f"note: {workdir} has {rows}{upto} but no checkpoint (the earlier run "
                "stopped before its first save): starting from step 0, those rows dropped.")
    return (f"note: dropped {rows}{upto} written after the checkpoint at step {start}, "
            "so metrics.jsonl holds one run.")
