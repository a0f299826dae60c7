"""Orbax checkpoints in `<workdir>/checkpoints`: state, config JSON, data iterator, metrics.

The config travels with every checkpoint so that a checkpoint alone rebuilds its model
(extraction reads it back). The keep policy is the only thing that removes checkpoints:
the latest `train.keep_checkpoints` plus the one with the lowest value of the task's
best metric (stage 1: validation L1; stage 2: validation denoising loss). Only that one
metric is recorded with each step, under its own name, so `best_step` needs no stage.

Damaged checkpoints (a truncated or missing file, from a full disk, a copy cut short or
a crash of the storage) are recognised, never deleted: `find_damaged` checks a step's
small files, and every restore here turns any failure into a `DamagedCheckpointError`
naming the step and its cause. Training sets such a step aside (`set_aside`:
`checkpoints/<step>` -> `checkpoints/<step>.damaged`, which orbax ignores) and resumes
from the newest intact one; readers (`open_step`: extract, reconstruct, decode, sample)
skip it for `latest`/`best` and refuse it when asked for by number.
"""

import json
import logging
import os
import sys

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ldm_jax.errors import CheckpointNotFoundError, ConfigError, DamagedCheckpointError

DAMAGED_SUFFIX = ".damaged"

DEFAULT_BEST_METRIC = "val_l1"  # checkpoints written before tasks named their own


def checkpoint_dir(workdir):
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _only_value(metrics):
    """The one recorded best-metric value of a step (see `save`)."""
    return float(next(iter(metrics.values())))


class _ExpectedOrbaxWarnings(logging.Filter):
    """Drops the orbax warnings that describe what this module asks for, nothing else.

    - "Requested `tracked_metric`; did not provide metrics.": the manager tracks the best
      step (so it has a `best_fn`), but only evaluated steps have a metric; orbax warns
      at every other save.
    - "Given directory is read only=...": inference opens checkpoints read-only on purpose.
    Matched on the exact message templates, so every other warning still shows.
    """

    TEMPLATES = frozenset({"Requested `tracked_metric`; did not provide metrics.",
                           "Given directory is read only=%s"})

    def filter(self, record) -> bool:
        # orbax also logs dicts as messages (its standard_logger, at INFO): not ours to drop.
        return not (isinstance(record.msg, str) and record.msg in self.TEMPLATES)


def _quiet_expected_warnings() -> None:
    from absl import logging as absl_logging
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _ExpectedOrbaxWarnings) for f in logger.filters):
        logger.addFilter(_ExpectedOrbaxWarnings())


class _SkippingNameFormat:
    """orbax's standard step names ("4"), without the steps in `skip` (damaged ones a
    reader must not see: orbax would read their metrics when it lists the steps)."""

    def __init__(self, skip):
        self._base = ocp.step.standard_name_format()
        self._skip = frozenset(int(s) for s in skip)

    def __getattr__(self, name):
        return getattr(self._base, name)

    def build_name(self, step):
        return self._base.build_name(step)

    def find_all(self, base_path):
        return (m for m in self._base.find_all(base_path) if m.step not in self._skip)

    def find_step(self, base_path, step):
        if int(step) in self._skip:
            raise ValueError(f"step {step} is damaged")
        return self._base.find_step(base_path, step)


def make_manager(workdir, keep=3, read_only=False, item_names=None,
                 best_metric=DEFAULT_BEST_METRIC, skip_steps=()):
    """CheckpointManager keeping the latest `keep` steps and the best by `best_metric`
    (lowest wins). `skip_steps`: steps it does not list (damaged ones, for readers)."""
    _quiet_expected_warnings()
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(int(keep), 1)),
        pp.BestN(get_metric_fn=_only_value, reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # orbax warns when it must change it
        # best_fn only makes orbax write each step's metrics (for best_step after a
        # restart); which steps survive is decided by the policy above.
        best_fn=_only_value, best_mode="min",
        enable_async_checkpointing=False,
        step_name_format=_SkippingNameFormat(skip_steps) if skip_steps else None)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                    item_names=item_names)
    manager.best_metric = best_metric
    return manager


def _dir_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _size_estimate(manager, state) -> int:
    """Bytes a new checkpoint of `state` takes: the newest saved one's size on disk, else
    the state's array bytes plus room for the metadata."""
    steps = sorted(manager.all_steps())
    if steps:
        path = os.path.join(str(manager.directory), str(steps[-1]))
        if os.path.isdir(path):
            return _dir_bytes(path)
    import jax
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state)) + (1 << 16)


def _from_orbax(info) -> bool:
    """Whether an unraisable exception comes from orbax's coroutines (by their code's
    file or the frames of the exception)."""
    import traceback

    code = getattr(getattr(info, "object", None), "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    exc = info.exc_value
    while exc is not None:
        if any("orbax" in frame.filename
               for frame in traceback.extract_tb(exc.__traceback__)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _loop_closed(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


class _OrbaxNoise(logging.Filter):
    """orbax's logged tracebacks of its failed writer threads, and asyncio's "Task
    exception was never retrieved" for its cancelled tasks."""

    def filter(self, record) -> bool:
        msg = record.getMessage() if record.name == "asyncio" else (
            record.msg if isinstance(record.msg, str) else "")
        if record.name == "asyncio":
            return "orbax" not in msg
        return not (record.levelno >= logging.ERROR and "raised an exception" in msg)


def _quiet_orbax_noise() -> None:
    """When a save or restore fails, orbax's writer threads, cancelled coroutines and
    tensorstore's callbacks (into a closed event loop) each print a traceback, during the
    failure and when they are collected: hundreds of lines around the one that matters.
    These hooks drop exactly those reports (matched on orbax's frames, its messages and
    the closed loop), nothing else; the failure itself is reported once, as one line."""
    import threading

    from absl import logging as absl_logging

    if getattr(sys.unraisablehook, "_ldm_jax_quiet", False):
        return

    def unraisable(info, _old=sys.unraisablehook):
        if not (_from_orbax(info) or _loop_closed(info.exc_value)):
            _old(info)

    def thread_hook(args, _old=threading.excepthook):
        if not _loop_closed(args.exc_value):
            _old(args)

    def except_hook(kind, value, tb, _old=sys.excepthook):
        if not _loop_closed(value):  # tensorstore's callbacks print through here
            _old(kind, value, tb)

    unraisable._ldm_jax_quiet = True
    sys.unraisablehook, threading.excepthook, sys.excepthook = (unraisable, thread_hook,
                                                                except_hook)
    for logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
        if not any(isinstance(f, _OrbaxNoise) for f in logger.filters):
            logger.addFilter(_OrbaxNoise())


def save(manager, step, state, config, data_iter=None, metrics=None):
    """Saves one step. `metrics` holding the manager's best metric make it a candidate
    for best.

    Raises StorageError (one line: the step, the free space, the newest intact
    checkpoint, which stays untouched) when the disk is full, read-only or not writable;
    a full disk is found before orbax starts writing when the free space is below the
    size of the newest checkpoint.
    """
    from ldm_jax import storage

    where = str(manager.directory)
    kept = sorted(manager.all_steps())
    then = (f"The checkpoint at step {kept[-1]} is untouched; free some space or fix the "
            "folder, then run the same command again to resume from it." if kept else
            "No earlier checkpoint exists; free some space or fix the folder, then run the "
            "same command again.")
    need, free = _size_estimate(manager, state), storage.free_bytes(where)
    full = free is not None and free < need
    import jax
    if jax.process_count() > 1:  # one decision for all processes (hosts' disks differ)
        from ldm_jax.stopping import any_process
        full = bool(any_process([full])[0])
    if full:
        from ldm_jax.errors import StorageError
        raise StorageError(
            f"no space left for the checkpoint of step {step}: it needs about "
            f"{storage.size_text(need)}, {storage.size_text(free)} are free in {where}; "
            f"step {step} was not saved. {then}")
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iter is not None:
        items["data"] = _grain_save(data_iter)
    if metrics:
        items["last_metrics"] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})
    name = getattr(manager, "best_metric", DEFAULT_BEST_METRIC)
    best = {name: float(metrics[name])} if metrics and name in metrics else None
    _quiet_orbax_noise()
    try:
        manager.save(step, args=ocp.args.Composite(**items), metrics=best, force=True)
        manager.wait_until_finished()
    except Exception as e:
        storage.reraise(e, where, f"writing the checkpoint of step {step}", then)


def _grain_save(data_iter):
    import grain
    return grain.checkpoint.CheckpointSave(data_iter)


def best_step(manager):
    """Step with the lowest recorded best-metric value, else None."""
    best, best_value = None, None
    for step in manager.all_steps():
        m = manager.metrics(step)
        if m and (best_value is None or _only_value(m) < best_value):
            best, best_value = step, _only_value(m)
    return best


def resolve_step(manager, step="latest"):
    """Turns 'latest' | 'best' | int into a saved step, with a clear error listing them."""
    steps = sorted(manager.all_steps())
    where = manager.directory
    if not steps:
        raise CheckpointNotFoundError(
            f"No checkpoints in {where}. Train first (python train.py --workdir ...) or "
            "point --workdir at a directory that holds a 'checkpoints' folder.")
    if step in (None, "latest"):
        return steps[-1]
    if step == "best":
        found = best_step(manager)
        return steps[-1] if found is None else found
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise CheckpointNotFoundError(
            f"--step={step!r} is not 'latest', 'best' or a step number.") from None
    if step not in steps:
        raise CheckpointNotFoundError(
            f"Step {step} is not in {where}; saved steps: {', '.join(map(str, steps))}.")
    return step


def cause_of(exc: BaseException, limit: int = 300) -> str:
    """A one-line cause of a restore failure: the innermost error's first line (orbax
    wraps tensorstore's, which says which file and what is wrong), shortened."""
    inner, seen = exc, set()
    while id(inner) not in seen and (inner.__cause__ or inner.__context__) is not None:
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    for e in (inner, exc):
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if lines:
            text = f"{type(e).__name__}: {lines[0]}"
            return text if len(text) <= limit else text[:limit - 3] + "..."
    return type(exc).__name__


class _Reading:
    """Turns any failure to read a step into DamagedCheckpointError (or StorageError when
    it is a permission problem); ldm-jax's own errors pass unchanged."""

    def __init__(self, manager, step, what):
        self.where, self.step, self.what = manager.directory, int(step), what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (ConfigError, CheckpointNotFoundError,
                                           DamagedCheckpointError, KeyboardInterrupt)):
            return False
        if not isinstance(exc, Exception):
            return False
        import errno

        from ldm_jax import storage
        if storage.errno_of(exc) in (errno.EACCES, errno.EPERM):
            raise storage.storage_error(
                exc, os.path.join(str(self.where), str(self.step)),
                f"reading the checkpoint of step {self.step}",
                "Give this user read access to the workdir.") from None
        cause = cause_of(exc)
        _quiet_orbax_noise()
        raise DamagedCheckpointError(
            f"The checkpoint at step {self.step} in {self.where} is damaged: its "
            f"{self.what} cannot be read ({cause}).", self.step, cause) from exc


def restore_config(manager, step):
    """The config dict saved with `step` (plain dict from JSON). Raises
    DamagedCheckpointError when it cannot be read."""
    with _Reading(manager, step, "config"):
        out = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out["config"]


def restore_train(manager, step, abstract_state, data_iter=None):
    """Restores the full train state (with shardings of `abstract_state`) and the iterator.
    Raises DamagedCheckpointError when a file of the step cannot be read."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
        import grain
        _check_process_count(manager, step)
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    with _Reading(manager, step, "train state"):
        out = manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]


def restore_data(manager, step, data_iter) -> None:
    """Sets `data_iter` (a grain iterator) to the position saved with `step`."""
    import grain
    _check_process_count(manager, step)
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iter)))


def _step_path(manager, step):
    return ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(),
                                   step=int(step))


def _check_process_count(manager, step):
    """Raises ConfigError unless this run has as many processes as the one that saved
    `step` (grain keeps one data-iterator state per process: process_I-of-N.json)."""
    import jax

    path = _step_path(manager, step) / "data"
    index, count = jax.process_index(), jax.process_count()
    if not (path / f"process_{index}-of-{count}.json").exists():
        saved = sorted({p.name.split("-of-")[-1].removesuffix(".json")
                        for p in path.glob("process_*-of-*.json")})
        raise ConfigError(
            f"The checkpoint at step {step} in {manager.directory} was saved by "
            f"{' or '.join(saved) or 'an unknown number of'} process(es); this run has "
            f"{count}. The data-iterator state is kept per process: resume with the same "
            "number of processes (--multihost), or start a new --workdir.")


def _key_names(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _state_metadata(manager, step):
    with _Reading(manager, step, "state metadata"):
        return ocp.PyTreeCheckpointHandler().metadata(_step_path(manager, step) / "state").tree


def state_mismatch(manager, step, abstract_state) -> list:
    """How the state saved at `step` differs from `abstract_state` (a pytree of
    ShapeDtypeStructs): "path: saved (shape) dtype, config (shape) dtype" per differing
    array, or "path: only in the checkpoint/config"; [] when they fit. Reads only the
    saved metadata; DamagedCheckpointError when that cannot be read."""
    import jax

    def flat(tree):
        return {_key_names(p): (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "")))
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved, want = flat(_state_metadata(manager, step)), flat(abstract_state)
    out = []
    for key in sorted(set(saved) | set(want)):
        a, b = saved.get(key), want.get(key)
        if a == b:
            continue
        name = ".".join(key)
        if a is None:
            out.append(f"{name}: only in the config's state")
        elif b is None:
            out.append(f"{name}: only in the checkpoint")
        else:
            out.append(f"{name}: checkpoint {a[0]} {a[1]}, config {b[0]} {b[1]}")
    return out


def restore_state_item(manager, step, key):
    """One top-level entry of the saved state (e.g. the autoencoder params), on one device.

    Inference needs only the model params (stage 1: `g_params`); restoring the whole
    TrainState would also read both optimiser states and the discriminator (about 3x the
    params) and would need a target built from the training setup. The target here comes
    from the saved metadata, so the checkpoint alone is enough. Raises
    CheckpointNotFoundError when the state has no `key`, DamagedCheckpointError when it
    cannot be read.
    """
    import jax

    tree = _state_metadata(manager, step)
    if key not in tree:
        raise CheckpointNotFoundError(
            f"The state saved at step {step} in {manager.directory} has no {key!r} entry "
            f"(it has {', '.join(sorted(tree))}); it was not written by ldm-jax's trainer.")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree[key])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    with _Reading(manager, step, f"{key!r} arrays"):
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={key: target}, restore_args={key: args}, partial_restore=True)))
    return out["state"][key]


# ------------------------------------------------------------------ damaged checkpoints

def step_folders(workdir) -> dict:
    """{step: path} of the step folders in `<workdir>/checkpoints` (finished saves only:
    orbax's temporary folders and steps set aside are not steps)."""
    d = checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return {}
    return {int(n): os.path.join(d, n) for n in os.listdir(d)
            if n.isdigit() and os.path.isdir(os.path.join(d, n))}


def _json_problem(path, required=True):
    if not os.path.exists(path):
        return "is missing" if required else None
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"is not readable JSON ({type(e).__name__}: {e})"
    return None


def check_step_files(path) -> str | None:
    """Why the step folder `path` is damaged, from its small files (JSON metadata, the
    state's _METADATA and manifest, the config, metrics and data positions), else None.
    A truncated array file is found only when it is read (the restore functions)."""
    where = os.path.basename(path)
    checks = [(os.path.join(path, "_CHECKPOINT_METADATA"), False),
              (os.path.join(path, "config", "metadata"), True),
              (os.path.join(path, "metrics", "metrics"), False),
              (os.path.join(path, "last_metrics", "metadata"), False),
              (os.path.join(path, "state", "_METADATA"), True)]
    data = os.path.join(path, "data")
    if os.path.isdir(data):
        checks += [(os.path.join(data, n), True) for n in sorted(os.listdir(data))
                   if n.endswith(".json")]
    for file, required in checks:
        problem = _json_problem(file, required)
        if problem:
            return f"{where}/{os.path.relpath(file, path)} {problem}"
    state = os.path.join(path, "state")
    if os.path.exists(os.path.join(state, "_METADATA")) and not any(
            n.startswith("ocdbt.process_") or n == "d" for n in os.listdir(state)):
        return f"{where}/state holds no array data"
    return None


def find_damaged(workdir) -> dict:
    """{step: cause} of the steps whose small files show damage (`check_step_files`)."""
    out = {}
    for step, path in sorted(step_folders(workdir).items()):
        cause = check_step_files(path)
        if cause:
            out[step] = cause
    return out


def set_aside(workdir, step) -> str:
    """Renames `checkpoints/<step>` to `checkpoints/<step>.damaged` (`.damaged-2`, ... when
    taken), which orbax does not list; returns the new path. Nothing is deleted."""
    src = os.path.join(checkpoint_dir(workdir), str(int(step)))
    dst, k = src + DAMAGED_SUFFIX, 1
    while os.path.exists(dst):
        k += 1
        dst = f"{src}{DAMAGED_SUFFIX}-{k}"
    os.rename(src, dst)
    return dst


def damaged_line(step, where, cause, then) -> str:
    """The one line saying a step is damaged, why, and what happens instead (`then`)."""
    return f"warning: the checkpoint at step {step} in {where} is damaged ({cause}); {then}"


def open_step(workdir, step="best", *, item, stage, best_metric=DEFAULT_BEST_METRIC,
              say=None):
    """(step, saved config dict, saved state entry `item`) of a workdir, for inference.

    `step`: 'latest', 'best' or a number. A damaged step (any read failure) is skipped for
    'latest'/'best' with one line through `say` (default: stderr) naming it and its cause,
    and the newest intact step is used ('best': the best intact one by the recorded
    metric, else the newest intact); a damaged step asked for by number is refused.
    `stage`: the config.stage the caller needs ("autoencoder" | "diffusion").

    Raises CheckpointNotFoundError (no checkpoints, no such step), DamagedCheckpointError
    (the step asked for, or every step, is damaged), ConfigError (a run of another stage).
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    where = checkpoint_dir(workdir)
    damaged = find_damaged(workdir)
    manager = make_manager(workdir, read_only=True, best_metric=best_metric,
                           skip_steps=damaged)
    try:
        intact = sorted(manager.all_steps())
        explicit = step not in (None, "latest", "best")
        if explicit:
            try:
                number = int(step)
            except (TypeError, ValueError):
                number = None
            if number in damaged:
                raise _refuse(number, where, damaged[number], intact)
            candidates = [resolve_step(manager, step)]
        elif not intact:
            if damaged:
                raise DamagedCheckpointError(
                    f"Every checkpoint in {where} is damaged: "
                    + "; ".join(f"step {s} ({c})" for s, c in sorted(damaged.items()))
                    + ". Nothing was set aside or deleted; train again in a new --workdir, "
                    "or restore the folder from a backup.", max(damaged), None)
            candidates = [resolve_step(manager, step)]  # raises: no checkpoints
        else:
            first = resolve_step(manager, step)
            ranked = sorted((s for s in intact if manager.metrics(s)),
                            key=lambda s: _only_value(manager.metrics(s))) \
                if step == "best" else []
            candidates = [first] + [s for s in ranked + intact[::-1] if s != first]
            candidates = list(dict.fromkeys(candidates))
        skipped = dict(damaged) if not explicit else {}
        for i, s in enumerate(candidates):
            try:
                config = restore_config(manager, s)
                _check_stage(config, stage, workdir, s)
                value = restore_state_item(manager, s, item)
            except DamagedCheckpointError as e:
                if explicit:
                    raise _refuse(s, where, e.cause, [x for x in intact if x != s]) from None
                skipped[s] = e.cause
                continue
            newer = {d: c for d, c in skipped.items() if d > s or step == "best"}
            for d, c in sorted(newer.items(), reverse=True):
                say(damaged_line(d, where, c, f"using step {s}, the "
                                 f"{'best' if step == 'best' and manager.metrics(s) else 'newest'}"
                                 " intact one. (The next training run on this workdir "
                                 "renames it aside.)"))
            return s, config, value
        raise DamagedCheckpointError(
            f"Every checkpoint in {where} is damaged: "
            + "; ".join(f"step {s} ({c})" for s, c in sorted(skipped.items()))
            + ". Nothing was set aside or deleted; train again in a new --workdir, or "
            "restore the folder from a backup.", max(skipped), None)
    finally:
        manager.close()


def _refuse(step, where, cause, intact) -> DamagedCheckpointError:
    others = (f"pick an intact one: --step latest, --step best or one of "
              f"{', '.join(map(str, intact))}" if intact else
              "no other checkpoint in it is intact")
    return DamagedCheckpointError(
        f"The checkpoint at step {step} in {where} is damaged ({cause}); {others}.",
        step, cause)


def _check_stage(config, stage, workdir, step):
    got = config.get("stage", "autoencoder")
    if got == stage:
        return
    if stage == "autoencoder":
        ae = (config.get("latents") or {}).get("autoencoder_workdir")
        raise ConfigError(
            f"{os.path.abspath(workdir)} is a stage-2 (diffusion) run; this command reads a "
            "stage-1 (autoencoder) run's workdir"
            + (f": this run's autoencoder is --workdir {ae} (its latents.autoencoder_workdir)."
               if ae else "."))
    raise ConfigError(
        f"{os.path.abspath(workdir)} is a stage-1 (autoencoder) run; sampling needs a "
        "diffusion run (configs/diffusion/*.py). For reconstructions use ldm-jax reconstruct.")
