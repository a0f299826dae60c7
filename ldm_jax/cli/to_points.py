r"""Volumes -> point clouds: localisations drawn in proportion to intensity, in nm.

  ldm-jax to_points --input samples/ --output clouds/ \
      [--num_points N | --points_per_unit_intensity k] [--threshold t] [--seed 0] \
      [--jitter uniform|gaussian|none] [--units auto|nm|micron|mm|meter] [--voxel_size nm]

Inputs: .nii/.nii.gz/.npy volumes, (X, Y, Z) or (X, Y, Z, 1) (sampled volumes,
reconstructions, ldm-jax voxelize outputs). Each point picks a voxel with probability
proportional to max(I - threshold, 0), then a position inside it (--jitter), mapped to nm
by the volume's affine: NIfTI units from the header (none: micrometres, as ldm_jax
writes them), .npy files have no affine: --voxel_size nm with the origin at 0. The count
is --num_points, or round(k x the summed intensity above the threshold). Output:
OUTPUT/NAME.csv with the header `x [nm],y [nm],z [nm]`. Each file's draw depends only on
--seed and its name. A rerun completes the folder: clouds drawn with the same options from
the same volumes are reused, missing ones are made; clouds drawn otherwise are kept and
the run refuses unless --overwrite (OUTPUT/provenance.jsonl records each).
"""

from __future__ import annotations

import sys
import zlib

import numpy as np

from ldm_jax import outputs as vf


def volume_to_points(path, *, num_points=None, points_per_unit=None, threshold=0.0,
                     jitter="uniform", seed=0, units="auto", voxel_size=None):
    """One volume file -> ((N, 3) float64 nm, note about units or "")."""
    from ldm_jax.data.pointcloud.sample import as_3d, num_points_for, sample_points
    from ldm_jax.data.pointcloud.volumes import read_volume_nm

    arr, affine, note = read_volume_nm(path, units, voxel_size)
    vol = as_3d(arr, str(path))
    n = num_points_for(vol, num_points=num_points, points_per_unit=points_per_unit,
                       threshold=threshold, name=str(path))
    rng = np.random.default_rng([int(seed), zlib.crc32(vf.stem(path).encode())])
    return sample_points(vol, affine, n, threshold=threshold, jitter=jitter, rng=rng,
                         name=str(path)), note


def _define(fv):
    from absl import flags

    from ldm_jax import cli

    flags.DEFINE_string("input", None, "Volumes: a directory, a glob (quote it) or one file.",
                        flag_values=fv)
    cli.define_output_flag(fv, "Output directory (created; not the input directory).")
    flags.DEFINE_integer("num_points", None, "Points per volume.", flag_values=fv)
    flags.DEFINE_float("points_per_unit_intensity", None, "Points per unit of summed intensity "
                       "above the threshold (instead of --num_points).", flag_values=fv)
    flags.DEFINE_float("threshold", 0.0, "Voxels at or below it give no points; weights are "
                       "intensity - threshold.", flag_values=fv)
    cli.define_seed_flag(fv, "Random seed.")
    flags.DEFINE_enum("jitter", "uniform", ["uniform", "gaussian", "none"], "Position in the "
                      "voxel: uniform, gaussian around the centre (sd 1/sqrt(12) voxel) or the "
                      "centre.", flag_values=fv)
    flags.DEFINE_enum("units", "auto", ["auto", "nm", "micron", "mm", "meter"], "Units of "
                      "NIfTI affines (auto: the header's; none given: micron).", flag_values=fv)
    flags.DEFINE_string("voxel_size", None, "nm per voxel for .npy volumes (one number or "
                        "x,y,z); default 1 (positions in voxels).", flag_values=fv)
    cli.define_overwrite_flag(fv, "Rewrite outputs that exist (default: skip them).")


def _body(fv):
    from ldm_jax import cli
    from ldm_jax.cli.voxelize import numbers
    from ldm_jax.data import io
    from ldm_jax.data.pointcloud.io import write_csv
    from ldm_jax.errors import ConfigError
    if (fv.num_points is None) == (fv.points_per_unit_intensity is None):
        raise ConfigError("give exactly one of --num_points N and --points_per_unit_intensity k "
                          "(how many points each volume gives).")
    cli.check_range("num_points", fv.num_points, 1)
    cli.check_range("points_per_unit_intensity", fv.points_per_unit_intensity, 1e-300,
                    what=" (points per unit of summed intensity, > 0)")
    cli.check_range("threshold", fv.threshold)
    files = io.list_volume_files(fv.input)
    names = vf.output_names(files)
    out_dir = vf.prepare_output_dir(fv.output, files)
    voxel_size = numbers(fv.voxel_size, "voxel_size")
    options = dict(num_points=fv.num_points, points_per_unit=fv.points_per_unit_intensity,
                   threshold=fv.threshold, jitter=fv.jitter, seed=fv.seed, units=fv.units,
                   voxel_size=voxel_size)
    items = [(name, [name + ".csv"], vf.source_of(path)) for path, name in zip(files, names)]
    paths = dict(zip(names, files))
    notes = set()
    with vf.Outputs(out_dir, "to_points", {"options": options}, overwrite=fv.overwrite) as outs:
        make, reused = outs.plan(items, "cloud(s)")
        for name, _, src in items:
            if name not in make:
                continue
            pts, note = volume_to_points(paths[name], **options)
            if note and note not in notes:
                notes.add(note)
                print(f"note: {note}")
            outs.write(name, {name + ".csv": lambda t: write_csv(t, pts)}, src,
                       {"points": int(len(pts))})
            print(f"{name}: {len(pts)} points")
    print(f"Wrote {len(make)} cloud(s), reused {len(reused)} complete, into {out_dir}.")


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax to_points", __doc__, _define, _body, argv,
                   required=("input", "output"))


if __name__ == "__main__":
    sys.exit(main())
