"""`python train.py --config CONFIG --workdir DIR` (or `ldm-jax train ...`): the stage named
by `config.stage`.

Any config field can be overridden, e.g. --config.train.num_steps=2000. With no dataset
configured stage 1 trains on built-in synthetic filament volumes.

Exit status: 0 trained (or the workdir was already finished), 2 a user error (one
`error:` line), 1 training diverged, 128+signal when stopped by SIGINT/SIGTERM (130 for
Ctrl-C, 143 for SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import shlex
import sys


def make_task(config, config_path=None):
    """The trainer task for `config.stage` ("autoencoder", the default, or "diffusion";
    a diffusion config with `controlnet.unet_workdir` trains a ControlNet on that run's
    frozen UNet), with the config prepared and validated; `config_path` (the file, for hints) is set as
    `task.config_path`. Raises ConfigError for an unknown stage or an invalid config."""
    from ldm_jax.errors import ConfigError

    stage = str(config.get("stage", "autoencoder"))
    if stage == "autoencoder":
        from ldm_jax.autoencoder.config import prepare_config
        from ldm_jax.autoencoder.kinds import make_task as make_stage1_task
        task = make_stage1_task(prepare_config(config))  # by autoencoder.kind
    elif stage == "diffusion":
        from ldm_jax.diffusion.config import prepare_config
        config = prepare_config(config)
        if (config.get("controlnet") or {}).get("unet_workdir"):
            from ldm_jax.diffusion.controlnet_task import ControlNetTask
            task = ControlNetTask(config)
        else:
            from ldm_jax.diffusion.task import DiffusionTask
            task = DiffusionTask(config)
    else:
        raise ConfigError(f"config.stage={stage!r} is unknown; expected 'autoencoder' or "
                          "'diffusion' (configs/*.py or configs/diffusion/*.py).")
    task.config_path = config_path
    return task


def train_and_evaluate(config, workdir, progress=True, config_path=None):
    """Trains the config's stage in `workdir` (resuming from its latest checkpoint);
    returns the final train state. Raises `ldm_jax.trainer.TrainingStopped` when stopped
    by SIGINT/SIGTERM (after saving a checkpoint)."""
    from ldm_jax import trainer
    return trainer.train(make_task(config, config_path), workdir, progress=progress)


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    from ldm_jax.cli import multihost

    cli.define_workdir_flag(fv, "Where checkpoints, metrics and images go; an existing "
                            "workdir is resumed, never cleared.", default="runs/default")
    flags.DEFINE_bool("multihost", False, "One process per host, joined by jax.distributed "
                      "(see --coordinator_address; docs/multihost.md).", flag_values=fv)
    multihost.define_flags(fv)
    cli.define_progress_flag(fv)


def _body(fv, argv):
    import jax

    from ldm_jax import cli
    from ldm_jax.errors import TrainingDivergedError
    from ldm_jax.trainer import TrainingStopped
    if fv.multihost:
        from absl import logging

        from ldm_jax.cli import multihost
        try:
            multihost.initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                                 fv.initialization_timeout)
        except multihost.MultihostError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if jax.process_index() != 0 and not fv["verbosity"].present:
            logging.set_verbosity(logging.ERROR)  # process 0 speaks for all
    if jax.default_backend() == "cpu":
        # XLA:CPU compiles partitionable threefry much slower; on one CPU host nothing
        # is gained from it.
        jax.config.update("jax_threefry_partitionable", False)
    try:
        train_and_evaluate(fv.config, fv.workdir, progress=fv.progress,
                           config_path=cli.config_path(fv))
    except TrainingDivergedError as e:
        print(cli.error_text(e), file=sys.stderr)
        return 1
    except TrainingStopped as e:
        if jax.process_index() == 0:
            prog = argv[0].split() if argv and argv[0].startswith("ldm-jax") else ["python", argv[0]]
            command = shlex.join([*prog, *argv[1:]])
            print(f"{e} To resume, run the same command again:\n  {command}", flush=True)
        return 128 + e.signum
    return 0


def main(argv=None):
    """Entry point of train.py; returns (and with argv=None exits with) the exit status."""
    from ldm_jax import cli

    args = list(sys.argv if argv is None else argv)
    code = cli.run("train.py", __doc__, _define, lambda fv: _body(fv, args), args,
                   config="optional", config_default="configs/balanced_4x.py")
    if argv is None:
        sys.exit(code)
    return code
