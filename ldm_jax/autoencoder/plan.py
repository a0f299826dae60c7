"""Print what a config does to a volume: shapes per level, activation sizes, parameters.

Why: picking downsampling factors means drawing the levels by hand; this prints
that drawing (and fails with a clear message on a config that cannot work) before anything
is compiled. The trainer prints the same table at start via `format_plan(config)`; the
command line is `ldm-jax plan` (`ldm_jax.cli.plan`).
"""

from __future__ import annotations

import math

from ldm_jax.autoencoder.config import kind_of, validate
from ldm_jax.autoencoder.geometry import (
    format_factor,
    format_step,
    level_shapes,
    smallest_volume,
    total_factor,
)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def param_counts(config) -> dict[str, int]:
    """Parameter counts of the autoencoder and the discriminator, from shapes only.

    Counts do not depend on the volume size, so the models are initialised abstractly
    (`jax.eval_shape`) on a small input that is a multiple of the total factor.
    """
    import jax
    import jax.numpy as jnp

    from ldm_jax.models import build_autoencoder, build_discriminator

    key = jax.random.key(0)
    ae = config.autoencoder
    size = smallest_volume(total_factor(ae), minimum=1)
    x = jax.ShapeDtypeStruct((1, *size, int(ae.in_channels)), jnp.float32)
    model = build_autoencoder(ae)
    ae_vars = jax.eval_shape(lambda x: model.init({"params": key, "sample": key}, x), x)
    counts = {"autoencoder": _count(ae_vars["params"])}

    disc_cfg = config.get("discriminator")
    if disc_cfg is not None:
        # The patch discriminator halves the size num_layers_d times and ends in a conv of
        # kernel_size, so it needs a few voxels more than the autoencoder does.
        need = 2 ** (int(disc_cfg.num_layers_d) + 1) * int(disc_cfg.kernel_size)
        dsize = (need,) * 3
        dx = jax.ShapeDtypeStruct((1, *dsize, int(disc_cfg.in_channels)), jnp.float32)
        disc = build_discriminator(disc_cfg)
        d_vars = jax.eval_shape(lambda x: disc.init({"params": key}, x), dx)
        counts["discriminator"] = _count(d_vars["params"])
    return counts


def format_plan(config, *, with_params: bool = True, title: str | None = None) -> str:
    """The plan table as text; raises ConfigError for an invalid config."""
    validate(config)
    if kind_of(config) == "vqvae":
        from ldm_jax.autoencoder.vq_config import format_vq_plan
        return "\n".join(([title] if title else []) + [format_vq_plan(config)])
    ae = config.autoencoder
    dtype = str(ae.get("dtype", "float32"))
    nbytes = _DTYPE_BYTES.get(dtype, 4)
    rows = level_shapes(config)
    total = total_factor(ae)
    factors = ae.get("downsample_factors")
    level_f = "2 everywhere (MONAI)" if factors is None else ", ".join(
        "/" + format_step(f) for f in factors)

    lines = []
    if title:
        lines.append(title)
    stem = format_step(ae.initial_downsample_factor)
    # The head undoes the stem: with a stem of 1 there is none (MONAI's decoder).
    head = ae.get("upsample_head", "nearest_conv") if stem != "1" else "none (stem 1)"
    lines.append(
        f"autoencoder: num_channels {tuple(ae.num_channels)}, stem /{stem}, "
        f"level factors {level_f}, upsample_head {head}, dtype {dtype}"
    )
    header = ("path", "stage", "shape (XxYxZ)", "channels", "factor",
              f"activation ({dtype}, batch 1)")
    table = [header]
    prev_path = None
    for r in rows:
        path = r["path"] if r["path"] != prev_path else ""
        prev_path = r["path"]
        act = math.prod(r["shape"]) * r["channels"] * nbytes
        table.append((path, r["name"], _shape_str(r["shape"]), str(r["channels"]),
                      format_factor(r["factor"]), human_bytes(act)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))

    latent = next(r for r in rows if r["path"] == "latent")
    in_values = math.prod(rows[0]["shape"]) * rows[0]["channels"]
    latent_values = math.prod(latent["shape"]) * latent["channels"]
    lines.append(
        f"total downsampling factor: {format_factor(total)} "
        f"(X {total[0]}, Y {total[1]}, Z {total[2]})"
    )
    lines.append(
        f"latent: {_shape_str(latent['shape'])} x {latent['channels']} channels = "
        f"{latent_values:,} values per volume, {in_values / latent_values:,.1f} input values per "
        f"latent value\n  (sparse data such as filaments needs few per value: "
        f"benchmarks/QUALITY.md, 'Bottleneck')"
    )
    if with_params:
        try:
            counts = param_counts(config)
        except ImportError as e:  # models not installed/importable: shapes are still useful
            lines.append(f"parameters: unavailable ({e})")
        else:
            lines.append("parameters: " + ", ".join(
                f"{k} {v:,} ({human_bytes(4 * v)} float32)" for k, v in counts.items()))
    return "\n".join(lines)
