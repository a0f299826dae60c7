"""The workdir of a run: one writer at a time, usable storage, damaged checkpoints set aside.

- `open_workdir` creates the folder (one line when a file is in the way, the file system
  is read-only or full) and takes its lock (`ldm_jax.lock`: host and process id of the
  holder; a stale lock of a dead process on this host is taken over with a line saying
  so). Multi-host runs take it once, on process 0; all processes agree on the outcome.
- `set_aside` renames a damaged checkpoint (`checkpoints/<step>` ->
  `checkpoints/<step>.damaged`), with one line naming the step, its cause and the step
  the run goes on from; nothing is deleted.
"""

from __future__ import annotations

import os

import jax

from ldm_jax import checkpoint as ckpt
from ldm_jax import distributed, lock, storage
from ldm_jax.errors import WorkdirInUseError
from ldm_jax.stopping import any_process
from ldm_jax.trainer.writers import say


def check_workdir(workdir: str) -> str:
    """The absolute workdir, after checking that no file stands where it or a folder
    above it should be (before any data is read). Raises StorageError."""
    return storage.check_dir(workdir, "--workdir")


def open_workdir(workdir: str):
    """Creates `workdir` and takes its lock; returns the Lock (None on processes other
    than 0). Raises StorageError (cannot create or write it) or WorkdirInUseError."""
    held, failure = None, None
    try:
        try:
            os.makedirs(workdir, exist_ok=True)  # every process: hosts may mount it apart
        except OSError as e:
            storage.reraise(e, workdir, "creating the workdir",
                            "Pass a --workdir you can write to.")
        if jax.process_index() == 0:
            held = lock.acquire(workdir, "workdir", say=say)
    except Exception as e:  # told to the other processes first, then raised
        failure = e
    if jax.process_count() > 1:
        # A barrier first: gloo gives a first collective only 30 s for every process to
        # arrive (`ldm_jax.distributed`); the coordination service's barrier waits.
        distributed.sync_processes("workdir_opened")
    if jax.process_count() > 1 and bool(any_process([failure is not None])[0]):
        if failure is None:
            if held is not None:
                held.release()
            raise WorkdirInUseError(f"another process could not open {workdir} (its "
                                    "message says why); nothing was written.")
    if failure is not None:
        raise failure
    return held


def set_aside(workdir: str, steps_causes: dict | None = None) -> None:
    """Sets the damaged steps aside (process 0 renames, all wait for it), each with one
    line: the step, its cause, where it went and the step the run goes on from.
    `steps_causes` {step: cause}; None: the steps `ckpt.find_damaged` finds."""
    if jax.process_index() == 0:
        if steps_causes is None:
            steps_causes = ckpt.find_damaged(workdir)
        moved = {step: ckpt.set_aside(workdir, step) for step in steps_causes}
        left = sorted(ckpt.step_folders(workdir))
        then = (f"resuming from step {left[-1]}, the newest one left." if left else
                "no other checkpoint is left: training starts from step 0.")
        for step, cause in sorted(steps_causes.items(), reverse=True):
            say(ckpt.damaged_line(step, ckpt.checkpoint_dir(workdir), cause,
                                  f"renamed to {moved[step]} (kept, not deleted); {then}"))
    distributed.sync_processes("set_aside_damaged")
