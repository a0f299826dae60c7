"""Shared command-line plumbing: every command (train.py and each `python -m ldm_jax.<name>`)
goes through `run`, so they all parse, report errors and exit the same way.

The pattern a command follows (see ldm_jax/cli/extract.py or plan.py)::

    def _define(fv):                  # flags on the command's own FlagValues
        flags.DEFINE_string("out", "x.png", "Where to write it.", flag_values=fv)

    def _body(fv):                    # the work; returns None (exit 0) or an exit code
        ...                           # user errors: raise ConfigError, DataError or
                                      # FileNotFoundError with a one-line message

    def main(argv=None) -> int:
        return cli.run("ldm_jax.name", __doc__, _define, _body, argv, config="required")

What `run` guarantees:
- Each command parses into fresh `FlagValues`, so commands can run in one process (tests).
  `--skip-bad-files` and `--skip_bad_files` are both accepted.
- `config="required"`/`"optional"` adds `--config` (an ml_collections config file with
  `--config.a.b=value` overrides). The file and every override's field are checked before
  absl loads them: a missing file or a misspelt field is one line with a "did you mean".
- A user error -- a bad flag, config, path or data file (`USER_ERRORS`) -- ends with one
  `error: ...` line on stderr and exit status 2, before any model is built; no traceback
  unless `--verbosity=1` (which also turns on debug logging). A problem list (several
  config problems) follows that line as indented `  - ` lines.
- Ctrl-C outside a training loop ends with one line and status 130.
"""

from __future__ import annotations

import difflib
import re
import sys
import traceback
from typing import Callable

from absl import flags

EXIT_USER_ERROR = 2


def define_checkpoint_flags(fv: flags.FlagValues) -> None:
    """--workdir, --step, --config: which checkpoint to read."""
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", flag_values=fv)
    flags.DEFINE_string("step", "best", "'best' (lowest validation L1; latest when none is "
                        "recorded), 'latest' or a step number.", flag_values=fv)
    flags.DEFINE_string("config", None, "Optional config file; it must agree with the config "
                        "saved in the checkpoint (which is what is used).", flag_values=fv)


def define_model_flags(fv: flags.FlagValues) -> None:
    define_checkpoint_flags(fv)
    flags.DEFINE_string("window", "training", "Sliding window in input voxels: 'training' (the "
                        "training patch), 'whole' (one pass per volume) or X,Y,Z.",
                        flag_values=fv)
    flags.DEFINE_float("overlap", 0.5, "Fraction of the window shared by neighbouring windows.",
                       flag_values=fv)
    flags.DEFINE_integer("windows_per_batch", 1, "Windows encoded/decoded per call.",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override (the "
                      "checkpoint's by default; float32 is often faster on CPU).",
                      flag_values=fv)


def define_io_flags(fv: flags.FlagValues, input_help: str) -> None:
    flags.DEFINE_string("input", None, input_help, flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory (created; must not be the input "
                        "directory).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Rewrite outputs that exist (default: skip them).",
                      flag_values=fv)
    flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable inputs (counted and listed) "
                      "instead of stopping.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def model_kwargs(fv) -> dict:
    """load_autoencoder keyword arguments from the model flags."""
    return dict(step=fv.step, config=fv.config, window=fv.window, overlap=fv.overlap,
                windows_per_batch=fv.windows_per_batch, dtype=fv.dtype)


def user_errors() -> tuple:
    """The exception types `run` reports as one `error:` line (exit 2): problems with the
    command line, the config, paths and data files, never bugs. Types of modules not yet
    imported cannot have been raised, so they are not imported for this (fast errors)."""
    from ldm_jax.config import ConfigError

    found = [flags.Error, ConfigError, FileNotFoundError, NotADirectoryError]
    for module, name in (("ldm_jax.data.errors", "DataError"),
                         ("ldm_jax.data.files", "OutputDirError"),
                         ("ldm_jax.autoencoder.inference", "ChannelMismatchError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def error_text(e) -> str:
    """`error: <message>` on one line; indented `  - ` problem lists keep their lines."""
    lines, items = [], []
    for line in str(e).splitlines():
        if line.startswith("  - "):
            items.append(line)
        elif line.strip():
            lines.append(line.strip())
    return "\n".join([f"error: {' '.join(lines)}", *items])


def config_path(fv) -> str | None:
    """The config file of a parsed `--config` flag (a config_flags flag or a plain path)."""
    flag = fv["config"]
    name = flag.config_filename if hasattr(type(flag), "config_filename") else flag.value
    return None if name is None else str(name).split(":", 1)[0]


# ------------------------------------------------------------------------------ parsing

def _normalise(argv):
    """--skip-bad-files[=x] -> --skip_bad_files[=x] (absl names use underscores)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def _config_arg(argv, default):
    """The value given to --config (or `default`), and the --config.a.b override paths."""
    value, overrides = default, []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        elif a.startswith(("--config.", "--noconfig.")):
            overrides.append((a.split("=", 1)[0], a.split("=", 1)[0].split(".", 1)[1]))
    return value, overrides


def check_config_file(path: str) -> None:
    """Raises ConfigError when `path` (a config file, optionally `file.py:arg`) does not
    exist, naming the closest existing config."""
    from pathlib import Path

    from ldm_jax.config import ConfigError

    p = Path(str(path).split(":", 1)[0]).expanduser()
    if p.is_file():
        return
    folder = p.parent if p.parent.is_dir() else None
    names = sorted(str(q) for q in folder.glob("*.py") if q.name != "__init__.py") \
        if folder else []
    close = difflib.get_close_matches(str(p), names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else (
        f" Configs in {folder}: {', '.join(Path(n).name for n in names)}." if names else "")
    raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a Python "
                      f"file with a get_config() function, like configs/balanced.py.{hint}")


def check_overrides(config, overrides, where: str) -> None:
    """Raises ConfigError for the first `--config.a.b` whose field `a.b` is not in `config`,
    with the closest existing field as a suggestion."""
    from ldm_jax.config import ConfigError

    for flag, path in overrides:
        node, done = config, []
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else None
            if keys is None:
                break  # a field inside a value (tuple element ...): config_flags decides
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
                field = ".".join(done + [part])
                hint = (f" Did you mean {'.'.join(done + [close[0]])}?" if close else
                        f" Fields of {'.'.join(done) or 'the config'}: {', '.join(keys)}.")
                raise ConfigError(f"{flag}: {where} has no field {field}.{hint} "
                                  "(configs/default.py lists every field.)")
            node = node[part]
            done.append(part)


def _parse(fv, argv, config, config_default):
    """Parses argv into fv (config flag included); user errors as ConfigError/flags.Error."""
    from ldm_jax.config import ConfigError, load_config

    if config:
        from ml_collections import config_flags

        path, overrides = _config_arg(argv, config_default)
        if path is None and overrides:
            raise ConfigError(f"{overrides[0][0]} overrides a field, but no --config was "
                              "given; pass --config=configs/balanced.py (or another file).")
        if path is not None:
            check_config_file(path)
            file, _, arg = str(path).partition(":")
            check_overrides(load_config(file, arg or None), overrides, file)
        config_flags.DEFINE_config_file(
            "config", config_default, "Config file (configs/*.py); override any field with "
            "--config.<section>.<field>=value.", flag_values=fv, sys_argv=argv,
            lock_config=True)
    try:
        return fv(argv)
    except flags.Error:
        raise
    except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        # config_flags loading or applying a value; the checks above catch the usual cases.
        raise ConfigError(str(e).strip().splitlines()[-1]) from e


def run(prog: str, doc: str, define: Callable, body: Callable, argv=None,
        required=(), config: str | None = None, config_default: str | None = None,
        log_level: str = "warning") -> int:
    """Parses `argv` into fresh flags and runs `body(flag_values)`; returns the exit code.

    `define(fv)` defines the command's flags; `required` names flags that must be set;
    `config` is None (no --config flag), "required" or "optional" (with `config_default`).
    `body` returns None (0) or an exit code. User errors (see `user_errors`) print one
    `error:` line and give 2; `--verbosity=1` adds the traceback. `log_level` is absl's
    level unless --verbosity is given ("error" hides orbax's read-only warnings).
    """
    argv = _normalise(list(sys.argv if argv is None else argv))
    fv = flags.FlagValues()
    define(fv)
    flags.DEFINE_integer("verbosity", None, "1: debug logging and tracebacks of user errors.",
                         flag_values=fv)
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        config_help = "" if not config else (
            f"  --config: {config} config file (configs/*.py)"
            + (f", default {config_default}" if config_default else "")
            + "; override any field with --config.<section>.<field>=value\n")
        print(doc.strip() + "\n\nflags:\n" + config_help + fv.get_help(), file=sys.stdout)
        return 0
    # Read from argv, not the flag: a traceback is wanted for parse errors too.
    verbose = any(re.fullmatch(r"--verbosity=[1-9]\d*", a) for a in argv)
    try:
        try:
            rest = _parse(fv, argv, config, config_default)
        except flags.Error as e:  # absl's "Did you mean: workdir ?" -> "... workdir?"
            msg = str(e).strip().rstrip(".").replace(" ?", "?")
            raise flags.Error(f"{msg}{'' if msg.endswith('?') else '.'} Run with --help "
                              "for the flags.") from e
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments {' '.join(rest[1:])}; every option is "
                              "a --flag=value (run with --help for the flags).")
        missing = [f"--{n}" for n in required if fv[n].value in (None, "")]
        if config == "required" and fv["config"].value is None:
            missing.insert(0, "--config")
        if missing:
            raise flags.Error(f"{', '.join(missing)} required. Run with --help for the flags.")
        if config is None and "config" in fv and fv["config"].value:
            check_config_file(fv["config"].value)  # a plain path flag (extract, ...)
        _setup_logging(fv, log_level)
        code = body(fv)
    except user_errors() as e:
        if verbose:
            traceback.print_exc()
        print(error_text(e), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr, flush=True)
        return 130
    return int(code or 0)


def _setup_logging(fv, log_level):
    from absl import logging

    if not flags.FLAGS.is_parsed():
        # absl's logging (used by orbax) and grain read the global flags: defaults suffice.
        flags.FLAGS.mark_as_parsed()
    v = fv["verbosity"].value
    logging.set_verbosity(log_level if v is None else v)
