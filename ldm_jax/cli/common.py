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

from ldm_jax import options

# Config fields each flag stands for, so library errors suggest this command's flags
# (`ldm_jax.options`); a command offers only the flags it defines.
FLAG_FIELDS = {
    "input": ("data.train_dir", "data.val_dir"),
    "skip_bad_files": ("data.skip_bad_files",),
    "frame": ("data.frame",),
}
FLAG_CHOICES = {"frame": ("all", "none")}
FRAME_ALL, FRAME_NONE = "all", "none"

def define_model_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", flag_values=fv)
    flags.DEFINE_string("step", "best", "'best' (lowest validation L1; latest when none is "
                        "recorded), 'latest' or a step number.", flag_values=fv)
    flags.DEFINE_string("config", None, "Optional config file; it must agree with the config "
                        "saved in the checkpoint (which is what is used).", flag_values=fv)
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
    flags.DEFINE_string("input", None, input_help, flag_values=fv)
    flags.DEFINE_string("output", None, "Output directory (created; must not be the input "
                        "directory).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Rewrite outputs that exist (default: skip them).",
                      flag_values=fv)
    flags.DEFINE_bool("skip_bad_files", False, "Skip unreadable inputs (counted and listed) "
                      "instead of stopping.", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def define_frame_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("frame", None, "Frame of 4D volumes (X, Y, Z, T) to use: K (0-based), "
                        "'all' (each frame as its own volume, written as NAME_t0003), or 'none' "
                        "(all frames as channels). Default: the checkpoint's data.frame.",
                        flag_values=fv)


def parse_frame(value):
    """--frame -> None (the checkpoint's), an int, FRAME_ALL or FRAME_NONE; ConfigError else."""
    from ldm_jax.config import ConfigError
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
    NAME). Raises ConfigError when --frame=all meets a model of more than one channel,
    OutputDirError when two outputs would get the same name.
    """
    from ldm_jax.config import ConfigError
    from ldm_jax.data import io
    from ldm_jax.data.files import OutputDirError

    jobs = []
    for path, name in zip(files, names):
        if frame != FRAME_ALL:
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


def model_kwargs(fv) -> dict:
    """load_autoencoder keyword arguments from the model flags."""
    return dict(step=fv.step, config=fv.config, window=fv.window, overlap=fv.overlap,
                windows_per_batch=fv.windows_per_batch or None, dtype=fv.dtype,
                memory_budget=None if fv.memory_gb is None else fv.memory_gb * 2**30)


def _normalise(argv):
    """--skip-bad-files[=x] -> --skip_bad_files[=x] (absl names use underscores)."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def command_options(prog: str, fv: flags.FlagValues) -> options.Command:
    """The `ldm_jax.options.Command` of a command with flags `fv`: errors raised inside
    suggest these flags for the config fields they stand for, and nothing else."""
    fields = {field: f"--{name}" for name, fs in FLAG_FIELDS.items() if name in fv
              for field in fs}
    choices = {field: FLAG_CHOICES[name] for name, fs in FLAG_FIELDS.items()
               if name in fv and name in FLAG_CHOICES for field in fs}
    return options.Command(prog, flags=fields, choices=choices)


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
        with options.command(command_options(prog, fv)):
            body(fv)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, ... subclass these
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
