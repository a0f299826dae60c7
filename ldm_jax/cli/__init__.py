"""Command-line entry points, one thin `main(argv) -> exit status` per command.

`ldm-jax <name>` / `python -m ldm_jax <name>` (`ldm_jax.__main__` lists the commands) runs
`ldm_jax.cli.<name>.main`; `python train.py` runs `ldm_jax.cli.train.main`. Shared flags
and plumbing are in `ldm_jax.cli.common`, whose docstring gives the pattern a new command
follows (one `error:` line and exit 2 for user errors).
"""

from ldm_jax.cli.common import (
                                check_finite,
                                check_range,
                                config_path,
                                define_checkpoint_flags,
                                define_condition_flags,
                                define_frame_flag,
                                define_io_flags,
                                define_model_flags,
                                define_output_flag,
                                define_overwrite_flag,
                                define_progress_flag,
                                define_seed_flag,
                                define_skip_bad_files_flag,
                                define_step_flag,
                                define_workdir_flag,
                                error_text,
                                model_kwargs,
                                parse_frame,
                                run,
                                volume_jobs,
                                with_skip_hint,
)

__all__ = ["check_finite", "check_range", "config_path", "define_checkpoint_flags",
           "define_condition_flags",           "define_frame_flag", "define_io_flags", "define_model_flags", "define_output_flag",
           "define_overwrite_flag", "define_progress_flag", "define_seed_flag",
           "define_skip_bad_files_flag", "define_step_flag", "define_workdir_flag", "error_text",
           "model_kwargs", "parse_frame", "run", "volume_jobs", "with_skip_hint"]
