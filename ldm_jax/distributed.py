"""Keeping several processes (jax.distributed) in step where their work differs in time.

On CPU the cross-process collectives are gloo's, and gloo gives the *first* collective
over a set of devices only 30 s (not configurable) for every process to arrive; later
collectives wait as long as needed. Processes reach the first training step at different
times: only process 0 reads and writes JAX's persistent compilation cache (on CPU the
others miss it: their cache keys differ), hosts compile at different speeds. So the first
step is compiled ahead and the processes meet at a barrier of the coordination service
(no 30 s limit) before running it.
"""

from __future__ import annotations

import itertools

import jax

_barriers = itertools.count()


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process has called `sync_processes(name)` (a no-op with one
    process). Raises jax's error after `timeout_s` seconds."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    # Coordination-service barrier names must be unique: number them.
    multihost.get_barrier_sync_fn()(key=f"ldm_jax_{name}_{next(_barriers)}",
                                    timeout_ms=int(timeout_s) * 1000)


def compile_then_sync(jitted, name: str):
    """`jitted` (a `jax.jit` function) whose first call compiles for its arguments, waits
    for every process to have compiled (`sync_processes`), then runs; later calls run the
    same executable (arguments must keep their shapes and shardings)."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = jitted.lower(*args).compile()
            sync_processes(name)
        return compiled(*args)

    return call
