"""Volumes from files (NIfTI, npy): the train/validation split, header checks, the source.

Unreadable files fail at the header scan, or are skipped and counted with
data.skip_bad_files.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Sequence

import numpy as np

from ldm_jax.data import io
from ldm_jax.data.transforms import Prep, preprocess
from ldm_jax.errors import BadFileError, DataError, DataWarning

# Files skipped at read time in this process (the header scan counts separately).
_SKIPPED: set = set()


def _warn_skip(path: str, err: Exception) -> None:
    _SKIPPED.add(path)
    warnings.warn(
        f"Skipping {path}: {io.skipped_reason(err)} "
        f"({len(_SKIPPED)} file(s) skipped at read time in this "
        f"process; data.skip_bad_files=True).",
        DataWarning,
        stacklevel=2,
    )


def skipped_files() -> list:
    """Files this process skipped at read time because they were unreadable."""
    return sorted(_SKIPPED)


def scan_files(paths: Sequence[str], prep: Prep, where: str) -> list:
    """Header-check every file so bad ones fail (or are skipped) before training starts.

    data.skip_bad_files skips unreadable files (BadFileError); layout errors always raise.
    """
    infos, bad = [], []
    for path in paths:
        try:
            info = io.read_header(path)
            io.check_dtype(info)
        except BadFileError as e:  # unreadable: skippable
            if not prep.skip_bad_files:
                raise
            bad.append((path, e))
            continue
        # A readable file of the wrong layout (4D without data.frame, 2D) is a config
        # decision, not damage: always an error, never silently skipped.
        io.channel_layout(info, prep.frame, prep.channels)
        infos.append(info)
    if bad:
        lines = "\n  ".join(io.skipped_reason(e) for _, e in bad[:10])  # each message names its file
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(
            f"Skipped {len(bad)} of {len(paths)} file(s) in {where} (data.skip_bad_files=True):"
            f"\n  {lines}{more}",
            DataWarning,
            stacklevel=2,
        )
    if not infos:
        raise BadFileError(
            f"All {len(paths)} file(s) in {where} are unusable (first: {bad[0][1]}). Fix the "
            f"files or point data.train_dir / data.val_dir elsewhere."
        )
    return infos


class FileSource:
    """Volumes from files; unreadable ones become {"bad_file": path} when skipping."""

    def __init__(self, infos: Sequence[io.VolumeInfo], prep: Prep, split: str = "train"):
        self._infos = list(infos)
        self._prep = prep
        self._split = split
        digest = hashlib.sha1("\n".join(i.path for i in self._infos).encode()).hexdigest()[:12]
        self._repr = f"FileSource(split={split}, files={len(self._infos)}, paths_sha1={digest})"

    @property
    def paths(self) -> list:
        return [i.path for i in self._infos]

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return self._repr

    def load(self, index: int):
        """(volume, affine) of file `index` after deterministic preprocessing (may raise)."""
        info = self._infos[index]
        arr = io.read_array(info, self._prep.frame, self._prep.channels)
        return preprocess(arr, self._prep, info.path, info.zooms, info.affine)

    def __getitem__(self, index: int) -> dict:
        info = self._infos[index]
        try:
            vol, _ = self.load(index)
        except BadFileError as e:
            if not self._prep.skip_bad_files:
                raise
            _warn_skip(info.path, e)
            return {"bad_file": info.path}
        return {"image": vol, "name": info.path}


def patterns(prep: Prep) -> tuple:
    if prep.source == "pointcloud":
        from ldm_jax.data.pointcloud.io import CLOUD_PATTERNS
        return CLOUD_PATTERNS
    return io.NPY_PATTERNS if prep.source == "npy" else io.NIFTI_PATTERNS


def split_files(config, prep: Prep) -> tuple:
    """(train paths, val paths): data.val_dir, or a seeded data.val_fraction split."""
    d = config.data
    train_dir = d.get("train_dir")
    if not train_dir:
        raise DataError(
            f"data.source={prep.source!r} needs data.train_dir: a directory or glob of "
            f"{' / '.join(patterns(prep))} files (e.g. --config.data.train_dir=/path/to/vols), "
            f"or use data.source='synthetic_filaments' to train without a dataset."
        )
    recursive = bool(d.get("recursive", False))
    train = io.list_volume_files(train_dir, patterns(prep), recursive)
    if d.get("val_dir"):
        val = io.list_volume_files(d.val_dir, patterns(prep), recursive, field="data.val_dir")
        overlap = sorted(set(train) & set(val))
        if overlap:
            warnings.warn(
                f"{len(overlap)} file(s) are in both data.train_dir and data.val_dir "
                f"(e.g. {overlap[0]}); validation scores will be optimistic.",
                DataWarning,
                stacklevel=2,
            )
        return train, val
    frac = float(d.get("val_fraction", 0.1))
    if not 0.0 <= frac < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {frac}.")
    if len(train) < 2 or frac == 0.0:
        if frac > 0:
            warnings.warn(
                f"Only {len(train)} file in {train_dir}: validating on the training file. "
                f"Add files or set data.val_dir.",
                DataWarning,
                stacklevel=2,
            )
        return train, list(train)
    n_val = min(len(train) - 1, max(1, int(round(frac * len(train)))))
    order = np.random.default_rng(int(d.get("seed", 0))).permutation(len(train))
    val_idx = set(order[:n_val].tolist())
    return (
        [p for i, p in enumerate(train) if i not in val_idx],
        [p for i, p in enumerate(train) if i in val_idx],
    )
