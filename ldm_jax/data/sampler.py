"""A grain sampler for data-parallel training on any number of processes.

One shuffled stream of records (a new permutation every epoch, forever) is cut into
global batches of `batch_size * process_count` records; process `i` reads positions
`[i * batch_size, (i + 1) * batch_size)` of every global batch. So the processes read
disjoint halves (thirds, ...) of each global batch, and the global batches - which
records, in which order, with which augmentation (the per-record rng follows the global
position) - are the same for 1 process with 4 devices as for 2 processes with 2 devices
each: training does not depend on how the devices are spread over hosts.

(grain's own `IndexSampler` with `ShardOptions` gives each process a contiguous block of
the records instead: the batches then depend on the process count.)
"""

from __future__ import annotations

import sys

import grain.python as gp
import numpy as np

from ldm_jax.errors import DataError


class GlobalBatchSampler:
    """grain sampler (`sampler[index] -> RecordMetadata`) for one process's slice of the
    global batches; pass the same `gp.ShardOptions(process_index, process_count)` to the
    `gp.DataLoader`, which asks for `index = local_position * process_count +
    process_index`.

    Args:
        num_records: records in the data source (>= 1).
        batch_size: the per-process batch (>= 1).
        seed: shuffle order and augmentation, in [0, 2**32).
        process_index, process_count: this process and how many there are.
    """

    def __init__(self, num_records: int, batch_size: int, seed: int, process_index: int,
                 process_count: int):
        if num_records < 1:
            raise DataError("no training records: the data source is empty.")
        self.num_records, self.batch_size, self.seed = int(num_records), int(batch_size), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self._keys = gp.MapDataset.range(self.num_records).shuffle(seed=self.seed)

    def global_position(self, index: int) -> int:
        """Position in the global stream of the DataLoader's sampler `index`."""
        pc, b = self.process_count, self.batch_size
        if index % pc != self.process_index:
            raise ValueError(f"sampler index {index} does not belong to process "
                             f"{self.process_index} of {pc}: give the DataLoader the same "
                             "ShardOptions as the sampler.")
        local = index // pc
        return (local // b) * b * pc + self.process_index * b + local % b

    def __getitem__(self, index: int) -> gp.RecordMetadata:
        if index < 0:
            raise IndexError(f"sampler index {index} < 0")
        g = self.global_position(index)
        rng = np.random.Generator(np.random.Philox(key=self.seed + g))
        return gp.RecordMetadata(index=index, record_key=int(self._keys[g]), rng=rng)

    def __len__(self) -> int:
        return sys.maxsize  # forever

    def __repr__(self) -> str:  # grain compares it when restoring an iterator state
        return (f"GlobalBatchSampler(num_records={self.num_records}, batch_size="
                f"{self.batch_size}, seed={self.seed}, process={self.process_index}/"
                f"{self.process_count})")


def make_loader(source, operations, *, batch_size: int, seed: int, process_index: int,
                process_count: int, worker_count: int = 0, read_options=None) -> gp.DataLoader:
    """A `gp.DataLoader` over `source` reading this process's slice of every global batch
    (see `GlobalBatchSampler`); `operations` come before batching to `batch_size`."""
    shard = gp.ShardOptions(shard_index=int(process_index), shard_count=int(process_count),
                            drop_remainder=False)
    sampler = GlobalBatchSampler(len(source), batch_size, seed, process_index, process_count)
    return gp.DataLoader(
        data_source=source, sampler=sampler, read_options=read_options,
        operations=[*operations, gp.Batch(int(batch_size), drop_remainder=True)],
        worker_count=int(worker_count), shard_options=shard)
