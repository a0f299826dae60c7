"""Test setup: eight simulated CPU devices (set before jax is imported) for sharding tests."""

import os
import tempfile

# Eight simulated CPU devices for the sharding tests. The suite is bound by compiling many
# small programs, not by running them: LLVM at -O0 (~35% less compile time), XLA:CPU's
# older loop emitters instead of its MLIR fusion emitters (tiny train steps compile in
# 4.1 s instead of 7.1 s; same results), and each program's machine code in one piece
# (splitting it for parallel codegen cost a tiny train step 4.5-4.9 CPU-s of compile
# instead of 3.5-3.8; both cores are busy with test workers anyway).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false "
                                   "--xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Threefry in its partitionable form compiles ~10x slower on XLA:CPU; values stay
# independent of sharding either way.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
# Tests compile the same small programs many times (and in several processes): a shared
# persistent compilation cache turns the repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ldm_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402  (after the environment above, before jax is imported)


@pytest.fixture(scope="session", autouse=True)
def _xla_convolutions():
    """Tests trace XLA's own convolutions, not the CPU tap convolutions
    (`ldm_jax.models.tap_conv`), unless marked `tap_conv`.

    The taps are a CPU speed path with the same values: XLA compiled the tiny training
    step (tests/tiny.py) built on its own convolutions in 2.6-3.2 s instead of 4.2-5.0,
    and compiling is most of this suite's time. What the taps compute is checked where
    it matters: against lax in tests/models/test_tap_conv.py, and in whole models by the tests
    marked `tap_conv` (MONAI parity, the sharded step, multi-host training, whose
    train.py processes use the taps as every CPU run does).
    """
    from ldm_jax.models import tap_conv
    with tap_conv.disabled():
        yield


@pytest.fixture(autouse=True)
def _tap_convolutions_when_marked(request):
    """Tests marked `tap_conv` trace with the tap convolutions, as users' CPU runs do."""
    if request.node.get_closest_marker("tap_conv") is None:
        yield
        return
    from ldm_jax.models import tap_conv
    with tap_conv.enabled():
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run shared by the tests that need a trained workdir (they copy it before
    writing): tests/tiny.py's float32 config, 4 steps, checkpoints at steps 2 and 4.

    `.task` is the trainer task: tests that train the same config again pass it to
    `ldm_jax.trainer.train`, which then reuses its traced and compiled step (the slow
    part of a tiny run). `.output` is what the run printed, `.params` the final
    autoencoder params, `.config_path` the path given for hints.
    """
    import contextlib
    import io
    from types import SimpleNamespace

    import jax

    from ldm_jax import trainer
    from ldm_jax.cli.train import make_task
    from tests.tiny import tiny_config

    config = tiny_config()
    config.train.max_bad_steps = 2
    task = make_task(config, config_path="tests/tiny.py")
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state = trainer.train(task, workdir, progress=False)
    return SimpleNamespace(task=task, workdir=workdir, output=out.getvalue(),
                           params=jax.device_get(state.g_params), config_path="tests/tiny.py")


@pytest.fixture(scope="session")
def ae_workdir(tiny_run):
    """The trained stage-1 workdir that stage-2 tests read (never write): `tiny_run`'s."""
    return tiny_run.workdir


@pytest.fixture(scope="session")
def latents_dir(ae_workdir, tmp_path_factory):
    """Latents (8x8x4x2) of six 16x16x8 filament volumes, extracted with `ae_workdir`'s
    autoencoder by `ldm-jax extract`: the stage-2 tests' training data."""
    from tests.tiny import extract_filament_latents
    return extract_filament_latents(ae_workdir, str(tmp_path_factory.mktemp("stage2")), 6)


# The longest test files, started first (pytest.ini: `--dist loadfile
# --no-loadscope-reorder` hands out whole files, in this order): the two workers then end
# within seconds of each other instead of one waiting for the other's last long file.
LONGEST_FIRST = ("tests/trainer/test_multihost.py", "tests/diffusion/test_diffusion.py", "tests/autoencoder/test_train_step.py",
                 "tests/models/test_unet.py", "tests/models/test_unet_parity_monai.py", "tests/models/test_models.py")


def pytest_collection_modifyitems(config, items):
    """Collection order, except the files of LONGEST_FIRST go first (stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
