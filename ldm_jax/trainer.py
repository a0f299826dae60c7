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
- `describe() -> str` (printed at start) and `quick_run_hint(seconds, first, steps)`;
- optionally `resume_fixed` / `resume_free`: dotted config prefixes that a resumed run
  must keep (the state's shapes, the data's meaning: model sections, preprocessing), and
  exceptions inside them (see `resume_changes`); `loss_metric` (default "loss"), the
  metric watched for absurd values.

Outputs in the workdir: `checkpoints/` (orbax), `metrics.jsonl` (one strict-JSON object
per logged step: {"step": int, name: float or null}; a non-finite value is written as
null, since JSON has no NaN or Infinity), `tb/` (TensorBoard events) and `images/`.
Every step is logged at `train.log_every_steps`, and so are the last step, every
step with a non-finite loss or gradient (skipped by the guard) and every step with an
absurd loss (over ABSURD_LOSS_RATIO times the median of the recent ones), which is also
reported with the files of its batch.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time

import jax
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import sharding


class TrainingDivergedError(RuntimeError):
    pass


# A finite loss this many times the median of the last ABSURD_LOSS_WINDOW losses is
# reported (with its step and batch) as a warning: such a batch usually holds a volume
# with extreme intensities (e.g. data.clip=False and an unscaled file).
ABSURD_LOSS_RATIO = 1e6
ABSURD_LOSS_WINDOW = 100
_ABSURD_LOSS_MIN_HISTORY = 5

# Config sections no task may change on resume.
_ALWAYS_FIXED = ("stage",)


def _flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1} (lists are values)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = object()


def _cli_value(value) -> str:
    """A saved config value as a command-line override takes it ('(32,64,64)' quoted)."""
    if isinstance(value, list):
        inner = ",".join(_cli_value(v).strip("'") for v in value)
        return f"'({inner}{',' if len(value) == 1 else ''})'"
    return str(value)


def _under(key, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(task, saved: dict):
    """Compares the config saved with a checkpoint to the task's config.

    Returns (refused, accepted): lists of (field, checkpoint value, config value). A
    field is refused when it lies under `task.resume_fixed` (or is `stage`) and not under
    `task.resume_free`: it changes the state's shapes or what the data mean. Every other
    change (steps, learning rates, cadences, batch size, ...) is accepted. A field the
    checkpoint does not have (a newer version's) is accepted.
    """
    fixed = _ALWAYS_FIXED + tuple(getattr(task, "resume_fixed", ()))
    free = tuple(getattr(task, "resume_free", ()))
    old = _flatten(saved)
    new = _flatten(json.loads(task.config.to_json()))
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        change = (key, a, b)
        if a is not _ABSENT and _under(key, fixed) and not _under(key, free):
            refused.append(change)
        else:
            accepted.append(change)
    return refused, accepted


def _describe_changes(changes, sep="; ") -> str:
    return sep.join(f"{k}: checkpoint {_show(a)}, config {_show(b)}" for k, a, b in changes)


def _check_resume(task, manager, step):
    """Refuses (ConfigError) a resume whose config changes fixed fields; returns the
    accepted changes. Reads only the config saved with `step`."""
    from ldm_jax import options
    from ldm_jax.config import ConfigError

    refused, accepted = resume_changes(task, ckpt.restore_config(manager, step))
    if refused:
        undo = options.fixes(*(options.setting(k, _cli_value(a)) for k, a, _ in refused),
                             sep=" ")
        raise ConfigError(
            f"Cannot resume from the checkpoint at step {step} in {manager.directory}: "
            f"{_describe_changes(refused)} (these change the model's state or what the data "
            f"mean). Train this config in a new --workdir, or undo the change to resume"
            + (f" ({undo})." if undo else "."))
    if accepted:
        say(f"Resuming with {len(accepted)} changed setting(s): "
            + "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in accepted))
    return accepted


def _restore(manager, step, abstract_state, train_iter, accepted):
    """The train state and the data position saved at `step`. A state that does not fit
    the config's is a ConfigError naming the changed settings; a data position that
    cannot be restored (a changed batch size or dataset) restarts the data stream, said
    in one line."""
    from ldm_jax.config import ConfigError

    try:
        state = ckpt.restore_train(manager, step, abstract_state)
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        suspects = (f"Settings changed since: {_describe_changes(accepted)}; one of them "
                    "changes the state's structure. Undo it, or train in a new --workdir."
                    if accepted else "Nothing in the config changed, so the checkpoint "
                    "comes from another version or stage; train in a new --workdir.")
        raise ConfigError(
            f"The train state saved at step {step} in {manager.directory} does not fit the "
            f"state this config builds ({reason}). {suspects}") from None
    try:
        ckpt.restore_data(manager, step, train_iter)
    except Exception as e:  # grain raises several types for a state of other data
        say(f"note: the data position saved at step {step} does not fit this data setup "
            f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            "); the data stream starts from its beginning.")
    return state


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


def init_train_state(task, mesh):
    """(state, abstract state with shardings): the initial state, replicated on the mesh."""
    abstract = abstract_train_state(task, mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, abstract)
    state = jax.jit(task.init_state, out_shardings=state_sh)(
        jax.random.PRNGKey(int(task.config.train.seed)))
    return state, abstract


def put_batch(batch, mesh):
    """A host batch (dict of arrays, batch first) as global arrays on the mesh."""
    return {k: sharding.put_global_batch(np.asarray(v), mesh) for k, v in batch.items()}


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
        """Appends {"step": step, **values}; non-finite values become null (strict JSON)."""
        if not self.active or not values:
            return
        row = {"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


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


def say(msg):
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _diverged_message(step, bad, config, manager) -> str:
    from ldm_jax import options

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

    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints,
                                best_metric=task.best_metric)
    latest = manager.latest_step()
    try:
        accepted = _check_resume(task, manager, latest) if latest is not None else []
        state, abstract_state = init_train_state(task, mesh)
        train_iter = iter(task.train_loader(global_batch // jax.process_count()))
        eval_batches = task.eval_batches(max(mesh.shape["data"], min(global_batch, 4)))
        consts = task.step_consts()
        start = 0
        if latest is not None:
            state = _restore(manager, latest, abstract_state, train_iter, accepted)
            start = int(latest)
            say(f"Resuming from the checkpoint at step {start} in {manager.directory}")
    except BaseException:
        manager.close()
        raise
    accum = int(config.train.grad_accum_steps)
    loss_key = getattr(task, "loss_metric", "loss")
    watch = AbsurdLossWatch()

    step_fn = compile_train_step(task, mesh, abstract_state)
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
            names = []
            for _ in range(accum):
                batch = dict(next(train_iter))
                names += _batch_names(batch) or []
                state, metrics = step_fn(state, put_batch(batch, mesh), consts)
            bad = int(state.bad_steps)  # syncs: the guard must see this step
            step_times.append(time.perf_counter() - t0)
            loss = float(jax.device_get(metrics[loss_key])) if loss_key in metrics else None
            median = None if loss is None else watch.check(loss)
            if median is not None:
                where = (f"batch files: {', '.join(names)}" if names else
                         "the loader gives no file names for its batches")
                say(f"warning: step {step}: {loss_key} {loss:.4g} is {loss / median:.3g} times "
                    f"the median {median:.4g} of the last {len(watch.recent) - 1} steps; "
                    f"{where}.")
            n_log += 1
            if (step % int(config.train.log_every_steps) == 0 or step == num_steps or bad
                    or median is not None):
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
            if bad >= int(config.train.max_bad_steps):
                raise TrainingDivergedError(_diverged_message(step, bad, config, manager))
            if step == start + 3 and jax.devices()[0].platform == "cpu":
                hint = task.quick_run_hint(float(np.median(step_times[1:])), step_times[0],
                                           num_steps * accum)
                if hint:
                    say(hint)
            val = None
            if step % int(config.train.eval_every_steps) == 0 or step == num_steps:
                image_path = os.path.join(workdir, "images", f"step_{step}.png")
                val = task.evaluate(state, eval_batches, lambda b: put_batch(b, mesh),
                                    image_path)
                writers.write(step, val)
                last_metrics.update(val)
                if val:
                    say(f"\nstep {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            # No checkpoint during a streak of skipped steps: the last good one stays latest.
            if bad == 0 and (step % int(config.train.save_every_steps) == 0
                             or step == num_steps):
                # Only this step's own evaluation makes it a candidate for best.
                ckpt.save(manager, step, state, config, train_iter,
                          dict(last_metrics, **val) if val else
                          {k: v for k, v in last_metrics.items() if k != task.best_metric})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        writers.close()
        manager.close()
    return state
