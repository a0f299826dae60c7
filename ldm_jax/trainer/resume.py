"""Resuming a run: which config changes a checkpoint accepts, and restoring its state.

A task names the config fields a resumed run must keep (`resume_fixed`: the state's
shapes, what the data mean) and exceptions inside them (`resume_free`); every other change
is accepted and listed in one line.
"""

from __future__ import annotations

import json

from ldm_jax import checkpoint as ckpt
from ldm_jax import options
from ldm_jax.trainer.writers import say

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
    fixed = _ALWAYS_FIXED + tuple(task.resume_fixed)
    free = tuple(task.resume_free)
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


def check_resume(task, manager, step, quiet=False):
    """Refuses (ConfigError) a resume whose config changes fixed fields; returns the
    accepted changes, listed in one line unless `quiet`. Reads only the config saved with
    `step` (DamagedCheckpointError when it cannot be read)."""
    from ldm_jax.errors import ConfigError

    refused, accepted = resume_changes(task, ckpt.restore_config(manager, step))
    if refused:
        undo = options.fixes(*(options.setting(k, _cli_value(a)) for k, a, _ in refused),
                             sep=" ")
        raise ConfigError(
            f"Cannot resume from the checkpoint at step {step} in {manager.directory}: "
            f"{_describe_changes(refused)} (these change the model's state or what the data "
            f"mean). Train this config in a new --workdir, or undo the change to resume"
            + (f" ({undo})." if undo else "."))
    if accepted and not quiet:
        say(f"Resuming with {len(accepted)} changed setting(s): "
            + "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in accepted))
    return accepted


def restore(manager, step, abstract_state, train_iter, accepted):
    """The train state and (unless `train_iter` is None) the data position saved at
    `step`.

    Raises ConfigError when the saved state's arrays do not fit the state this config
    builds (compared on the saved metadata first, so only a real change of structure is
    reported, naming the changed settings), DamagedCheckpointError when the step cannot
    be read (the caller sets it aside and tries the next one). A data position that
    cannot be restored (a changed batch size or dataset) restarts the data stream, said
    in one line.
    """
    from ldm_jax.errors import ConfigError

    mismatch = ckpt.state_mismatch(manager, step, abstract_state)
    if mismatch:
        reason = "; ".join(mismatch[:3]) + (f"; and {len(mismatch) - 3} more"
                                            if len(mismatch) > 3 else "")
        suspects = (f"Settings changed since: {_describe_changes(accepted)}; one of them "
                    "changes the state's structure. Undo it, or train in a new --workdir."
                    if accepted else "Nothing in the config changed, so the checkpoint "
                    "comes from another version or stage; train in a new --workdir.")
        raise ConfigError(
            f"The train state saved at step {step} in {manager.directory} does not fit the "
            f"state this config builds ({reason}). {suspects}")
    state = ckpt.restore_train(manager, step, abstract_state)
    if train_iter is None:
        return state
    try:
        ckpt.restore_data(manager, step, train_iter)
    except ConfigError:  # saved by another number of processes: say so, never guess
        raise
    except Exception as e:  # grain raises several types for a state of other data
        say(f"note: the data position saved at step {step} does not fit this data setup "
            f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            "); the data stream starts from its beginning.")
    return state
