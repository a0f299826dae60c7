"""Write a PNG of what the model will see: a few samples, each as three orthogonal
mid-slices and a maximum-intensity projection, labelled.

  ldm-jax preview --config configs/balanced.py --output preview.png
  ldm-jax preview --config configs/balanced.py --config.data.source=mni152
  ldm-jax preview --config configs/balanced.py --split=val \\
      --config.data.source=nifti --config.data.train_dir=/data/vols

Rows are samples (named by file or synthetic index); columns are the XY slice at mid Z,
the XZ slice at mid Y, the YZ slice at mid X (X down the rows) and the maximum over Z,
each enlarged to at least 128 pixels. Grey levels span data.b_min..data.b_max (stated
in the title).
"""

from __future__ import annotations


def sample_volumes(config, split: str, num: int, seed: int = 0) -> tuple:
    """(volumes, names): `num` (X, Y, Z, C) volumes exactly as the training (augmented)
    or eval loader gives them, and their names ("train sample i" for augmented crops)."""
    from ldm_jax.data.pipeline import make_eval_batches, make_train_loader

    if split == "train":
        it = iter(make_train_loader(config, batch_size=1, seed=seed, process_index=0,
                                    process_count=1))
        try:
            vols = [next(it)["image"][0] for _ in range(num)]
        finally:
            it.close()
        return vols, [f"train sample {i}" for i in range(len(vols))]
    vols, names = [], []
    for batch in make_eval_batches(config, batch_size=1):
        vols.append(batch["image"][0])
        names.append(str(batch["name"][0]))
        if len(vols) == num:
            break
    return vols, names


def _body(fv):
    from ldm_jax import cli, visualize
    from ldm_jax import data as data_lib
    cli.check_range("num_samples", fv.num_samples, 1)
    cfg = fv.config
    data_lib.check_data_config(cfg.data)
    vols, names = sample_volumes(cfg, fv.split, fv.num_samples, fv.seed)
    lo, hi = sorted((float(cfg.data.b_min), float(cfg.data.b_max)))
    title = (f"{fv.split} samples of data.source={cfg.data.source!r}; grey {lo:g} (black) to "
             f"{hi:g} (white)")
    visualize.samples_image(vols, names, (lo, hi), title).save(fv.output)
    print(data_lib.describe(cfg))
    print(
        f"Wrote {fv.output}: {len(vols)} {fv.split} sample(s) from data.source="
        f"{cfg.data.source!r}, each {vols[0].shape} (X, Y, Z, C), values "
        f"{min(float(v.min()) for v in vols):.3f}..{max(float(v.max()) for v in vols):.3f}."
    )


def _define(fv):
    from absl import flags

    from ldm_jax import cli

    cli.define_output_flag(fv, "Where to write the PNG.", default="preview.png")
    flags.DEFINE_integer("num_samples", 3, "Number of samples (rows).", flag_values=fv)
    flags.DEFINE_enum("split", "train", ["train", "val"], "Augmented training samples or "
                      "validation crops.", flag_values=fv)
    cli.define_seed_flag(fv, "Shuffle/augmentation seed for training samples.")


def main(argv=None) -> int:
    from ldm_jax import cli

    return cli.run("ldm-jax preview", __doc__, _define, _body, argv, config="required")
