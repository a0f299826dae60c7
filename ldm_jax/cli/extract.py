r"""Turn a dataset into latents for the diffusion stage.

  ldm-jax extract --workdir runs/x --input DIR_OR_GLOB --output latents/ \
      [--step best|latest|N] [--format npy|nifti|both] [--sample --seed S] [--overwrite]

The checkpoint alone defines the model and the preprocessing (intensity window, spacing,
...), so latents match what the autoencoder was trained on. One latent per input
(NAME.npy: (x, y, z, C) float32 channels-last; NAME.nii.gz: the same with the input's
affine, voxel sizes times the total factor) plus latents.json: per-file shapes and
affines, per-channel mean/std over the whole set, and scale_factor = 1/std, which the
diffusion stage multiplies latents by (the LDM convention for unit-variance latents).

Reruns: OUTPUT/provenance.jsonl records what made each output (checkpoint step and model
hash, the options that change the result, the input's path, size and modification time,
each file's SHA-256). A rerun with the same checkpoint and options completes the folder:
complete outputs are reused (and named), missing ones are made; outputs made otherwise
(another --step, a moved --step best included) are kept and the run refuses in one line
unless --overwrite. An interrupted run leaves only complete outputs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
import time
import zlib

import numpy as np

from ldm_jax import outputs as vf

LATENTS_JSON = "latents.json"


class LatentStats:
    """Per-channel mean / std over many latents (Chan's parallel update in float64)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, z) -> None:
        z = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
        n_b, mean_b = z.shape[0], z.mean(axis=0)
        m2_b = np.square(z - mean_b).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"latent with {mean_b.shape[0]} channels among latents with "
                             f"{self.mean.shape[0]}")
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + np.square(delta) * self.n * n_b / n
        self.n = n

    def summary(self) -> dict:
        """Channel means/stds, the same over all values, and 1/std scale factors."""
        if self.n == 0:
            return {}
        std = np.sqrt(self.m2 / self.n)
        g_mean = float(self.mean.mean())  # equal counts per channel
        g_m2 = float(self.m2.sum() + self.n * np.square(self.mean - g_mean).sum())
        g_std = float(np.sqrt(g_m2 / (self.n * self.mean.size)))
        return {
            "num_values_per_channel": int(self.n),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in std],
            "global_mean": g_mean,
            "global_std": g_std,
            "scale_factor": 1.0 / g_std if g_std > 0 else None,
            "scale_factor_per_channel": [1.0 / float(s) if s > 0 else None for s in std],
        }


def _sample_key(seed: int, name: str):
    """Per-file key from the seed and the file NAME, so a file's latent does not depend on
    which other files are in the run or their order."""
    import jax
    return jax.random.fold_in(jax.random.PRNGKey(int(seed)), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def dumps(obj) -> str:
    """Indented JSON with lists of numbers on one line (shapes, means, affine rows)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-+0-9.eE,\s]*?|null|true|false)\s*\]",
                  lambda m: "[" + re.sub(r"\s*,\s*", ", ", m.group(1).strip()) + "]", text)


def _write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(dumps(obj) + "\n")
    vf.atomic_write(path, write)


def _latent_path(out_dir, rec) -> str:
    """The file of a recorded latent to read back: its .npy if written, else its NIfTI."""
    files = sorted(rec["files"], key=lambda f: not f.endswith(".npy"))
    return os.path.join(out_dir, files[0])


def write_summary(out_dir, meta, records, bad, complete) -> dict:
    """latents.json over every recorded latent in `out_dir` (`records`: name -> record,
    sorted): per-file entries and the statistics, read back from the files in name
    order (the same bytes whatever runs wrote them). Returns its content."""
    stats, entries = LatentStats(), {}
    for name, rec in records.items():
        z, _ = vf.read_latent(_latent_path(out_dir, rec))
        stats.update(z)
        entries[name] = rec["row"]
    result = dict(meta, **stats.summary(), num_files=len(entries), files=entries,
                  skipped_bad_files=bad, complete=bool(complete))
    _write_json(os.path.join(out_dir, LATENTS_JSON), result)
    return result


def extract(workdir, input, output, *, step="best", format="npy", sample=False, seed=0,
            overwrite=False, skip_bad_files=False, frame=None, config=None, window="auto",
            overlap=0.5, windows_per_batch=None, memory_budget=None, dtype=None,
            progress=True, log=None) -> dict:
    """Encodes every volume of `input` into `output`; returns the latents.json content.

    `frame` (4D inputs): None (the checkpoint's data.frame), K, "all" (each frame its own
    latent, NAME_t0000 ...) or "none" (all frames as channels); see `cli.volume_jobs`.

    A rerun completes the folder: latents made by the same checkpoint and encoding from
    the same input files are reused, missing ones are made (`ldm_jax.outputs.Outputs`).
    Raises OutputConflictError when the folder holds latents of another checkpoint (a
    moved `--step best` included), encoding or input version, unless `overwrite`;
    NonFiniteResultError when a latent comes out NaN or Inf (nothing is written for it).
    """
    from tqdm import tqdm

    from ldm_jax import cli
    from ldm_jax import data as data_lib
    from ldm_jax.autoencoder.inference import (
        PREPROCESS_FIELDS,
        ChannelMismatchError,
        latent_affine,
        load_autoencoder,
    )
    from ldm_jax.data import io as data_io

    log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    fmts = vf.formats(format)
    frame = cli.parse_frame(frame)
    files = data_lib.list_volume_files(input, option="--input")  # before loading anything
    ae = load_autoencoder(workdir, step, dtype=dtype, config=config, window=window,
                          overlap=overlap, windows_per_batch=windows_per_batch,
                          memory_budget=memory_budget)
    jobs = cli.volume_jobs(files, vf.output_names(files), frame, ae.in_channels)
    out_dir = vf.prepare_output_dir(output, files)
    log(f"Checkpoint step {ae.step} of {ae.workdir} (model hash {ae.config_hash}); total factor "
        f"{ae.factor}, {ae.latent_channels} latent channels; window "
        f"{ae.describe_window()}, overlap {ae.overlap}; {len(files)} input file(s)"
        + (f", {len(jobs)} volume(s)." if len(jobs) != len(files) else "."))
    meta = {
        "checkpoint": {"workdir": ae.workdir, "step": ae.step, "config_hash": ae.config_hash},
        "model": {"total_factor": list(ae.factor), "latent_channels": ae.latent_channels,
                  "in_channels": ae.in_channels, "dtype": str(ae.model.dtype)},
        "preprocessing": {k: ae.config.data.get(k) for k in PREPROCESS_FIELDS},
        "encoding": {"mode": "sample" if sample else "mu", "seed": int(seed) if sample else None,
                     "frame": frame,
                     "window": (ae.window if isinstance(ae.window, str) else
                                list(ae.window) if ae.window else "whole"),
                     "overlap": ae.overlap},
    }
    items = [(name, [name + vf.SUFFIXES[f] for f in fmts],
              vf.source_of(path, frame=pick if isinstance(pick, int) else None))
             for path, name, pick in jobs]
    by_name = {name: (path, pick, src) for (path, name, pick), (_, _, src) in zip(jobs, items)}
    bad, done_at = [], []
    t_start = time.perf_counter()
    with vf.Outputs(out_dir, "extract", meta, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "latent(s)")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loads = {}

        def _load(path, pick):  # the volume, its affine and its header's (sform, qform)
            vol, affine = data_lib.load_volume(path, ae.config, pick)
            return vol, affine, data_io.nifti_codes(path)

        def prefetch(i):  # read + preprocess the next volume while this one is encoded
            if i < len(make) and i not in loads:
                path, pick, _ = by_name[make[i]]
                loads[i] = pool.submit(_load, path, pick)

        interrupted = True
        bar = tqdm(range(len(make)), desc="extract", unit="vol", disable=not progress,
                   file=sys.stdout, dynamic_ncols=True)
        try:
            for i in bar:
                name = make[i]
                path, pick, src = by_name[name]
                prefetch(i)
                prefetch(i + 1)
                try:
                    vol, affine, codes = loads.pop(i).result()
                except data_lib.VolumeShapeError as e:  # a layout the model cannot take
                    raise ChannelMismatchError(str(e)) from None  # says what it takes
                except data_lib.DataError as e:
                    if not skip_bad_files:
                        raise cli.with_skip_hint(e) from None
                    bad.append({"input": os.path.abspath(path), "reason": str(e)})
                    log(f"skipped {path}: {e}")
                    continue
                lay = ae.layout(vol.shape)
                if lay.was_padded or lay.window is not None:
                    log(f"{name}: {lay.describe()}")
                try:
                    z = np.asarray(ae.encode_volume(
                        vol, sample=sample, key=_sample_key(seed, name) if sample else None),
                        np.float32)
                except ValueError as e:
                    raise type(e)(f"{path}: {e}") from None
                cli.check_finite(z, f"{path}: its latent", ae,
                                 f"encoding {meta['encoding']['mode']}, dtype "
                                 f"{ae.model.dtype}, window {lay.describe()}")
                lat_affine = latent_affine(affine, ae.factor)
                row = {
                    "input": os.path.abspath(path),
                    "frame": pick if isinstance(pick, int) else None,
                    "input_shape": list(lay.shape),
                    "padded_shape": list(lay.padded),
                    "latent_shape": list(z.shape),
                    "windows": lay.num_windows,
                    "affine": np.asarray(affine, float).round(9).tolist(),
                    "latent_affine": lat_affine.round(9).tolist(),
                    "sform_code": None if codes is None else codes[0],
                    "qform_code": None if codes is None else codes[1],
                    "outputs": [name + vf.SUFFIXES[f] for f in fmts],
                }
                outs.write(name, {name + vf.SUFFIXES[f]: (
                    lambda tmp, f=f: vf.write(tmp, f, z, lat_affine, codes)) for f in fmts},
                    src, row)
                done_at.append(time.perf_counter())
            interrupted = False
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            records = outs.complete()
            if records and interrupted:  # the folder's summary still covers every latent
                try:
                    write_summary(out_dir, meta, records, bad, complete=False)
                except Exception:  # noqa: BLE001 -- the interruption is what to report
                    pass
    if not records:
        raise data_lib.DataError(
            f"No latents: all {len(files)} input file(s) were unreadable ({len(bad)} skipped).")
    result = write_summary(out_dir, meta, records, bad, complete=True)
    json_path = os.path.join(out_dir, LATENTS_JSON)
    rate = ""
    if done_at:
        total = done_at[-1] - t_start
        rate = f" in {total:.1f} s ({len(done_at) / total:.2f} volumes/s"
        if len(done_at) > 1:  # the first volume includes compilation
            rate += (f"; {(len(done_at) - 1) / (done_at[-1] - done_at[0]):.2f} volumes/s "
                     "after the first")
        rate += ")"
    sf = result.get("scale_factor")
    log(f"Encoded {len(done_at)} volume(s){rate}, reused {len(reused)} complete, skipped "
        f"{len(bad)} unreadable. Wrote {json_path} over {len(records)} latent(s) "
        f"(scale_factor {'undefined: all latents are constant' if sf is None else f'{sf:.6g}'}).")
    return result


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    cli.define_model_flags(fv)
    cli.define_io_flags(fv, "Volumes: a directory, a glob (quote it) or one file "
                        "(.nii, .nii.gz, .npy).")
    cli.define_frame_flag(fv)
    flags.DEFINE_enum("format", "npy", ["npy", "nifti", "both"], "Latent file format.",
                      flag_values=fv)
    flags.DEFINE_bool("sample", False, "Draw mu + sigma * eps instead of mu.", flag_values=fv)
    cli.define_seed_flag(fv, "Seed for --sample (combined with each file's name).")


def _body(fv):
    from ldm_jax import cli
    extract(fv.workdir, fv.input, fv.output, format=fv.format, sample=fv.sample, seed=fv.seed,
            overwrite=fv.overwrite, skip_bad_files=fv.skip_bad_files, frame=fv.frame,
            progress=fv.progress,
            **cli.model_kwargs(fv))


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax extract", __doc__, _define, _body, argv,
                   required=("workdir", "input", "output"))


if __name__ == "__main__":
    sys.exit(main())
