r"""Edit given volumes with a trained latent diffusion model: inpaint, SDEdit, likelihood
and anomaly maps.

  ldm-jax edit --workdir runs/ldm --input VOLS --output edits/ --mode inpaint \
      (--box x0:x1,y0:y1,z0:z1 | --mask MASK.nii.gz) [--jump_length 10 --jump_n_sample 10] \
      [--blend_width 0] [--num_repeats 1]
  ldm-jax edit --workdir runs/ldm --input VOLS --output edits/ --mode sdedit --strength 0.5
  ldm-jax edit --workdir runs/ldm --input VOLS --output maps/ --mode likelihood \
      [--num_inference_steps 1000]
  ldm-jax edit --workdir runs/ldm --input VOLS --output maps/ --mode anomaly \
      [--strength 0.5 --num_repeats 1]
  ldm-jax edit --workdir runs/inpaint --input VOLS --output maps/ --mode anomaly \
      [--patch 16 --stride 8 --num_repeats 1]          # an inpainting model
  ldm-jax edit --workdir runs/controlnet ... --mode inpaint|sdedit --condition FILE|DIR

VOLS is a file, folder or glob of volumes of the autoencoder's data.volume_size,
preprocessed as in training. inpaint: the masked region (non-zero voxels of --mask, one
mask for every input, or the --box, voxels end exclusive) is generated in latent space
(RePaint's resampling with --jump_n_sample > 1; 1 replaces the known region at every
step), the rest is the input's voxels exactly; --blend_width W feathers the seam over W
voxels inside the mask; --num_repeats N writes the mean of N fills (the posterior mean:
least squared error, smoother than one fill). sdedit: the latents are noised to
--strength (0: the input's reconstruction, 1: a new sample) and denoised. likelihood
(DDPM models): MONAI's variational bound per latent voxel, resampled to the volume
(nearest), as NAME_kl.nii.gz, and MONAI's total_kl score. anomaly: the input SDEdited
--num_repeats times at --strength (default 0.5), the mean of those is its
"pseudo-healthy" version, and |mean - input| per voxel is the map (Pinaya et al. 2022;
`ldm_jax.diffusion.editing.anomaly`), its mean the score; with an inpainting model
(conditioning.aligned=inpainting or an inpainting ControlNet) each --patch box every
--stride voxels is inpainted from the rest of the volume instead, --num_repeats times,
and the mean of the fills covering a voxel is its pseudo-healthy value (patched
diffusion, Behrendt et al. 2023; `ldm_jax.diffusion.editing.patched_anomaly`). A
ControlNet run (inpaint, sdedit) needs --condition: one NIfTI/.npy condition for every
input, or a folder with NAME.nii.gz / NAME.npy per input NAME, as `ldm-jax sample
--condition` takes them; an inpainting ControlNet run
(controlnet.condition.kind=inpainting) or inpainting UNet (conditioning.aligned=
inpainting) builds its condition in --mode inpaint from each input and the mask.
Writes, in --output:
  NAME.nii.gz / NAME.npy       the edited volume (inpaint, sdedit), or NAME_kl.nii.gz
  latents/NAME.npy             its unscaled latents, or the latent-grid map (likelihood)
  NAME_anomaly.nii.gz          anomaly: the map, intensity units (X, Y, Z)
  NAME_healthy.nii.gz / .npy   anomaly: the pseudo-healthy volume (no latents)
  edits.json                   settings, checkpoints, per input its score (likelihood,
                               anomaly)
  provenance.jsonl             what made each output; reruns complete, others are refused
Batch k of --batch_size inputs draws from fold_in(PRNGKey(seed), k).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

MODES = ("inpaint", "sdedit", "likelihood", "anomaly")
STRENGTH_MODES = ("sdedit", "anomaly")


def _define(fv):
    from absl import flags

    from ldm_jax import cli

    cli.define_workdir_flag(fv, "Stage-2 training workdir (checkpoints/).")
    cli.define_step_flag(fv, "'best' (lowest validation loss), 'latest' or a step number.")
    flags.DEFINE_string("input", None, "Volume file, folder or glob.", flag_values=fv)
    cli.define_output_flag(fv, "Output directory (created).")
    flags.DEFINE_enum("mode", None, list(MODES), "What to do.", flag_values=fv)
    flags.DEFINE_string("mask", None, "inpaint: mask volume (non-zero: fill), the inputs' "
                        "shape.", flag_values=fv)
    flags.DEFINE_string("box", None, "inpaint: region to fill, x0:x1,y0:y1,z0:z1 voxels.",
                        flag_values=fv)
    flags.DEFINE_integer("jump_length", 10, "inpaint: RePaint's jump length (steps).",
                         flag_values=fv)
    flags.DEFINE_integer("jump_n_sample", 1, "inpaint: RePaint's resamplings (1: replace "
                         "the known region only).", flag_values=fv)
    flags.DEFINE_float("blend_width", 0.0, "inpaint: feathered seam inside the mask, voxels.",
                       flag_values=fv)
    flags.DEFINE_float("strength", 0.5, "sdedit, anomaly: 0 reconstruction .. 1 new "
                       "sample.", flag_values=fv)
    flags.DEFINE_integer("num_repeats", 1, "anomaly: draws averaged into the pseudo-healthy "
                         "volume; inpaint: fills averaged (the posterior mean).",
                         flag_values=fv)
    flags.DEFINE_integer("patch", 16, "anomaly with an inpainting model: box side, voxels.",
                         flag_values=fv)
    flags.DEFINE_integer("stride", 8, "anomaly with an inpainting model: box stride, voxels.",
                         flag_values=fv)
    flags.DEFINE_integer("num_inference_steps", 50, "Denoising steps (likelihood: timesteps "
                         "evaluated; default there all of them).", flag_values=fv)
    flags.DEFINE_enum("scheduler", None, ["ddim", "ddpm", "rflow"], "Sampler (as sample's).",
                      flag_values=fv)
    flags.DEFINE_float("eta", 0.0, "DDIM eta.", flag_values=fv)
    flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance weight.",
                       flag_values=fv)
    flags.DEFINE_integer("class_label", None, "Class (conditional models).", flag_values=fv)
    cli.define_condition_flags(fv)
    cli.define_seed_flag(fv, "Random seed: the same seed gives the same outputs.")
    flags.DEFINE_enum("format", "nifti", ["npy", "nifti", "both"], "Volume file format.",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 4, "Inputs per jitted loop.", flag_values=fv)
    flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw ones).",
                      flag_values=fv)
    flags.DEFINE_string("autoencoder_workdir", None, "Where the stage-1 run is now, if it "
                        "moved.", flag_values=fv)
    cli.define_overwrite_flag(fv, "Replace outputs that other settings made.")
    cli.define_progress_flag(fv)


def _check(mode, mask, box, strength, batch_size, blend_width, steps, present):
    from ldm_jax.errors import ConfigError

    if mode == "inpaint" and (mask is None) == (box is None):
        raise ConfigError("--mode inpaint needs one of --mask FILE or --box x0:x1,y0:y1,z0:z1.")
    if mode != "inpaint":
        for flag in ("mask", "box", "jump_n_sample", "blend_width"):
            if flag in present:
                raise ConfigError(f"--{flag} is for --mode inpaint; drop it.")
    if mode not in STRENGTH_MODES and "strength" in present:
        raise ConfigError("--strength is for --mode sdedit or anomaly; drop it.")
    for flag in ("patch", "stride"):
        if mode != "anomaly" and flag in present:
            raise ConfigError(f"--{flag} is for --mode anomaly; drop it.")
    if mode not in ("anomaly", "inpaint") and "num_repeats" in present:
        raise ConfigError("--num_repeats is for --mode anomaly or inpaint; drop it.")
    if mode in ("likelihood", "anomaly") and "condition" in present:
        raise ConfigError(f"--condition is for --mode inpaint or sdedit (the {mode} map is "
                          "the plain UNet's); drop it.")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch_size={batch_size} must be >= 1.")
    if not float(blend_width) >= 0:
        raise ConfigError(f"--blend_width={blend_width} must be >= 0 voxels.")
    if int(steps) < 1:
        raise ConfigError(f"--num_inference_steps={steps} must be >= 1.")
    if mode in STRENGTH_MODES:
        from ldm_jax.diffusion.img2img import start_index
        start_index(1, strength)


def edit(workdir, input, output, *, mode, mask=None, box=None, jump_length=10,
         jump_n_sample=1, blend_width=0.0, strength=0.5, num_repeats=1, patch=16, stride=8,
         steps=50,
         scheduler=None, eta=0.0, guidance_scale=1.0, class_label=None, seed=0, step="best",
         format="nifti",
         batch_size=4, ema=True, overwrite=False, progress=True, autoencoder_workdir=None,
         condition=None, conditioning_scale=1.0, present=(), log=print) -> dict:
    """Edits every volume of `input` into `output` (the module docstring); returns the
    edits.json content. Raises ConfigError (a flag out of range or a request the model
    cannot take, before --output is created), DataError, CheckpointNotFoundError,
    OutputConflictError and NonFiniteResultError, as `ldm-jax sample`."""
    import jax
    from tqdm import tqdm

    from ldm_jax import outputs as vf
    from ldm_jax.data.pointcloud import volumes as pc
    from ldm_jax.diffusion import editing
    from ldm_jax.diffusion.pipeline import load_pipeline
    from ldm_jax.errors import ConfigError, NonFiniteResultError

    if mode in ("anomaly", "inpaint") and int(num_repeats) < 1:
        raise ConfigError(f"--num_repeats={num_repeats} must be >= 1 (draws averaged).")
    _check(mode, mask, box, strength, batch_size, blend_width, steps, present)
    pipe = load_pipeline(workdir, step, use_ema=ema, autoencoder_workdir=autoencoder_workdir)
    cfg = pipe.autoencoder.config
    files, names = pc.list_inputs(input, cfg)
    vols, affines = zip(*[pc.load_input(f, cfg) for f in files])
    vols = editing.check_volumes(pipe, np.stack(vols))
    masks = None
    if mode == "inpaint":
        from ldm_jax.diffusion.inpainting import box_mask, check_mask
        m = box_mask(vols.shape[1:4], box) if box else vf.read_latent(mask)[0][..., 0]
        masks = check_mask(m, vols.shape[1:4], "--box" if box else "--mask")
    conds = cond_files = None
    patched = mode == "anomaly" and "inpainting" in (pipe.aligned,
                                                     editing.controlnet_kind(pipe))
    if patched and "strength" in present:
        raise ConfigError(f"{workdir} is an inpainting model: its anomaly map inpaints boxes "
                          "(--patch, --stride), no --strength; drop it.")
    if mode == "anomaly" and not patched and {"patch", "stride"} & set(present):
        raise ConfigError("--patch and --stride are for an inpainting model's anomaly map "
                          "(configs/diffusion/inpainting_4x.py); drop them.")
    if patched:
        from ldm_jax.diffusion.editing import patch_starts
        for n in vols.shape[1:4]:
            patch_starts(n, patch, stride)
    elif mode in ("likelihood", "anomaly") and pipe.controlnet is not None:
        raise ConfigError(f"{workdir} is a ControlNet run; the {mode} map is the plain "
                          "UNet's: give its run, --workdir "
                          f"{pipe.unet_checkpoint['workdir']}.")
    if mode == "anomaly" and pipe.aligned is not None and not patched:
        raise ConfigError(f"{workdir} is conditioned on aligned images (conditioning.aligned="
                          f"{pipe.aligned!r}); anomaly maps take an unconditioned stage-2 run: "
                          "pass the workdir of a run without conditioning.aligned.")
    if mode == "likelihood":
        editing.likelihood_function(pipe, steps if "num_inference_steps" in present else None)
    else:
        pipe.check_request(steps, scheduler, class_label)
        if condition is not None:
            conds, cond_files = pipe.read_conditions(condition, names=names)
        if not (conds is None and (patched or (  # built from the inputs and the boxes
                mode == "inpaint" and "inpainting" in (editing.controlnet_kind(pipe),
                                                       pipe.aligned)))):
            pipe.controlnet_args(len(names), conds, conditioning_scale)  # refuses before --output
    out_dir = vf.prepare_output_dir(output, [str(f) for f in files])
    settings = {"mode": mode, "seed": int(seed), "steps": int(steps), "scheduler": scheduler,
                "eta": float(eta), "guidance_scale": float(guidance_scale),
                "class_label": class_label, "batch_size": int(batch_size)}
    if mode == "inpaint":
        settings.update(mask=None if mask is None else os.path.abspath(mask),
                        mask_sha256=None if mask is None else vf.sha256(mask), box=box,
                        jump_length=int(jump_length), jump_n_sample=int(jump_n_sample),
                        blend_width=float(blend_width), num_repeats=int(num_repeats))
    if mode in STRENGTH_MODES:
        settings["strength"] = float(strength)
    if mode == "anomaly":
        settings["num_repeats"] = int(num_repeats)
    if patched:
        settings.update(method="patched inpainting", patch=int(patch), stride=int(stride))
        settings.pop("strength")
    if pipe.controlnet is not None:
        from ldm_jax.diffusion.condition import sha256
        settings.update(condition=None if condition is None else os.path.abspath(condition),
                        conditioning_scale=float(conditioning_scale),
                        unet_checkpoint=pipe.unet_checkpoint)
    made_by = {"diffusion_checkpoint": {"workdir": os.path.abspath(workdir), "step": pipe.step,
                                        "ema": bool(ema)},
               "autoencoder_checkpoint": {"workdir": pipe.autoencoder.workdir,
                                          "step": pipe.autoencoder.step,
                                          "config_hash": pipe.autoencoder.config_hash},
               "settings": settings}
    fmts = vf.formats(format)
    suffix = "_kl" if mode == "likelihood" else ""

    def files_of(name):
        if mode == "anomaly":  # the map, then the pseudo-healthy volume; no latents
            return [name + "_anomaly" + vf.SUFFIXES["nifti"]] + [
                name + "_healthy" + vf.SUFFIXES[f] for f in fmts]
        vol = [name + suffix + vf.SUFFIXES[f] for f in (["nifti"] if suffix else fmts)]
        return vol + [f"latents/{name}{suffix}.npy"]

    bs = int(batch_size)
    batches = [list(range(i, min(i + bs, len(names)))) for i in range(0, len(names), bs)]
    items = [(names[j], files_of(names[j]), vf.source_of(str(files[j]), batch=k))
             for k, b in enumerate(batches) for j in b]
    if cond_files is not None:  # each output names its condition file and its SHA-256
        digest = {f: sha256(f) for f in set(cond_files)}
        for name, _, src in items:
            j = names.index(name)
            src.update(condition=os.path.abspath(cond_files[j]),
                       condition_sha256=digest[cond_files[j]])
    sources = {n: s for n, _, s in items}
    rng = jax.random.PRNGKey(int(seed))
    common = {"steps": steps, "scheduler": scheduler, "eta": eta,
              "guidance_scale": guidance_scale, "class_label": class_label,
              "conditioning_scale": conditioning_scale}
    with vf.Outputs(out_dir, "edit", made_by, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "output(s)")
        todo = set(make)
        bar = tqdm(total=len(make), desc=mode, unit="vol", disable=not progress,
                   file=sys.stdout, dynamic_ncols=True)
        try:
            for k, b in enumerate(batches):
                if not any(names[j] in todo for j in b):
                    continue
                score = None
                if conds is not None:
                    common["condition"] = conds[b]
                if mode == "inpaint":
                    out, lat = editing.inpaint(pipe, vols[b], masks, rng, k, **common,
                                               jump_length=jump_length,
                                               jump_n_sample=jump_n_sample,
                                               blend_width=blend_width,
                                               num_repeats=num_repeats)
                elif mode == "sdedit":
                    out, lat = editing.sdedit(pipe, vols[b], rng, k, strength=strength,
                                              **common)
                elif mode == "anomaly":
                    a_args = {n: common[n] for n in ("steps", "scheduler", "eta",
                                                     "guidance_scale", "class_label")}
                    if patched:
                        out, lat, score = editing.patched_anomaly(
                            pipe, vols[b], rng, k, patch=patch, stride=stride,
                            num_repeats=num_repeats, **{n: a_args[n] for n in (
                                "steps", "scheduler", "eta", "guidance_scale")})
                    else:
                        out, lat, score = editing.anomaly(pipe, vols[b], rng, k,
                                                          strength=strength,
                                                          num_repeats=num_repeats, **a_args)
                else:
                    out, lat, score = editing.likelihood(
                        pipe, vols[b], rng, k, steps=steps if "num_inference_steps" in present
                        else None, class_label=class_label)
                if not (np.isfinite(out).all() and np.isfinite(lat).all()):
                    raise NonFiniteResultError(
                        f"inputs {names[b[0]]}..{names[b[-1]]} (batch {k}) came out NaN or "
                        f"Inf with --mode {mode}; nothing of that batch was written. Try "
                        "another --step or --noema.")
                for i, j in enumerate(b):
                    name = names[j]
                    if name not in todo:
                        continue
                    v, z = out[i], lat[i]
                    wanted = files_of(name)
                    writers = {}
                    # anomaly: the map (v) then the pseudo-healthy volume (z); else the
                    # volume (v) in each format then its latents (z)
                    vols_of = [(wanted[0], v)] + [(f, z) for f in wanted[1:]] \
                        if mode == "anomaly" else [(f, v) for f in wanted[:-1]]
                    for f, x in vols_of:
                        fmt = "npy" if f.endswith(".npy") else "nifti"
                        writers[f] = lambda t, fmt=fmt, x=x, a=affines[j]: vf.write(t, fmt, x, a)
                    if mode != "anomaly":
                        writers[wanted[-1]] = lambda t, z=z: vf.write_npy(t, z)
                    key = "anomaly_score" if mode == "anomaly" else "total_kl"
                    row = {} if score is None else {key: float(score[i])}
                    outs.write(name, writers, sources[name], row)
                    bar.update(1)
        finally:
            bar.close()
            records = outs.complete()
    record = {**settings, "diffusion_checkpoint": made_by["diffusion_checkpoint"],
              "autoencoder_checkpoint": made_by["autoencoder_checkpoint"],
              "outputs": {n: records[n].get("row") or {} for n in records}}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    vf.atomic_write(os.path.join(out_dir, "edits.json"), write_json)
    log(f"{mode}: made {len(make)}, reused {len(reused)} complete; wrote "
        f"{os.path.join(out_dir, 'edits.json')}.")
    return record


def _body(fv):
    present = {name for name in fv if fv[name].present}
    edit(fv.workdir, fv.input, fv.output, mode=fv.mode, mask=fv.mask, box=fv.box,
         jump_length=fv.jump_length, jump_n_sample=fv.jump_n_sample,
         blend_width=fv.blend_width, strength=fv.strength, num_repeats=fv.num_repeats,
         patch=fv.patch, stride=fv.stride,
         steps=fv.num_inference_steps,
         scheduler=fv.scheduler, eta=fv.eta, guidance_scale=fv.guidance_scale,
         class_label=fv.class_label, seed=fv.seed, step=fv.step,
         format=fv.format, batch_size=fv.batch_size, ema=fv.ema, overwrite=fv.overwrite,
         progress=fv.progress, autoencoder_workdir=fv.autoencoder_workdir,
         condition=fv.condition, conditioning_scale=fv.conditioning_scale, present=present)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax edit", __doc__, _define, _body, argv,
                   required=("workdir", "input", "output", "mode"))


if __name__ == "__main__":
    sys.exit(main())
