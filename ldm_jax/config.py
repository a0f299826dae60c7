"""Config helpers: normalise factors, validate a whole config, derive shapes per level.

Why: every module (model, data, trainer, plan) needs the same answer to "what does this
config do to a volume", and a bad config should fail before anything is compiled, with a
message that says what is wrong and how to fix it.
"""

from __future__ import annotations

import numbers
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message says what, what is expected and how to fix it."""


def _is_pos_int(v: Any) -> bool:
    # bool is an int subclass; True as a factor is almost surely a mistake.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) > 0


def as_triple(f: Any, name: str = "factor") -> tuple[int, int, int]:
    """Normalise a factor given as a positive int or a 3-sequence of positive ints."""
    if _is_pos_int(f):
        return (int(f),) * 3
    if isinstance(f, (list, tuple)) and len(f) == 3 and all(_is_pos_int(v) for v in f):
        return tuple(int(v) for v in f)  # type: ignore[return-value]
    raise ConfigError(
        f"{name} must be a positive int or a 3-tuple of positive ints like (2, 2, 1), "
        f"got {f!r}"
    )


# ----------------------------------------------------------------------------------------
# Small helpers.

_AXES = ("X", "Y", "Z")
UPSAMPLE_HEADS = ("nearest_conv", "subpixel")
DTYPES = ("float32", "bfloat16")
REMAT_MODES = ("none", "res_blocks", "levels")
DISC_NORMS = ("batch", "instance")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Field of a ConfigDict or a plain dict, `default` when absent (partial test configs)."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _prod3(triples) -> tuple[int, int, int]:
    out = [1, 1, 1]
    for t in triples:
        for a in range(3):
            out[a] *= t[a]
    return tuple(out)  # type: ignore[return-value]


def format_factor(triple) -> str:
    """'16x' when isotropic, '(8, 8, 4)' when not."""
    t = as_triple(triple)
    if t[0] == t[1] == t[2]:
        return f"{t[0]}x"
    return f"({t[0]}, {t[1]}, {t[2]})"


def _step(triple) -> str:
    """'2' when isotropic, '(2, 2, 1)' when not: for '/2' and 'x(2, 2, 1)' in shape tables."""
    t = as_triple(triple)
    return str(t[0]) if t[0] == t[1] == t[2] else f"({t[0]}, {t[1]}, {t[2]})"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _num_levels(ae_cfg) -> int:
    channels = _get(ae_cfg, "num_channels")
    if not isinstance(channels, (list, tuple)) or len(channels) == 0:
        raise ConfigError(
            "autoencoder.num_channels must be a non-empty sequence of positive ints, one per "
            f"level, like (32, 64, 64); got {channels!r}"
        )
    return len(channels)


# ----------------------------------------------------------------------------------------
# Factors.


def level_factors(ae_cfg) -> list[tuple[int, int, int]]:
    """Downsampling factor of each level transition (len(num_channels) - 1 of them)."""
    n = _num_levels(ae_cfg)
    factors = _get(ae_cfg, "downsample_factors")
    if factors is None:
        return [(2, 2, 2)] * (n - 1)
    if not isinstance(factors, (list, tuple)):
        raise ConfigError(
            "autoencoder.downsample_factors must be None (2 everywhere) or a sequence with one "
            f"factor per level transition, like (4, 2); got {factors!r}"
        )
    if len(factors) != n - 1:
        raise ConfigError(
            f"autoencoder.downsample_factors has {len(factors)} entries but {n - 1} are expected: "
            f"one per transition between the {n} levels of autoencoder.num_channels="
            f"{tuple(_get(ae_cfg, 'num_channels'))}; got {tuple(factors)!r}"
        )
    return [as_triple(f, f"autoencoder.downsample_factors[{i}]") for i, f in enumerate(factors)]


def initial_factor(ae_cfg) -> tuple[int, int, int]:
    """Downsampling done by the first (stem) convolution."""
    return as_triple(
        _get(ae_cfg, "initial_downsample_factor", 1), "autoencoder.initial_downsample_factor"
    )


def total_factor(ae_cfg) -> tuple[int, int, int]:
    """Per-axis input/latent size ratio: stem factor times every level factor."""
    return _prod3([initial_factor(ae_cfg)] + level_factors(ae_cfg))


# ----------------------------------------------------------------------------------------
# Validation.


def smallest_volume(total, minimum: int = 32) -> tuple[int, int, int]:
    """Smallest volume (voxels per axis) of at least `minimum` voxels that the per-axis
    total factor `total` divides: (32, 32, 32) for 16x; (64, 64, 64) for 64x. Used for
    shape-only inits (params do not depend on the volume) and the quick-run hints."""
    return tuple(-(-max(int(minimum), f) // f) * f for f in as_triple(total))


def _check_choice(problems, value, name, choices):
    if value not in choices:
        problems.append(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )


def _check_pos_int(problems, value, name, allow_none=False):
    if allow_none and value is None:
        return
    if not _is_pos_int(value):
        problems.append(f"{name} must be a positive int; got {value!r}")


def _nearest_sizes(size: int, factor: int) -> str:
    below = (size // factor) * factor
    above = below + factor
    if below > 0:
        return f"nearest valid sizes: {below} or {above}"
    return f"nearest valid size: {above}"


def _autoencoder_problems(ae) -> list[str]:
    problems: list[str] = []
    if ae is None:
        return ["config.autoencoder is missing; start from configs/default.py"]
    channels = _get(ae, "num_channels")
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) == 0
        or not all(_is_pos_int(c) for c in channels)
    ):
        problems.append(
            "autoencoder.num_channels must be a non-empty sequence of positive ints, one per "
            f"level, like (32, 64, 64); got {channels!r}"
        )
        channels = None
    n = len(channels) if channels else None

    try:
        initial_factor(ae)
    except ConfigError as e:
        problems.append(str(e))
    if n is not None:
        factors = _get(ae, "downsample_factors")
        if factors is not None and not isinstance(factors, (list, tuple)):
            problems.append(
                "autoencoder.downsample_factors must be None (2 everywhere) or a sequence with "
                f"one factor per level transition, like (4, 2); got {factors!r}"
            )
        elif factors is not None:
            if len(factors) != n - 1:
                problems.append(
                    f"autoencoder.downsample_factors has {len(factors)} entries but {n - 1} "
                    f"{'is' if n - 1 == 1 else 'are'} expected: one per transition between the "
                    f"{n} levels of autoencoder.num_channels={tuple(channels)}; got "
                    f"{tuple(factors)!r}"
                )
            for i, f in enumerate(factors):
                try:
                    as_triple(f, f"autoencoder.downsample_factors[{i}]")
                except ConfigError as e:
                    problems.append(str(e))

    groups = _get(ae, "norm_num_groups")
    if not _is_pos_int(groups):
        problems.append(f"autoencoder.norm_num_groups must be a positive int; got {groups!r}")
    elif channels:
        from math import gcd
        from functools import reduce

        common = reduce(gcd, channels)
        valid = ", ".join(str(d) for d in _divisors(common))
        bad = [f"level {i} ({c})" for i, c in enumerate(channels) if c % groups]
        if bad:
            problems.append(
                f"autoencoder.norm_num_groups = {groups} does not divide the channels of "
                f"{', '.join(bad)} in autoencoder.num_channels (GroupNorm needs whole groups "
                f"of channels); group counts that divide every level's channels "
                f"{tuple(channels)}: {valid}"
            )

    for key in ("in_channels", "out_channels", "latent_channels"):
        _check_pos_int(problems, _get(ae, key), f"autoencoder.{key}")

    if n is not None:
        att = _get(ae, "attention_levels")
        if not isinstance(att, (list, tuple)) or len(att) != n:
            problems.append(
                f"autoencoder.attention_levels must have one bool per level ({n} for "
                f"num_channels={tuple(channels)}); got {att!r}"
            )
        nrb = _get(ae, "num_res_blocks", 1)
        if isinstance(nrb, (list, tuple)):
            if len(nrb) != n:
                problems.append(
                    f"autoencoder.num_res_blocks must be an int or have one entry per level "
                    f"({n} for num_channels={tuple(channels)}); got {tuple(nrb)!r}"
                )
            elif not all(_is_pos_int(b) for b in nrb):
                problems.append(
                    f"autoencoder.num_res_blocks entries must be positive ints; got {tuple(nrb)!r}"
                )
        else:
            _check_pos_int(problems, nrb, "autoencoder.num_res_blocks")

    _check_choice(problems, _get(ae, "upsample_head", "nearest_conv"),
                  "autoencoder.upsample_head", UPSAMPLE_HEADS)
    _check_choice(problems, _get(ae, "dtype", "float32"), "autoencoder.dtype", DTYPES)
    _check_choice(problems, _get(ae, "remat", "none"), "autoencoder.remat", REMAT_MODES)
    _check_pos_int(problems, _get(ae, "strided_kernel"), "autoencoder.strided_kernel",
                   allow_none=True)
    return problems


def _volume_problems(config) -> list[str]:
    data = _get(config, "data")
    size = _get(data, "volume_size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(_is_pos_int(s) for s in size)
    ):
        return [
            "data.volume_size must be 3 positive ints (X, Y, Z) in the file's axis order, "
            f"like (256, 256, 64); got {size!r}"
        ]
    try:
        total = total_factor(config.autoencoder)
    except ConfigError:  # already reported by the autoencoder checks
        return []
    problems = []
    for a in range(3):
        if size[a] % total[a]:
            problems.append(
                f"data.volume_size[{a}] ({_AXES[a]}) = {size[a]} is not divisible by the total "
                f"downsampling factor {total[a]} on that axis (initial_downsample_factor x "
                f"downsample_factors = {format_factor(total)}); "
                f"{_nearest_sizes(size[a], total[a])}. Change volume_size or the factors."
            )
    return problems


def _other_problems(config) -> list[str]:
    problems: list[str] = []
    disc = _get(config, "discriminator")
    if disc is not None:
        _check_choice(problems, _get(disc, "norm", "batch"), "discriminator.norm", DISC_NORMS)
        _check_choice(problems, _get(disc, "dtype", "float32"), "discriminator.dtype", DTYPES)
        for key in ("in_channels", "out_channels", "num_layers_d", "num_channels",
                    "kernel_size"):
            if _get(disc, key) is not None:
                _check_pos_int(problems, _get(disc, key), f"discriminator.{key}")
    mesh = _get(config, "mesh")
    if mesh is not None:
        for key in ("data", "spatial"):
            v = _get(mesh, key, 1)
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and (
                v == -1 or v > 0)
            if not ok:
                problems.append(
                    f"mesh.{key} must be a positive int (devices on that axis) or -1 (all "
                    f"remaining devices); got {v!r}"
                )
        if _get(mesh, "data", 1) == -1 and _get(mesh, "spatial", 1) == -1:
            problems.append("only one of mesh.data and mesh.spatial may be -1")
    train = _get(config, "train")
    if train is not None and _get(train, "remat") is not None:
        _check_choice(problems, _get(train, "remat"), "train.remat", REMAT_MODES)
    return problems


def _raise(problems: list[str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(problems[0])
    raise ConfigError(
        f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def _validate_shapes(config) -> None:
    ae_problems = _autoencoder_problems(_get(config, "autoencoder"))
    _raise(ae_problems + _volume_problems(config))


def validate(config) -> None:
    """Raise ConfigError listing every problem found in every section; None when valid.

    Sections whose rules live with the code that uses them are asked for their problems
    (`ldm_jax.optim.train_problems`, `ldm_jax.autoencoder.losses.loss_problems`); they are
    imported here, at call time, so this module stays importable by everything.
    """
    from ldm_jax.optim import train_problems

    problems = []
    if _get(config, "autoencoder") is not None:
        problems += _autoencoder_problems(_get(config, "autoencoder"))
        if _get(config, "data") is not None:
            problems += _volume_problems(config)
    problems += _other_problems(config)
    if _get(config, "train") is not None:
        problems += train_problems(config.train)
    if _get(config, "loss") is not None:
        from ldm_jax.autoencoder.losses import loss_problems
        problems += loss_problems(config.loss)
    if _get(config, "data") is not None:
        from ldm_jax.data.sources import data_problems
        problems += data_problems(config.data)
    if not problems:  # sizes are only comparable once every section is valid
        problems += _fit_problems(config)
    _raise(problems)


def _fit_problems(config) -> list[str]:
    """The training volume against the networks that see it whole: the discriminator and
    the 2.5D perceptual network (checked here, not at trace time, so nothing is built)."""
    size = tuple(_get(_get(config, "data"), "volume_size") or ())
    if len(size) != 3:
        return []
    problems = []
    disc = _get(config, "discriminator")
    if disc is not None and _get(config, "autoencoder") is not None:
        from ldm_jax.models.discriminator import size_problems
        problems += size_problems(disc, size)
    loss = _get(config, "loss")
    if loss is not None and float(_get(loss, "perceptual_weight", 0) or 0) > 0:
        from ldm_jax.autoencoder.perceptual import MIN_SLICE_SIZE
        net = _get(loss, "perceptual_net", "alexnet")
        need = MIN_SLICE_SIZE.get(net)
        if need is not None and min(size) < need:
            problems.append(
                f"data.volume_size {size} is too small for the perceptual loss: "
                f"LPIPS-{net} needs every axis >= {need}; use a larger volume_size, "
                "--config.loss.perceptual_net=vgg16 (>= 16) or "
                "--config.loss.perceptual_weight=0.")
    return problems


# ----------------------------------------------------------------------------------------
# Derived shapes.


def _div(shape, f):
    return tuple(s // g for s, g in zip(shape, f))


def level_shapes(config) -> list[dict]:
    """Shapes along the autoencoder: encoder (input, stem, levels), latent, decoder back.

    Each entry: {"path": "encoder"|"latent"|"decoder", "name", "shape": (X, Y, Z),
    "channels", "factor": per-axis downsampling relative to the input}.
    """
    _validate_shapes(config)
    ae = config.autoencoder
    channels = tuple(ae.num_channels)
    vol = tuple(int(s) for s in config.data.volume_size)
    init = initial_factor(ae)
    factors = level_factors(ae)
    out = [dict(path="encoder", name="input", shape=vol, channels=int(ae.in_channels),
                factor=(1, 1, 1))]
    cum = init
    out.append(dict(path="encoder", name=f"stem (conv /{_step(init)})",
                    shape=_div(vol, cum), channels=channels[0], factor=cum))
    level_factor = [cum]
    for i, c in enumerate(channels):
        if i > 0:
            cum = _prod3([cum, factors[i - 1]])
            level_factor.append(cum)
        down = f", then /{_step(factors[i])}" if i < len(factors) else ""
        out.append(dict(path="encoder", name=f"level {i}{down}", shape=_div(vol, cum),
                        channels=c, factor=cum))
    out.append(dict(path="latent", name="latent", shape=_div(vol, cum),
                    channels=int(ae.latent_channels), factor=cum))
    for i in reversed(range(len(channels))):
        up = f", then x{_step(factors[i - 1])}" if i > 0 else ""
        out.append(dict(path="decoder", name=f"level {i}{up}",
                        shape=_div(vol, level_factor[i]), channels=channels[i],
                        factor=level_factor[i]))
    head = _get(ae, "upsample_head", "nearest_conv")
    out_c = int(ae.out_channels)
    if init != (1, 1, 1) and head == "nearest_conv":
        # The seed's head: nearest-upsample the level-0 features, then convolve them at
        # full resolution -- usually the largest activation in the network.
        out.append(dict(path="decoder", name=f"head: nearest x{_step(init)}, conv",
                        shape=vol, channels=channels[0], factor=(1, 1, 1)))
    elif init != (1, 1, 1) and head == "subpixel":
        # Mirror of the strided stem: one conv at the coarse grid, then depth-to-space.
        out.append(dict(path="decoder", name=f"head: conv to {out_c}x{init[0] * init[1] * init[2]}"
                        f" (subpixel)", shape=_div(vol, init),
                        channels=out_c * init[0] * init[1] * init[2], factor=init))
    out.append(dict(path="decoder", name="output", shape=vol, channels=out_c,
                    factor=(1, 1, 1)))
    return out


def latent_shape(config) -> tuple[int, int, int, int]:
    """(X, Y, Z, latent_channels) of one encoded volume."""
    latent = next(e for e in level_shapes(config) if e["path"] == "latent")
    return (*latent["shape"], latent["channels"])


# ----------------------------------------------------------------------------------------
# Loading.


def missing_config_hint(path) -> str:
    """For a config file `path` that does not exist: " Did you mean F?" naming the config
    file (one with a get_config) closest by file name in the path's folder, then in
    configs/ and configs/diffusion/ (relative to the working directory); else
    " Configs in FOLDER: a.py, b.py." for the path's folder; else ""."""
    import difflib
    import re
    from pathlib import Path

    p = Path(path).expanduser()
    name = p.name if p.suffix == ".py" else p.name + ".py"

    def configs_in(folder):
        if not folder.is_dir():
            return []
        return sorted(q for q in folder.glob("*.py") if q.name != "__init__.py"
                      and re.search(r"^def get_config\(", q.read_text(errors="replace"), re.M))

    for folder in (p.parent, Path("configs"), Path("configs", "diffusion")):
        found = configs_in(folder)
        close = difflib.get_close_matches(name, [q.name for q in found], n=1, cutoff=0.6)
        if close:
            return f" Did you mean {folder / close[0]}?"
    names = configs_in(p.parent)
    return f" Configs in {p.parent}: {', '.join(q.name for q in names)}." if names else ""


def load_config(path, arg: str | None = None):
    """Load a configs/*.py file by path and return its get_config() (get_config(arg) if given).

    Config files import `configs.default`: the `configs` package must be importable
    (`pip install -e .`, or run from the repository root). Raises ConfigError for a
    missing file, an import failure or a file without get_config().
    """
    import importlib.util
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass the path of a Python file with a "
            f"get_config() function, like configs/balanced.py.{missing_config_hint(path)}"
        )
    p = p.resolve()
    name = f"_ldm_jax_config_{p.stem}_{abs(hash(str(p)))}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {str(p)!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user file: report which file failed and why
        raise ConfigError(f"could not import config file {str(p)!r}: "
                          f"{type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"config file {str(p)!r} has no get_config() function; define one that returns an "
            "ml_collections.ConfigDict (see configs/balanced.py)"
        )
    try:
        return get_config(arg) if arg is not None else get_config()
    except Exception as e:  # a user file: say which call failed and why
        call = f"get_config({arg!r})" if arg is not None else "get_config()"
        raise ConfigError(f"{call} of config file {str(p)!r} failed: "
                          f"{type(e).__name__}: {e}") from e
