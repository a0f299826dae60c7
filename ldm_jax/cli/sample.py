r"""Generate volumes with a trained latent diffusion model (stage 2).

  ldm-jax sample --workdir runs/ldm --num_samples 8 --output samples/ \
      [--num_inference_steps 50] [--scheduler ddim|ddpm|rflow] [--eta 0] \
      [--guidance_scale 3 --class_label K] [--context FILE.npy] [--condition FILE|DIR] \
      [--conditioning_scale 1] [--seed 0] \
      [--step best|latest|N] [--format nifti|npy|both] [--batch_size 8] [--noema] \
      [--autoencoder_workdir DIR] [--overwrite]

Noise is denoised in one jitted loop per batch (`jax.lax.fori_loop`), the latents are
cropped to the autoencoder's latent shape, divided by the run's scale_factor and decoded
by the stage-1 autoencoder from its checkpoint. Writes, in --output:
  sample_0000.nii.gz ...   volumes (X, Y, Z, C) float32 in the model's intensity range
                           (data.b_min..b_max); the affine carries the training data's
                           voxel size (data.spacing, else 1 mm; point-cloud models:
                           data.pointcloud_voxel_size, in micrometres as voxelize writes)
  latents/sample_0000.npy  the unscaled latents (decode them again with ldm-jax decode)
  samples.png              contact sheet: per sample XY, XZ, YZ mid-slices and the XY MIP
                           (ControlNet runs: each sample beside its condition)
  samples.json             seed, steps, scheduler, context and condition files (with
                           their SHA-256), checkpoints used
  provenance.jsonl         what made each sample (checkpoints, settings, batch, SHA-256s)
--context (models trained with unet.with_conditioning): a .npy float32 (S, D) or (D,)
context for every sample, or (num_samples, S, D) one per sample; without it such a model
samples with the null context (zeros), i.e. unconditionally.
--condition (ControlNet runs and models trained with conditioning.aligned, then
required): a condition for every sample, or a folder whose condition files, in name
order, go one to each sample. ControlNet: a NIfTI or .npy volume on the volume grid
(data.volume_size) or the ControlNet's condition grid (ldm_jax.diffusion.condition says
how a volume-grid file is resampled). Aligned models (docs/conditioning.md): a 2D image
(PNG, TIFF, .npy, NIfTI) for a projection model, a coarse volume, or a volume on the
volume grid whose condition is computed; the sheet shows each sample beside its
condition and its own projection (or coarse version).
--autoencoder_workdir: where the stage-1 run is now if it moved since stage 2 was trained
(the run's own latents.autoencoder_workdir by default).
Batch k is drawn from fold_in(PRNGKey(seed), k) and written as soon as it is decoded. A
rerun with the same settings completes the folder: complete samples are reused, only the
batches with missing ones are drawn, so an interrupted run ends with exactly the files of
an uninterrupted one. Samples other settings made (another --step, seed, --batch_size ...)
are kept and the run refuses in one line unless --overwrite. NaN or Inf samples are an
error naming the batch and the settings; nothing of that batch is written.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _define(fv):
    from absl import flags

    from ldm_jax import cli

    cli.define_workdir_flag(fv, "Stage-2 training workdir (checkpoints/).")
    cli.define_step_flag(fv, "'best' (lowest validation loss), 'latest' or a step number.")
    cli.define_output_flag(fv, "Output directory (created).")
    flags.DEFINE_integer("num_samples", 8, "Volumes to generate.", flag_values=fv)
    flags.DEFINE_integer("num_inference_steps", 50, "Denoising steps.", flag_values=fv)
    flags.DEFINE_enum("scheduler", None, ["ddim", "ddpm", "rflow"], "Sampler (default: "
                      "ddim for DDPM/DDIM-trained models, rflow for rectified flow).",
                      flag_values=fv)
    flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).", flag_values=fv)
    flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance weight (class-"
                       "conditional models).", flag_values=fv)
    flags.DEFINE_integer("class_label", None, "Class to generate (conditional models).",
                         flag_values=fv)
    flags.DEFINE_string("context", None, "Cross-attention context .npy (models trained with "
                        "unet.with_conditioning): (S, D) or (D,) for every sample, or "
                        "(num_samples, S, D).", flag_values=fv)
    cli.define_condition_flags(fv)
    cli.define_seed_flag(fv, "Random seed: the same seed gives the same samples.")
    flags.DEFINE_enum("format", "nifti", ["npy", "nifti", "both"], "Volume file format.",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Samples per jitted loop.", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw ones).",
                      flag_values=fv)
    flags.DEFINE_string("autoencoder_workdir", None, "Where the stage-1 run this model was "
                        "trained with is now, if it moved (default: the folder saved in the "
                        "checkpoint's latents.autoencoder_workdir).", flag_values=fv)
    cli.define_overwrite_flag(fv, "Replace outputs that other settings made.")
    cli.define_progress_flag(fv)


def check_request(num_samples, steps, eta, guidance_scale, batch_size) -> None:
    """The sampling flags' ranges, before any work. Raises ConfigError naming the flag,
    what it takes and its value."""
    import math

    from ldm_jax.errors import ConfigError

    if int(num_samples) < 1:
        raise ConfigError(f"--num_samples={num_samples} must be >= 1.")
    if int(steps) < 1:
        raise ConfigError(f"--num_inference_steps={steps} must be >= 1.")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch_size={batch_size} must be >= 1 (samples per jitted "
                          "loop; 8 by default).")
    if not (math.isfinite(float(eta)) and 0.0 <= float(eta) <= 1.0):
        raise ConfigError(f"--eta={eta} must be in [0, 1] (DDIM's stochasticity: 0 "
                          "deterministic, 1 as DDPM); pass e.g. --eta=0.")
    if not math.isfinite(float(guidance_scale)):
        raise ConfigError(f"--guidance_scale={guidance_scale} must be a finite number "
                          "(1 = no guidance).")


def sample(workdir, output, *, num_samples=8, steps=50, scheduler=None, eta=0.0,
           guidance_scale=1.0, class_label=None, context=None, seed=0, step="best",
           format="nifti", batch_size=8, ema=True, overwrite=False, progress=True,
           autoencoder_workdir=None, condition=None, conditioning_scale=1.0,
           log=print) -> dict:
    """Writes `num_samples` volumes to `output` (see the module docstring); returns the
    samples.json content.

    Batch k (samples k*batch_size ...) is drawn from fold_in(PRNGKey(seed), k) and written
    as soon as it is decoded; a rerun with the same settings reuses the complete samples
    and draws only the batches with missing ones (`ldm_jax.outputs.Outputs`), so an
    interrupted run completes to exactly what an uninterrupted one writes.

    Raises ConfigError (a flag out of range, a request the model cannot take),
    CheckpointNotFoundError, DamagedCheckpointError, OutputDirError,
    OutputConflictError (samples made otherwise in `output`, unless `overwrite`) and
    NonFiniteResultError (a batch came out NaN/Inf: nothing of it is written).
    """
    import hashlib

    import jax
    from tqdm import tqdm

    from ldm_jax import outputs as vf
    from ldm_jax.diffusion.pipeline import load_pipeline
    from ldm_jax.errors import ConfigError, NonFiniteResultError

    check_request(num_samples, steps, eta, guidance_scale, batch_size)
    n, bs = int(num_samples), int(batch_size)
    context_array = context_digest = None
    if context is not None:
        try:
            context_array = np.load(context)
            with open(context, "rb") as f:
                context_digest = hashlib.sha256(f.read()).hexdigest()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--context={context!r} is not a readable .npy file ({e}).") \
                from None
    names = [f"sample_{i:04d}" for i in range(n)]
    fmts = vf.formats(format)
    pipe = load_pipeline(workdir, step, use_ema=ema, autoencoder_workdir=autoencoder_workdir)
    # Every check before --output is created: a refused request leaves nothing behind.
    pipe.check_request(steps, scheduler, class_label)
    contexts = pipe.contexts_for(n, context_array)
    conds, cond_files, cond_digests = None, [None] * n, [None] * n
    if condition is not None:
        from ldm_jax.diffusion.condition import sha256
        conds, cond_files = pipe.read_conditions(condition, count=n)
        cond_files = [os.path.abspath(f) for f in cond_files]
        digest = {f: sha256(f) for f in set(cond_files)}
        cond_digests = [digest[f] for f in cond_files]
    pipe.controlnet_args(n, conds, conditioning_scale)  # refuses a missing/unwanted condition
    out_dir = vf.prepare_output_dir(output)
    sampler = scheduler or ("rflow" if pipe.config.scheduler.name == "rflow" else "ddim")
    space = ("voxel space (no autoencoder)" if pipe.autoencoder.workdir is None else
             f"autoencoder step {pipe.autoencoder.step} of {pipe.autoencoder.workdir}")
    log(f"Stage-2 checkpoint step {pipe.step} of {os.path.abspath(workdir)} "
        f"({'EMA' if ema else 'raw'} weights); {space}; latents "
        f"{'x'.join(map(str, pipe.latent_shape))}, scale_factor {pipe.scale_factor:.6g}.")
    if contexts is not None and context is None:
        log("This model cross-attends to a context; without --context it samples with the "
            "null context (zeros): unconditional samples.")
    made_by = {
        "diffusion_checkpoint": {"workdir": os.path.abspath(workdir), "step": pipe.step,
                                 "ema": bool(ema)},
        "autoencoder_checkpoint": {"workdir": pipe.autoencoder.workdir,
                                   "step": pipe.autoencoder.step,
                                   "config_hash": pipe.autoencoder.config_hash},
        "sampling": {"seed": int(seed), "steps": int(steps), "scheduler": sampler,
                     "eta": float(eta), "guidance_scale": float(guidance_scale),
                     "class_label": class_label, "context_sha256": context_digest},
    }
    if pipe.controlnet is not None:
        made_by["unet_checkpoint"] = pipe.unet_checkpoint
        made_by["sampling"]["conditioning_scale"] = float(conditioning_scale)
        made_by["sampling"]["condition_sha256"] = (
            cond_digests[0] if len(set(cond_digests)) == 1 else
            hashlib.sha256("\n".join(cond_digests).encode()).hexdigest())
    d = pipe.autoencoder.config.data
    spacing = d.get("spacing")
    affine = np.diag([*(spacing if spacing else (1.0, 1.0, 1.0)), 1.0]).astype(np.float64)
    cloud_affine = None  # point-cloud models: voxels of data.pointcloud_voxel_size nm
    if d.get("source") in ("pointcloud", "synthetic_smlm"):
        from ldm_jax.data.pointcloud.grid import triple
        cloud_affine = np.diag([*triple(d.get("pointcloud_voxel_size", 20.0),
                                        "data.pointcloud_voxel_size"), 1.0])

    def write_volume(tmp, fmt, v):
        if fmt == "nifti" and cloud_affine is not None:
            from ldm_jax.data.pointcloud.volumes import write_volume as write_nm
            return write_nm(tmp, v, cloud_affine, "ldm-jax sample")
        return vf.write(tmp, fmt, v, affine)

    def files_of(name):
        return [name + vf.SUFFIXES[f] for f in fmts] + [f"latents/{name}.npy"]

    batches = [(k, i, min(bs, n - i)) for k, i in enumerate(range(0, n, bs))]
    items = [(names[i + j], files_of(names[i + j]),
              {"index": i + j, "batch": [k, b], "batch_size": bs,
               "context_row": None if context_array is None or context_array.ndim < 3
               else i + j, "condition": cond_files[i + j],
               "condition_sha256": cond_digests[i + j]})
             for k, i, b in batches for j in range(b)]
    sources = {name: src for name, _, src in items}
    rng = jax.random.PRNGKey(int(seed))
    t0 = time.perf_counter()
    with vf.Outputs(out_dir, "sample", made_by, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "sample(s)")
        todo = set(make)
        extra = {"context": None if context is None else os.path.abspath(context),
                 "context_shape": None if context_array is None else
                 list(context_array.shape),
                 "condition": None if condition is None else os.path.abspath(condition),
                 "condition_files": None if condition is None else cond_files,
                 "condition_sha256": None if condition is None else cond_digests}
        shown = None  # the conditions on the volume grid, beside the samples on the sheet
        if conds is not None and pipe.aligned is not None:  # raw: the sheet adds each
            shown = {names[i]: conds[i] for i in range(n)}  # sample's own projection
        elif conds is not None:
            from ldm_jax.diffusion.condition import resample
            shown = {names[i]: resample(conds[i], pipe.autoencoder.config.data.volume_size)
                     for i in range(n)}
        bar = tqdm(total=len(make), desc="sample", unit="vol", disable=not progress,
                   file=sys.stdout, dynamic_ncols=True)
        interrupted = True
        try:
            for k, i, b in batches:
                wanted = [j for j in range(b) if names[i + j] in todo]
                if not wanted:
                    continue
                z = pipe.sample_batch(rng, k, b, steps=steps, scheduler=scheduler, eta=eta,
                                      guidance_scale=guidance_scale, class_label=class_label,
                                      context=None if contexts is None else contexts[i:i + b],
                                      condition=None if conds is None else conds[i:i + b],
                                      conditioning_scale=conditioning_scale)
                vols = pipe.decode(z) if np.isfinite(z).all() else None
                if vols is None or not np.isfinite(vols).all():
                    raise NonFiniteResultError(
                        f"samples {names[i]}..{names[i + b - 1]} (batch {k}) came out NaN or "
                        f"Inf {'as latents' if vols is None else 'after decoding'}: stage-2 "
                        f"step {pipe.step} of {os.path.abspath(workdir)} "
                        f"({'EMA' if ema else 'raw'} weights), {sampler}, {steps} steps, eta "
                        f"{eta}, guidance {guidance_scale}, seed {seed}; nothing of that batch "
                        "was written. Try another --step, --noema, or a smaller "
                        "--guidance_scale.")
                for j in wanted:
                    name, v, lat = names[i + j], vols[j], z[j]
                    files = {name + vf.SUFFIXES[f]: (
                        lambda t, f=f, v=v: write_volume(t, f, v)) for f in fmts}
                    files[f"latents/{name}.npy"] = lambda t, lat=lat: vf.write_npy(t, lat)
                    outs.write(name, files, sources[name])
                    bar.update(1)
            interrupted = False
        finally:
            bar.close()
            records = outs.complete()
            if interrupted:  # the summary still covers every sample in the folder
                try:
                    _write_summary(out_dir, records, made_by, extra, pipe, workdir, shown)
                except Exception:  # noqa: BLE001 -- the interruption is what to report
                    pass
    record = _write_summary(out_dir, records, made_by, extra, pipe, workdir, shown)
    t_total = time.perf_counter() - t0
    if make:
        log(f"Drew {len(make)} sample(s) in {t_total:.1f} s ({t_total / len(make):.2f} s per "
            f"sample); reused {len(reused)} complete. Wrote {out_dir}/samples.json over "
            f"{len(records)} sample(s).")
    else:
        log(f"All {len(reused)} sample(s) were complete in {out_dir}; nothing to draw.")
    return record


def _write_summary(out_dir, records, made_by, extra, pipe, workdir, shown=None):
    """samples.json and samples.png over every recorded sample in `out_dir` (volumes read
    back from the files, in name order; each beside its condition `shown[name]` when
    given); returns the samples.json content."""
    from ldm_jax import outputs as vf
    from ldm_jax.diffusion.pipeline import save_sheet

    if not records:
        return None
    names = list(records)
    vols = []
    for name in names:
        files = sorted((f for f in records[name]["files"] if not f.startswith("latents/")),
                       key=lambda f: not f.endswith(".npy"))
        vols.append(vf.read_latent(os.path.join(out_dir, files[0]))[0])
    s = made_by["sampling"]
    sheet, labels = vols, names
    if shown and pipe.aligned is not None and all(name in shown for name in names):
        sheet, _ = pipe.sheet_with_conditions(vols, [shown[name] for name in names])
        labels = [x for name in names for x in (
            (f"{name} input (hole blanked)", name, f"{name} in the hole")
            if pipe.aligned == "inpainting" else
            (f"{name} condition", name, f"{name}'s own {pipe.aligned}"))]
    elif shown:
        sheet = [v for name, vol in zip(names, vols) for v in (shown[name], vol)
                 ] if all(name in shown for name in names) else vols
        labels = [x for name in names for x in (f"{name} condition", name)] \
            if sheet is not vols else names
    save_sheet(sheet, os.path.join(out_dir, "samples.png"), pipe.autoencoder.config.data, labels,
               title=f"{len(names)} sample{'s' if len(names) != 1 else ''}, {s['steps']} steps, seed {s['seed']}, step "
                     f"{pipe.step} of {os.path.basename(os.path.abspath(workdir))}")
    diffusion = made_by["diffusion_checkpoint"]
    record = {
        "num_samples": len(names), **s, **extra, "ema": diffusion["ema"],
        "diffusion_checkpoint": {"workdir": diffusion["workdir"], "step": diffusion["step"]},
        "autoencoder_checkpoint": made_by["autoencoder_checkpoint"],
        "scale_factor": pipe.scale_factor, "latent_shape": list(pipe.latent_shape),
        "volume_shape": list(vols[0].shape), "files": names,
    }

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    vf.atomic_write(os.path.join(out_dir, "samples.json"), write_json)
    return record


def _body(fv):
    sample(fv.workdir, fv.output, num_samples=fv.num_samples, steps=fv.num_inference_steps,
           scheduler=fv.scheduler, eta=fv.eta, guidance_scale=fv.guidance_scale,
           class_label=fv.class_label, context=fv.context, seed=fv.seed, step=fv.step,
           format=fv.format, batch_size=fv.batch_size, ema=fv.ema, overwrite=fv.overwrite,
           progress=fv.progress, autoencoder_workdir=fv.autoencoder_workdir,
           condition=fv.condition, conditioning_scale=fv.conditioning_scale)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax sample", __doc__, _define, _body, argv,
                   required=("workdir", "output"))


if __name__ == "__main__":
    sys.exit(main())
