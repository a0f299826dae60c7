"""`python train.py --config CONFIG --workdir DIR`: the stage named by `config.stage`.

Any config field can be overridden, e.g. --config.train.num_steps=2000. With no dataset
configured stage 1 trains on built-in synthetic filament volumes.
"""

from __future__ import annotations

import sys


def make_task(config):
    """The trainer task for `config.stage` ("autoencoder", the default, or "diffusion"),
    with the config prepared and validated. Raises ConfigError for an unknown stage."""
    from ldm_jax.config import ConfigError

    stage = str(config.get("stage", "autoencoder"))
    if stage == "autoencoder":
        from ldm_jax.autoencoder.task import AutoencoderTask, prepare_config
        return AutoencoderTask(prepare_config(config))
    if stage == "diffusion":
        from ldm_jax.diffusion.task import DiffusionTask, prepare_config
        return DiffusionTask(prepare_config(config))
    raise ConfigError(f"config.stage={stage!r} is unknown; expected 'autoencoder' or "
                      "'diffusion' (configs/*.py or configs/diffusion/*.py).")


def train_and_evaluate(config, workdir, progress=True):
    """Trains the config's stage in `workdir` (resuming from its latest checkpoint);
    returns the final train state."""
    from ldm_jax import trainer
    return trainer.train(make_task(config), workdir, progress=progress)


def main(argv=None):
    """absl entry point (train.py)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/balanced.py", "Config file (.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and images "
                        "go; an existing workdir is resumed, never cleared.")
    flags.DEFINE_bool("multihost", False, "One process per host, joined by jax.distributed "
                      "(see --coordinator_address; README 'Multi-host').")
    from ldm_jax.cli import multihost
    multihost.define_flags()
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    FLAGS = flags.FLAGS

    def body(args):
        if len(args) > 1:
            raise app.UsageError(f"Unexpected arguments: {args[1:]}")
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax/jax INFO lines drown the progress
        import jax
        if FLAGS.multihost:
            try:
                multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id, FLAGS.initialization_timeout)
            except multihost.MultihostError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            if jax.process_index() != 0 and not FLAGS["verbosity"].present:
                logging.set_verbosity(logging.ERROR)  # process 0 speaks for all
        if jax.default_backend() == "cpu":
            # XLA:CPU compiles partitionable threefry ~10x slower; on one CPU host nothing
            # is gained from it.
            jax.config.update("jax_threefry_partitionable", False)
        from ldm_jax.config import ConfigError
        from ldm_jax.data import DataError
        from ldm_jax.trainer import TrainingDivergedError
        try:
            train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
        except (ConfigError, DataError, TrainingDivergedError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    app.run(lambda args: sys.exit(body(args)), argv=argv)
