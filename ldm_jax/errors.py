"""The exceptions ldm-jax raises for problems a user can fix, and its data warning.

Every message names what was wrong (a config field, a file, a flag), what is expected and
how to fix it; the command line prints it as one `error:` line and exits with status 2
(`ldm_jax.cli.common.run`). Errors that are bugs stay built-in exceptions.
"""


class ConfigError(ValueError):
    """A config value is invalid; the message says what, what is expected and how to fix it."""


class DataError(ValueError):
    """Bad data or data configuration (a ValueError, like ConfigError)."""


class NoFilesError(DataError, FileNotFoundError):
    """No volume files match the configured directory / glob."""


class BadFileError(DataError):
    """A file cannot be read as a volume (corrupt, truncated, wrong format, wrong dtype)."""


class VolumeShapeError(DataError):
    """A volume has a shape the pipeline cannot use as configured (2D, 4D without a frame...)."""


class NonFiniteError(DataError):
    """A volume contains NaN or Inf voxels and data.nan_to_num is False."""


class ChannelMismatchError(ValueError):
    """A volume's channel count differs from the model's in_channels / latent_channels."""


class OutputDirError(ValueError):
    """The output directory cannot be used (not creatable, not writable, the input dir)."""


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint (or not the requested step) in a workdir."""


class ConversionError(ValueError):
    """A state dict does not fit the model built from the config (keys, shapes), or a
    checkpoint file cannot be read as one."""


class DamagedCheckpointError(ValueError):
    """A checkpoint step cannot be read (truncated or missing files); `step` and `cause`
    say which and why. Raised for an explicitly requested step; `latest`/`best` skip it."""

    def __init__(self, message, step=None, cause=None):
        super().__init__(message)
        self.step, self.cause = step, cause


class WorkdirInUseError(RuntimeError):
    """Another live process holds the workdir's lock (`ldm_jax.lock`)."""


class StorageError(RuntimeError):
    """A folder cannot be written: disk full, read-only, a file where a folder should be,
    no permission. The message names the path and the free space or the permission."""


class NonFiniteResultError(ValueError):
    """A command computed NaN or Inf values (samples, latents, reconstructions); nothing
    was written for them. The message names the checkpoint step and the options."""


class OutputConflictError(ValueError):
    """An output folder holds outputs of another model, other options or other inputs
    (or files without a record); a rerun refuses to replace them without --overwrite."""


class TrainingDivergedError(RuntimeError):
    """`train.max_bad_steps` non-finite steps in a row; the last good checkpoint is kept."""


class DataWarning(UserWarning):
    """Recoverable data problem: skipped file, padded volume, replaced NaNs."""


# What the command line reports as one `error:` line (exit 2) instead of a traceback.
USER_ERRORS = (ConfigError, DataError, ChannelMismatchError, OutputDirError,
               FileNotFoundError, NotADirectoryError, DamagedCheckpointError,
               WorkdirInUseError, StorageError, NonFiniteResultError, OutputConflictError)
