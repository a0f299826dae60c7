"""SIGINT/SIGTERM handling of ldm_jax.stopping: the first signal asks to stop, the second
aborts at once even while the main thread is blocked."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from ldm_jax import stopping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The main thread blocks in os.read (restarted after each Python-level handler, PEP 475),
# as it would inside a long XLA call.
_SCRIPT = """
import os, sys
from ldm_jax.stopping import StopRequests
with StopRequests() as stop:
    print("ready", flush=True)
    r, w = os.pipe()
    os.read(r, 1)
"""


def _read_until(stream, text, timeout=60):
    end, seen = time.time() + timeout, ""
    while time.time() < end:
        line = stream.readline()
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen in {seen!r}")


def test_first_signal_notifies_second_aborts_at_once():
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _read_until(p.stdout, "ready")
        p.send_signal(signal.SIGINT)
        _read_until(p.stderr, "SIGINT: stopping after the current step")
        assert p.poll() is None  # the first signal only asks
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 128 + signal.SIGINT
        assert time.time() - t0 < 10
        assert "aborting now without saving" in p.stderr.read()
    finally:
        p.kill()


def test_handlers_are_restored_and_flag_set_in_process():
    before = signal.getsignal(signal.SIGTERM)
    with stopping.StopRequests(notify=lambda msg: None) as stop:
        assert stop.requested == 0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs signal handlers at its next call
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_any_process_is_the_flags_on_one_process():
    np.testing.assert_array_equal(stopping.any_process([1, 0]), [True, False])


_TWO_PROCESSES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2,
                           process_id=int(sys.argv[2]))
from ldm_jax.stopping import any_process
pid = jax.process_index()
print("result", any_process([pid == 1, 0]).tolist(), any_process([0, 0]).tolist(), flush=True)
"""


def test_any_process_agrees_over_two_processes():
    """Only process 1 asks to stop (a SIGTERM reaching one host): both see the request."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, port, str(i)], cwd=REPO,
                              env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "result [True, False] [False, False]" in out, out
