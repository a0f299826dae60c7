r"""Generate volumes with a trained latent diffusion model (stage 2).

  ldm-jax sample --workdir runs/ldm --num_samples 8 --output samples/ \
      [--num_inference_steps 50] [--scheduler ddim|ddpm|rflow] [--eta 0] \
      [--guidance_scale 3 --class_label K] [--context FILE.npy] [--seed 0] \
      [--step best|latest|N] [--format nifti|npy|both] [--batch_size 8] [--noema] \
      [--overwrite]

Noise is denoised in one jitted loop per batch (`jax.lax.fori_loop`), the latents are
cropped to the autoencoder's latent shape, divided by the run's scale_factor and decoded
by the stage-1 autoencoder from its checkpoint. Writes, in --output:
  sample_0000.nii.gz ...   volumes (X, Y, Z, C) float32; the affine carries the training
                           data's voxel size (data.spacing, else 1 mm)
  latents/sample_0000.npy  the unscaled latents (decode them again with ldm-jax decode)
  samples.png              contact sheet: per sample XY, XZ, YZ mid-slices and the XY MIP
  samples.json             seed, steps, scheduler, context file, checkpoints used, seconds
--context (models trained with unet.with_conditioning): a .npy float32 (S, D) or (D,)
context for every sample, or (num_samples, S, D) one per sample; without it such a model
samples with the null context (zeros), i.e. unconditionally.
Existing outputs are not overwritten without --overwrite.
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
    cli.define_seed_flag(fv, "Random seed: the same seed gives the same samples.")
    flags.DEFINE_enum("format", "nifti", ["npy", "nifti", "both"], "Volume file format.",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Samples per jitted loop.", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw ones).",
                      flag_values=fv)
    cli.define_overwrite_flag(fv, "Replace existing outputs.")
    cli.define_progress_flag(fv)


def sample(workdir, output, *, num_samples=8, steps=50, scheduler=None, eta=0.0,
           guidance_scale=1.0, class_label=None, context=None, seed=0, step="best",
           format="nifti", batch_size=8, ema=True, overwrite=False, progress=True,
           log=print) -> dict:
    """Writes `num_samples` volumes to `output` (see the module docstring); returns the
    samples.json content. Raises ConfigError / CheckpointNotFoundError / OutputDirError."""
    import jax
    from tqdm import tqdm

    from ldm_jax import outputs as vf
    from ldm_jax.diffusion.pipeline import load_pipeline, save_sheet
    from ldm_jax.errors import ConfigError

    if int(num_samples) < 1:
        raise ConfigError(f"--num_samples={num_samples} must be >= 1.")
    context_array = None
    if context is not None:
        try:
            context_array = np.load(context)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--context={context!r} is not a readable .npy file ({e}).") \
                from None
    names = [f"sample_{i:04d}" for i in range(int(num_samples))]
    fmts = vf.formats(format)
    out_path = os.path.abspath(os.path.expanduser(str(output)))
    targets = [os.path.join(out_path, n + vf.SUFFIXES[f]) for n in names for f in fmts]
    existing = [t for t in targets + [os.path.join(out_path, "samples.json")]
                if os.path.exists(t)]
    if existing and not overwrite:
        raise vf.OutputDirError(
            f"{output} already holds {len(existing)} output(s) such as {existing[0]}; pass "
            "--overwrite to replace them, or choose a new --output.")
    pipe = load_pipeline(workdir, step, use_ema=ema)
    # Every check before --output is created: a refused request leaves nothing behind.
    pipe.check_request(steps, scheduler, class_label)
    contexts = pipe.contexts_for(int(num_samples), context_array)
    out_dir = vf.prepare_output_dir(output)
    log(f"Stage-2 checkpoint step {pipe.step} of {os.path.abspath(workdir)} "
        f"({'EMA' if ema else 'raw'} weights); autoencoder step {pipe.autoencoder.step} of "
        f"{pipe.autoencoder.workdir}; latents {'x'.join(map(str, pipe.latent_shape))}, "
        f"scale_factor {pipe.scale_factor:.6g}.")
    if contexts is not None and context is None:
        log("This model cross-attends to a context; without --context it samples with the "
            "null context (zeros): unconditional samples.")
    bar = tqdm(total=int(num_samples), desc="sample", unit="vol", disable=not progress,
               file=sys.stdout, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        z = pipe.sample_latents(int(num_samples), jax.random.PRNGKey(int(seed)), steps=steps,
                                scheduler=scheduler, eta=eta, guidance_scale=guidance_scale,
                                class_label=class_label, context=contexts,
                                batch_size=int(batch_size),
                                on_batch=lambda done: bar.update(done - bar.n))
        t_sample = time.perf_counter() - t0
        vols = pipe.decode(z)
    finally:
        bar.close()
    t_total = time.perf_counter() - t0
    d = pipe.autoencoder.config.data
    spacing = d.get("spacing")
    affine = np.diag([*(spacing if spacing else (1.0, 1.0, 1.0)), 1.0]).astype(np.float64)
    os.makedirs(os.path.join(out_dir, "latents"), exist_ok=True)
    for name, v, lat in zip(names, vols, z):
        for f in fmts:
            vf.save(os.path.join(out_dir, name), f, v, affine)
        vf.save_npy(os.path.join(out_dir, "latents", name + ".npy"), lat)
    save_sheet(vols, os.path.join(out_dir, "samples.png"), d, names,
               title=f"{len(names)} samples, {steps} steps, seed {seed}, step {pipe.step} of "
                     f"{os.path.basename(os.path.abspath(workdir))}")
    record = {
        "num_samples": int(num_samples), "seed": int(seed), "steps": int(steps),
        "scheduler": scheduler or ("rflow" if pipe.config.scheduler.name == "rflow" else "ddim"),
        "eta": float(eta), "guidance_scale": float(guidance_scale),
        "class_label": class_label,
        "context": None if context is None else os.path.abspath(context),
        "context_shape": None if context_array is None else list(context_array.shape),
        "ema": bool(ema),
        "diffusion_checkpoint": {"workdir": os.path.abspath(workdir), "step": pipe.step},
        "autoencoder_checkpoint": {"workdir": pipe.autoencoder.workdir,
                                   "step": pipe.autoencoder.step,
                                   "config_hash": pipe.autoencoder.config_hash},
        "scale_factor": pipe.scale_factor, "latent_shape": list(pipe.latent_shape),
        "volume_shape": list(vols.shape[1:]),
        "seconds": {"sampling": round(t_sample, 3), "total": round(t_total, 3),
                    "per_sample": round(t_total / int(num_samples), 3)},
        "files": names,
    }
    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    vf.atomic_write(os.path.join(out_dir, "samples.json"), write_json)
    log(f"Wrote {num_samples} sample(s) to {out_dir} in {t_total:.1f} s "
        f"({t_total / int(num_samples):.2f} s per sample, sampling {t_sample:.1f} s).")
    return record


def _body(fv):
    sample(fv.workdir, fv.output, num_samples=fv.num_samples, steps=fv.num_inference_steps,
           scheduler=fv.scheduler, eta=fv.eta, guidance_scale=fv.guidance_scale,
           class_label=fv.class_label, context=fv.context, seed=fv.seed, step=fv.step,
           format=fv.format, batch_size=fv.batch_size, ema=fv.ema, overwrite=fv.overwrite,
           progress=fv.progress)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax sample", __doc__, _define, _body, argv,
                   required=("workdir", "output"))


if __name__ == "__main__":
    sys.exit(main())
