"""Exceptions and warnings for bad data input.

Each error names the file (or directory) and says what to do, so a user with a folder of
volumes can fix the problem without reading a traceback.
"""


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


class DataWarning(UserWarning):
    """Recoverable data problem: skipped file, padded volume, replaced NaNs."""
