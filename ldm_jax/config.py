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
