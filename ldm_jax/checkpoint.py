"""Orbax checkpoints in `<workdir>/checkpoints`: state, config JSON, data iterator, metrics.

The config travels with every checkpoint so that a checkpoint alone rebuilds its model
(extraction reads it back). The keep policy is the only thing that removes checkpoints:
the latest `train.keep_checkpoints` plus the one with the lowest validation L1.
"""

import json
import os

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = "val_l1"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def checkpoint_dir(workdir):
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir, keep=3, read_only=False, item_names=None):
    """CheckpointManager keeping the latest `keep` steps and the best by validation L1."""
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=max(int(keep), 1)),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        # best_fn only makes orbax write each step's metrics (for best_step after a
        # restart); which steps survive is decided by the policy above.
        best_fn=lambda m: m[BEST_METRIC], best_mode="min",
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=item_names)


def save(manager, step, state, config, data_iter=None, metrics=None):
    """Saves one step. `metrics` with a `val_l1` entry makes it a candidate for best."""
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iter is not None:
        items["data"] = _grain_save(data_iter)
    if metrics:
        items["last_metrics"] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})
    manager.save(step, args=ocp.args.Composite(**items),
                 metrics=_best_metrics(metrics), force=True)
    manager.wait_until_finished()


def _best_metrics(metrics):
    if metrics and BEST_METRIC in metrics:
        return {BEST_METRIC: float(metrics[BEST_METRIC])}
    return None


def _grain_save(data_iter):
    import grain
    return grain.checkpoint.CheckpointSave(data_iter)


def best_step(manager):
    """Step with the lowest validation L1 among those saved with metrics, else None."""
    best, best_value = None, None
    for step in manager.all_steps():
        m = manager.metrics(step)
        if m and BEST_METRIC in m and (best_value is None or m[BEST_METRIC] < best_value):
            best, best_value = step, m[BEST_METRIC]
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
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]


def restore_raw_state(manager, step):
    """The state as saved, as nested dicts of arrays, without building a target."""
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"]


def restore_state_item(manager, step, key="g_params"):
    """One top-level entry of the saved state (e.g. the autoencoder params), on one device.

    Extraction and inference need only `g_params`; restoring the whole TrainState would
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
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree[key])
    args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: target}, restore_args={key: args}, partial_restore=True)))
    return out["state"][key]
