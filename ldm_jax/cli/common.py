"""Shared command-line plumbing: every command (`ldm-jax <command>`, `python train.py`)
goes through `run`, so they all parse, report errors and exit the same way, and defines
its shared flags (--workdir, --step, --input, --output, --seed, ...) with the `define_*`
functions here, so a flag has one spelling and one meaning everywhere.

The pattern a command follows (see ldm_jax/cli/extract.py or plan.py)::

    def _define(fv):                  # flags on the command's own FlagValues
        cli.define_output_flag(fv, "Where to write it.", default="x.png")

    def _body(fv):                    # the work; returns None (exit 0) or an exit code
        ...                           # user errors: raise ConfigError, DataError or
                                      # FileNotFoundError with a one-line message

    def main(argv=None) -> int:
        return cli.run("ldm-jax name", __doc__, _define, _body, argv, config="required")

What `run` guarantees:
- Each command parses into fresh `FlagValues`, so commands can run in one process (tests).
  Flags are snake_case; `--skip-bad-files` is accepted for `--skip_bad_files`.
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

from ldm_jax import options

EXIT_USER_ERROR = 2

# Config fields each flag stands for, so library errors suggest this command's flags
# (`ldm_jax.options`); a command offers only the flags it defines.
FLAG_FIELDS = {
    "input": ("data.train_dir", "data.val_dir"),
    "skip_bad_files": ("data.skip_bad_files",),
    "frame": ("data.frame",),
    "autoencoder_workdir": ("latents.autoencoder_workdir",),
}
FLAG_CHOICES = {"frame": ("all", "none")}
FRAME_ALL, FRAME_NONE = "all", "none"


def define_workdir_flag(fv: flags.FlagValues, help: str = "Training workdir holding "
                        "checkpoints/.", default: str | None = None) -> None:
    """--workdir: a training run's folder."""
    flags.DEFINE_string("workdir", default, help, flag_values=fv)


def define_step_flag(fv: flags.FlagValues, help: str = "'best' (lowest validation L1; "
                     "latest when none is recorded), 'latest' or a step number.") -> None:
    """--step: which checkpoint of the workdir."""
    flags.DEFINE_string("step", "best", help, flag_values=fv)


def define_output_flag(fv: flags.FlagValues, help: str = "Output directory (created; must "
                       "not be the input directory).", default: str | None = None) -> None:
    """--output: where a command writes (every command spells it so)."""
    flags.DEFINE_string("output", default, help, flag_values=fv)


def define_overwrite_flag(fv: flags.FlagValues, help: str = "Rewrite outputs that exist "
                          "(default: skip them).") -> None:
    flags.DEFINE_bool("overwrite", False, help, flag_values=fv)


def define_progress_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def define_skip_bad_files_flag(fv: flags.FlagValues, help: str = "Skip unreadable inputs "
                               "(counted and listed) instead of stopping.") -> None:
    flags.DEFINE_bool("skip_bad_files", False, help, flag_values=fv)


def define_seed_flag(fv: flags.FlagValues, help: str = "Random seed.") -> None:
    flags.DEFINE_integer("seed", 0, help, flag_values=fv)


def define_condition_flags(fv: flags.FlagValues) -> None:
    """--condition FILE|DIR and --conditioning_scale: the aligned input of conditioned
    models (a ControlNet's), read by `ldm_jax.diffusion.condition`."""
    flags.DEFINE_string("condition", None, "Aligned input of a conditioned model (ControlNet "
                        "runs; models trained with conditioning.aligned, e.g. a 2D projection "
                        "PNG/TIFF/.npy): a file for all, or a folder with one per sample "
                        "(sample: name order; edit: named as the input).", flag_values=fv)
    flags.DEFINE_float("conditioning_scale", 1.0, "Multiplies the ControlNet's residuals "
                       "(MONAI's conditioning_scale; 1 as trained).", flag_values=fv)


def define_checkpoint_flags(fv: flags.FlagValues) -> None:
    """--workdir, --step, --config: which checkpoint to read."""
    define_workdir_flag(fv)
    define_step_flag(fv)
    flags.DEFINE_string("config", None, "Optional config file; it must agree with the config "
                        "saved in the checkpoint (which is what is used).", flag_values=fv)


def define_model_flags(fv: flags.FlagValues) -> None:
    define_checkpoint_flags(fv)
    flags.DEFINE_string("window", "auto", "Window in input voxels: 'auto' (the whole volume "
                        "in one pass when it fits --memory_gb, else the largest window that "
                        "does), 'training' (the training patch), 'whole' or X,Y,Z.",
                        flag_values=fv)
    flags.DEFINE_float("overlap", 0.5, "Fraction of the window shared by neighbouring windows.",
                       flag_values=fv)
    flags.DEFINE_integer("windows_per_batch", 0, "Windows encoded/decoded per call; 0: as "
                         "many as fit --memory_gb.", flag_values=fv)
    flags.DEFINE_float("memory_gb", None, "Memory one encode/decode call may use, in GiB "
                       "(default: half the free accelerator memory, or a quarter of the "
                       "available host memory on a CPU).", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype override (the "
                      "checkpoint's by default; float32 is often faster on CPU).",
                      flag_values=fv)


def define_io_flags(fv: flags.FlagValues, input_help: str) -> None:
    """--input, --output, --overwrite, --skip_bad_files, --progress."""
    flags.DEFINE_string("input", None, input_help, flag_values=fv)
    define_output_flag(fv)
    define_overwrite_flag(fv)
    define_skip_bad_files_flag(fv)
    define_progress_flag(fv)


def define_frame_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("frame", None, "Frame of 4D volumes (X, Y, Z, T) to use: K (0-based), "
                        "'all' (each frame as its own volume, written as NAME_t0003), or 'none' "
                        "(all frames as channels). Default: the checkpoint's data.frame.",
                        flag_values=fv)


def parse_frame(value):
    """--frame -> None (the checkpoint's), an int, FRAME_ALL or FRAME_NONE; ConfigError else."""
    from ldm_jax.errors import ConfigError
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    if v in (FRAME_ALL, FRAME_NONE):
        return v
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"--frame={value!r} is not a frame number (0-based), 'all' or "
                          "'none'.") from None


def volume_jobs(files, names, frame, in_channels: int) -> list[tuple]:
    """(path, output name, frame for `load_volume`) per volume to process.

    `frame` from `parse_frame`: None keeps the checkpoint's data.frame ("config"), an int
    or FRAME_NONE (no frame: all frames as channels) applies to every file, FRAME_ALL
    splits every 4D file into its frames, named NAME_t0000, NAME_t0001, ... (3D files keep
    NAME). Entries that are not paths (point clouds of `pointcloud.list_inputs`) are one
    volume each. Raises ConfigError when --frame=all meets a model of more than one channel,
    OutputDirError when two outputs would get the same name.
    """
    import os

    from ldm_jax.data import io
    from ldm_jax.errors import ConfigError, OutputDirError

    jobs = []
    for path, name in zip(files, names):
        if frame != FRAME_ALL or not isinstance(path, (str, os.PathLike)):
            jobs.append((path, name, "config" if frame is None else
                         (None if frame == FRAME_NONE else frame)))
            continue
        try:
            t = io.num_frames(io.read_header(path))
        except ValueError:  # unreadable: reported (or skipped) when it is loaded
            t = None
        if t is None:
            jobs.append((path, name, "config"))
            continue
        if in_channels != 1:
            raise ConfigError(
                f"--frame=all makes each frame of {path} a 1-channel volume, but this "
                f"checkpoint's model takes {in_channels} channels; drop --frame to read "
                f"{in_channels}-frame files as {in_channels} channels.")
        jobs += [(path, f"{name}_t{k:04d}", k) for k in range(t)]
    seen = {}
    for path, name, _ in jobs:
        if name in seen and seen[name] != path:
            raise OutputDirError(
                f"Two inputs would write the same output name {name!r}: {seen[name]} and "
                f"{path}. Rename one of them or run them into different --output directories.")
        seen[name] = path
    return jobs


def with_skip_hint(err: Exception) -> Exception:
    """A data error of one input, with the hint that --skip_bad_files skips such files
    (unless its message gives it already)."""
    if "--skip_bad_files" in str(err):
        return err
    from ldm_jax.data import DataError
    return DataError(f"{err} (--skip_bad_files skips unreadable files and counts them.)")


def check_range(name: str, value, low=None, high=None, *, high_open=False,
                allow_none=True, what: str = "") -> None:
    """Raises ConfigError unless flag --`name`'s `value` is a finite number in [low, high]
    (`high_open`: [low, high)); None passes when `allow_none`. `what` says what the flag
    means, for the message."""
    import math

    from ldm_jax.errors import ConfigError
    if value is None and allow_none:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = math.isfinite(v) and (low is None or v >= low) and (
        high is None or (v < high if high_open else v <= high))
    if not ok:
        if low is not None and high is not None:
            want = f"in [{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            want = f">= {low:g}"
        else:
            want = "a finite number"
        raise ConfigError(f"--{name}={value} must be {want}{what}.")


def check_finite(values, what: str, ae, settings: str, source: str = "input") -> None:
    """Raises NonFiniteResultError when `values` (an array) hold NaN or Inf: `what` (e.g.
    "PATH: its latent") from checkpoint `ae.step` of `ae.workdir` with `settings` (one
    phrase), though its `source` was finite; nothing is written for it."""
    import numpy as np

    from ldm_jax.errors import NonFiniteResultError
    if np.isfinite(values).all():
        return
    raise NonFiniteResultError(
        f"{what} from checkpoint step {ae.step} of {ae.workdir} ({settings}) holds NaN or "
        f"Inf values, though the {source} is finite; nothing was written for it. Try "
        "--dtype float32 or another --step.")


def check_model_flags(fv) -> None:
    """The model flags' ranges (--overlap, --windows_per_batch, --memory_gb), before any
    work."""
    check_range("overlap", fv.overlap, 0, 1, high_open=True,
                what=" (the fraction of a window its neighbour shares; 0.5 by default)")
    check_range("windows_per_batch", fv.windows_per_batch, 0,
                what=" (0: as many as fit --memory_gb)")
    if fv.memory_gb is not None:
        check_range("memory_gb", fv.memory_gb, 1e-3, what=" (GiB one call may use)")


def model_kwargs(fv) -> dict:
    """load_autoencoder keyword arguments from the model flags (their ranges checked:
    ConfigError)."""
    check_model_flags(fv)
    return dict(step=fv.step, config=fv.config, window=fv.window, overlap=fv.overlap,
                windows_per_batch=fv.windows_per_batch or None, dtype=fv.dtype,
                memory_budget=None if fv.memory_gb is None else fv.memory_gb * 2**30)


def user_errors() -> tuple:
    """The exception types `run` reports as one `error:` line (exit 2): problems with the
    command line, the config, paths and data files, never bugs (`ldm_jax.errors`)."""
    from ldm_jax.errors import USER_ERRORS

    return (flags.Error, *USER_ERRORS)


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

    from ldm_jax.config import missing_config_hint
    from ldm_jax.errors import ConfigError
    p = Path(str(path).split(":", 1)[0]).expanduser()
    if p.is_file():
        return
    raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a Python "
                      f"file with a get_config() function, like configs/balanced.py."
                      f"{missing_config_hint(p)}")


def check_overrides(config, overrides, where: str) -> None:
    """Raises ConfigError for the first `--config.a.b` whose field `a.b` is not in `config`,
    with the closest existing field as a suggestion."""
    from ldm_jax.errors import ConfigError

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
    from ldm_jax.config import load_config
    from ldm_jax.errors import ConfigError
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


def command_options(prog: str, fv: flags.FlagValues, config_overrides: bool = False
                    ) -> options.Command:
    """The `ldm_jax.options.Command` of a command with flags `fv`: errors raised inside
    suggest these flags for the config fields they stand for, and nothing else.
    `config_overrides`: the command takes `--config.<field>=value` for any field."""
    fields = {field: f"--{name}" for name, fs in FLAG_FIELDS.items() if name in fv
              for field in fs}
    choices = {field: FLAG_CHOICES[name] for name, fs in FLAG_FIELDS.items()
               if name in fv and name in FLAG_CHOICES for field in fs}
    return options.Command(prog, flags=fields, config_overrides=config_overrides,
                           choices=choices)


def run(prog: str, doc: str, define: Callable, body: Callable, argv=None,
        required=(), config: str | None = None, config_default: str | None = None,
        log_level: str = "warning") -> int:
    """Parses `argv` into fresh flags and runs `body(flag_values)`; returns the exit code.

    `define(fv)` defines the command's flags; `required` names flags that must be set;
    `config` is None (no --config flag), "required" or "optional" (with `config_default`).
    `body` returns None (0) or an exit code. User errors (see `user_errors`) print one
    `error:` line and give 2; `--verbosity=1` adds the traceback. `log_level` is absl's
    level unless --verbosity is given (orbax's expected warnings are filtered anyway:
    `ldm_jax.checkpoint`). Messages raised inside `body` suggest only this command's
    flags (`command_options`, `ldm_jax.options`).
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
        with options.command(command_options(prog, fv, config_overrides=bool(config))):
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
