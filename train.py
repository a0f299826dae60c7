"""Train the stage-1 autoencoder: python train.py --config configs/balanced.py --workdir runs/x

Any config field can be overridden, e.g. --config.train.num_steps=2000. With no dataset
configured it trains on built-in synthetic filament volumes.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/balanced.py", "Config file (.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and images go; "
                    "an existing workdir is resumed, never cleared.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process "
                  "per host, coordinator from the environment).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/jax INFO lines drown the progress
    import jax
    if FLAGS.multihost:
        jax.distributed.initialize()
    if jax.default_backend() == "cpu":
        # XLA:CPU compiles partitionable threefry ~10x slower; on one CPU host nothing
        # is gained from it.
        jax.config.update("jax_threefry_partitionable", False)
    from ldm_jax.config import ConfigError
    from ldm_jax.data import DataError
    from ldm_jax.train import TrainingDivergedError, train_and_evaluate
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    except (ConfigError, DataError, TrainingDivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
