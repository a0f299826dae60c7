r"""Point clouds (localisations in nm) -> NIfTI volumes, for training or viewing.

  ldm-jax voxelize --input clouds/ --output volumes/ --voxel_size 20 \
      [--method gaussian --sigma 15] [--columns "x [nm],y [nm],z [nm]"] [--scale 1] \
      [--dataset locs] [--shape X,Y,Z | --fov x0,y0,z0,x1,y1,z1] [--margin 0] [--overwrite]
  ldm-jax voxelize --demo_clouds 8 --output clouds/     # built-in SMLM-like CSVs

Inputs: a directory, a glob (quote it) or one file of .csv/.tsv/.txt/.npy/.npz/.h5/.hdf5
localisation tables (HDF5 and .npz files may hold several clouds; see
ldm_jax/data/pointcloud_io.py). Each cloud becomes OUTPUT/NAME.nii.gz: float32, affine in
micrometres with NIfTI units "micron" (20 nm voxels are 0.02), so positions in nm are kept.
OUTPUT/voxelize.json lists per cloud the points read and kept, the grid and the largest
voxel value (set data.a_max near the typical maximum when training on such volumes).
A rerun completes the folder: volumes voxelised with the same settings from the same files
are reused, missing ones are made, voxelize.json lists every volume in the folder; volumes
made otherwise are kept and the run refuses unless --overwrite (OUTPUT/provenance.jsonl
records each).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from ldm_jax import outputs as vf

MANIFEST = "voxelize.json"


def numbers(text, name, count=3, cast=float):
    """'20,20,50' -> a tuple of `count`; with count 3 one number is repeated: '20' ->
    (20, 20, 20). None stays None. DataError when malformed."""
    if text is None:
        return None
    from ldm_jax.data import DataError
    try:
        vals = tuple(cast(t) for t in str(text).replace(" ", "").split(",") if t)
    except ValueError:
        raise DataError(f"--{name} must be comma-separated numbers, got {text!r}.") from None
    if count == 3 and len(vals) == 1:
        vals = vals * 3
    if len(vals) != count:
        raise DataError(f"--{name} needs {count} comma-separated numbers, got {text!r}.")
    return vals


def spec_from_flags(fv):
    """A CloudSpec from the command-line flags."""
    from ldm_jax.data.pointcloud.grid import triple
    from ldm_jax.data.pointcloud.spec import CloudSpec, parse_columns, parse_fov

    return CloudSpec(
        voxel_size=triple(numbers(fv.voxel_size, "voxel_size"), "--voxel_size"),
        shape=numbers(fv.shape, "shape", 3, int),
        fov=parse_fov(numbers(fv.fov, "fov", 6)),
        margin=float(fv.margin),
        method=fv.method,
        sigma=triple(numbers(fv.sigma, "sigma"), "--sigma"),
        columns=parse_columns(fv.columns) if fv.columns else None,
        scale=triple(numbers(fv.scale, "scale"), "--scale"),
        dataset=fv.dataset or None,
        max_gib=float(fv.max_gib),
    )


def voxelize_files(input, output, spec, *, overwrite=False, skip_bad_files=False,
                   progress=True, log=print) -> dict:
    """Voxelises every cloud in `input` into OUTPUT/NAME.nii.gz; returns the manifest.

    A rerun completes the folder (`ldm_jax.outputs.Outputs`): volumes voxelised with the
    same settings from the same files are reused, missing ones are made, and
    voxelize.json lists every volume in the folder. Raises OutputConflictError for
    volumes made with other settings or from another version of a file (unless
    `overwrite`).
    """
    import dataclasses

    from tqdm import tqdm

    from ldm_jax.data import BadFileError, io
    from ldm_jax.data.pointcloud import io as pio
    from ldm_jax.data.pointcloud.volumes import save_volume

    files = io.list_volume_files(input, pio.CLOUD_PATTERNS)
    out_dir = vf.prepare_output_dir(output, files)
    refs = pio.list_clouds(files, spec.dataset)
    made_by = {"spec": {k: v for k, v in dataclasses.asdict(spec).items()
                        if k not in ("max_gib", "smlm")}}  # max_gib only refuses
    items = [(ref.name, [ref.name + ".nii.gz"], vf.source_of(ref.path, entry=str(ref)))
             for ref in refs]
    by_name = {ref.name: (ref, src) for ref, (_, _, src) in zip(refs, items)}
    bad = []
    with vf.Outputs(out_dir, "voxelize", made_by, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "volume(s)")
        interrupted = True
        try:
            for name in tqdm(make, desc="voxelize", unit="cloud", disable=not progress,
                             file=sys.stdout):
                ref, src = by_name[name]
                try:
                    pts = spec.read(ref)
                except BadFileError as e:
                    if not skip_bad_files:
                        raise
                    bad.append(str(e))
                    continue
                vol, grid, n_in = spec.voxelize(pts, str(ref))
                row = {"input": os.path.abspath(str(ref)), "points": int(len(pts)),
                       "points_in_grid": n_in, "shape": list(grid.shape),
                       "voxel_size_nm": list(grid.voxel_size),
                       "origin_nm": list(grid.origin), "method": spec.method,
                       "max": float(vol.max())}
                outs.write(name, {name + ".nii.gz": lambda t: save_volume(
                    t, vol, grid.affine, f"ldm_jax {spec.method} voxel "
                    f"{grid.voxel_size[0]:g} nm, {n_in} points")}, src, row)
                if n_in < len(pts):
                    log(f"{name}: {len(pts) - n_in} of {len(pts)} points are outside the grid "
                        "and left out.")
            interrupted = False
        finally:
            records = outs.complete()
            if interrupted:
                try:
                    _write_manifest(out_dir, records, bad)
                except Exception:  # noqa: BLE001 -- the interruption is what to report
                    pass
    manifest = _write_manifest(out_dir, records, bad)
    maxima = [r["max"] for r in manifest["clouds"].values()]
    hint = (f" Voxel maxima: median {np.median(maxima):.3g}, largest {max(maxima):.3g} "
            f"(a guide for data.a_max).") if maxima else ""
    log(f"Voxelised {len(make) - len(bad)} cloud(s), reused {len(reused)} complete, "
        f"{len(bad)} unreadable, into {out_dir}.{hint}")
    return manifest


def _write_manifest(out_dir, records, bad) -> dict:
    """voxelize.json over every recorded volume in `out_dir`; returns its content."""
    manifest = {"clouds": {name: rec["row"] for name, rec in records.items()},
                "skipped_bad_files": bad}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
    vf.atomic_write(os.path.join(out_dir, MANIFEST), write)
    return manifest


def _define(fv):
    from absl import flags

    from ldm_jax import cli

    flags.DEFINE_string("input", None, "Point clouds: a directory, a glob (quote it) or a file.",
                        flag_values=fv)
    cli.define_output_flag(fv, "Output directory (created; not the input directory).")
    flags.DEFINE_string("voxel_size", "20", "Voxel size in nm: one number or x,y,z.",
                        flag_values=fv)
    flags.DEFINE_enum("method", "gaussian", ["occupancy", "density", "gaussian"],
                      "occupancy (0/1), density (points per voxel) or gaussian (points spread "
                      "with --sigma nm; sums to the point count).", flag_values=fv)
    flags.DEFINE_string("sigma", "10", "Gaussian sigma in nm (one number or x,y,z), e.g. the "
                        "localisation precision.", flag_values=fv)
    flags.DEFINE_string("columns", None, "x,y,z column names or 0-based indices (default: found "
                        "by name, else the first three).", flag_values=fv)
    flags.DEFINE_string("scale", "1", "nm per file unit (one number or x,y,z); Picasso's x, y "
                        "are camera pixels: e.g. 130,130,1.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "HDF5 dataset or group / .npz key (default: 'locs' if "
                        "present, else every dataset).", flag_values=fv)
    flags.DEFINE_string("shape", None, "Grid X,Y,Z in voxels centred on each cloud (default: "
                        "each cloud's bounds).", flag_values=fv)
    flags.DEFINE_string("fov", None, "Fixed field of view x0,y0,z0,x1,y1,z1 in nm for every "
                        "cloud.", flag_values=fv)
    flags.DEFINE_float("margin", 0.0, "nm added around each cloud's bounds.", flag_values=fv)
    flags.DEFINE_float("max_gib", 2.0, "Refuse grids needing more memory than this (GiB).",
                       flag_values=fv)
    flags.DEFINE_integer("demo_clouds", 0, "Write this many built-in SMLM-like clouds as CSV "
                         "to --output instead (no --input).", flag_values=fv)
    flags.DEFINE_string("demo_shape", "64,64,32", "Field of view of the demo clouds in voxels "
                        "of --voxel_size.", flag_values=fv)
    cli.define_seed_flag(fv, "Seed of the demo clouds.")
    cli.define_overwrite_flag(fv, "Rewrite outputs that exist (default: skip them).")
    cli.define_skip_bad_files_flag(fv, "Skip unreadable files instead of stopping.")
    cli.define_progress_flag(fv)


def _body(fv):
    from ldm_jax import cli
    from ldm_jax.data import DataError
    from ldm_jax.data.pointcloud.volumes import write_demo_clouds
    cli.check_range("margin", fv.margin, 0, what=" (nm around each cloud)")
    cli.check_range("max_gib", fv.max_gib, 1e-6, what=" (GiB a grid may take)")
    cli.check_range("demo_clouds", fv.demo_clouds, 0)
    spec = spec_from_flags(fv)
    if fv.demo_clouds:
        if fv.input:
            raise DataError("--demo_clouds writes built-in clouds; leave out --input.")
        written = write_demo_clouds(fv.output, fv.demo_clouds, numbers(fv.demo_shape, "demo_shape", 3, int),
                                    spec.voxel_size, seed=fv.seed, overwrite=fv.overwrite)
        print(f"Wrote {len(written)} cloud(s) (of {fv.demo_clouds}; existing kept) to "
              f"{os.path.abspath(fv.output)}.")
        return
    if not fv.input:
        raise DataError("--input is required (or --demo_clouds N to write built-in clouds).")
    voxelize_files(fv.input, fv.output, spec, overwrite=fv.overwrite,
                   skip_bad_files=fv.skip_bad_files, progress=fv.progress)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax voxelize", __doc__, _define, _body, argv, required=("output",))


if __name__ == "__main__":
    sys.exit(main())
