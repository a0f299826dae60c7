r"""Point clouds (localisations in nm) -> NIfTI volumes, for training or viewing.

  ldm-jax voxelize --input clouds/ --output volumes/ --voxel_size 20 \
      [--method gaussian --sigma 15] [--columns "x [nm],y [nm],z [nm]"] [--scale 1] \
      [--dataset locs] [--shape X,Y,Z | --fov x0,y0,z0,x1,y1,z1] [--margin 0] [--overwrite]
  ldm-jax voxelize --demo_clouds 8 --output clouds/     # built-in SMLM-like CSVs
  ldm-jax voxelize --input locs2d.csv --output images/ --voxel_size 100 --projection z
      # 2D images (e.g. condition images): NAME.npy (X, Y) float32 + NAME.png preview

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

--projection x|y|z writes 2D images instead: the 3D render summed along that axis (z gives
(X, Y), the axis order of a 2D condition image; see docs/conditioning.md) as OUTPUT/NAME.npy
(float32) and OUTPUT/NAME.png (an 8-bit preview scaled to the image's maximum). With z a
2D table (x, y only) is read with z = 0 and rendered on one z slice: its x, y columns by
name when it has no z column, or by --columns X,Y (two names or indices).
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


def _columns(fv):
    """--columns: three (x, y, z), or two (x, y: a 2D table) with --projection z."""
    from ldm_jax.data import DataError
    from ldm_jax.data.pointcloud.spec import parse_columns
    if not fv.columns:
        return None
    cols = tuple(c.strip() for c in fv.columns.split(","))
    if len(cols) != 2:
        return parse_columns(fv.columns)
    if getattr(fv, "projection", None) != "z":
        raise DataError(f"--columns={fv.columns!r} names two columns (x, y): a 2D table is "
                        "rendered as a 2D image with --projection z; else give x,y,z.")
    return cols


def spec_from_flags(fv):
    """A CloudSpec from the command-line flags (columns: see `_columns`)."""
    from ldm_jax.data.pointcloud.grid import triple
    from ldm_jax.data.pointcloud.spec import CloudSpec, parse_fov

    return CloudSpec(
        voxel_size=triple(numbers(fv.voxel_size, "voxel_size"), "--voxel_size"),
        shape=numbers(fv.shape, "shape", 3, int),
        fov=parse_fov(numbers(fv.fov, "fov", 6)),
        margin=float(fv.margin),
        method=fv.method,
        sigma=triple(numbers(fv.sigma, "sigma"), "--sigma"),
        columns=_columns(fv),
        scale=triple(numbers(fv.scale, "scale"), "--scale"),
        dataset=fv.dataset or None,
        max_gib=float(fv.max_gib),
    )


def read_points(spec, ref, projection=None):
    """(N, 3) nm of a cloud. With `projection` "z" a 2D table is read with z = 0: by the
    two columns of `spec.columns`, or, with columns found by name and no z column among
    them, by the columns x, y."""
    from ldm_jax.data import BadFileError, DataError
    from ldm_jax.data.pointcloud import io as pio
    cols = spec.columns
    if projection == "z" and cols is None:
        try:
            pio.check_columns(ref)
        except BadFileError:
            raise
        except DataError as e:
            try:
                cols = tuple(pio.check_columns(ref, ("x", "y", "x"))[:2])
            except DataError:
                raise DataError(f"{e} (--projection z reads a 2D table by its x, y columns, "
                                "or by --columns X,Y.)") from None
    if cols is None or len(cols) == 3:
        return spec.read(ref)
    pts = pio.read_cloud(ref, (*cols, cols[0]), spec.scale)
    pts[:, 2] = 0.0
    return pts


def _write_png(path, img):
    """An 8-bit greyscale preview of a 2D image >= 0, scaled to its maximum; rows are X."""
    from PIL import Image
    top = float(img.max())
    u8 = np.round(img * (255.0 / top) if top > 0 else img * 0).astype(np.uint8)
    Image.fromarray(u8).save(path, format="PNG")


def voxelize_files(input, output, spec, *, projection=None, overwrite=False,
                   skip_bad_files=False, progress=True, log=print) -> dict:
    """Voxelises every cloud in `input` into OUTPUT/NAME.nii.gz; returns the manifest.
    With `projection` ("x", "y" or "z"): the volume summed along that axis, as
    OUTPUT/NAME.npy (2D float32) and OUTPUT/NAME.png (preview); see `read_points`.

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
    suffixes = [".npy", ".png"] if projection else [".nii.gz"]
    if projection:
        made_by["projection"] = projection
    items = [(ref.name, [ref.name + s for s in suffixes], vf.source_of(ref.path, entry=str(ref)))
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
                    pts = read_points(spec, ref, projection)
                except BadFileError as e:
                    if not skip_bad_files:
                        raise
                    bad.append(str(e))
                    continue
                vol, grid, n_in = spec.voxelize(pts, str(ref))
                if projection:
                    vol = vol.sum(axis="xyz".index(projection), dtype=np.float32)
                row = {"input": os.path.abspath(str(ref)), "points": int(len(pts)),
                       "points_in_grid": n_in, "shape": list(vol.shape),
                       "voxel_size_nm": list(grid.voxel_size),
                       "origin_nm": list(grid.origin), "method": spec.method,
                       "max": float(vol.max())}
                if projection:
                    row["projection"] = projection
                    files = {name + ".npy": lambda t: vf.write_npy(t, vol),
                             name + ".png": lambda t: _write_png(t, vol)}
                else:
                    files = {name + ".nii.gz": lambda t: save_volume(
                        t, vol, grid.affine, f"ldm_jax {spec.method} voxel "
                        f"{grid.voxel_size[0]:g} nm, {n_in} points")}
                outs.write(name, files, src, row)
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
                        "by name, else the first three); x,y (a 2D table) with --projection z.",
                        flag_values=fv)
    flags.DEFINE_enum("projection", None, ["x", "y", "z"], "Write 2D images: the render summed "
                      "along this axis, as NAME.npy (float32; z gives (X, Y)) and NAME.png "
                      "(preview). With z a 2D table (x, y only) is rendered with z = 0.",
                      flag_values=fv)
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
        if fv.projection:
            raise DataError("--demo_clouds writes clouds, --projection renders images; run "
                            "them one after the other.")
        if fv.input:
            raise DataError("--demo_clouds writes built-in clouds; leave out --input.")
        written = write_demo_clouds(fv.output, fv.demo_clouds,
                                    numbers(fv.demo_shape, "demo_shape", 3, int), spec.voxel_size,
                                    seed=fv.seed, overwrite=fv.overwrite)
        print(f"Wrote {len(written)} cloud(s) (of {fv.demo_clouds}; existing kept) to "
              f"{os.path.abspath(fv.output)}.")
        return
    if not fv.input:
        raise DataError("--input is required (or --demo_clouds N to write built-in clouds).")
    voxelize_files(fv.input, fv.output, spec, projection=fv.projection, overwrite=fv.overwrite,
                   skip_bad_files=fv.skip_bad_files, progress=fv.progress)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax voxelize", __doc__, _define, _body, argv, required=("output",))


if __name__ == "__main__":
    sys.exit(main())
