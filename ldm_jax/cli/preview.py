"""Write a PNG of what the model will see: a few samples, each as three orthogonal
mid-slices and a maximum-intensity projection.

  python -m ldm_jax.preview --config configs/balanced.py --out preview.png
  python -m ldm_jax.preview --config configs/balanced.py --config.data.source=mni152
  python -m ldm_jax.preview --config configs/balanced.py --split=val \\
      --config.data.source=nifti --config.data.train_dir=/data/vols

Rows are samples; columns are the XY slice at mid Z, the XZ slice at mid Y, the YZ slice
at mid X (one panel pixel per voxel, X down the rows) and the maximum over Z. Grey levels
span data.b_min..data.b_max.
"""

from __future__ import annotations


import numpy as np  # noqa: E402

_PAD = 4  # pixels between panels
_TITLE = 14  # pixels for the header row
_COLUMNS = ("XY @ mid Z", "XZ @ mid Y", "YZ @ mid X", "max over Z")


def panels(vol: np.ndarray, lo: float, hi: float) -> list:
    """Four uint8 images of one (X, Y, Z, C) volume (first channel)."""
    v = np.asarray(vol)[..., 0]
    x, y, z = v.shape
    imgs = [v[:, :, z // 2], v[:, y // 2, :], v[x // 2, :, :], v.max(axis=2)]
    span = (hi - lo) or 1.0
    return [np.clip((i - lo) / span * 255.0, 0, 255).astype(np.uint8) for i in imgs]


def render(volumes, lo: float, hi: float, min_panel: int = 128):
    """A PIL image: one row per volume, the four views side by side on black."""
    from PIL import Image, ImageDraw

    rows = [panels(v, lo, hi) for v in volumes]
    # Small volumes are enlarged (nearest) so a 32^3 sample is still visible.
    scale = max(1, int(np.ceil(min_panel / max(rows[0][0].shape))))
    widths = [max(r[c].shape[1] for r in rows) * scale for c in range(4)]
    heights = [max(p.shape[0] for p in r) * scale for r in rows]
    canvas = Image.new("L", (sum(widths) + _PAD * 5, _TITLE + sum(heights) + _PAD * (len(rows) + 1)), 0)
    draw = ImageDraw.Draw(canvas)
    xs = np.cumsum([_PAD] + [w + _PAD for w in widths])
    for c, name in enumerate(_COLUMNS):
        draw.text((int(xs[c]), 1), name, fill=200)
    ypos = _TITLE + _PAD
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            pil = Image.fromarray(img)
            if scale > 1:
                pil = pil.resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            canvas.paste(pil, (int(xs[c]), ypos))
            # A dim frame shows the volume's extent against a black background.
            draw.rectangle(
                (int(xs[c]) - 1, ypos - 1, int(xs[c]) + pil.size[0], ypos + pil.size[1]), outline=70
            )
        ypos += heights[r] + _PAD
    return canvas


def sample_volumes(config, split: str, num: int, seed: int = 0) -> list:
    """`num` (X, Y, Z, C) volumes exactly as the training (augmented) or eval loader gives them."""
    from ldm_jax.data.pipeline import make_eval_batches, make_train_loader

    if split == "train":
        it = iter(make_train_loader(config, batch_size=1, seed=seed, process_index=0, process_count=1))
        try:
            return [next(it)["image"][0] for _ in range(num)]
        finally:
            it.close()
    out = []
    for batch in make_eval_batches(config, batch_size=1):
        out.append(batch["image"][0])
        if len(out) == num:
            break
    return out


def _body(argv):
    del argv
    from absl import flags

    cfg = flags.FLAGS.config
    f = flags.FLAGS
    vols = sample_volumes(cfg, f.split, f.num_samples, f.seed)
    lo, hi = sorted((float(cfg.data.b_min), float(cfg.data.b_max)))
    image = render(vols, lo, hi)
    image.save(f.out)
    shape = vols[0].shape
    print(
        f"Wrote {f.out}: {len(vols)} {f.split} sample(s) from data.source={cfg.data.source!r}, "
        f"each {shape} (X, Y, Z, C), values {min(float(v.min()) for v in vols):.3f}.."
        f"{max(float(v.max()) for v in vols):.3f}."
    )


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/balanced.py.", lock_config=True)
    flags.DEFINE_string("out", "preview.png", "Where to write the PNG.")
    flags.DEFINE_integer("num_samples", 3, "Number of samples (rows).")
    flags.DEFINE_enum("split", "train", ["train", "val"], "Augmented training samples or validation crops.")
    flags.DEFINE_integer("seed", 0, "Shuffle/augmentation seed for training samples.")
    flags.mark_flags_as_required(["config"])


def main(argv=None):
    from absl import app

    _define_flags()
    from ldm_jax import options
    app.run(options.run_as(options.config_command("ldm_jax.preview"), _body), argv=argv)
