"""What the autoencoder's factors do to a volume: per-level factors, total factor, shapes.

A factor is an int or a per-axis 3-tuple (`ldm_jax.config.as_triple`); the stem
(`initial_downsample_factor`) and each level transition (`downsample_factors`) multiply into
the total factor, the ratio of input to latent size per axis.
"""

from __future__ import annotations

from ldm_jax.config import as_triple, get_field, is_pos_int, raise_problems
from ldm_jax.errors import ConfigError

AXES = ("X", "Y", "Z")


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


def format_step(triple) -> str:
    """'2' when isotropic, '(2, 2, 1)' when not: for '/2' and 'x(2, 2, 1)' in shape tables."""
    t = as_triple(triple)
    return str(t[0]) if t[0] == t[1] == t[2] else f"({t[0]}, {t[1]}, {t[2]})"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _num_levels(ae_cfg) -> int:
    channels = get_field(ae_cfg, "num_channels")
    if not isinstance(channels, (list, tuple)) or len(channels) == 0:
        raise ConfigError(
            "autoencoder.num_channels must be a non-empty sequence of positive ints, one per "
            f"level, like (32, 64, 64); got {channels!r}"
        )
    return len(channels)


def level_factors(ae_cfg) -> list[tuple[int, int, int]]:
    """Downsampling factor of each level transition (len(num_channels) - 1 of them)."""
    n = _num_levels(ae_cfg)
    factors = get_field(ae_cfg, "downsample_factors")
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
            f"{tuple(get_field(ae_cfg, 'num_channels'))}; got {tuple(factors)!r}"
        )
    return [as_triple(f, f"autoencoder.downsample_factors[{i}]") for i, f in enumerate(factors)]


def initial_factor(ae_cfg) -> tuple[int, int, int]:
    """Downsampling done by the first (stem) convolution."""
    return as_triple(
        get_field(ae_cfg, "initial_downsample_factor", 1), "autoencoder.initial_downsample_factor"
    )


def total_factor(ae_cfg) -> tuple[int, int, int]:
    """Per-axis input/latent size ratio: stem factor times every level factor."""
    return _prod3([initial_factor(ae_cfg)] + level_factors(ae_cfg))


def smallest_volume(total, minimum: int = 32) -> tuple[int, int, int]:
    """Smallest volume (voxels per axis) of at least `minimum` voxels that the per-axis
    total factor `total` divides: (32, 32, 32) for 16x; (64, 64, 64) for 64x. Used for
    shape-only inits (params do not depend on the volume) and the quick-run hints."""
    return tuple(-(-max(int(minimum), f) // f) * f for f in as_triple(total))


def _nearest_sizes(size: int, factor: int) -> str:
    below = (size // factor) * factor
    above = below + factor
    if below > 0:
        return f"nearest valid sizes: {below} or {above}"
    return f"nearest valid size: {above}"


def factor_problems(ae) -> list[str]:
    """Problems of autoencoder.num_channels and the factors (strings, empty when valid)."""
    problems: list[str] = []
    if ae is None:
        return ["config.autoencoder is missing; start from configs/default.py"]
    channels = get_field(ae, "num_channels")
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) == 0
        or not all(is_pos_int(c) for c in channels)
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
        factors = get_field(ae, "downsample_factors")
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
    return problems


def volume_problems(config) -> list[str]:
    """Problems of data.volume_size against the total factor (strings, empty when valid)."""
    data = get_field(config, "data")
    size = get_field(data, "volume_size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(is_pos_int(s) for s in size)
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
                f"data.volume_size[{a}] ({AXES[a]}) = {size[a]} is not divisible by the total "
                f"downsampling factor {total[a]} on that axis (initial_downsample_factor x "
                f"downsample_factors = {format_factor(total)}); "
                f"{_nearest_sizes(size[a], total[a])}. Change volume_size or the factors."
            )
    return problems


def check_shapes(config) -> None:
    """Raises ConfigError listing the factor and volume-size problems of `config`."""
    raise_problems(factor_problems(get_field(config, "autoencoder")) + volume_problems(config))


def _div(shape, f):
    return tuple(s // g for s, g in zip(shape, f))


def level_shapes(config) -> list[dict]:
    """Shapes along the autoencoder: encoder (input, stem, levels), latent, decoder back.

    Each entry: {"path": "encoder"|"latent"|"decoder", "name", "shape": (X, Y, Z),
    "channels", "factor": per-axis downsampling relative to the input}.
    """
    check_shapes(config)
    ae = config.autoencoder
    channels = tuple(ae.num_channels)
    vol = tuple(int(s) for s in config.data.volume_size)
    init = initial_factor(ae)
    factors = level_factors(ae)
    out = [dict(path="encoder", name="input", shape=vol, channels=int(ae.in_channels),
                factor=(1, 1, 1))]
    cum = init
    out.append(dict(path="encoder", name=f"stem (conv /{format_step(init)})",
                    shape=_div(vol, cum), channels=channels[0], factor=cum))
    level_factor = [cum]
    for i, c in enumerate(channels):
        if i > 0:
            cum = _prod3([cum, factors[i - 1]])
            level_factor.append(cum)
        down = f", then /{format_step(factors[i])}" if i < len(factors) else ""
        out.append(dict(path="encoder", name=f"level {i}{down}", shape=_div(vol, cum),
                        channels=c, factor=cum))
    out.append(dict(path="latent", name="latent", shape=_div(vol, cum),
                    channels=int(ae.latent_channels), factor=cum))
    for i in reversed(range(len(channels))):
        up = f", then x{format_step(factors[i - 1])}" if i > 0 else ""
        out.append(dict(path="decoder", name=f"level {i}{up}",
                        shape=_div(vol, level_factor[i]), channels=channels[i],
                        factor=level_factor[i]))
    head = get_field(ae, "upsample_head", "nearest_conv")
    out_c = int(ae.out_channels)
    if init != (1, 1, 1) and head == "nearest_conv":
        # The original PyTorch project's head: nearest-upsample level 0, then convolve at
        # full resolution -- usually the largest activation in the network.
        out.append(dict(path="decoder", name=f"head: nearest x{format_step(init)}, conv",
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
