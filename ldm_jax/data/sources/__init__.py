"""Grain random-access data sources, chosen by config.data.source from `SOURCES`.

A source maps a record index to {"image": (X, Y, Z, C) float32 after the deterministic
preprocessing, "name": str}; random augmentation happens later in the grain pipeline.
Every source has a stable repr (no object addresses): grain stores it in the iterator
state and refuses to restore a state into a loader over different data.
"""

from __future__ import annotations

import warnings

from ldm_jax.data import io
from ldm_jax.data.sources.files import FileSource, patterns, scan_files, split_files
from ldm_jax.data.sources.mni152 import MNI152Source
from ldm_jax.data.sources.synthetic import TRAIN, VAL, FilamentSource, num_records_check
from ldm_jax.data.transforms import Prep
from ldm_jax.errors import DataError, DataWarning


def _synthetic(config, prep: Prep, split: str):
    d = config.data
    num = d.num_train_volumes if split == "train" else d.num_val_volumes
    num_records_check(num, f"data.num_{split}_volumes")
    return FilamentSource(num, prep, int(d.get("seed", 0)), TRAIN if split == "train" else VAL)


def _mni152(config, prep: Prep, split: str):
    d = config.data
    num = d.num_train_volumes if split == "train" else d.num_val_volumes
    num_records_check(num, f"data.num_{split}_volumes")
    return MNI152Source(num, prep)


def _clouds(config, prep: Prep, split: str):
    from ldm_jax.data.sources.pointcloud import build_cloud_source  # h5py etc. on demand
    return build_cloud_source(config, prep, split)


def _files(config, prep: Prep, split: str):
    train, val = split_files(config, prep)
    paths = train if split == "train" else val
    return FileSource(scan_files(paths, prep, _split_where(config, split)), prep, split)


# data.source -> builder(config, prep, split) of a grain random-access source.
SOURCES = {"synthetic_filaments": _synthetic, "mni152": _mni152, "pointcloud": _clouds,
           "synthetic_smlm": _clouds, "nifti": _files, "npy": _files}


def build_source(config, prep: Prep, split: str):
    """The train or val source for config.data.source (a key of `SOURCES`)."""
    return SOURCES.get(prep.source, _files)(config, prep, split)


def _split_where(config, split: str) -> str:
    """Where a split's files come from, for messages: the folder and, when the split is
    part of a folder, which part ("the train split of /data (data.val_fraction=0.1)")."""
    d = config.data
    if d.get("val_dir"):
        return f"data.{split}_dir {d.train_dir if split == 'train' else d.val_dir}"
    frac = d.get("val_fraction", 0.1)
    if not frac:
        return f"data.train_dir {d.train_dir}"
    name = "train" if split == "train" else "validation"
    return f"the {name} split of {d.train_dir} (data.val_fraction={frac})"


def describe(config) -> str:
    """One line naming the data source and where it reads from, e.g. "Data: nifti files
    (*.nii, *.nii.gz) from /data/vols: 6 file(s), 5 for training and 1 for validation
    (data.val_fraction=0.1); crops of 96x96x64". Lists files (reads none); raises
    DataError like the loaders."""
    d = config.data
    prep = Prep.from_config(config)
    size = "x".join(str(v) for v in prep.volume_size)
    if prep.source == "synthetic_filaments":
        return (f"Data: built-in synthetic filaments (data.source='synthetic_filaments'), "
                f"{d.num_train_volumes} training and {d.num_val_volumes} validation volumes "
                f"of {size} from data.seed={d.get('seed', 0)}.")
    if prep.source == "synthetic_smlm":
        return (f"Data: built-in synthetic SMLM-like localisations (data.source="
                f"'synthetic_smlm'), {d.num_train_volumes} training and {d.num_val_volumes} "
                f"validation clouds voxelised to {size} voxels of "
                f"{d.get('pointcloud_voxel_size')} nm from data.seed={d.get('seed', 0)}.")
    if prep.source == "mni152":
        return (f"Data: the MNI152 T1 template shipped in nilearn ({prep.mni152_resolution} "
                f"mm, data.source='mni152'), randomly rotated, zoomed and cropped to {size}: "
                f"{d.num_train_volumes} training and {d.num_val_volumes} validation samples.")
    with warnings.catch_warnings():  # the loaders give split_files' warnings
        warnings.simplefilter("ignore", DataWarning)
        train, val = split_files(config, prep)
    kind = f"{prep.source} files ({', '.join(patterns(prep))})"
    if d.get("val_dir"):
        return (f"Data: {kind}: {len(train)} for training from {d.train_dir}, {len(val)} for "
                f"validation from {d.val_dir}; crops of {size}.")
    total = len(set(train) | set(val))
    split = (f"{len(train)} for training and {len(val)} for validation "
             f"(data.val_fraction={d.get('val_fraction', 0.1)})"
             if set(train) != set(val) else "all of them for training and validation")
    return f"Data: {kind} from {d.train_dir}: {total} file(s), {split}; crops of {size}."


def data_problems(data_cfg) -> list:
    """Config problems of the data section that need no file reading, one line each:
    a data folder set for a source that reads no files (it would be ignored silently)."""
    source = data_cfg.get("source") or "synthetic_filaments"
    problems = []
    if source in ("synthetic_filaments", "mni152"):
        for key in ("train_dir", "val_dir"):
            folder = data_cfg.get(key)
            if folder:
                guess = _guess_source(str(folder))
                problems.append(
                    f"data.{key}={folder!r} is set but data.source={source!r} reads no files "
                    f"(it would be ignored); add --config.data.source={guess} to train on "
                    f"those {'.npy' if guess == 'npy' else '.nii/.nii.gz'} "
                    f"files, or unset data.{key}.")
    return problems


def check_data_config(data_cfg) -> None:
    """Raises DataError with the first of `data_problems` (for commands that read data
    without a model: preview, throughput)."""
    problems = data_problems(data_cfg)
    if problems:
        raise DataError(problems[0])


def _guess_source(folder: str) -> str:
    """'npy' when the folder (or glob) holds .npy files but no NIfTI, else 'nifti'."""
    try:
        found = io.list_volume_files(folder)
    except DataError:
        return "nifti"
    npy = sum(p.endswith(".npy") for p in found)
    return "npy" if npy and npy == len(found) else "nifti"


__all__ = [
    "FileSource",
    "FilamentSource",
    "MNI152Source",
    "build_source",
    "check_data_config",
    "data_problems",
    "describe",
    "scan_files",
    "skipped_files",
    "split_files",
]
