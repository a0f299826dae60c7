"""The checks of a stage-1 config (autoencoder, discriminator, data, loss, train, mesh).

`validate(config)` asks each section for its problems -- geometry for the factors and the
volume size, `ldm_jax.optim` for train, `autoencoder.losses` for loss, `data.sources` for
data -- and raises one ConfigError listing all of them.
"""

from __future__ import annotations

import numbers

from ldm_jax.autoencoder.geometry import divisors, factor_problems, volume_problems
from ldm_jax.config import check_choice, check_pos_int, get_field, is_pos_int, raise_problems

UPSAMPLE_HEADS = ("nearest_conv", "subpixel")


DTYPES = ("float32", "bfloat16")


REMAT_MODES = ("none", "res_blocks", "levels")


DISC_NORMS = ("batch", "instance")


# The stage-1 models `autoencoder.kind` picks: "kl" (AutoencoderKL, the section's own
# fields), "vqvae" (MONAI's VQVAE, the fields of `autoencoder.vqvae`) and "maisi" (MAISI's
# AutoencoderKlMaisi from the section's own MONAI-named fields, `ldm_jax.models.maisi.
# finetune`). A new kind adds its name here, its checks in `validate` and its task in
# `ldm_jax.autoencoder.kinds`.
KINDS = ("kl", "vqvae", "maisi")


def kind_of(config) -> str:
    """`config.autoencoder.kind`, "kl" when the section or the field is absent (configs
    and checkpoints from before the switch)."""
    return get_field(get_field(config, "autoencoder"), "kind", "kl")


def _autoencoder_problems(ae) -> list[str]:
    if ae is None:
        return []  # geometry.factor_problems reports the missing section
    problems: list[str] = []
    channels = get_field(ae, "num_channels")
    if not (isinstance(channels, (list, tuple)) and channels
            and all(is_pos_int(c) for c in channels)):
        channels = None  # geometry.factor_problems reports it
    n = len(channels) if channels else None

    groups = get_field(ae, "norm_num_groups")
    if not is_pos_int(groups):
        problems.append(f"autoencoder.norm_num_groups must be a positive int; got {groups!r}")
    elif channels:
        from functools import reduce
        from math import gcd

        common = reduce(gcd, channels)
        valid = ", ".join(str(d) for d in divisors(common))
        bad = [f"level {i} ({c})" for i, c in enumerate(channels) if c % groups]
        if bad:
            problems.append(
                f"autoencoder.norm_num_groups = {groups} does not divide the channels of "
                f"{', '.join(bad)} in autoencoder.num_channels (GroupNorm needs whole groups "
                f"of channels); group counts that divide every level's channels "
                f"{tuple(channels)}: {valid}"
            )

    for key in ("in_channels", "out_channels", "latent_channels"):
        check_pos_int(problems, get_field(ae, key), f"autoencoder.{key}")

    if n is not None:
        att = get_field(ae, "attention_levels")
        if not isinstance(att, (list, tuple)) or len(att) != n:
            problems.append(
                f"autoencoder.attention_levels must have one bool per level ({n} for "
                f"num_channels={tuple(channels)}); got {att!r}"
            )
        nrb = get_field(ae, "num_res_blocks", 1)
        if isinstance(nrb, (list, tuple)):
            if len(nrb) != n:
                problems.append(
                    f"autoencoder.num_res_blocks must be an int or have one entry per level "
                    f"({n} for num_channels={tuple(channels)}); got {tuple(nrb)!r}"
                )
            elif not all(is_pos_int(b) for b in nrb):
                problems.append(
                    f"autoencoder.num_res_blocks entries must be positive ints; got {tuple(nrb)!r}"
                )
        else:
            check_pos_int(problems, nrb, "autoencoder.num_res_blocks")

    check_choice(problems, get_field(ae, "upsample_head", "nearest_conv"),
                  "autoencoder.upsample_head", UPSAMPLE_HEADS)
    check_choice(problems, get_field(ae, "dtype", "float32"), "autoencoder.dtype", DTYPES)
    check_choice(problems, get_field(ae, "remat", "none"), "autoencoder.remat", REMAT_MODES)
    check_pos_int(problems, get_field(ae, "strided_kernel"), "autoencoder.strided_kernel",
                   allow_none=True)
    return problems


def _other_problems(config) -> list[str]:
    problems: list[str] = []
    thr = get_field(get_field(config, "eval"), "fg_threshold", 0.1)
    if not (isinstance(thr, numbers.Real) and not isinstance(thr, bool) and 0 < thr < 1):
        problems.append(f"eval.fg_threshold must be a fraction of the output range in (0, 1), "
                        f"like 0.1; got {thr!r}")
    disc = get_field(config, "discriminator")
    if disc is not None:
        check_choice(problems, get_field(disc, "norm", "batch"), "discriminator.norm", DISC_NORMS)
        check_choice(problems, get_field(disc, "dtype", "float32"), "discriminator.dtype", DTYPES)
        for key in ("in_channels", "out_channels", "num_layers_d", "num_channels",
                    "kernel_size"):
            if get_field(disc, key) is not None:
                check_pos_int(problems, get_field(disc, key), f"discriminator.{key}")
    mesh = get_field(config, "mesh")
    if mesh is not None:
        for key in ("data", "spatial"):
            v = get_field(mesh, key, 1)
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and (
                v == -1 or v > 0)
            if not ok:
                problems.append(
                    f"mesh.{key} must be a positive int (devices on that axis) or -1 (all "
                    f"remaining devices); got {v!r}"
                )
        if get_field(mesh, "data", 1) == -1 and get_field(mesh, "spatial", 1) == -1:
            problems.append("only one of mesh.data and mesh.spatial may be -1")
    train = get_field(config, "train")
    if train is not None and get_field(train, "remat") is not None:
        check_choice(problems, get_field(train, "remat"), "train.remat", REMAT_MODES)
    return problems


def validate(config) -> None:
    """Raise ConfigError listing every problem found in every section; None when valid.

    Sections whose rules live with the code that uses them are asked for their problems
    (`ldm_jax.optim.train_problems`, `ldm_jax.autoencoder.losses.loss_problems`); they are
    imported here, at call time, so this module stays importable by everything.
    """
    from ldm_jax.optim import train_problems

    problems = []
    kind = kind_of(config)
    if kind not in KINDS:
        problems.append(
            f"autoencoder.kind={kind!r} is not a known stage-1 model; valid: "
            f"{', '.join(repr(k) for k in KINDS)} (e.g. --config.autoencoder.kind=vqvae; "
            "docs/vqvae.md)")
    elif kind == "vqvae":
        from ldm_jax.autoencoder.vq_config import vqvae_problems
        problems += vqvae_problems(config)
    elif get_field(config, "autoencoder") is not None:
        problems += factor_problems(get_field(config, "autoencoder"))
        problems += _autoencoder_problems(get_field(config, "autoencoder"))
        if get_field(config, "data") is not None:
            problems += volume_problems(config)
        if kind == "maisi":
            from ldm_jax.models.maisi.finetune import maisi_autoencoder_problems
            problems += maisi_autoencoder_problems(get_field(config, "autoencoder"))
    problems += _other_problems(config)
    if get_field(config, "train") is not None:
        problems += train_problems(config.train)
    if get_field(config, "loss") is not None:
        from ldm_jax.autoencoder.losses import loss_problems
        problems += loss_problems(config.loss)
    if get_field(config, "data") is not None:
        from ldm_jax.data.sources import data_problems
        problems += data_problems(config.data)
    if not problems:  # sizes are only comparable once every section is valid
        problems += _fit_problems(config)
    raise_problems(problems)


def _fit_problems(config) -> list[str]:
    """The training volume against the networks that see it whole: the discriminator and
    the 2.5D perceptual network (checked here, not at trace time, so nothing is built)."""
    size = tuple(get_field(get_field(config, "data"), "volume_size") or ())
    if len(size) != 3:
        return []
    problems = []
    disc = get_field(config, "discriminator")
    if disc is not None and get_field(config, "autoencoder") is not None:
        from ldm_jax.models.discriminator import size_problems
        problems += size_problems(disc, size)
    loss = get_field(config, "loss")
    if loss is not None and float(get_field(loss, "perceptual_weight", 0) or 0) > 0:
        from ldm_jax.models.lpips import MIN_SLICE_SIZE
        net = get_field(loss, "perceptual_net", "alexnet")
        need = MIN_SLICE_SIZE.get(net)
        if need is not None and min(size) < need:
            problems.append(
                f"data.volume_size {size} is too small for the perceptual loss: "
                f"LPIPS-{net} needs every axis >= {need}; use a larger volume_size, "
                "--config.loss.perceptual_net=vgg16 (>= 16) or "
                "--config.loss.perceptual_weight=0.")
    return problems


def prepare_config(config):
    """A resolved copy of a stage-1 config with `train.remat` applied to the model,
    validated (raises ConfigError)."""
    config = config.copy_and_resolve_references()
    if config.train.get("remat") is not None:
        config.autoencoder.remat = config.train.remat
    validate(config)
    return config
