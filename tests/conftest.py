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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir holding tests/tiny.py's model trained 2 steps (checkpoint at step 2)."""
    from ldm_jax.cli.train import train_and_evaluate
    from tests.tiny import tiny_config

    wd = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config()
    config.train.num_steps = 2
    train_and_evaluate(config, str(wd), progress=False)
    return str(wd)
