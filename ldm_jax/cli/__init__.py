"""Command-line entry points, one thin `main` per `python -m` command.

`python -m ldm_jax.<name>` (extract, reconstruct, decode, plan, preview, throughput, ...)
runs `ldm_jax.cli.<name>.main`; `train.py` runs `ldm_jax.cli.train.main`. Shared flag
plumbing is in `ldm_jax.cli.common`.
"""

from ldm_jax.cli.common import (define_frame_flag, define_io_flags, define_model_flags,
                                model_kwargs, parse_frame, run, volume_jobs,
                                with_skip_hint)

__all__ = ["define_frame_flag", "define_io_flags", "define_model_flags", "model_kwargs",
           "parse_frame", "run", "volume_jobs", "with_skip_hint"]
