"""Test setup: eight simulated CPU devices (set before jax is imported) for sharding tests."""

import os
import tempfile

# Eight simulated CPU devices for the sharding tests; LLVM at -O0 because the suite is
# bound by compiling many small programs (~35% less compile time), not by running them.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threefry in its partitionable form compiles ~10x slower on XLA:CPU; values stay
# independent of sharding either way.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# Tests compile the same small programs many times (and in several processes): a shared
# persistent compilation cache turns the repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ldm_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
