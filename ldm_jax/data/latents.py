"""Latents for the diffusion stage: an extracted folder, or volumes encoded at start.

A latents folder is what `ldm-jax extract` writes: `NAME.npy` (x, y, z, C)
float32 channels-last plus `latents.json` (per-file entries, the autoencoder checkpoint's
workdir, step and model hash). `read_latent_folder` checks that hash against the
autoencoder the diffusion run uses, so latents of another model are refused.

Batches are `{"latent": float32 (B, x, y, z, C)}` (plus `"class_label": int32 (B,)` when
labels are configured, `"context": float32 (B, S, D)` when a cross-attention context
folder is, and `"condition": float32 (B, X', Y', Z', C)` for a ControlNet's paired
conditions), from an infinite, per-epoch reshuffled, process-sharded grain
loader whose iterator state goes into every checkpoint (exact resume), like stage 1's.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import grain.python as gp
import numpy as np

from ldm_jax.errors import DataError

LATENTS_JSON = "latents.json"


def read_latent_folder(path: str, expected_hash: Optional[str] = None):
    """(names, latents, meta) of an extracted latents folder.

    Args:
        path: folder holding latents.json and NAME.npy (or NAME.nii.gz) files.
        expected_hash: the autoencoder's `model_config_hash`; None skips the check.

    Returns:
        names (list[str], sorted), latents (list of float32 (x, y, z, C)), meta (the
        latents.json dict).

    Raises:
        DataError: no folder / no latents.json / an interrupted extraction (latents.json
            marked incomplete, or latents in the folder it does not list) / no latents /
            unequal latent shapes / latents from another autoencoder (hash mismatch).
    """
    from ldm_jax.outputs import read_latent

    json_path = os.path.join(path, LATENTS_JSON)
    if not os.path.isfile(json_path):
        raise DataError(
            f"latents.dir={path!r} has no {LATENTS_JSON}; write one with "
            f"`ldm-jax extract --workdir AUTOENCODER_WORKDIR --input VOLUMES --output {path}`, "
            "or unset latents.dir to encode volumes on the fly.")
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path} is not readable JSON ({type(e).__name__}: {e}); run "
                        "the ldm-jax extract command that wrote it again (it reuses the "
                        "complete latents).") from None
    _check_complete(path, meta)
    got = meta.get("checkpoint", {}).get("config_hash")
    if expected_hash is not None and got != expected_hash:
        raise DataError(
            f"The latents in {path} come from another autoencoder (model hash {got}, "
            f"{meta.get('checkpoint', {}).get('workdir')}) than latents.autoencoder_workdir "
            f"(model hash {expected_hash}). Re-extract them with that autoencoder, or point "
            "latents.autoencoder_workdir at the one that made them.")
    names = sorted(meta.get("files", {}))
    if not names:
        raise DataError(f"{json_path} lists no latents; run the extraction again.")
    latents = []
    for name in names:
        outputs = meta["files"][name].get("outputs") or [name + ".npy"]
        p = os.path.join(path, outputs[0])
        if not os.path.exists(p):
            raise DataError(f"{p} is listed in {json_path} but missing.")
        z, _ = read_latent(p)
        latents.append(np.asarray(z, np.float32))
    shapes = sorted({z.shape for z in latents})
    if len(shapes) > 1:
        raise DataError(
            f"The latents in {path} have {len(shapes)} different shapes ({shapes[:3]}...); "
            "the diffusion model trains on one shape: extract crops of one size (the "
            "autoencoder's data.volume_size) or resample the volumes first.")
    return names, latents, meta


def _check_complete(path: str, meta: dict) -> None:
    """Raises DataError when the extraction that wrote `path` was interrupted: its
    latents.json says so, or provenance.jsonl records latents that latents.json lacks (a
    run killed before it could rewrite the summary)."""
    from ldm_jax.outputs import RECORD

    fix = ("run the same ldm-jax extract command again to complete it (it reuses the "
           "complete latents and makes the missing ones).")
    if meta.get("complete") is False:
        raise DataError(f"The extraction into {path} was interrupted: its {LATENTS_JSON} "
                        f"lists {len(meta.get('files', {}))} latent(s) so far; {fix}")
    record = os.path.join(path, RECORD)
    if not os.path.exists(record):
        return
    listed, made = set(meta.get("files", {})), set()
    with open(record, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("made_by", {}).get("command") == "extract":
                made.add(str(rec.get("name")))
    extra = sorted(made - listed)
    extra = [n for n in extra if any(os.path.exists(os.path.join(path, n + s))
                                     for s in (".npy", ".nii.gz"))]
    if extra:
        raise DataError(f"{path} holds {len(extra)} latent(s) that its {LATENTS_JSON} does "
                        f"not list (e.g. {extra[0]}): an extraction into it was interrupted; "
                        f"{fix}")


def read_labels(csv_path: str, names: Sequence[str], num_classes: int) -> np.ndarray:
    """Class labels (int32, one per name) from a CSV with columns `name,label`.

    Raises:
        DataError: missing file or column, a name without a label, a label that is not an
            integer or is outside [0, num_classes).
    """
    if not os.path.isfile(csv_path):
        raise DataError(f"data.labels_csv={csv_path!r} does not exist; give a CSV with "
                        "columns name,label (name = the latent's file name without suffix).")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"name", "label"} <= set(rows[0]):
        raise DataError(f"{csv_path} needs the columns name,label; found "
                        f"{sorted(rows[0]) if rows else 'no rows'}.")
    table = {r["name"]: r["label"] for r in rows}
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{csv_path} has no label for {len(missing)} latent(s), e.g. "
                        f"{missing[:3]}.")
    labels = []
    for n in names:
        try:
            labels.append(int(str(table[n]).strip()))
        except ValueError:
            raise DataError(f"{csv_path}: the label of {n!r} is {table[n]!r}, not a class "
                            f"number; labels are integers in [0, {num_classes}) "
                            f"(conditioning.num_classes={num_classes}): map class names to "
                            "0, 1, ... in the CSV.") from None
    labels = np.asarray(labels, np.int32)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{csv_path}: label {int(bad[0])} is outside [0, {num_classes}) "
                        f"(conditioning.num_classes={num_classes}).")
    return labels


def read_contexts(folder: str, names: Sequence[str], dim: int) -> np.ndarray:
    """Cross-attention contexts (N, S, dim) float32, one `NAME.npy` per name in `folder`.

    Each file holds (S, dim) (a sequence of S tokens, e.g. a text encoder's hidden states)
    or (dim,) (read as S = 1); every file must have the same S.

    Raises:
        DataError: no folder, a name without a file, a file that is not (S, dim) or
            (dim,), unequal S.
    """
    hint = (f"one NAME.npy per latent (NAME = the latent's file name without suffix), "
            f"float32 (S, {dim}) or ({dim},)")
    if not os.path.isdir(folder):
        raise DataError(f"conditioning.context_dir={folder!r} is not a folder; give a folder "
                        f"with {hint}.")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n + ".npy"))]
    if missing:
        raise DataError(f"{folder} has no context for {len(missing)} latent(s), e.g. "
                        f"{[m + '.npy' for m in missing[:3]]}; it needs {hint}.")
    contexts = []
    for n in names:
        path = os.path.join(folder, n + ".npy")
        try:
            raw = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable .npy array ({e}); {hint}.") from None
        c = np.asarray(raw, np.float32)
        c = c[None] if c.ndim == 1 else c
        if c.ndim != 2 or c.shape[-1] != int(dim):
            raise DataError(f"{path} has shape {tuple(raw.shape)}; contexts must be "
                            f"(S, {dim}) or ({dim},) (unet.cross_attention_dim={dim}): save "
                            "them with that last axis, or set --config.unet.cross_attention_dim "
                            "to theirs.")
        contexts.append(c)
    lengths = sorted({c.shape[0] for c in contexts})
    if len(lengths) > 1:
        raise DataError(f"the contexts in {folder} have {len(lengths)} different lengths S "
                        f"{lengths[:4]}; give every NAME.npy the same S (pad or truncate the "
                        "token sequences to one length, as text encoders pad prompts).")
    return np.stack(contexts)


class _ArraySource(gp.RandomAccessDataSource):
    """Records {"latent": (x, y, z, C)[, "class_label": ()][, "context": (S, D)]
    [, "condition": (X', Y', Z', C)]} from in-memory arrays."""

    def __init__(self, latents, labels=None, contexts=None, conditions=None):
        self.latents = latents
        self.labels = labels
        self.contexts = contexts
        self.conditions = conditions

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        rec = {"latent": self.latents[i]}
        if self.labels is not None:
            rec["class_label"] = np.int32(self.labels[i])
        if self.contexts is not None:
            rec["context"] = self.contexts[i]
        if self.conditions is not None:
            rec["condition"] = self.conditions[i]
        return rec

    def __repr__(self):
        return f"latents({len(self.latents)})"


def make_latent_loader(latents, labels=None, contexts=None, *, batch_size: int, seed: int,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None, conditions=None):
    """Infinite, reshuffled batches of in-memory latents: this process's slice of every
    global batch (`ldm_jax.data.sampler`).

    Returns a `ldm_jax.data.pipeline.TrainLoader` (iterator checkpointable with grain).
    Raises DataError when there are no latents.
    """
    import grain.python as gp

    from ldm_jax.data.pipeline import TrainLoader, _process_index_count
    from ldm_jax.data.sampler import make_loader

    pi, pc = _process_index_count(process_index, process_count)
    source = _ArraySource(latents, labels, contexts, conditions)
    # In memory: one reading thread, two batches ahead. (grain's default read-ahead of 500
    # records on 16 threads costs far more CPU in its index shuffle than reading a
    # handful of in-memory latents.)
    read_options = gp.ReadOptions(num_threads=1, prefetch_buffer_size=2 * int(batch_size))
    loader = make_loader(source, [], batch_size=int(batch_size), seed=int(seed),
                         process_index=pi, process_count=pc, read_options=read_options)
    return TrainLoader(loader, source, int(batch_size), pi, pc)
