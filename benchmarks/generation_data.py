"""Write a config's built-in volumes to disk for the generation benchmark (GENERATION.md).

    python -m benchmarks.generation_data --config configs/monai_3d_ldm.py \
        --volume 32,32,32 --train 256 --val 16 --out runs/gen/data

Writes OUT/train/vNNNN.npy in the data's raw units (what `ldm-jax extract`
expects: it applies the checkpoint's intensity window itself) and OUT/val/vNNNN.npy
preprocessed as the model sees them (b_min..b_max), the held-out reference for
`ldm-jax evaluate`. Training volumes come from the training loader (random
crops and flips of data.num_train_volumes = --train procedural volumes); validation
volumes are the config's held-out centre crops, never seen in training.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation_data")
    p.add_argument("--config", required=True)
    p.add_argument("--volume", default="32,32,32")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from ldm_jax import data as data_lib
    from ldm_jax.config import load_config

    config = load_config(a.config)
    config.data.volume_size = tuple(int(v) for v in a.volume.split(","))
    config.data.num_train_volumes = a.train
    config.data.num_val_volumes = a.val
    d = config.data
    lo, hi, b_lo, b_hi = float(d.a_min), float(d.a_max), float(d.b_min), float(d.b_max)
    for split in ("train", "val"):
        os.makedirs(os.path.join(a.out, split), exist_ok=True)
    it = iter(data_lib.make_train_loader(config, batch_size=1, seed=a.seed,
                                         process_index=0, process_count=1))
    try:
        for i in range(a.train):
            v = next(it)["image"][0]
            raw = lo + (v - b_lo) / (b_hi - b_lo) * (hi - lo)  # undo the window
            np.save(os.path.join(a.out, "train", f"v{i:04d}.npy"), raw.astype(np.float32))
    finally:
        it.close()
    batches = data_lib.make_eval_batches(config, batch_size=1)
    for i, b in enumerate(batches):
        if i >= batches.num_volumes:
            break
        np.save(os.path.join(a.out, "val", f"v{i:04d}.npy"), b["image"][0].astype(np.float32))
    print(f"Wrote {a.train} training volumes (raw units) and {batches.num_volumes} held-out "
          f"volumes (preprocessed) of {config.data.volume_size} to {a.out}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
