"""How the running command spells a setting, so that error messages suggest only real options.

Library code names a setting by its config field (`data.frame`). Commands offer it
differently: `python train.py` as `--config.data.frame=K`; `ldm-jax extract` as
`--frame=K`; and some not at all (extract's model and preprocessing come from the
checkpoint). A message asks `setting("data.frame", "K")` and suggests only what it gets
back, so no command suggests a flag it does not have:

    fix = options.setting("data.frame", "K")
    hint = f" Pick one with {fix}." if fix else ""

Outside any command (library use) settings are spelled as config fields (`data.frame=K`).
The command is a process-wide setting, not a context variable, so that messages raised in
worker threads (extract's read-ahead) are spelled for the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Command:
    """One command's options, as far as messages need them.

    `flags`: config field -> the command's flag for it ({"data.frame": "--frame"}).
    `config_overrides`: any config field can be set as `--config.<field>=value` (train.py).
    `choices`: literal values a flag takes beyond the config field's ({"data.frame":
    ("all",)} for extract's `--frame=all`).
    """

    prog: str
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_overrides: bool = False
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)


def config_command(prog: str) -> Command:
    """A command whose options are the config's own fields (`--config.a.b=value`)."""
    return Command(prog, config_overrides=True)


TRAIN = config_command("train.py")

_current: Optional[Command] = None


def current() -> Optional[Command]:
    """The command being run, or None for library use."""
    return _current


@contextlib.contextmanager
def command(cmd: Command):
    """Messages raised inside are spelled for `cmd`."""
    global _current
    previous, _current = _current, cmd
    try:
        yield cmd
    finally:
        _current = previous


def run_as(cmd: Command, fn):
    """`fn` wrapped so that messages raised inside are spelled for `cmd` (for absl's
    `app.run(run_as(cmd, body))`)."""
    def wrapped(*args, **kwargs):
        with command(cmd):
            return fn(*args, **kwargs)
    return wrapped


def _spell(flag: str, value: Any) -> str:
    return flag if value is True else f"{flag}={value}"


def setting(field: str, value: Any) -> Optional[str]:
    """How to set config `field` to `value` (a value or a metavar like "K") in the running
    command: "--frame=K", "--config.data.frame=K", "data.frame=K" (library use), or None
    when the command cannot change it. `value=True` spells a boolean flag bare
    ("--skip_bad_files")."""
    cmd = _current
    if cmd is None:
        return f"{field}={value}"
    if field in cmd.flags:
        return _spell(cmd.flags[field], value)
    if cmd.config_overrides:
        return f"--config.{field}={value}"
    return None


def choice(field: str, literal: str) -> Optional[str]:
    """A literal value only some commands accept for `field` ("--frame=all"), else None."""
    cmd = _current
    if cmd is not None and field in cmd.flags and literal in cmd.choices.get(field, ()):
        return _spell(cmd.flags[field], literal)
    return None


def fixes(*options: Optional[str], sep: str = ", or ") -> str:
    """Joins the suggestions that exist ("a, or b"); "" when none does."""
    return sep.join(o for o in options if o)
