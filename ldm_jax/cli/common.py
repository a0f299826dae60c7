"""Shared command-line plumbing for extract / reconstruct / decode (absl flags, like train.py).

Each command defines its flags on its own `FlagValues`, so the three can be imported and
run in one process (tests) without clashing. `--skip-bad-files` and `--skip_bad_files`
are both accepted. User errors (bad paths, steps, configs, channels) end with one
`error: ...` line and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags


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


def _normalise(argv):
    """--skip-bad-files[=x] -> --skip_bad_files[=x] (absl names use underscores)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def run(prog: str, doc: str, define: Callable, body: Callable, argv=None,
        required=("workdir", "input", "output")) -> int:
    """Parses `argv` into fresh flags, runs `body(flag_values)`, maps user errors to exit 1."""
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define(fv)
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(), file=sys.stdout)
        return 0
    try:
        rest = fv(_normalise(argv))
    except flags.Error as e:
        print(f"{prog}: {e}\nRun with --help for the flags.", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"{prog}: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    missing = [f"--{n}" for n in required if fv[n].value in (None, "")]
    if missing:
        print(f"{prog}: {', '.join(missing)} required. Run with --help for the flags.",
              file=sys.stderr)
        return 2
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # orbax's read-only-manager warnings are noise here
    try:
        body(fv)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, ... subclass these
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
