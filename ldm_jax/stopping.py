"""Stop requests for a training loop: SIGINT (Ctrl-C) and SIGTERM (cluster preemption).

Inside `StopRequests()`, the first SIGINT or SIGTERM only sets `requested` (the signal
number): the loop finishes its current step, saves a checkpoint and stops. A second one
aborts the process at once (`os._exit(128 + signal)`, nothing saved), even while the
main thread is inside a long XLA compile or step, where Python signal handlers cannot
run: a watcher thread reads the signals from `signal.set_wakeup_fd`, prints the notice at
once and does the abort. Outside the main thread (where handlers cannot be installed)
the context does nothing and signals keep their default behaviour.

Several processes stop at the same step through `any_process`: every step, each process
contributes its flags and all get the OR (one small all-gather; a single process needs
none). A SIGTERM that reaches only some hosts thus still stops all of them together,
which orbax's collective save requires.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequests:
    """Context manager catching SIGINT/SIGTERM; see the module docstring.

    `notify(message)` prints the notices (the watcher thread calls it; process 0 only is
    the caller's business). `requested` is 0 until a first signal arrives, then its number.
    """

    def __init__(self, notify=None):
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.requested = 0
        self._count = 0
        self._lock = threading.Lock()
        self._active = False

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._old = {s: signal.getsignal(s) for s in SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for s in SIGNALS:
            signal.signal(s, self._handler)
        self._active = True
        self._watcher = threading.Thread(target=self._watch, name="stop-requests",
                                         daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self._active:
            return
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_fd)
        self._active = False
        os.write(self._write, b"\0")  # wakes the watcher, which then returns
        self._watcher.join(timeout=5)
        os.close(self._read)
        os.close(self._write)

    def _handler(self, signum, frame) -> None:
        # Runs in the main thread at the next bytecode boundary: it makes a signal sent
        # from within a step (a test hook) count before that step's end is checked.
        if not self.requested:
            self.requested = signum

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 64)
            for signum in data:
                if signum == 0 or not self._active:
                    return
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        with self._lock:
            self._count += 1
            count = self._count
            if not self.requested:
                self.requested = signum
        name = signal_name(signum)
        if count == 1:
            self.notify(f"{name}: stopping after the current step and saving a checkpoint "
                        f"(send it again, e.g. Ctrl-C, to abort at once without saving).")
        else:
            self.notify(f"{name} again: aborting now without saving; a re-run resumes from "
                        "the latest checkpoint, if any.")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)


def any_process(flags) -> np.ndarray:
    """Element-wise OR of `flags` (a small int/bool array) over all JAX processes; the same
    array in every process. One process: `flags` itself, no communication."""
    import jax

    flags = np.asarray(flags, np.int32)
    if jax.process_count() == 1:
        return flags.astype(bool)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(flags)).reshape(
        jax.process_count(), *flags.shape).any(axis=0)
