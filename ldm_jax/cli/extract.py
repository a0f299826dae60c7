r"""Turn a dataset into latents for the diffusion stage.

  ldm-jax extract --workdir runs/x --input DIR_OR_GLOB --output latents/ \
      [--step best|latest|N] [--format npy|nifti|both] [--sample --seed S] [--overwrite]

The checkpoint alone defines the model and the preprocessing (intensity window, spacing,
...), so latents match what the autoencoder was trained on. One latent per input
(NAME.npy: (x, y, z, C) float32 channels-last; NAME.nii.gz: the same with the input's
affine, voxel sizes times the total factor) plus latents.json: per-file shapes and
affines, per-channel mean/std over the whole set, and scale_factor = 1/std, which the
diffusion stage multiplies latents by (the LDM convention for unit-variance latents).
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
_SAVE_EVERY_S = 30.0


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


def _previous(out_dir, meta, overwrite, log):
    """Entries of an earlier run's latents.json, if it used the same model and encoding."""
    path = os.path.join(out_dir, LATENTS_JSON)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        log(f"note: {path} is unreadable; it will be rewritten")
        return {}
    ck, pk = meta["checkpoint"], prev.get("checkpoint", {})
    same = (pk.get("config_hash") == ck["config_hash"] and pk.get("step") == ck["step"]
            and prev.get("encoding", {}).get("mode") == meta["encoding"]["mode"]
            and prev.get("encoding", {}).get("seed") == meta["encoding"]["seed"]
            and prev.get("encoding", {}).get("frame") == meta["encoding"]["frame"])
    if not same and not overwrite:
        from ldm_jax.errors import ConfigError
        raise ConfigError(
            f"{out_dir} holds latents from another model or encoding (step "
            f"{pk.get('step')}, config hash {pk.get('config_hash')}, mode "
            f"{prev.get('encoding', {}).get('mode')}, frame "
            f"{prev.get('encoding', {}).get('frame')}) than this run (step {ck['step']}, "
            f"hash {ck['config_hash']}, mode {meta['encoding']['mode']}, frame "
            f"{meta['encoding']['frame']}). Mixing them would "
            "corrupt the statistics; use a new --output, or --overwrite to re-encode all.")
    return prev.get("files", {}) if same else {}


def extract(workdir, input, output, *, step="best", format="npy", sample=False, seed=0,
            overwrite=False, skip_bad_files=False, frame=None, config=None, window="auto",
            overlap=0.5, windows_per_batch=None, memory_budget=None, dtype=None,
            progress=True, log=None) -> dict:
    """Encodes every volume of `input` into `output`; returns the latents.json content.

    `frame` (4D inputs): None (the checkpoint's data.frame), K, "all" (each frame its own
    latent, NAME_t0000 ...) or "none" (all frames as channels); see `cli.volume_jobs`.
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
                     "overlap": ae.overlap, "formats": fmts},
    }
    previous = _previous(out_dir, meta, overwrite, log)
    json_path = os.path.join(out_dir, LATENTS_JSON)

    stats, entries, bad = LatentStats(), {}, []
    n_encoded, n_reused, done_at = 0, 0, []
    last_save = t_start = time.perf_counter()
    plan = []  # (path, name, frame, targets, formats to write, earlier entry)
    for path, name, pick in jobs:
        targets = {f: os.path.join(out_dir, name + vf.SUFFIXES[f]) for f in fmts}
        missing = [f for f in fmts if overwrite or not os.path.exists(targets[f])]
        plan.append((path, name, pick, targets, missing, previous.get(name)))
    needs_load = [bool(m) or e is None for *_, m, e in plan]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loads = {}

    def prefetch(i):  # read + preprocess the next volume while this one is encoded
        if i < len(plan) and needs_load[i] and i not in loads:
            loads[i] = pool.submit(_load, plan[i][0], plan[i][2])

    def _load(path, pick):  # the volume, its affine and its header's (sform, qform) codes
        vol, affine = data_lib.load_volume(path, ae.config, pick)
        return vol, affine, data_io.nifti_codes(path)

    bar = tqdm(range(len(plan)), desc="extract", unit="vol", disable=not progress,
               file=sys.stdout, dynamic_ncols=True)
    try:
        for i in bar:
            path, name, pick, targets, missing, entry = plan[i]
            if not needs_load[i]:
                z, _ = vf.read_latent(targets["npy" if "npy" in fmts else "nifti"])
                if z.shape[-1] != ae.latent_channels:
                    raise data_lib.DataError(
                        f"{targets[fmts[0]]} has {z.shape[-1]} channels, not the model's "
                        f"{ae.latent_channels}; use --overwrite or a new --output")
                stats.update(z)
                entries[name] = entry
                n_reused += 1
                continue
            prefetch(i)
            prefetch(i + 1)
            try:
                vol, affine, codes = loads.pop(i).result()
            except data_lib.VolumeShapeError as e:  # a layout the model cannot take
                raise ChannelMismatchError(str(e)) from None  # it says what the model takes
            except data_lib.DataError as e:
                if not skip_bad_files:
                    raise cli.with_skip_hint(e) from None
                bad.append({"input": os.path.abspath(path), "reason": str(e)})
                log(f"skipped {path}: {e}")
                continue
            lay = ae.layout(vol.shape)
            if lay.was_padded or lay.window is not None:
                log(f"{name}: {lay.describe()}")
            if not missing:  # outputs exist from an interrupted run: reuse, just record them
                z, _ = vf.read_latent(targets["npy" if "npy" in fmts else "nifti"])
                n_reused += 1
            else:
                try:
                    z = ae.encode_volume(vol, sample=sample,
                                         key=_sample_key(seed, name) if sample else None)
                except ValueError as e:
                    raise type(e)(f"{path}: {e}") from None
                lat_affine = latent_affine(affine, ae.factor)
                for f in missing:
                    vf.save(os.path.join(out_dir, name), f, z, lat_affine, codes)
                n_encoded += 1
                done_at.append(time.perf_counter())
            stats.update(z)
            entries[name] = {
                "input": os.path.abspath(path),
                "frame": pick if isinstance(pick, int) else None,
                "input_shape": list(lay.shape),
                "padded_shape": list(lay.padded),
                "latent_shape": list(z.shape),
                "windows": lay.num_windows,
                "affine": np.asarray(affine, float).round(9).tolist(),
                "latent_affine": latent_affine(affine, ae.factor).round(9).tolist(),
                "sform_code": None if codes is None else codes[0],
                "qform_code": None if codes is None else codes[1],
                "outputs": [os.path.basename(t) for t in targets.values()],
            }
            if time.perf_counter() - last_save > _SAVE_EVERY_S:  # resumable record
                _write_json(json_path, dict(meta, files=entries, complete=False))
                last_save = time.perf_counter()
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)

    if not entries:
        raise data_lib.DataError(
            f"No latents: all {len(files)} input file(s) were unreadable ({len(bad)} skipped).")
    result = dict(meta, **stats.summary(), num_files=len(entries), files=entries,
                  skipped_bad_files=bad, complete=True)
    _write_json(json_path, result)
    rate = ""
    if done_at:
        total = done_at[-1] - t_start
        rate = f" in {total:.1f} s ({len(done_at) / total:.2f} volumes/s"
        if len(done_at) > 1:  # the first volume includes compilation
            rate += (f"; {(len(done_at) - 1) / (done_at[-1] - done_at[0]):.2f} volumes/s "
                     "after the first")
        rate += ")"
    sf = result.get("scale_factor")
    log(f"Encoded {n_encoded} volume(s){rate}, reused {n_reused} existing, skipped "
        f"{len(bad)} unreadable. Wrote {json_path} (scale_factor "
        f"{'undefined: all latents are constant' if sf is None else f'{sf:.6g}'}).")
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
