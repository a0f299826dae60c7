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

The loop knows nothing of a stage's models or losses. A task gives it (duck-typed):

- `config` (validated), `best_metric` (a validation metric to minimise, e.g. "val_l1"),
  `progress_keys` ({bar label: metric name}), `config_path` (the config file or None,
  for hints; `ldm_jax.cli.train.make_task` sets it);
- `init_state(rng) -> state`: a pytree with at least `step`, `rng`, `bad_steps` and
  `skipped_steps` (int32 scalars; the non-finite guard reads the last two);
- `train_step(state, batch, consts) -> (state, metrics)`; `step_consts()` gives the
  replicated constants (e.g. perceptual-network weights) passed as `consts`;
- `sample_shape()`: (1, X, Y, Z, C) of one training input;
- `train_loader(batch_size)` and `eval_batches(batch_size)`: host batches, dicts of
  numpy arrays with the batch first (eval batches may carry extra keys, e.g. names);
- `evaluate(state, batches, put, image_path) -> metrics` (writes images on process 0);
- `describe() -> str` (printed at start: the model and the data it reads) and
  `quick_run_hint(seconds, first_seconds, steps) -> str` (printed on a CPU when the
  remaining `steps` would take more than `LONG_RUN_HOURS`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import sharding, stopping

LONG_RUN_HOURS = 2.0  # CPU runs estimated longer than this get the task's quick-run hint


class TrainingDivergedError(RuntimeError):
    """`train.max_bad_steps` non-finite steps in a row; the last good checkpoint is kept."""


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


def compile_train_step(task, mesh, abstract_state):
    """One jax.jit over the whole update: replicated state and constants, the batch's
    sharding taken from the placed batch (see `put_batch`), the state donated.
    The same object for the same task and mesh (jax's trace cache then applies)."""
    def make():
        repl = sharding.replicated(mesh)
        state_sh = jax.tree.map(lambda _: repl, abstract_state)
        return jax.jit(task.train_step, in_shardings=(state_sh, None, repl),
                       out_shardings=(state_sh, repl), donate_argnums=(0,))
    return _memo(task, ("train_step", mesh), make)


def abstract_train_state(task, mesh):
    """The task's train state as `jax.ShapeDtypeStruct`s, replicated on the mesh
    (nothing allocated): what `compile_train_step(...).lower` takes."""
    def make():
        rng = jax.random.PRNGKey(int(task.config.train.seed))
        repl = sharding.replicated(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            jax.eval_shape(task.init_state, rng))
    return _memo(task, ("abstract_state", mesh), make)


def init_train_state(task, mesh, abstract=None):
    """(state, abstract state with shardings): the initial state, replicated on the mesh."""
    abstract = abstract_train_state(task, mesh) if abstract is None else abstract
    state_sh = jax.tree.map(lambda x: x.sharding, abstract)
    init = _memo(task, ("init", mesh),
                 lambda: jax.jit(task.init_state, out_shardings=state_sh))
    return init(jax.random.PRNGKey(int(task.config.train.seed))), abstract


def put_batch(batch, mesh):
    """A host batch (dict of arrays, batch first) as global arrays on the mesh."""
    return {k: sharding.put_global_batch(np.asarray(v), mesh) for k, v in batch.items()}


def _json_value(v):
    """A metric as JSON: non-finite floats become null (JSON has no NaN or Infinity)."""
    v = float(v)
    return v if math.isfinite(v) else None


class Writers:
    """metrics.jsonl and TensorBoard events of one run, written by process 0 only.

    metrics.jsonl: one JSON object per row, {"step": int, name: float or null, ...}; a
    non-finite value (NaN, inf) is null. A run starting at `start_step` first drops the
    rows after that step (an earlier run's, written after its last checkpoint), so the
    file never interleaves two runs; `dropped` counts them (`last_dropped_step` is the
    highest). TensorBoard events after `start_step` are purged likewise.
    """

    def __init__(self, workdir, start_step=0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        self.dropped, self.last_dropped_step = 0, None
        if not self.active:
            return
        self._drop_rows_after(int(start_step))
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                                    purge_step=int(start_step) + 1)
        except ImportError:  # events are optional; metrics.jsonl always written
            self.tb = None

    def _drop_rows_after(self, start_step):
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    step = int(json.loads(line)["step"])
                except (ValueError, KeyError, TypeError):  # a torn last line
                    step = None
                if step is not None and step <= start_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
                elif line.strip():
                    self.dropped += 1
                    if step is not None:
                        self.last_dropped_step = max(step, self.last_dropped_step or 0)
        if self.dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def write(self, step, values):
        if not self.active or not values:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def say(msg, bar=None):
    """Prints on process 0 only; above a progress bar, on its own line."""
    if jax.process_index() != 0:
        return
    if bar is not None:
        bar.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def _dropped_note(workdir, writers, start):
    if not writers.dropped:
        return None
    rows = f"{writers.dropped} metrics.jsonl row(s)"
    upto = (f" (up to step {writers.last_dropped_step})"
            if writers.last_dropped_step is not None else "")
    if start == 0:
        return (f"note: {workdir} has {rows}{upto} but no checkpoint (the earlier run "
                "stopped before its first save): starting from step 0, those rows dropped.")
    return (f"note: dropped {rows}{upto} written after the checkpoint at step {start}, "
            "so metrics.jsonl holds one run.")


def train(task, workdir, progress=True):
    """Trains `task` in `workdir`; returns the final train state.

    Raises ConfigError / DataError (before the workdir is created) for a batch/mesh
    mismatch or bad data, TrainingDivergedError after `train.max_bad_steps` non-finite
    steps in a row (the last good checkpoint is kept) and TrainingStopped after SIGINT or
    SIGTERM (a checkpoint of the step reached is saved first).
    """
    from ldm_jax.config import ConfigError

    config = task.config
    workdir = os.path.abspath(workdir)
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

    os.makedirs(workdir, exist_ok=True)
    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                best_metric=task.best_metric)
    num_steps = int(config.train.num_steps)
    writers = None
    try:
        abstract_state = abstract_train_state(task, mesh)
        latest = manager.latest_step()
        if latest is not None and int(latest) >= num_steps:
            say(f"{workdir} is finished: its latest checkpoint is step {latest} and "
                f"train.num_steps={num_steps}. Nothing to do; raise "
                "--config.train.num_steps to train longer, or pass a new --workdir to start "
                "over.")
            return ckpt.restore_train(manager, latest, abstract_state)
        train_iter = iter(train_loader)
        start = 0
        if latest is None:
            state, _ = init_train_state(task, mesh, abstract_state)
        else:
            state = ckpt.restore_train(manager, latest, abstract_state, train_iter)
            start = int(latest)
            say(f"Resuming from the checkpoint at step {start} in {manager.directory}")
        writers = Writers(workdir, start)
        note = _dropped_note(workdir, writers, start)
        if note:
            say(note)
        step_fn = compile_train_step(task, mesh, abstract_state)
        return _loop(task, mesh, state, step_fn, task.step_consts(), train_iter,
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
                for _ in range(accum):
                    state, metrics = step_fn(state, put_batch(next(train_iter), mesh), consts)
                bad = int(state.bad_steps)  # syncs: the guard must see this step
                step_times.append(time.perf_counter() - t0)
                if bad >= int(config.train.max_bad_steps):
                    raise TrainingDivergedError(
                        f"Stopped at step {step}: {bad} steps in a row had non-finite losses "
                        f"or gradients (train.max_bad_steps={config.train.max_bad_steps}). "
                        f"The last good checkpoint in {manager.directory} is untouched. "
                        "Lower train.learning_rate, check the data for extreme values, or "
                        "lower train.grad_clip_norm.")
                # One decision for all processes: stop here? save by wall-clock time?
                stop_now, time_due = stopping.any_process(
                    [stop.requested != 0,
                     save_every_s > 0 and time.monotonic() - last_save >= save_every_s])
                if step == start + 3 and jax.devices()[0].platform == "cpu":
                    seconds = float(np.median(step_times[1:]))
                    if seconds * (num_steps - start) > LONG_RUN_HOURS * 3600:
                        say(task.quick_run_hint(seconds, step_times[0], num_steps - start),
                            bar)
                n_log += 1
                if (step == start + 1 or step % int(config.train.log_every_steps) == 0
                        or step == num_steps or stop_now):
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
                val = None
                if step % int(config.train.eval_every_steps) == 0 or step == num_steps:
                    image_path = os.path.join(workdir, "images", f"step_{step}.png")
                    val = task.evaluate(state, eval_batches, lambda b: put_batch(b, mesh),
                                        image_path)
                    writers.write(step, val)
                    last_metrics.update(val)
                    if val:
                        say(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()),
                            bar)
                # No checkpoint during a streak of skipped steps: the last good one stays
                # latest.
                if bad == 0 and (step % int(config.train.save_every_steps) == 0
                                 or step == num_steps or time_due or stop_now):
                    ckpt.save(manager, step, state, config, train_iter,
                              dict(last_metrics, **(val or {})) if val else last_metrics)
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
