"""The training loop for any stage: data -> one jitted sharded step -> eval, images, checkpoints.

`train(task, workdir)` runs a task (stage 1: `ldm_jax.autoencoder.task.AutoencoderTask`,
stage 2: `ldm_jax.diffusion.task.DiffusionTask`) to `config.train.num_steps`. A second
run on the same workdir resumes from the latest checkpoint, exactly: the train state and
the data iterator are both restored; on a finished workdir it says so and returns.

What a user can rely on:
- Data and config problems fail before any model is built and before the workdir is
  created (the loaders are built first; they check folders, files and sizes).
- Nothing is lost when stopped: SIGINT (Ctrl-C) or SIGTERM finish the current step, save a
  checkpoint and raise `TrainingStopped` (a second signal aborts at once; see
  `ldm_jax.stopping`). Checkpoints are also written every `train.save_every_steps` and
  every `train.save_every_minutes` of wall-clock time. All processes agree on both.
- metrics.jsonl holds one run: rows after the step a run starts from are dropped (with
  a note), and non-finite values are written as null.
- A resume that changes the model or what the data mean (the task's `resume_fixed`) is
  refused, naming each field, before anything is built or restored; other changes are
  listed in one line (`resume_changes`).

The loop knows nothing of a stage's models or losses: a task implements
`ldm_jax.trainer.task.Task`.

Training batches may carry a "name" entry ((B,) strings: the files of each sample); the
loop takes it off before the batch goes to the devices and names those files when a loss
is absurd. Loaders without names (stage 2's latents) work the same.

Outputs in the workdir: `checkpoints/` (orbax), `metrics.jsonl` (one strict-JSON object
per logged step: {"step": int, name: float or null}), `tb/` (TensorBoard events) and
`images/`. Rows are logged at the first step of a run, every `train.log_every_steps`, the
last step, when stopped, every step with a non-finite loss or gradient (skipped by the
guard) and every step with an absurd loss (over ABSURD_LOSS_RATIO times the median of
the recent ones), which is also reported with the files of its batch.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import distributed, options, sharding, stopping, storage
from ldm_jax.errors import DamagedCheckpointError, TrainingDivergedError
from ldm_jax.models import tap_conv
from ldm_jax.stopping import any_process
from ldm_jax.trainer import resume
from ldm_jax.trainer import workdir as workdir_lib
from ldm_jax.trainer.writers import Writers, dropped_note, say

LONG_RUN_HOURS = 2.0  # CPU runs estimated longer than this get the task's quick-run hint


class TrainingStopped(Exception):
    """SIGINT/SIGTERM stopped training after `step`; `saved` says whether a checkpoint of
    that step was written (not during a streak of skipped, non-finite steps)."""

    def __init__(self, message, step, signum, saved):
        super().__init__(message)
        self.step, self.signum, self.saved = step, signum, saved


def _memo(task, key, make):
    """`make()` once per task object and `key`: a task trained several times in one
    process (tests, notebooks) traces and compiles its step, init and shapes once."""
    memo = task.__dict__.setdefault("_trainer_memo", {})
    if key not in memo:
        memo[key] = make()
    return memo[key]


# A finite loss this many times the median of the last ABSURD_LOSS_WINDOW losses is
# reported (with its step and batch) as a warning: such a batch usually holds a volume
# with extreme intensities (e.g. data.clip=False and an unscaled file).
ABSURD_LOSS_RATIO = 1e6
ABSURD_LOSS_WINDOW = 100
_ABSURD_LOSS_MIN_HISTORY = 5


def compile_train_step(task, mesh, abstract_state):
    """One jax.jit over the whole update: replicated state and constants, the batch's
    sharding taken from the placed batch (see `put_batch`), the state donated.
    The same object for the same task and mesh (jax's trace cache then applies).
    On a mesh that splits volumes spatially the step is traced with XLA's convolutions
    (`tap_conv.for_mesh`: the CPU tap convs' slices would gather the whole activation)."""
    def make():
        repl = sharding.replicated(mesh)
        state_sh = jax.tree.map(lambda _: repl, abstract_state)

        def train_step(state, batch, consts):  # runs only while tracing
            with tap_conv.for_mesh(mesh):
                return task.train_step(state, batch, consts)

        return jax.jit(train_step, in_shardings=(state_sh, None, repl),
                       out_shardings=(state_sh, repl), donate_argnums=(0,))
    return _memo(task, ("train_step", mesh), make)


def _init_fn(task, mesh):
    """`task.init_state` jitted, its output replicated on the mesh; one object per task
    and mesh, so its shapes (`.eval_shape`) and its call share one trace."""
    return _memo(task, ("init", mesh),
                 lambda: jax.jit(task.init_state, out_shardings=sharding.replicated(mesh)))


def abstract_train_state(task, mesh):
    """The task's train state as `jax.ShapeDtypeStruct`s, replicated on the mesh
    (nothing allocated): what `compile_train_step(...).lower` takes."""
    def make():
        rng = jax.random.PRNGKey(int(task.config.train.seed))
        repl = sharding.replicated(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            _init_fn(task, mesh).eval_shape(rng))
    return _memo(task, ("abstract_state", mesh), make)


def init_train_state(task, mesh, abstract=None):
    """(state, abstract state with shardings): the initial state, replicated on the mesh."""
    abstract = abstract_train_state(task, mesh) if abstract is None else abstract
    return _init_fn(task, mesh)(jax.random.PRNGKey(int(task.config.train.seed))), abstract


def put_batch(batch, mesh):
    """A host batch (dict of arrays, batch first) as global arrays on the mesh."""
    return {k: sharding.put_global_batch(np.asarray(v), mesh) for k, v in batch.items()}


def put_eval_batch(batch, mesh):
    """An evaluation batch, which every process holds whole, as global arrays."""
    return {k: sharding.put_shared_batch(np.asarray(v), mesh) for k, v in batch.items()}


class AbsurdLossWatch:
    """Flags a finite loss over ABSURD_LOSS_RATIO times the median of the recent finite
    ones (at least _ABSURD_LOSS_MIN_HISTORY of them)."""

    def __init__(self, ratio=ABSURD_LOSS_RATIO, window=ABSURD_LOSS_WINDOW):
        self.ratio = float(ratio)
        self.recent = collections.deque(maxlen=int(window))

    def check(self, loss):
        """Returns the running median when `loss` is absurd, else None; records it."""
        loss = float(loss)
        if not math.isfinite(loss):
            return None
        median = float(np.median(self.recent)) if self.recent else None
        self.recent.append(loss)
        if (median is not None and len(self.recent) > _ABSURD_LOSS_MIN_HISTORY
                and median > 0 and loss > self.ratio * median):
            return median
        return None


def _batch_names(batch):
    """Pops the batch's file names (a loader may give "name": (B,) strings) off the batch,
    which then holds only arrays for the device."""
    names = batch.pop("name", None)
    return None if names is None else [str(n) for n in np.asarray(names).ravel()]


def _diverged_message(step, bad, config, manager) -> str:
    saved = sorted(manager.all_steps())
    if saved:
        kept = (f"The last good checkpoint, step {saved[-1]} in {manager.directory}, is "
                "untouched; a new run resumes from it.")
    else:
        kept = (f"No checkpoint was written before (none in {manager.directory}; "
                f"train.save_every_steps={config.train.save_every_steps}), so there is "
                "nothing to resume from.")
    lower_lr = options.setting("train.learning_rate", "LR")
    clip = options.setting("data.clip", True)
    fixes = options.fixes(lower_lr and f"lower the learning rate ({lower_lr})",
                          "check the data for extreme or non-finite values"
                          + (f" (or clip intensities to the a_min..a_max window: {clip})"
                             if clip and not config.data.get("clip", True) else ""))
    return (f"Stopped at step {step}: {bad} steps in a row had non-finite losses or "
            f"gradients (train.max_bad_steps={config.train.max_bad_steps}); they are in "
            f"metrics.jsonl. {kept} To fix: {fixes}.")


def train(task, workdir, progress=True):
    """Trains `task` in `workdir`; returns the final train state.

    Raises ConfigError / DataError (before the workdir is created) for a batch/mesh
    mismatch or bad data, StorageError when a file stands where the workdir should be,
    or it cannot be created or written (disk full, read-only; one line with the path and
    the free space or permission), WorkdirInUseError when another live process holds its
    lock, TrainingDivergedError after `train.max_bad_steps` non-finite steps in a row
    (the last good checkpoint is kept) and TrainingStopped after SIGINT or SIGTERM (a
    checkpoint of the step reached is saved first). A damaged checkpoint is set aside
    (renamed `<step>.damaged`) with one line, and the run resumes from the newest intact
    one.
    """
    from ldm_jax.errors import ConfigError

    config = task.config
    workdir = workdir_lib.check_workdir(workdir)  # a file in its place: before any work
    mesh = sharding.make_mesh(config.mesh)
    global_batch = int(config.train.batch_size)
    sharding.check_batch_fits(mesh, global_batch, task.sample_shape()[1:4])
    if global_batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} "
            "processes.")
    # The loaders check folders, files and sizes: before any model or workdir exists.
    train_loader = task.train_loader(global_batch // jax.process_count())
    eval_batches = task.eval_batches(max(mesh.shape["data"], min(global_batch, 4)))

    say(task.describe())
    say(f"Mesh: data={mesh.shape['data']} x spatial={mesh.shape['spatial']} over "
        f"{mesh.devices.size} of {len(jax.devices())} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es)")
    say(f"Workdir: {workdir} (checkpoints, metrics.jsonl, images/)")

    held = workdir_lib.open_workdir(workdir)  # one writer per workdir
    try:
        workdir_lib.set_aside(workdir)  # damaged steps its small files show
        return _resume_and_run(task, mesh, workdir, train_loader, eval_batches, progress)
    except OSError as e:  # metrics, images, TensorBoard events: disk full, read-only, ...
        storage.reraise(e, workdir, "writing the run's files",
                        "Checkpoints already saved are untouched; free some space or fix the "
                        "folder, then run the same command again to resume.")
    finally:
        if held is not None:
            held.release()


def _resume_and_run(task, mesh, workdir, train_loader, eval_batches, progress):
    """Resumes from the newest intact checkpoint (damaged ones set aside, one line each)
    or starts, then runs the loop."""
    config = task.config
    num_steps = int(config.train.num_steps)
    writers = None
    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                best_metric=task.best_metric)
    try:
        abstract_state, tries = None, 0
        while True:
            latest = manager.latest_step()
            try:
                # Reads only the saved config: a changed model is refused before anything
                # is built.
                accepted = (resume.check_resume(task, manager, latest, quiet=tries > 0)
                            if latest is not None else [])
                abstract_state = abstract_train_state(task, mesh)
                if latest is not None and int(latest) >= num_steps:
                    longer = options.setting("train.num_steps", "N")
                    restored = resume.restore(manager, latest, abstract_state, None, accepted)
                    say(f"{workdir} is finished: its latest checkpoint is step {latest} and "
                        f"train.num_steps={num_steps}. Nothing to do; "
                        + (f"raise {longer} to train longer, or " if longer else "")
                        + "train in a new workdir to start over.")
                    return restored
                train_iter = iter(train_loader)
                start = 0
                if latest is None:
                    state, _ = init_train_state(task, mesh, abstract_state)
                else:
                    state = resume.restore(manager, latest, abstract_state, train_iter,
                                           accepted)
                    start = int(latest)
                damaged = None
            except DamagedCheckpointError as e:
                damaged = e
            if jax.process_count() > 1:  # one decision for all processes
                if bool(any_process([damaged is not None])[0]) and damaged is None:
                    damaged = DamagedCheckpointError("unreadable on another process", latest,
                                                     "unreadable on another process")
            if damaged is None:
                break
            manager.close()
            tries += 1
            workdir_lib.set_aside(workdir, {int(latest): damaged.cause or str(damaged)})
            manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                        best_metric=task.best_metric)
        if start:
            say(f"Resuming from the checkpoint at step {start} in {manager.directory}")
        writers = Writers(workdir, start)
        note = dropped_note(workdir, writers, start)
        if note:
            say(note)
        step_fn = compile_train_step(task, mesh, abstract_state)
        if jax.process_count() > 1:  # gloo's first collective waits only 30 s for the others
            step_fn = distributed.compile_then_sync(step_fn, "train_step_compiled")
        consts = sharding.put_replicated(task.step_consts(), mesh)
        return _loop(task, mesh, state, step_fn, consts, train_iter,
                     eval_batches, manager, writers, workdir, start, progress)
    finally:
        if writers is not None:
            writers.close()
        manager.close()


def _loop(task, mesh, state, step_fn, consts, train_iter, eval_batches, manager, writers,
          workdir, start, progress):
    config = task.config
    num_steps = int(config.train.num_steps)
    accum = int(config.train.grad_accum_steps)
    save_every_s = 60.0 * float(config.train.get("save_every_minutes", 0) or 0)
    loss_key = task.loss_metric
    watch = AbsurdLossWatch()
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True,
                   file=sys.stdout)

    last_metrics, t_log, n_log = {}, time.perf_counter(), 0
    step_times, last_save = [], time.monotonic()
    try:
        with stopping.StopRequests(notify=lambda msg: say(msg, bar)) as stop:
            for step in range(start + 1, num_steps + 1):
                t0 = time.perf_counter()
                names = []
                for _ in range(accum):
                    batch = dict(next(train_iter))
                    names += _batch_names(batch) or []
                    state, metrics = step_fn(state, put_batch(batch, mesh), consts)
                bad = int(state.bad_steps)  # syncs: the guard must see this step
                step_times.append(time.perf_counter() - t0)
                loss = (float(jax.device_get(metrics[loss_key])) if loss_key in metrics
                        else None)
                median = None if loss is None else watch.check(loss)
                if median is not None:
                    where = (f"batch files: {', '.join(names)}" if names else
                             "the loader gives no file names for its batches")
                    say(f"warning: step {step}: {loss_key} {loss:.4g} is "
                        f"{loss / median:.3g} times the median {median:.4g} of the last "
                        f"{len(watch.recent) - 1} steps; {where}.", bar)
                # One decision for all processes: stop here? save by wall-clock time?
                stop_now, time_due = stopping.any_process(
                    [stop.requested != 0,
                     save_every_s > 0 and time.monotonic() - last_save >= save_every_s])
                n_log += 1
                if (step == start + 1 or step % int(config.train.log_every_steps) == 0
                        or step == num_steps or stop_now or bad or median is not None):
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    values["steps_per_s"] = n_log / (time.perf_counter() - t_log)
                    values["skipped_steps"] = int(state.skipped_steps)
                    writers.write(step, values)
                    last_metrics.update(values)
                    t_log, n_log = time.perf_counter(), 0
                    if bar is not None:
                        bar.set_postfix({label: f"{values[key]:.4f}"
                                         for label, key in task.progress_keys.items()
                                         if key in values}
                                        | {"it_s": f"{values['steps_per_s']:.2f}"})
                if bad >= int(config.train.max_bad_steps):  # after its row is written
                    raise TrainingDivergedError(_diverged_message(step, bad, config, manager))
                if step == start + 3 and jax.devices()[0].platform == "cpu":
                    seconds = float(np.median(step_times[1:]))
                    if seconds * (num_steps - start) > LONG_RUN_HOURS * 3600:
                        say(task.quick_run_hint(seconds, step_times[0], num_steps - start),
                            bar)
                val = None
                if step % int(config.train.eval_every_steps) == 0 or step == num_steps:
                    image_path = os.path.join(workdir, "images", f"step_{step}.png")
                    with tap_conv.for_mesh(mesh):  # the task traces its eval step here
                        val = task.evaluate(state, eval_batches,
                                            lambda b: put_eval_batch(b, mesh), image_path)
                    writers.write(step, val)
                    last_metrics.update(val)
                    if val:
                        say(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()),
                            bar)
                # No checkpoint during a streak of skipped steps: the last good one stays
                # latest.
                if bad == 0 and (step % int(config.train.save_every_steps) == 0
                                 or step == num_steps or time_due or stop_now):
                    # Only this step's own evaluation makes it a candidate for best.
                    ckpt.save(manager, step, state, config, train_iter,
                              dict(last_metrics, **val) if val else
                              {k: v for k, v in last_metrics.items() if k != task.best_metric})
                    last_save = time.monotonic()
                if bar is not None:
                    bar.update(1)
                if stop_now and step < num_steps:
                    raise _stopped(step, num_steps, stop.requested, bad == 0, manager)
    finally:
        if bar is not None:
            bar.close()
    return state


def _stopped(step, num_steps, signum, saved, manager):
    signum = signum or int(signal.SIGTERM)  # another process got it: that is preemption
    if saved:
        where = f"checkpoint saved in {os.path.join(str(manager.directory), str(step))}."
    else:
        latest = manager.latest_step()
        where = (f"step {step} was a skipped non-finite step, so nothing was saved; " + (
            f"the checkpoint at step {latest} in {manager.directory} is the latest."
            if latest is not None else "there is no checkpoint yet."))
    return TrainingStopped(f"Stopped by {stopping.signal_name(signum)} after step {step} of "
                           f"{num_steps}; {where}", step, signum, saved)
