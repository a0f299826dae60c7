"""Grain random-access data sources: files (NIfTI / npy), synthetic filaments, MNI152.

A source maps a record index to {"image": (X, Y, Z, C) float32 after the deterministic
preprocessing, "name": str}; random augmentation happens later in the grain pipeline.
Every source has a stable repr (no object addresses): grain stores it in the iterator
state and refuses to restore a state into a loader over different data.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from typing import Sequence

import numpy as np

from ldm_jax.data import io
from ldm_jax.errors import BadFileError, DataError, DataWarning
from ldm_jax.data.transforms import Prep, preprocess

# Split ids inside the synthetic generators' seed: train and validation never share a volume.
TRAIN, VAL = 0, 1

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


class FilamentSource:
    """`num` synthetic filament volumes, volume i depending only on (seed, split, i)."""

    def __init__(self, num: int, prep: Prep, seed: int, split: int):
        if prep.channels != 1:
            raise DataError(
                f"data.source='synthetic_filaments' makes 1-channel volumes but "
                f"autoencoder.in_channels={prep.channels}; set in_channels=1 or use file data."
            )
        self._num, self._prep, self._seed, self._split = int(num), prep, int(seed), int(split)

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        p = self._prep
        return (
            f"FilamentSource(num={self._num}, seed={self._seed}, split={self._split}, "
            f"size={p.volume_size}, filaments={p.num_filaments}, width={p.filament_width}, "
            f"noise={p.filament_noise})"
        )

    def __getitem__(self, index: int) -> dict:
        from ldm_jax.data.synthetic.filaments import render_filaments

        if not 0 <= index < self._num:
            raise IndexError(index)
        p = self._prep
        raw = render_filaments(
            p.volume_size, seed=self._seed, index=index, split=self._split,
            num_filaments=p.num_filaments, width=p.filament_width, noise=p.filament_noise,
        )
        # Generated at volume_size with unit voxels: spacing / voxel_resize do not apply.
        vol, _ = preprocess(raw[..., None], p, f"filaments[{self._split}:{index}]", resample=False)
        return {"image": vol, "name": f"filaments[{self._split}:{index}]"}


class MNI152Source:
    """`num` records of the (preprocessed) MNI152 template; augmentation makes them differ."""

    def __init__(self, num: int, prep: Prep):
        if prep.channels != 1:
            raise DataError(
                f"data.source='mni152' is a 1-channel T1 template but autoencoder.in_channels="
                f"{prep.channels}; set in_channels=1."
            )
        self._num, self._prep = int(num), prep

    def __len__(self) -> int:
        return self._num

    def __repr__(self) -> str:
        return f"MNI152Source(num={self._num}, resolution={self._prep.mni152_resolution})"

    def template(self) -> np.ndarray:
        return _preprocessed_template(self._prep)[0]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._num:
            raise IndexError(index)
        vol, (lo, hi) = _preprocessed_template(self._prep)
        return {"image": vol, "name": "mni152", "fg_lo": lo, "fg_hi": hi}


_TEMPLATE_CACHE: dict = {}
_TEMPLATE_LOCK = threading.Lock()  # grain reads records from several threads


def _preprocessed_template(prep: Prep):
    """(template after preprocessing (read-only), brain bounds), once per process."""
    with _TEMPLATE_LOCK:
        return _template_locked(prep)


def _template_locked(prep: Prep):
    if prep not in _TEMPLATE_CACHE:
        from ldm_jax.data.sources.mni152 import foreground_bounds, load_template

        vol, affine, zooms = load_template(prep.mni152_resolution)
        out, _ = preprocess(vol[..., None], prep, "mni152", zooms, affine)
        bounds = foreground_bounds(out if not prep.invert else -out)
        out.setflags(write=False)
        _TEMPLATE_CACHE[prep] = (out, bounds)
    return _TEMPLATE_CACHE[prep]


def _patterns(prep: Prep) -> tuple:
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
            f"{' / '.join(_patterns(prep))} files (e.g. --config.data.train_dir=/path/to/vols), "
            f"or use data.source='synthetic_filaments' to train without a dataset."
        )
    recursive = bool(d.get("recursive", False))
    train = io.list_volume_files(train_dir, _patterns(prep), recursive)
    if d.get("val_dir"):
        val = io.list_volume_files(d.val_dir, _patterns(prep), recursive, field="data.val_dir")
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


def build_source(config, prep: Prep, split: str):
    """The train or val source for config.data.source."""
    d = config.data
    seed = int(d.get("seed", 0))
    if prep.source == "synthetic_filaments":
        num = d.num_train_volumes if split == "train" else d.num_val_volumes
        num_records_check(num, f"data.num_{split}_volumes")
        return FilamentSource(num, prep, seed, TRAIN if split == "train" else VAL)
    if prep.source in ("pointcloud", "synthetic_smlm"):
        from ldm_jax.data.sources.pointcloud import build_cloud_source
        return build_cloud_source(config, prep, split)
    if prep.source == "mni152":
        num = d.num_train_volumes if split == "train" else d.num_val_volumes
        num_records_check(num, f"data.num_{split}_volumes")
        return MNI152Source(num, prep)
    train, val = split_files(config, prep)
    paths = train if split == "train" else val
    return FileSource(scan_files(paths, prep, _split_where(config, split)), prep, split)


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
    kind = f"{prep.source} files ({', '.join(_patterns(prep))})"
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


def num_records_check(num: int, what: str) -> None:
    if num < 1:
        raise DataError(f"{what} must be at least 1, got {num}.")


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
