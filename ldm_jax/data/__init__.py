"""Data for ldm-jax: NIfTI / npy folders, synthetic filaments, the MNI152 template.

Public API (used by the trainer and latent extraction):
  make_train_loader(config, *, batch_size, seed, process_index=None, process_count=None)
  make_eval_batches(config, *, batch_size)
  load_volume(path, config) -> (volume (X, Y, Z, C) float32, affine)
  list_volume_files(dir_or_glob) -> sorted paths
  describe(config) -> one line naming the source and where it reads from
  data_problems(data_cfg) -> config problems of the data section (config.validate asks)
Training batches are {"image": float32 (batch, X, Y, Z, C), "name": str (batch,)}; evaluation
batches {"image"}.
"""

from ldm_jax.errors import (
    BadFileError,
    DataError,
    DataWarning,
    NoFilesError,
    NonFiniteError,
    VolumeShapeError,
)

# The loaders (grain, and through it jax) load on first use: a command that only reads
# files or stops at a bad argument starts in half the time (PEP 562).
_LAZY = {
    "check_data_config": "sources", "data_problems": "sources", "describe": "sources",
    "EvalBatches": "pipeline", "TrainLoader": "pipeline", "list_volume_files": "pipeline",
    "load_volume": "pipeline", "make_eval_batches": "pipeline",
    "make_train_loader": "pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"ldm_jax.data.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups (and monkeypatching) see a plain attribute
        return value
    raise AttributeError(f"module 'ldm_jax.data' has no attribute {name!r}")


__all__ = [
    "BadFileError",
    "DataError",
    "DataWarning",
    "EvalBatches",
    "NoFilesError",
    "NonFiniteError",
    "TrainLoader",
    "VolumeShapeError",
    "check_data_config",
    "data_problems",
    "describe",
    "list_volume_files",
    "load_volume",
    "make_eval_batches",
    "make_train_loader",
]
