"""Orbax checkpoints in `<workdir>/checkpoints`: state, config JSON, data iterator, metrics.

The config travels with every checkpoint so that a checkpoint alone rebuilds its model
(extraction reads it back). The keep policy is the only thing that removes checkpoints:
the latest `train.keep_checkpoints` plus the one with the lowest value of the task's
best metric (stage 1: validation L1; stage 2: validation denoising loss). Only that one
metric is recorded with each step, under its own name, so `best_step` needs no stage.
"""

import json
import logging
import os

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from ldm_jax.errors import CheckpointNotFoundError

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


def make_manager(workdir, keep=3, read_only=False, item_names=None,
                 best_metric=DEFAULT_BEST_METRIC):
    """CheckpointManager keeping the latest `keep` steps and the best by `best_metric`
    (lowest wins)."""
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
        enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                    item_names=item_names)
    manager.best_metric = best_metric
    return manager


def save(manager, step, state, config, data_iter=None, metrics=None):
    """Saves one step. `metrics` holding the manager's best metric make it a candidate
    for best."""
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iter is not None:
        items["data"] = _grain_save(data_iter)
    if metrics:
        items["last_metrics"] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})
    name = getattr(manager, "best_metric", DEFAULT_BEST_METRIC)
    best = {name: float(metrics[name])} if metrics and name in metrics else None
    manager.save(step, args=ocp.args.Composite(**items), metrics=best, force=True)
    manager.wait_until_finished()


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


def restore_config(manager, step):
    """The config dict saved with `step` (plain dict from JSON)."""
    out = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out["config"]


def restore_train(manager, step, abstract_state, data_iter=None):
    """Restores the full train state (with shardings of `abstract_state`) and the iterator."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
        import grain
        _check_process_count(manager, step)
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]


def restore_data(manager, step, data_iter) -> None:
    """Sets `data_iter` (a grain iterator) to the position saved with `step`."""
    import grain
    _check_process_count(manager, step)
    manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iter)))


def _check_process_count(manager, step):
    """Raises ConfigError unless this run has as many processes as the one that saved
    `step` (grain keeps one data-iterator state per process: process_I-of-N.json)."""
    import jax

    from ldm_jax.errors import ConfigError

    path = ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(),
                                   step=int(step)) / "data"
    index, count = jax.process_index(), jax.process_count()
    if not (path / f"process_{index}-of-{count}.json").exists():
        saved = sorted({p.name.split("-of-")[-1].removesuffix(".json")
                        for p in path.glob("process_*-of-*.json")})
        raise ConfigError(
            f"The checkpoint at step {step} in {manager.directory} was saved by "
            f"{' or '.join(saved) or 'an unknown number of'} process(es); this run has "
            f"{count}. The data-iterator state is kept per process: resume with the same "
            "number of processes (--multihost), or start a new --workdir.")


def restore_raw_state(manager, step):
    """The state as saved, as nested dicts of arrays, without building a target."""
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"]


def restore_state_item(manager, step, key):
    """One top-level entry of the saved state (e.g. the autoencoder params), on one device.

    Inference needs only the model params (stage 1: `g_params`); restoring the whole TrainState would
    also read both optimiser states and the discriminator (about 3x the params) and would
    need a target built from the training setup. The target here comes from the saved
    metadata, so the checkpoint alone is enough.
    """
    import jax

    path = ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(),
                                   step=int(step)) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    if key not in tree:
        raise CheckpointNotFoundError(
            f"The state saved at step {step} in {manager.directory} has no {key!r} entry "
            f"(it has {', '.join(sorted(tree))}); it was not written by ldm-jax's trainer.")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree[key])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: target}, restore_args={key: args}, partial_restore=True)))
    return out["state"][key]
