r"""MAISI (NVIDIA's NV-Generate-CTMR) from the user's own weight files.

  ldm-jax maisi generate --autoencoder models/autoencoder_v1.pt \
      --diffusion_unet models/diff_unet_3d_rflow-ct.pt --output maisi_out/ \
      [--preset rflow-ct] [--network rflow|ddpm|config_network.json] \
      [--output_size 256,256,256] [--spacing 1.5,1.5,2] [--modality 1] \
      [--top_region_index chest --bottom_region_index abdomen] \
      [--controlnet models/controlnet_3d_rflow-ct.pt --condition mask.nii.gz] \
      [--conditioning_scale 1] [--num_samples 1] [--seed 0] [--num_inference_steps 30] \
      [--guidance_scale 0] [--intensity maisi|raw] [--window auto] [--memory_gb G] \
      [--overwrite]

Subcommands: generate (the only one). The networks are MAISI's released definitions
(`--network`, by default the preset's: rflow for the v2 weights, ddpm for v1) read from the
files as MAISI's scripts save them (`ldm_jax.models.maisi.convert`); the latent is sampled
with the preset's scheduler (`ldm_jax.schedulers.maisi`: rflow-ct 30 steps, ddpm-ct 1000)
and decoded by the autoencoder in one pass or in windows the memory planner picks
(`ldm_jax.diffusion.maisi`). Writes, in --output:
  sample_0000.nii.gz ...   (X, Y, Z) float32, HU for CT (modality <= 7, [-1000, 1000]),
                           MR as MAISI scales it (>= 0); --intensity raw: the decoder's
                           output. The affine is diag(--spacing) in mm.
  latents/sample_0000.npy  the sampled latent (x, y, z, 4), before / scale_factor
  samples.png              mid-slices and projection of every sample
  generate.json            files (with SHA-256), preset, steps, inputs, seed, decoding
  provenance.jsonl         what made each sample
--condition (with --controlnet): an integer label volume (NIfTI or .npy, MAISI's label
codes, axes in file order) of --output_size; it is fed to the ControlNet as 8 bit planes,
and voxels labelled 0 are set to the background value (-1000 HU / 0). Without
--output_size / --spacing the mask's shape and (NIfTI) voxel size are used.
Sample k is drawn from fold_in(PRNGKey(seed), k). A rerun with the same settings reuses
complete samples and makes the missing ones; samples made otherwise are refused in one line
unless --overwrite. Weight files that are missing or do not fit the networks are refused in
one line naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

SUBCOMMANDS = {"generate": "new CT/MR volumes from MAISI's released weight files"}
PROG = "ldm-jax maisi"


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    from ldm_jax.schedulers.maisi import MAISI_SAMPLING

    flags.DEFINE_string("autoencoder", None, "MAISI autoencoder weights (autoencoder_v1.pt, "
                        "autoencoder_v2.pt; a MONAI AutoencoderKlMaisi state dict).",
                        flag_values=fv)
    flags.DEFINE_string("diffusion_unet", None, "MAISI diffusion UNet file "
                        "(diff_unet_3d_rflow-ct.pt, ...: unet_state_dict + scale_factor).",
                        flag_values=fv)
    flags.DEFINE_string("controlnet", None, "MAISI ControlNet file (controlnet_3d_rflow-ct.pt);"
                        " needs --condition.", flag_values=fv)
    flags.DEFINE_enum("preset", "rflow-ct", list(MAISI_SAMPLING), "MAISI's inference setting: "
                      "scheduler, steps and default size, spacing, modality and guidance "
                      "(rflow-*: v2 weights, ddpm-ct: v1).", flag_values=fv)
    flags.DEFINE_string("network", None, "Network definitions: 'rflow', 'ddpm' (MAISI's "
                        "released ones) or a MAISI config_network_*.json (default: the "
                        "preset's scheduler).", flag_values=fv)
    flags.DEFINE_string("output_size", None, "X,Y,Z output voxels (default: the condition's "
                        "shape, else the preset's).", flag_values=fv)
    flags.DEFINE_string("spacing", None, "X,Y,Z voxel size in mm (default: the condition's, "
                        "else the preset's); a UNet input and the NIfTI affine.",
                        flag_values=fv)
    flags.DEFINE_integer("modality", None, "MAISI's modality class (1 CT, 8 and up MR; "
                         "default: the preset's); used by UNets with num_class_embeds.",
                         flag_values=fv)
    flags.DEFINE_string("top_region_index", None, "Top body region (head, chest, abdomen, "
                        "lower, or a one-hot 0,1,0,0); UNets with region inputs (ddpm-ct).",
                        flag_values=fv)
    flags.DEFINE_string("bottom_region_index", None, "Bottom body region, as "
                        "--top_region_index.", flag_values=fv)
    cli.define_condition_flags(fv)
    flags.DEFINE_integer("num_samples", 1, "Volumes to generate.", flag_values=fv)
    cli.define_seed_flag(fv, "Random seed: the same seed gives the same samples.")
    flags.DEFINE_integer("num_inference_steps", None, "Denoising steps (default: the "
                         "preset's, 30 for rflow, 1000 for ddpm).", flag_values=fv)
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance against modality 0 "
                       "(MAISI's cfg_guidance_scale; 0 none; default: the preset's).",
                       flag_values=fv)
    flags.DEFINE_enum("intensity", "maisi", ["maisi", "raw"], "maisi: HU for CT, MAISI's MR "
                      "scale; raw: the decoder's output.", flag_values=fv)
    flags.DEFINE_string("window", "auto", "Decoding window in output voxels: 'auto' (whole "
                        "volume when it fits --memory_gb, else the largest window that does), "
                        "'whole' or X,Y,Z.", flag_values=fv)
    flags.DEFINE_float("overlap", 0.4, "Fraction of a decoding window its neighbour shares "
                       "(MAISI's 0.4).", flag_values=fv)
    flags.DEFINE_float("memory_gb", None, "Memory one decode call may use, in GiB (default: "
                       "half the free accelerator memory, a quarter of the host's on a CPU).",
                       flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the "
                      "networks.", flag_values=fv)
    cli.define_output_flag(fv, "Output directory (created).")
    cli.define_overwrite_flag(fv, "Replace samples that other settings made.")
    cli.define_progress_flag(fv)


def _triple(value, flag, kind=float, default=None):
    from ldm_jax.errors import ConfigError

    if value is None or str(value).strip() == "":
        return default
    try:
        out = tuple(kind(v) for v in str(value).replace("x", ",").split(","))
    except ValueError:
        out = ()
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"--{flag}={value!r} must be three positive numbers X,Y,Z "
                          f"(e.g. {'256,256,128' if kind is int else '1.5,1.5,2'}).")
    return out


def _read_mask(path):
    """(labels (X, Y, Z) int64, voxel size in mm or None) of a --condition file."""
    from ldm_jax.diffusion.condition import read_condition
    from ldm_jax.errors import ConfigError

    arr = np.asarray(read_condition(path))
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ConfigError(f"--condition {path}: shape {arr.shape} is not one label volume "
                          "(X, Y, Z); MAISI's ControlNet takes an integer label mask.")
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)) or \
            arr.min() < 0 or arr.max() > 255:
        raise ConfigError(f"--condition {path}: values must be integer labels in [0, 255] "
                          "(MAISI's label codes; the ControlNet reads their 8 bits).")
    zooms = None
    if str(path).endswith((".nii", ".nii.gz")):
        import nibabel as nib
        zooms = tuple(float(z) for z in nib.load(path).header.get_zooms()[:3])
    return arr.astype(np.int64), zooms


def generate(autoencoder, diffusion_unet, output, *, controlnet=None, preset="rflow-ct",
             network=None, output_size=None, spacing=None, modality=None, top_region_index=None,
             bottom_region_index=None, condition=None, conditioning_scale=1.0, num_samples=1,
             seed=0, num_inference_steps=None, guidance_scale=None, intensity="maisi",
             window="auto", overlap=0.4, memory_gb=None, dtype="float32", overwrite=False,
             progress=True, log=print) -> dict:
    """Writes `num_samples` MAISI volumes to `output` (see the module docstring); returns
    the generate.json content.

    Raises ConfigError (a flag out of range, a missing or mismatched weight file, a
    condition that does not fit), OutputDirError, OutputConflictError (samples made
    otherwise, unless `overwrite`) and NonFiniteResultError (nothing of that sample is
    written).
    """
    import jax
    from tqdm import tqdm

    from ldm_jax import outputs as vf
    from ldm_jax import visualize
    from ldm_jax.cli.common import check_range
    from ldm_jax.diffusion import maisi
    from ldm_jax.errors import ConfigError, NonFiniteResultError
    from ldm_jax.schedulers.maisi import MAISI_SAMPLING

    if preset not in MAISI_SAMPLING:
        raise ConfigError(f"--preset={preset!r} is not one of {', '.join(MAISI_SAMPLING)}.")
    p = MAISI_SAMPLING[preset]
    if int(num_samples) < 1:
        raise ConfigError(f"--num_samples={num_samples} must be >= 1.")
    check_range("conditioning_scale", conditioning_scale, what=" (1 as trained)")
    check_range("overlap", overlap, 0, 1, high_open=True, what=" (0.4 as MAISI)")
    check_range("guidance_scale", guidance_scale, 0, what=" (0: no guidance)")
    if memory_gb is not None:
        check_range("memory_gb", memory_gb, 1e-3, what=" (GiB one decode call may use)")
    if (controlnet is None) != (condition is None):
        raise ConfigError("--controlnet and --condition go together: the ControlNet needs a "
                          "label mask (--condition mask.nii.gz), and a mask needs the ControlNet "
                          "weights (--controlnet controlnet_3d_rflow-ct.pt).")
    guidance = float(p.cfg_guidance_scale if guidance_scale is None else guidance_scale)
    if guidance > 0 and controlnet is not None:
        raise ConfigError(f"--guidance_scale={guidance:g} with --controlnet is not supported "
                          "(MAISI's guided ControlNet sampling needs a tumour-free copy of the "
                          "mask); pass --guidance_scale=0.")
    mask, mask_zooms, mask_digest = None, None, None
    if condition is not None:
        mask, mask_zooms = _read_mask(condition)
        mask_digest = maisi.sha256(condition)
    size = _triple(output_size, "output_size", int,
                   tuple(mask.shape) if mask is not None else p.output_size)
    if mask is not None and tuple(mask.shape) != tuple(size):
        raise ConfigError(f"--condition {condition} has shape {tuple(mask.shape)} but "
                          f"--output_size is {tuple(size)}; pass a mask of the output size "
                          "(MAISI resamples it, degrading the labels) or drop --output_size.")
    spacing = _triple(spacing, "spacing", float, mask_zooms or p.spacing)
    m = p.modality if modality is None else int(modality)
    top = maisi.parse_region(top_region_index, "--top_region_index")
    bottom = maisi.parse_region(bottom_region_index, "--bottom_region_index")
    win = str(window).strip().lower()
    if win not in ("auto", "whole"):
        win = _triple(window, "window", int)
    net = network or p.scheduler

    models = maisi.load_models(autoencoder, diffusion_unet, controlnet, network=net,
                               dtype=dtype)
    f, mult = models.factor, models.unet_multiple
    if any(s % (f * mult) for s in size):
        raise ConfigError(f"--output_size={','.join(map(str, size))} must be multiples of "
                          f"{f * mult} on every axis (the autoencoder's {f} times the UNet's "
                          f"{mult}); MAISI uses 128, 256, 384, 512 ...")
    if not isinstance(win, str) and any(w % f for w in win):
        raise ConfigError(f"--window={window} must be multiples of {f} (the autoencoder's "
                          "factor).")
    latent = tuple(s // f for s in size)
    inputs = maisi.unet_inputs(models.unet, spacing, m, top, bottom)
    if guidance > 0 and "class_labels" not in inputs:
        raise ConfigError(f"--guidance_scale={guidance:g} needs a UNet with a modality input "
                          "(num_class_embeds), which this network has not; pass "
                          "--guidance_scale=0.")
    sched, state = maisi.scheduler_for(preset, latent, num_inference_steps)
    steps = int(state.num_inference_steps)
    if p.scheduler == "ddpm" and steps < 1000:
        log(f"note: DDPM with {steps} < 1000 steps: MAISI samples its v1 weights with all "
            "1000; quality is not what it reports.")
    cond = None
    if mask is not None:
        cond = maisi.binarize_labels(mask)[None]
        want = int(models.controlnet.conditioning_embedding_in_channels)
        if want != cond.shape[-1]:
            raise ConfigError(f"--controlnet takes {want} condition channels; a label mask "
                              f"gives {cond.shape[-1]} bit planes (MAISI's ControlNets take 8).")
    budget = None if memory_gb is None else float(memory_gb) * 2**30
    out_dir = vf.prepare_output_dir(output)
    affine = np.diag([*spacing, 1.0]).astype(np.float64)

    files = {k.lstrip("-"): {"path": v, "sha256": maisi.sha256(v)}
             for k, v in models.files.items()}
    settings = {
        "preset": preset, "network": net if net in ("rflow", "ddpm") else os.path.abspath(net),
        "scheduler": p.scheduler, "num_inference_steps": steps, "seed": int(seed),
        "output_size": list(size), "spacing_mm": list(spacing), "modality": m,
        "top_region_index": None if top is None else list(top),
        "bottom_region_index": None if bottom is None else list(bottom),
        "guidance_scale": guidance, "conditioning_scale": float(conditioning_scale),
        "condition_sha256": mask_digest, "intensity": intensity, "dtype": dtype,
        "window": win if isinstance(win, str) else list(win), "overlap": float(overlap)}
    made_by = {"weights": {k: v["sha256"] for k, v in files.items()}, "generate": settings}
    names = [f"sample_{i:04d}" for i in range(int(num_samples))]
    items = [(n, [n + ".nii.gz", f"latents/{n}.npy"], {"index": i, "condition": None if
              condition is None else os.path.abspath(condition)}) for i, n in enumerate(names)]
    log(f"MAISI {preset}: networks {settings['network']}, scale_factor "
        f"{models.scale_factor:.6g}; output {'x'.join(map(str, size))} at "
        f"{'x'.join(f'{s:g}' for s in spacing)} mm, latent {'x'.join(map(str, latent))}x"
        f"{models.unet.in_channels}; {p.scheduler} {steps} steps"
        f"{', ControlNet on ' + os.path.basename(condition) if condition else ''}.")
    key = jax.random.PRNGKey(int(seed))
    decoded_how, t0 = None, time.perf_counter()
    with vf.Outputs(out_dir, "maisi generate", made_by, overwrite=overwrite, log=log) as outs:
        make, reused = outs.plan(items, "sample(s)")
        bar = tqdm(total=len(make), desc="generate", unit="vol", disable=not progress,
                   file=sys.stdout, dynamic_ncols=True)
        try:
            for i, name in enumerate(names):
                if name not in make:
                    continue
                z = maisi.sample_latent(models, jax.random.fold_in(key, i), latent, sched, state,
                                        inputs, cond, conditioning_scale, guidance)
                vol = None
                if np.isfinite(z).all():
                    vol, decoded_how = maisi.decode(models, z, window=win, overlap=overlap,
                                                    memory_budget=budget)
                if vol is None or not np.isfinite(vol).all():
                    stage = "as a latent" if vol is None else "after decoding"
                    raise NonFiniteResultError(
                        f"{name} came out NaN or Inf {stage} ({preset}, {steps} steps, seed "
                        f"{seed}); nothing of it was written. Check the weight files, or try "
                        "--dtype float32.")
                if intensity == "maisi":
                    vol = maisi.to_intensity(vol, m, mask)
                outs.write(name, {
                    name + ".nii.gz": lambda t, v=vol: vf.write_nifti(t, v, affine),
                    f"latents/{name}.npy": lambda t, z=z: vf.write_npy(t, z)},
                    {"index": i, "condition": items[i][2]["condition"]})
                bar.update(1)
        finally:
            bar.close()
            records = outs.complete()
    done = [n for n in names if n in records]
    vols = [vf.read_latent(os.path.join(out_dir, n + ".nii.gz"))[0] for n in done]
    lo, hi = ((0.0, 1.0) if intensity == "raw" else (-1000.0, 1000.0) if m <= 7
              else (0.0, 1000.0))
    if vols:
        visualize.samples_image(vols, done, (lo, hi), title=(
            f"MAISI {preset}, {steps} steps, seed {seed}")).save(
            os.path.join(out_dir, "samples.png"))
    record = {"command": "ldm-jax maisi generate", "files": done, "weights": files,
              "scale_factor": models.scale_factor, **settings,
              "latent_shape": [*latent, int(models.unet.in_channels)],
              "volume_shape": list(vols[0].shape) if vols else None,
              "condition": None if condition is None else os.path.abspath(condition),
              "decoding": decoded_how, "devices": [str(d) for d in jax.devices()]}
    def write_json(tmp):
        with open(tmp, "w") as fh:
            json.dump(record, fh, indent=1)

    vf.atomic_write(os.path.join(out_dir, "generate.json"), write_json)
    took = time.perf_counter() - t0
    log(f"Made {len(make)} sample(s) in {took:.1f} s, reused {len(reused)}; "
        f"{'decoded: ' + decoded_how + '; ' if decoded_how else ''}wrote {out_dir}.")
    return record


def _body(fv):
    generate(fv.autoencoder, fv.diffusion_unet, fv.output, controlnet=fv.controlnet,
             preset=fv.preset, network=fv.network, output_size=fv.output_size,
             spacing=fv.spacing, modality=fv.modality, top_region_index=fv.top_region_index,
             bottom_region_index=fv.bottom_region_index, condition=fv.condition,
             conditioning_scale=fv.conditioning_scale, num_samples=fv.num_samples,
             seed=fv.seed, num_inference_steps=fv.num_inference_steps,
             guidance_scale=fv.guidance_scale, intensity=fv.intensity, window=fv.window,
             overlap=fv.overlap, memory_gb=fv.memory_gb, dtype=fv.dtype,
             overwrite=fv.overwrite, progress=fv.progress)


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    return "\n".join([f"usage: {PROG} <subcommand> [flags]   ({PROG} <subcommand> --help)",
                      "", "subcommands:",
                      *(f"  {k:<{width}}  {v}" for k, v in SUBCOMMANDS.items())])


def main(argv=None) -> int:
    """`ldm-jax maisi <subcommand> [flags]`; `--help` without a subcommand prints the list
    and generate's flags. A missing or unknown subcommand: one `error:` line, exit 2."""
    from ldm_jax import cli

    argv = list(sys.argv if argv is None else argv)
    rest = argv[1:]
    if rest and rest[0] in ("-h", "--help", "help"):
        print(usage() + "\n")
        return cli.run(f"{PROG} generate", __doc__, _define, _body, [f"{PROG} generate",
                                                                      "--help"])
    if not rest or rest[0] not in SUBCOMMANDS:
        got = "no subcommand" if not rest else f"{rest[0]!r} is not a subcommand"
        print(f"error: {PROG}: {got}; use one of {', '.join(SUBCOMMANDS)}, e.g. {PROG} "
              f"generate --autoencoder A.pt --diffusion_unet U.pt --output DIR "
              f"({PROG} --help lists the flags).", file=sys.stderr)
        return 2
    return cli.run(f"{PROG} {rest[0]}", __doc__, _define, _body, [f"{PROG} {rest[0]}",
                                                                   *rest[1:]],
                   required=("autoencoder", "diffusion_unet", "output"))


if __name__ == "__main__":
    sys.exit(main())
