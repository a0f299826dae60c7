"""The public data API: training loader (grain), evaluation batches, whole-volume loading.

Training: grain DataLoader over a random-access source, an IndexSampler that shuffles
with a new permutation every epoch and repeats forever, sharded by process (each process
reads its own slice of every global batch: `ldm_jax.data.sampler`, so the global batches
do not depend on the process count), random augmentation with grain's per-record rng
(deterministic in the seed and the record's position in the global stream), then
batching to the per-process batch. The iterator
(BatchIterator, a thin wrapper of grain's DataLoaderIterator) has get_state()/set_state()
and works with orbax via `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`
(same classes as grain.python.PyGrainCheckpointSave / Restore): resume is exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import grain.python as gp
import numpy as np

from ldm_jax.data import io, sources
from ldm_jax.data.sampler import make_loader
from ldm_jax.data.transforms import Prep, crop_or_pad, flip_rot, preprocess
from ldm_jax.errors import DataError


class DropBadFiles(gp.FilterTransform):
    """grain filter: drop records of files skipped at read time (data.skip_bad_files)."""

    def filter(self, element) -> bool:
        return "image" in element


class Augment(gp.RandomMapTransform):
    """grain random map: random crop (or MNI152 affine crop), flips, rot90 -> {"image",
    "name"} (the record's file or synthetic name, so a batch can be traced to its files)."""

    def __init__(self, prep: Prep):
        self.prep = prep

    def random_map(self, element, rng: np.random.Generator):
        p = self.prep
        vol = element["image"]
        if p.source == "mni152":
            vol = _mni_sample(vol, p, rng, (element["fg_lo"], element["fg_hi"]))
        else:
            vol = crop_or_pad(vol, p.volume_size, rng, p.background, element.get("name", "volume"))
        vol = flip_rot(vol, rng, p.flip_prob, p.rot90_prob)
        return {"image": np.ascontiguousarray(vol, dtype=np.float32),
                "name": np.asarray(str(element.get("name", "")))}


def _mni_sample(template: np.ndarray, p: Prep, rng: np.random.Generator, bounds=None) -> np.ndarray:
    from ldm_jax.data.sources import mni152
    from ldm_jax.data.transforms import warn_once

    if any(n < s for n, s in zip(template.shape[:3], p.volume_size)):
        warn_once(
            ("pad", "mni152", template.shape, p.volume_size),
            f"mni152: template shape {template.shape[:3]} (after preprocessing) is smaller than "
            f"data.volume_size {p.volume_size} on some axes; outside the brain is padded with "
            f"{p.background}. Lower volume_size or set data.mni152_resolution / voxel_resize.",
        )
    vol = mni152.random_affine_crop(
        template, p.volume_size, rng, max_rotation_deg=p.mni152_rotation,
        max_scale=p.mni152_scale, pad_value=p.background, centre_bounds=bounds,
    )
    return mni152.intensity_jitter(vol, rng, p.mni152_intensity_jitter, p.background, p.foreground)


class BatchIterator:
    """grain's DataLoaderIterator, yielding plain numpy arrays.

    With worker processes grain hands out SharedMemoryArray batches whose shared memory
    lives until they are garbage collected (and warns about leaks at exit when a caller
    keeps one); a copy gives the trainer ordinary arrays.
    get_state / set_state / start_prefetch (what grain's orbax handler calls) and
    everything else delegate to the grain iterator.
    """

    def __init__(self, grain_iterator):
        self.grain_iterator = grain_iterator

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict:
        batch = next(self.grain_iterator)
        return {k: np.array(v, copy=not type(v) is np.ndarray) for k, v in batch.items()}

    def get_state(self) -> bytes:
        return self.grain_iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self.grain_iterator.set_state(state)

    def start_prefetch(self) -> None:
        self.grain_iterator.start_prefetch()

    def close(self) -> None:
        """Stop worker processes / read-ahead threads now (else when garbage collected)."""
        inner = getattr(self.grain_iterator, "_iterator", None)  # grain's DatasetIterator
        if inner is not None and hasattr(inner, "close"):
            inner.close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        if name == "grain_iterator":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.grain_iterator, name)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker pool reads absl flags; outside absl.app.run (tests, notebooks) they
    are unparsed and grain would raise UnparsedFlagAccessError. Marking them parsed keeps
    every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainLoader:
    """Infinite, per-epoch reshuffled training batches: this process's slice of every
    global batch (`ldm_jax.data.sampler.GlobalBatchSampler`).

    `iter(loader)` returns a BatchIterator (grain's DataLoaderIterator yielding plain numpy)
    of {"image": float32 (batch, X, Y, Z, C), "name": str (batch,) file or synthetic
    names}; it has get_state()/set_state() and works with
    `grain.python.PyGrainCheckpointSave(it)` / `PyGrainCheckpointRestore(it)` in an orbax
    Composite. A restored state must come from a loader with the same data, seed,
    process index/count and data.num_workers (grain checks this).
    """

    def __init__(self, data_loader, source, batch_size: int, shard_index: int, shard_count: int):
        self.data_loader = data_loader
        self.source = source
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.shard_count = shard_count

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(iter(self.data_loader))

    def __repr__(self) -> str:
        return (
            f"TrainLoader({self.source!r}, batch_size={self.batch_size}, "
            f"process={self.shard_index}/{self.shard_count})"
        )


def _process_index_count(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return process_index, process_count


def make_train_loader(config, *, batch_size: int, seed: int, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> TrainLoader:
    """Training batches for this process; batch_size is the per-process batch.

    process_index / process_count default to jax.process_index() / jax.process_count();
    pass them to simulate several hosts. `seed` sets the shuffle order and augmentation;
    config.data.seed sets which synthetic volumes exist and the train/val file split.
    """
    prep = Prep.from_config(config)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in [0, 2**32) for grain, got {seed}.")
    pi, pc = _process_index_count(process_index, process_count)
    source = sources.build_source(config, prep, "train")
    workers = int(config.data.get("num_workers", 0))
    if workers < 0:
        raise DataError(f"data.num_workers must be >= 0, got {workers}.")
    if workers > 0:
        _ensure_absl_flags_parsed()
    # grain's default read-ahead (500 records, 16 threads) would hold gigabytes of volumes.
    threads = max(1, int(config.data.get("read_threads", 2)))
    read_options = gp.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(2 * int(batch_size), threads)
    )
    loader = make_loader(source, [DropBadFiles(), Augment(prep)], batch_size=int(batch_size),
                         seed=seed, process_index=pi, process_count=pc, worker_count=workers,
                         read_options=read_options)
    return TrainLoader(loader, source, int(batch_size), pi, pc)


class EvalBatches:
    """Deterministic validation batches {"image": float32 (batch, X, Y, Z, C), "name"},
    re-iterable.

    Centre crops (pad when smaller), no augmentation. Volumes are read lazily on every
    pass (a big validation set never sits in memory). The last batch is filled up by
    wrapping around to the first volumes, so every batch has `batch_size` (fixed shapes for
    jit); `num_volumes` tells how many distinct volumes there are. Files skipped at read
    time (data.skip_bad_files) shorten the pass.
    """

    def __init__(self, source, prep: Prep, batch_size: int, seed: int):
        self.source, self.prep, self.batch_size, self.seed = source, prep, int(batch_size), seed
        self.num_volumes = len(source)

    def __len__(self) -> int:
        return math.ceil(self.num_volumes / self.batch_size)

    def volume(self, index: int) -> Optional[np.ndarray]:
        """Validation volume `index` (volume_size crop), or None if skipped as unreadable."""
        named = self._named(index)
        return None if named is None else named[0]

    def _named(self, index: int):
        """(volume, name) of validation volume `index`, or None if skipped."""
        p = self.prep
        rec = self.source[index]
        if "image" not in rec:
            return None
        vol, name = rec["image"], str(rec["name"])
        if p.source == "mni152" and index > 0:
            # One template: validation volumes 1.. are fixed augmentations (0 is the plain crop).
            rng = np.random.default_rng([self.seed, sources.VAL, index])
            return _mni_sample(vol, p, rng, (rec["fg_lo"], rec["fg_hi"])), f"{name}[{index}]"
        return np.ascontiguousarray(crop_or_pad(vol, p.volume_size, None, p.background,
                                                name)), name

    def __iter__(self):
        """Batches {"image": float32 (batch, X, Y, Z, C), "name": str (batch,)}: a file's
        path, or a synthetic volume's name such as "filaments[1:0]"."""
        first, pending = [], []

        def batch(items):
            return {"image": np.stack([v for v, _ in items]).astype(np.float32, copy=False),
                    "name": np.array([n for _, n in items])}

        for i in range(self.num_volumes):
            item = self._named(i)
            if item is None:
                continue
            if len(first) < self.batch_size:
                first.append(item)
            pending.append(item)
            if len(pending) == self.batch_size:
                yield batch(pending)
                pending = []
        if pending:
            k = 0
            while len(pending) < self.batch_size:
                pending.append(first[k % len(first)])
                k += 1
            yield batch(pending)


def make_eval_batches(config, *, batch_size: int) -> EvalBatches:
    """Deterministic validation batches (see EvalBatches); synthetic sources use
    config.data.num_val_volumes volumes that never occur in training."""
    prep = Prep.from_config(config)
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    source = sources.build_source(config, prep, "val")
    return EvalBatches(source, prep, batch_size, int(config.data.get("seed", 0)))


def load_volume(path: str, config, frame="config"):
    """One whole file -> ((X, Y, Z, C) float32, 4x4 affine of that grid), no cropping.

    Same deterministic preprocessing as validation (resampling, resize, window,
    inversion); the affine follows resampling so latents can be placed in scanner space.
    `frame`: "config" (config.data.frame), a frame index of a 4D file, or None (all
    frames as channels). Errors are raised even with data.skip_bad_files (the caller
    asked for this file).
    """
    prep = Prep.from_config(config)
    if not (isinstance(frame, str) and frame == "config"):
        prep = dataclasses.replace(prep, frame=None if frame is None else int(frame))
    info = io.read_header(str(path))
    io.check_dtype(info)
    arr = io.read_array(info, prep.frame, prep.channels)
    return preprocess(arr, prep, info.path, info.zooms, info.affine)


def list_volume_files(dir_or_glob: str, patterns=None, recursive: bool = False,
                      option=None, field: str = "data.train_dir") -> list:
    """Sorted .nii/.nii.gz/.npy paths in a directory, a glob, or a single file; `option`
    names the flag the path came from in errors (e.g. "--input"), else `field` the config
    field (see `io.list_volume_files`)."""
    return io.list_volume_files(dir_or_glob, patterns, recursive, option, field)
