"""Command-line entry points, one thin `main` per `python -m` command.

`python -m ldm_jax.<name>` (plan, preview, throughput, extract, reconstruct, decode, export,
sample, evaluate, voxelize, to_points) runs `ldm_jax.cli.<name>.main`; `train.py` runs `ldm_jax.cli.train.main`. Shared flag
plumbing is in `ldm_jax.cli.common`.
"""

from ldm_jax.cli.common import define_io_flags, define_model_flags, model_kwargs, run

__all__ = ["define_io_flags", "define_model_flags", "model_kwargs", "run"]
