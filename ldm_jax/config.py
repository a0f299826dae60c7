"""Config files: load one (`load_config`), and the check helpers every section's checks use.

Each stage owns the checks of its sections (`ldm_jax.autoencoder.config`,
`ldm_jax.diffusion.config`); they collect problems as strings and raise them together with
`raise_problems`, so a bad config fails before anything is compiled, with every problem
listed.
"""

from __future__ import annotations

import numbers
from typing import Any

from ldm_jax.errors import ConfigError


def is_pos_int(v: Any) -> bool:
    """True for a positive int (bools excluded)."""
    # bool is an int subclass; True as a factor is almost surely a mistake.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) > 0


def as_triple(f: Any, name: str = "factor") -> tuple[int, int, int]:
    """Normalise a factor given as a positive int or a 3-sequence of positive ints."""
    if is_pos_int(f):
        return (int(f),) * 3
    if isinstance(f, (list, tuple)) and len(f) == 3 and all(is_pos_int(v) for v in f):
        return tuple(int(v) for v in f)  # type: ignore[return-value]
    raise ConfigError(
        f"{name} must be a positive int or a 3-tuple of positive ints like (2, 2, 1), "
        f"got {f!r}"
    )


def get_field(cfg: Any, key: str, default: Any = None) -> Any:
    """Field of a ConfigDict or a plain dict, `default` when absent (partial test configs)."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def check_choice(problems: list, value, name: str, choices) -> None:
    """Appends a problem to `problems` when `value` is not one of `choices`."""
    if value not in choices:
        problems.append(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )


def check_pos_int(problems: list, value, name: str, allow_none: bool = False) -> None:
    """Appends a problem to `problems` when `value` is not a positive int."""
    if allow_none and value is None:
        return
    if not is_pos_int(value):
        problems.append(f"{name} must be a positive int; got {value!r}")


def raise_problems(problems: list[str]) -> None:
    """Raises ConfigError naming the one problem, or listing several as `  - ` lines."""
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(problems[0])
    raise ConfigError(
        f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)
    )


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
    missing file, an import failure, a file without get_config(), or a get_config() that
    returns something other than a ConfigDict (None, a plain dict).
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
    call = f"get_config({arg!r})" if arg is not None else "get_config()"
    try:
        config = get_config(arg) if arg is not None else get_config()
    except Exception as e:  # a user file: say which call failed and why
        raise ConfigError(f"{call} of config file {str(p)!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    check_config_type(config, f"{call} of config file {str(p)!r}")
    return config


def check_config_type(config, where: str) -> None:
    """Raises ConfigError unless `config` is an ml_collections ConfigDict (what every
    command reads fields of), naming what `where` returned instead and how to fix it."""
    import ml_collections

    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return
    got = "None (no return statement?)" if config is None else type(config).__name__
    wrap = (" (wrap it: return ml_collections.ConfigDict(d))"
            if isinstance(config, dict) else "")
    raise ConfigError(f"{where} returned {got}; it must return an ml_collections.ConfigDict"
                      f"{wrap}, like configs/balanced.py.")
