"""`train.py --multihost`: one process per host, joined by `jax.distributed`.

Where the processes find each other, in this order:

1. `--coordinator_address HOST:PORT --num_processes N --process_id I` (flags);
2. the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
   JAX_PROCESS_ID (the same three, for launchers that set variables);
3. whatever `jax.distributed.initialize()` detects by itself: SLURM (`srun`), Open MPI
   (`mpirun`), Kubernetes, Cloud TPU.

Process 0 runs the coordinator at HOST:PORT (HOST must be process 0's address, reachable
from every host). On CPU the cross-process collectives are gloo's
(`jax_cpu_collectives_implementation`, unless JAX_CPU_COLLECTIVES_IMPLEMENTATION is set).
"""

from __future__ import annotations

import os
import sys
import threading

from absl import flags

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
HOW = ("set --coordinator_address=HOST:PORT (process 0's address, any free port), "
       "--num_processes=N and --process_id=0..N-1 on every process (or JAX_COORDINATOR_ADDRESS, "
       "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or launch with srun under SLURM")


class MultihostError(RuntimeError):
    """jax.distributed could not be set up; the message says what to set."""


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--coordinator_address, --num_processes, --process_id, --initialization_timeout."""
    flags.DEFINE_string("coordinator_address", None, "With --multihost: HOST:PORT of process "
                        "0's coordinator (default: $JAX_COORDINATOR_ADDRESS, else detected, "
                        "e.g. under SLURM).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "With --multihost: how many processes "
                         "(default: $JAX_NUM_PROCESSES, else detected).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "With --multihost: this process, 0..N-1 "
                         "(default: $JAX_PROCESS_ID, else detected).", lower_bound=0,
                         flag_values=fv)
    flags.DEFINE_integer("initialization_timeout", 300, "With --multihost: seconds to wait "
                         "for all processes to reach the coordinator before giving up.",
                         lower_bound=1, flag_values=fv)


def _from_env(name, value, cast):
    if value is not None:
        return value
    raw = os.environ.get(ENV[name], "").strip()
    if not raw:
        return None
    try:
        return cast(raw)
    except ValueError:
        raise MultihostError(f"{ENV[name]}={raw!r} is not a valid {name}; {HOW}.") from None


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               initialization_timeout=300) -> None:
    """`jax.distributed.initialize` with the arguments, else the JAX_* variables, else
    cluster detection (see the module docstring); gloo collectives on CPU.

    Raises MultihostError (one line naming what to set) when no coordinator is given or
    detected, or the values are unusable. When the processes have not all reached the
    coordinator after `initialization_timeout` seconds, prints such a line as
    `error: ...` and ends the process with status 1 (jax would abort it with a C++ stack
    trace a little later).
    """
    import jax

    address = _from_env("coordinator_address", coordinator_address, str)
    count = _from_env("num_processes", num_processes, int)
    index = _from_env("process_id", process_id, int)
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(initialization_timeout)
    where = (f"coordinator {address or '(detected)'} (this is process "
             f"{'?' if index is None else index} of {count or '?'})")
    done = threading.Event()

    def give_up():
        if not done.wait(timeout):
            print(f"error: --multihost: not all processes reached the {where} within "
                  f"--initialization_timeout={timeout} s. Start every process (process 0 "
                  f"runs the coordinator; HOST must be its address, reachable from all "
                  f"hosts); {HOW}.", file=sys.stderr, flush=True)
            os._exit(2)  # a setup problem: exit 2 like every user error

    threading.Thread(target=give_up, daemon=True, name="multihost-timeout").start()
    try:
        # jax's own deadline comes later: it aborts the process instead of raising.
        jax.distributed.initialize(address, count, index,
                                   initialization_timeout=timeout + 60)
    except (ValueError, TypeError) as e:  # jax's checks: nothing given nor detected
        raise MultihostError(f"--multihost found no usable cluster setup ({e}); {HOW}.") from None
    except Exception as e:  # noqa: BLE001 - e.g. the port is taken; gRPC errors vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MultihostError(f"--multihost could not join the {where}: {first[:300]}; "
                             f"{HOW}.") from None
    finally:
        done.set()
