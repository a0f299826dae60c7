r"""See what the autoencoder keeps: volume -> latent (mu) -> reconstruction, with scores.

  ldm-jax reconstruct --workdir runs/x --input DIR_OR_GLOB --output recon/ \
      [--step best|latest|N] [--denormalize] [--overwrite]

Per input: NAME.nii.gz (the reconstruction on the preprocessed grid, with that grid's
affine, which is the input's own unless data.spacing/voxel_resize resample), NAME.png
(input / reconstruction / |error| as labelled mid-slices and a MIP, titled with the PSNR)
and a row of metrics.json / metrics.csv with PSNR and 3D SSIM against the preprocessed
input.

Point clouds (.csv/.tsv/.npz/.h5/.hdf5, 2D .npy; see ldm_jax.data.pointcloud.volumes) are voxelised
with the checkpoint's data.pointcloud_* settings; their rows add the Chamfer and EMD
distances (nm) of points sampled back from the reconstruction (NAME_points.csv) and, as
the floor, from the voxelisation alone.

Reruns: as extract's (OUTPUT/provenance.jsonl records each reconstruction with its scores;
metrics.json and metrics.csv always cover every reconstruction in the folder).
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np

from ldm_jax import outputs as vf

METRICS_JSON = "metrics.json"


def _scores(x, r, data_range):
    """PSNR and 3D SSIM (gaussian window 7, or the largest odd size that fits)."""
    from ldm_jax.metrics import image as metrics
    win = min(7, min(x.shape[:3]))
    win -= (win + 1) % 2  # odd
    out = {"psnr": float(metrics.psnr(r[None], x[None], data_range=data_range)[0]),
           "mae": float(metrics.mae(r[None], x[None])[0])}
    if win >= 3:
        out["ssim"] = float(metrics.ssim3d(r[None], x[None], data_range=data_range,
                                           win_size=win)[0])
    return out


def reconstruct(workdir, input, output, *, step="best", overwrite=False, skip_bad_files=False,
                denormalize=False, frame=None, config=None, window="auto", overlap=0.5,
                windows_per_batch=None, memory_budget=None, dtype=None,
                progress=True, log=None) -> dict:
    """Reconstructs every volume of `input` into `output`; returns the metrics.json content.

    `frame` (4D inputs): None (the checkpoint's data.frame), K, "all" (each frame its own
    reconstruction, NAME_t0000 ...) or "none"; see `cli.volume_jobs`.

    A rerun completes the folder (`ldm_jax.outputs.Outputs`): reconstructions made by the
    same checkpoint and options from the same inputs are reused with their scores, missing
    ones are made; metrics.json/.csv cover every reconstruction in the folder. Raises
    OutputConflictError for outputs of another checkpoint, options or input version
    (unless `overwrite`), NonFiniteResultError for a NaN/Inf reconstruction.
    """
    from tqdm import tqdm

    from ldm_jax import cli, visualize
    from ldm_jax import data as data_lib
    from ldm_jax.autoencoder import inference
    from ldm_jax.data import io as data_io
    from ldm_jax.data.pointcloud import volumes as pc
    from ldm_jax.errors import ChannelMismatchError
    log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    frame = cli.parse_frame(frame)
    # Checked before loading anything: the input exists and holds volumes or clouds.
    data_lib.list_volume_files(input, data_io.ALL_PATTERNS + pc.LIST_PATTERNS, option="--input")
    ae = inference.load_autoencoder(workdir, step, dtype=dtype, config=config, window=window,
                                    overlap=overlap, windows_per_batch=windows_per_batch,
                                    memory_budget=memory_budget)
    files, names = pc.list_inputs(input, ae.config)  # volume files and point clouds
    jobs = cli.volume_jobs(files, names, frame, ae.in_channels)
    out_dir = vf.prepare_output_dir(output, [pc.entry_path(f) for f in files])
    d = ae.config.data
    data_range = (float(d.b_min), float(d.b_max))
    log(f"Checkpoint step {ae.step} of {ae.workdir}; {len(files)} input file(s).")
    if d.get("spacing") is not None or d.get("voxel_resize") is not None:
        log("note: the checkpoint resamples inputs (data.spacing / voxel_resize); "
            "reconstructions are on that grid, with its affine.")

    made_by = {"checkpoint": {"workdir": ae.workdir, "step": ae.step,
                              "config_hash": ae.config_hash},
               "options": {"denormalize": bool(denormalize), "frame": frame,
                           "dtype": str(ae.model.dtype), "overlap": ae.overlap,
                           "window": (ae.window if isinstance(ae.window, str) else
                                      list(ae.window) if ae.window else "whole")}}

    def files_of(name, path):
        return [name + ".nii.gz", name + ".png"] + (
            [name + "_points.csv"] if pc.is_cloud(path) else [])

    items = [(name, files_of(name, path), vf.source_of(
        pc.entry_path(path), entry=str(path), frame=pick if isinstance(pick, int) else None))
        for path, name, pick in jobs]
    by_name = {name: (path, pick, src) for (path, name, pick), (_, _, src) in zip(jobs, items)}
    bad, n_done = [], 0
    with vf.Outputs(out_dir, "reconstruct", made_by, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "reconstruction(s)")
        interrupted = True
        try:
            for name in tqdm(make, desc="reconstruct", unit="vol", disable=not progress,
                             file=sys.stdout, dynamic_ncols=True):
                path, pick, src = by_name[name]
                try:
                    vol, affine = pc.load_input(path, ae.config, pick)
                    codes = None if pc.is_cloud(path) else data_io.nifti_codes(path)
                except data_lib.VolumeShapeError as e:  # a layout the model cannot take
                    raise ChannelMismatchError(str(e)) from None  # says what it takes
                except data_lib.DataError as e:
                    if not skip_bad_files:
                        raise cli.with_skip_hint(e) from None
                    bad.append({"input": os.path.abspath(str(path)), "reason": str(e)})
                    log(f"skipped {path}: {e}")
                    continue
                lay = ae.layout(vol.shape)
                if lay.was_padded or lay.window is not None:
                    log(f"{name}: {lay.describe()}")
                try:
                    z = ae.encode_volume(vol)
                    recon = np.asarray(ae.decode_volume(z, shape=vol.shape))
                except ValueError as e:
                    raise type(e)(f"{path}: {e}") from None
                cli.check_finite(recon, f"{path}: its reconstruction", ae,
                                 f"dtype {ae.model.dtype}, window {lay.describe()}")
                row = {"input": os.path.abspath(str(path)), "shape": list(vol.shape)}
                if isinstance(pick, int) and not pc.is_cloud(path):
                    row["frame"] = pick
                points_tmp = (vf.temporary_name(os.path.join(out_dir, name + "_points.csv"))
                              if pc.is_cloud(path) else None)
                try:
                    if recon.shape == vol.shape:
                        row.update(_scores(vol, recon, data_range[1] - data_range[0]))
                        if points_tmp:  # Chamfer / EMD of the points sampled back
                            row.update(pc.round_trip_scores(path, vol, recon, affine, ae.config,
                                                            points_path=points_tmp))
                    out_vol = inference.denormalize(recon, d) if denormalize else recon
                    files = {
                        name + ".nii.gz": lambda t: vf.write_nifti(t, out_vol, affine, codes),
                        name + ".png": lambda t: visualize.comparison_image(
                            [vol], [recon], [name], data_range).save(t, format="PNG")}
                    if points_tmp:
                        files[name + "_points.csv"] = lambda t: os.replace(points_tmp, t)
                    outs.write(name, files, src, row)
                finally:
                    if points_tmp and os.path.exists(points_tmp):
                        os.remove(points_tmp)  # our own temporary file
                n_done += 1
                if "psnr" in row:
                    log(f"{name}: PSNR {row['psnr']:.2f} dB, SSIM "
                        f"{row.get('ssim', float('nan')):.4f}"
                        + (f", Chamfer {row['chamfer_nm']:.2f} nm (voxelisation alone "
                           f"{row['chamfer_floor_nm']:.2f})" if "chamfer_nm" in row else ""))
            interrupted = False
        finally:
            records = outs.complete()
            if interrupted and records:  # the summary still covers every output
                try:
                    _write_summary(out_dir, made_by, records, bad)
                except Exception:  # noqa: BLE001 -- the interruption is what to report
                    pass
    result, scored = _write_summary(out_dir, made_by, records, bad)
    means = ", ".join(f"{k} {v:.4f}" for k, v in result["mean"].items())
    log(f"Reconstructed {n_done}, reused {len(reused)} complete, skipped {len(bad)} "
        f"unreadable. Mean over {scored} file(s): {means or 'n/a'}. Wrote "
        f"{os.path.join(out_dir, METRICS_JSON)} over {len(records)} reconstruction(s).")
    return result


def _write_summary(out_dir, made_by, records, bad):
    """metrics.json and metrics.csv over every recorded reconstruction in `out_dir`
    (`records`: name -> record, sorted by name); returns (metrics.json content, number of
    scored files)."""
    from ldm_jax.data.pointcloud import volumes as pc

    rows = {name: rec["row"] for name, rec in records.items()}
    scored = [r for r in rows.values() if "psnr" in r]
    summary = {k: float(np.mean([r[k] for r in scored if k in r])) for k in ("psnr", "ssim", "mae",
               *pc.SCORE_KEYS[1:]) if any(k in r for r in scored)}
    result = {"checkpoint": made_by["checkpoint"], "options": made_by["options"],
              "mean": summary, "files": rows, "skipped_bad_files": bad}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    vf.atomic_write(os.path.join(out_dir, METRICS_JSON), write_json)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            keys = ["psnr", "ssim", "mae", *pc.SCORE_KEYS]
            w.writerow(["name", *keys, "input"])
            for n, r in sorted(rows.items()):
                w.writerow([n, *(r.get(k, "") for k in keys), r["input"]])
    vf.atomic_write(os.path.join(out_dir, "metrics.csv"), write_csv)
    return result, len(scored)


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    cli.define_model_flags(fv)
    cli.define_io_flags(fv, "Volumes: a directory, a glob (quote it) or one file.")
    cli.define_frame_flag(fv)
    flags.DEFINE_bool("denormalize", False, "Write reconstructions in the input's intensity "
                      "range (undo the a_min..a_max -> b_min..b_max window).", flag_values=fv)


def _body(fv):
    from ldm_jax import cli
    reconstruct(fv.workdir, fv.input, fv.output, overwrite=fv.overwrite,
                skip_bad_files=fv.skip_bad_files, denormalize=fv.denormalize, frame=fv.frame,
                progress=fv.progress, **cli.model_kwargs(fv))


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax reconstruct", __doc__, _define, _body, argv,
                   required=("workdir", "input", "output"))


if __name__ == "__main__":
    sys.exit(main())
