"""Built-in synthetic filament volumes: volume i depends only on (data.seed, split, i)."""

from __future__ import annotations

from ldm_jax.data.transforms import Prep, preprocess
from ldm_jax.errors import DataError

# Split ids inside the synthetic generators' seed: train and validation never share a volume.
TRAIN, VAL = 0, 1


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


def num_records_check(num: int, what: str) -> None:
    if num < 1:
        raise DataError(f"{what} must be at least 1, got {num}.")
