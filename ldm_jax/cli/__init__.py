"""Command-line entry points, one thin `main` per `python -m` command.

`python -m ldm_jax.<name>` (plan, preview, throughput, extract, reconstruct, decode, export,
sample, evaluate, voxelize, to_points) runs `ldm_jax.cli.<name>.main`; `train.py` runs `ldm_jax.cli.train.main`. Shared flag
plumbing is in `ldm_jax.cli.common`, whose docstring gives the pattern a new
command follows (one `error:` line and exit 2 for user errors).
"""

from ldm_jax.cli.common import (config_path, define_checkpoint_flags, define_frame_flag,
                                define_io_flags, define_model_flags, error_text, model_kwargs,
                                parse_frame, run, volume_jobs, with_skip_hint)

__all__ = ["config_path", "define_checkpoint_flags", "define_frame_flag", "define_io_flags",
           "define_model_flags", "error_text", "model_kwargs", "parse_frame", "run",
           "volume_jobs", "with_skip_hint"]
