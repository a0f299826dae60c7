"""The training loop for any stage: data -> one jitted sharded step -> eval, images, checkpoints.

`train(task, workdir)` runs a task (stage 1: `ldm_jax.autoencoder.task.AutoencoderTask`,
stage 2: `ldm_jax.diffusion.task.DiffusionTask`) to `config.train.num_steps`. A second
run on the same workdir resumes from the latest checkpoint, exactly: the train state and
the data iterator are both restored.

The loop knows nothing of a stage's models or losses. A task gives it (duck-typed):

- `config` (validated), `best_metric` (a validation metric to minimise, e.g. "val_l1"),
  `progress_keys` ({bar label: metric name});
- `init_state(rng) -> state`: a pytree with at least `step`, `rng`, `bad_steps` and
  `skipped_steps` (int32 scalars; the non-finite guard reads the last two);
- `train_step(state, batch, consts) -> (state, metrics)`; `step_consts()` gives the
  replicated constants (e.g. perceptual-network weights) passed as `consts`;
- `train_loader(batch_size)` and `eval_batches(batch_size)`: host batches, dicts of
  numpy arrays with the batch first;
- `evaluate(state, batches, put, image_path) -> metrics` (writes images on process 0);
- `describe() -> str` (printed at start) and `quick_run_hint(seconds, first, steps)`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import distributed, sharding


class TrainingDivergedError(RuntimeError):
    pass


def compile_train_step(task, mesh, abstract_state):
    """One jax.jit over the whole update: replicated state and constants, the batch's
    sharding taken from the placed batch (see `put_batch`), the state donated."""
    repl = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: repl, abstract_state)
    return jax.jit(task.train_step, in_shardings=(state_sh, None, repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))


def abstract_train_state(task, mesh):
    """The task's train state as `jax.ShapeDtypeStruct`s, replicated on the mesh
    (nothing allocated): what `compile_train_step(...).lower` takes."""
    rng = jax.random.PRNGKey(int(task.config.train.seed))
    repl = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                        jax.eval_shape(task.init_state, rng))


def init_train_state(task, mesh, abstract=None):
    """(state, abstract state with shardings): the initial state, replicated on the mesh."""
    abstract = abstract_train_state(task, mesh) if abstract is None else abstract
    state_sh = jax.tree.map(lambda x: x.sharding, abstract)
    state = jax.jit(task.init_state, out_shardings=state_sh)(
        jax.random.PRNGKey(int(task.config.train.seed)))
    return state, abstract


def put_batch(batch, mesh):
    """A host batch (dict of arrays, batch first) as global arrays on the mesh."""
    return {k: sharding.put_global_batch(np.asarray(v), mesh) for k, v in batch.items()}


def put_eval_batch(batch, mesh):
    """An evaluation batch, which every process holds whole, as global arrays."""
    return {k: sharding.put_shared_batch(np.asarray(v), mesh) for k, v in batch.items()}


class Writers:
    """metrics.jsonl and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # events are optional; metrics.jsonl always written
                self.tb = None

    def write(self, step, values):
        if not self.active or not values:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def say(msg):
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def train(task, workdir, progress=True):
    """Trains `task` in `workdir`; returns the final train state.

    Raises ConfigError for a batch/mesh mismatch and TrainingDivergedError after
    `train.max_bad_steps` non-finite steps in a row (the last good checkpoint is kept).
    """
    from ldm_jax.config import ConfigError

    config = task.config
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    global_batch = int(config.train.batch_size)
    sharding.check_batch_fits(mesh, global_batch, task.sample_shape()[1:4])
    if global_batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} "
            "processes.")

    say(task.describe())
    say(f"Mesh: data={mesh.shape['data']} x spatial={mesh.shape['spatial']} over "
        f"{mesh.devices.size} of {len(jax.devices())} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es)")

    abstract_state = abstract_train_state(task, mesh)
    train_iter = iter(task.train_loader(global_batch // jax.process_count()))
    eval_batches = task.eval_batches(max(mesh.shape["data"], min(global_batch, 4)))
    consts = sharding.put_replicated(task.step_consts(), mesh)

    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                best_metric=task.best_metric)
    accum = int(config.train.grad_accum_steps)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state = ckpt.restore_train(manager, latest, abstract_state, train_iter)
        start = int(latest)
        say(f"Resuming from the checkpoint at step {start} in {manager.directory}")
    else:  # a resumed run skips compiling the initialisation
        state, _ = init_train_state(task, mesh, abstract_state)

    step_fn = compile_train_step(task, mesh, abstract_state)
    if jax.process_count() > 1:  # gloo's first collective waits only 30 s for the others
        step_fn = distributed.compile_then_sync(step_fn, "train_step_compiled")
    writers = Writers(workdir)
    num_steps = int(config.train.num_steps)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True,
                   file=sys.stdout)

    last_metrics, t_log, n_log = {}, time.perf_counter(), 0
    step_times = []
    try:
        for step in range(start + 1, num_steps + 1):
            t0 = time.perf_counter()
            for _ in range(accum):
                state, metrics = step_fn(state, put_batch(next(train_iter), mesh), consts)
            bad = int(state.bad_steps)  # syncs: the guard must see this step
            step_times.append(time.perf_counter() - t0)
            if bad >= int(config.train.max_bad_steps):
                raise TrainingDivergedError(
                    f"Stopped at step {step}: {bad} steps in a row had non-finite losses or "
                    f"gradients (train.max_bad_steps={config.train.max_bad_steps}). The last "
                    f"good checkpoint in {manager.directory} is untouched. Lower "
                    "train.learning_rate, check the data for extreme values, or raise "
                    "train.grad_clip_norm strictness.")
            if step == start + 3 and jax.devices()[0].platform == "cpu":
                hint = task.quick_run_hint(float(np.median(step_times[1:])), step_times[0],
                                           num_steps * accum)
                if hint:
                    say(hint)
            n_log += 1
            if step % int(config.train.log_every_steps) == 0 or step == num_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["steps_per_s"] = n_log / (time.perf_counter() - t_log)
                values["skipped_steps"] = int(state.skipped_steps)
                writers.write(step, values)
                last_metrics.update(values)
                t_log, n_log = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix({label: f"{values[key]:.4f}"
                                     for label, key in task.progress_keys.items()
                                     if key in values} | {"it_s": f"{values['steps_per_s']:.2f}"})
            val = None
            if step % int(config.train.eval_every_steps) == 0 or step == num_steps:
                image_path = os.path.join(workdir, "images", f"step_{step}.png")
                val = task.evaluate(state, eval_batches, lambda b: put_eval_batch(b, mesh),
                                    image_path)
                writers.write(step, val)
                last_metrics.update(val)
                if val:
                    say(f"\nstep {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            # No checkpoint during a streak of skipped steps: the last good one stays latest.
            if bad == 0 and (step % int(config.train.save_every_steps) == 0
                             or step == num_steps):
                ckpt.save(manager, step, state, config, train_iter,
                          dict(last_metrics, **(val or {})) if val else last_metrics)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        writers.close()
        manager.close()
    return state
