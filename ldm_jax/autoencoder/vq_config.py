"""The checks and the plan of a VQ-VAE stage-1 config (`autoencoder.kind = "vqvae"`).

The model's fields are MONAI's `VQVAE` names in `config.autoencoder.vqvae` (see
configs/default.py and docs/vqvae.md); `in_channels`, `out_channels` and `dtype` are
`config.autoencoder`'s own. `vqvae_problems(config)` returns one line per problem;
`ldm_jax.autoencoder.config.validate` raises them with every other section's.
"""

from __future__ import annotations

import math
import numbers

from ldm_jax.config import check_choice, check_pos_int, get_field, is_pos_int
from ldm_jax.errors import ConfigError

EMBEDDING_INITS = ("normal", "kaiming_uniform")
_DTYPES = ("float32", "bfloat16")  # as ldm_jax.autoencoder.config.DTYPES (which imports this)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def vqvae_problems(config) -> list[str]:
    """Every problem of a VQ-VAE config's `autoencoder` section and of `data.volume_size`
    against it (the decoder must give back the input's size), one line each."""
    from ldm_jax.models.vqvae import parse_act, vqvae_shapes

    ae = get_field(config, "autoencoder")
    vq = get_field(ae, "vqvae")
    if vq is None:
        return ["autoencoder.kind='vqvae' needs the autoencoder.vqvae section (MONAI "
                "VQVAE fields); start from configs/vqvae_4x.py or configs/default.py"]
    problems: list[str] = []
    for key in ("in_channels", "out_channels"):
        check_pos_int(problems, get_field(ae, key), f"autoencoder.{key}")
    check_choice(problems, get_field(ae, "dtype", "float32"), "autoencoder.dtype", _DTYPES)
    channels = get_field(vq, "channels")
    if not (isinstance(channels, (list, tuple)) and channels
            and all(is_pos_int(c) for c in channels)):
        problems.append("autoencoder.vqvae.channels must be a non-empty sequence of positive "
                        f"ints, one per level, like (64, 128); got {channels!r}")
        channels = None
    for key in ("num_res_layers", "num_embeddings", "embedding_dim", "restart_every"):
        check_pos_int(problems, get_field(vq, key), f"autoencoder.vqvae.{key}")
    rc = get_field(vq, "num_res_channels")
    if channels and not (is_pos_int(rc) or (
            isinstance(rc, (list, tuple)) and len(rc) == len(channels)
            and all(is_pos_int(c) for c in rc))):
        problems.append("autoencoder.vqvae.num_res_channels must be a positive int or one per "
                        f"level of channels {tuple(channels)}; got {rc!r}")
    check_choice(problems, get_field(vq, "embedding_init", "normal"),
                 "autoencoder.vqvae.embedding_init", EMBEDDING_INITS)
    ranges = {"commitment_cost": (0.0, None, ">= 0"), "decay": (0.0, 1.0, "in [0, 1)"),
              "epsilon": (None, None, "> 0"), "dropout": (0.0, 1.0, "in [0, 1)"),
              "restart_threshold": (0.0, None, ">= 0 (0 turns restarts off)")}
    for key, (lo, hi, says) in ranges.items():
        v = get_field(vq, key, 0.0 if key == "dropout" else None)
        ok = _real(v) and (v > 0 if key == "epsilon" else
                           (lo is None or v >= lo) and (hi is None or v < hi))
        if not ok:
            problems.append(f"autoencoder.vqvae.{key} must be a number {says}; got {v!r}")
    for key in ("act", "output_act"):
        try:
            parse_act(get_field(vq, key))
        except ConfigError as e:
            problems.append(f"autoencoder.vqvae.{key}: {e}")
    if problems or channels is None:
        return problems
    model = _model(config)
    try:
        model.lever_layout()
    except ConfigError as e:
        return [f"autoencoder.{e}"]
    size = tuple(get_field(get_field(config, "data"), "volume_size") or ())
    try:
        levels, out = vqvae_shapes(model, size)
    except ConfigError as e:
        return [f"autoencoder.vqvae: {e}"]
    if len(size) != 3 or not all(is_pos_int(s) for s in size):
        problems.append("data.volume_size must be 3 positive ints (X, Y, Z) in the file's "
                        f"axis order, like (64, 64, 32); got {size!r}")
    else:
        if min(min(s) for s in levels) < 1 or tuple(out) != size:
            problems.append(
                f"data.volume_size {size} does not come back whole through the VQ-VAE: its "
                f"encoder levels give {' -> '.join('x'.join(map(str, s)) for s in levels)} "
                f"and its decoder {'x'.join(map(str, out))} (with MONAI's rows, stride 2, "
                f"kernel 4, padding 1, every axis must divide by the total factor "
                f"{_factor_text(total(model))}; an initial_downsample_factor needs an "
                "upsample_head 'nearest_conv' or 'subpixel' unless the last "
                "upsample_parameters row undoes it); change volume_size or autoencoder.vqvae's "
                "downsample_parameters / upsample_parameters / memory levers.")
    return problems


def _factor_text(f) -> str:
    """4 for (4, 4, 4), 4x4x2 otherwise."""
    return str(f[0]) if len(set(f)) == 1 else "x".join(map(str, f))


def _model(config):
    from ldm_jax.models.vqvae import build_vqvae
    return build_vqvae(config.autoencoder)


def total(model) -> tuple[int, int, int]:
    """The VQ-VAE's total downsampling factor per axis: the product of its strides (the
    rows' or the memory levers')."""
    strides = model.lever_layout()[0]
    return tuple(math.prod(s[a] for s in strides) for a in range(3))


def format_vq_plan(config) -> str:
    """What the trainer prints at start for a VQ-VAE: levels, latent, codebook, restarts,
    parameters (counted from shapes)."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models.vqvae import vqvae_shapes

    ae, vq = config.autoencoder, config.autoencoder.vqvae
    model = _model(config)
    size = tuple(int(v) for v in config.data.volume_size)
    levels, _ = vqvae_shapes(model, size)
    latent = levels[-1]
    levers = []
    if vq.get("initial_downsample_factor", None) is not None:
        levers.append(f"first conv /{vq.initial_downsample_factor}")
    if vq.get("downsample_factors", None) is not None:
        levers.append(f"level factors {tuple(vq.downsample_factors)}")
    if vq.get("upsample_head", "deconv") != "deconv":
        levers.append(f"{vq.upsample_head} head")
    key = jax.random.key(0)
    x = jax.ShapeDtypeStruct((1, *size, int(ae.in_channels)), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init({"params": key}, x), x)
    n_params = sum(math.prod(v.shape) for v in jax.tree.leaves(shapes["params"]))
    thr = float(vq.restart_threshold)
    restarts = (f"dead-code restarts every {int(vq.restart_every)} step(s) below EMA cluster "
                f"size {thr:g}" if thr > 0 else "no dead-code restarts (MONAI)")
    return "\n".join([
        f"autoencoder: VQ-VAE (MONAI VQVAE), channels {tuple(vq.channels)}, "
        f"{int(vq.num_res_layers)} residual layer(s) per level, dtype {ae.dtype}"
        + (f"; memory levers: {', '.join(levers)}" if levers else ""),
        "  shapes: " + " -> ".join("x".join(map(str, s)) for s in [size, *levels]),
        f"latent: {'x'.join(map(str, latent))} x {int(vq.embedding_dim)} channels (continuous, "
        f"quantised to one of {int(vq.num_embeddings)} codes per latent voxel), total "
        f"factor {_factor_text(total(model))}",
        f"codebook: {int(vq.num_embeddings)} x {int(vq.embedding_dim)}, EMA decay "
        f"{float(vq.decay):g}, commitment cost {float(vq.commitment_cost):g}; {restarts}",
        f"parameters: autoencoder {n_params:,}",
    ])


def vq_call_bytes(model, window, op: str, batch: int = 1) -> int:
    """Estimated peak bytes of one inference call of the VQ-VAE `model` (a `VQVAE`) on
    `batch` windows of `window` input voxels (multiples of `total(model)`), op "encode" or
    "decode" (a decode call takes the window's latent and quantises it): as
    `ldm_jax.autoencoder.memory.call_bytes` counts the KL autoencoder's,
    ACTIVATION_COPIES float32 copies of the largest activation (each level's conv and
    residual channels on its grid, the input or output volume), plus for a decode the
    quantiser's latent-voxels x codes float32 distances (three copies)."""
    from ldm_jax.autoencoder.memory import ACTIVATION_COPIES

    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode'; got {op!r}")
    window = tuple(int(w) for w in window)
    io = int(model.in_channels if op == "encode" else model.out_channels)
    elements, cum = [math.prod(window) * io], (1, 1, 1)
    for s, c, rc in zip(model.lever_layout()[0], model.channels, model.res_channels):
        cum = tuple(a * b for a, b in zip(cum, s))
        elements.append(math.prod(max(w // f, 1) for w, f in zip(window, cum))
                        * max(int(c), int(rc)))
    latent_voxels = math.prod(max(w // f, 1) for w, f in zip(window, cum))
    quantiser = 3 * latent_voxels * int(model.num_embeddings) * 4 if op == "decode" else 0
    return int(batch) * (ACTIVATION_COPIES * max(elements) * 4 + quantiser)
