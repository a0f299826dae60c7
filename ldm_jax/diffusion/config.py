"""The checks of a stage-2 config (unet, scheduler, latents, loss, conditioning,
controlnet, train).

`prepare_config(config)` resolves and validates a copy: this module's `diffusion_problems`,
`ldm_jax.optim.train_problems`, the UNet's and the scheduler's own validators; every
problem is listed in one ConfigError.
"""

from __future__ import annotations

from ldm_jax.config import raise_problems

ENCODINGS = ("sample", "mu")


LOSSES = ("mse", "l1")

CONDITION_KINDS = ("foreground_mask", "inpainting", "files")  # controlnet.condition.kind


def diffusion_problems(config) -> list[str]:
    """One-line problems of the stage-2 sections (latents, conditioning, loss, eval)."""
    problems = []
    lat = config.get("latents")
    # A ControlNet run takes the autoencoder from its UNet's run.
    controlnet = bool((config.get("controlnet") or {}).get("unet_workdir"))
    voxel = "data" in config  # voxel space: no autoencoder (ldm_jax.diffusion.voxel_space)
    if not controlnet and not voxel and (lat is None or not lat.get("autoencoder_workdir")):
        problems.append("latents.autoencoder_workdir is not set; give the stage-1 workdir, "
                        "e.g. --config.latents.autoencoder_workdir=runs/balanced (or train "
                        "in voxel space: configs/diffusion/projection.py)")
    elif lat is not None and lat.get("encode", "sample") not in ENCODINGS:
        problems.append(f"latents.encode={lat.encode!r} is not known; use 'sample' or 'mu'.")
    if lat is not None and lat.get("scale_factor") is not None and not float(
            lat.scale_factor) > 0:
        problems.append(f"latents.scale_factor must be > 0 or None, got {lat.scale_factor!r}")
    loss = config.get("loss")
    if loss is not None:
        if loss.get("type", "mse") not in LOSSES:
            problems.append(f"loss.type={loss.type!r} is not known; use 'mse' or 'l1'.")
        if float(loss.get("min_snr_gamma", 0) or 0) < 0:
            problems.append(f"loss.min_snr_gamma must be >= 0 (0: off), got {loss.min_snr_gamma}")
    cond = config.get("conditioning")
    if cond is not None:
        k = int(cond.get("num_classes", 0) or 0)
        if k < 0:
            problems.append(f"conditioning.num_classes must be >= 0, got {k}")
        if not 0.0 <= float(cond.get("drop_prob", 0.0)) < 1.0:
            problems.append(f"conditioning.drop_prob must be in [0, 1), got {cond.drop_prob}")
        if k and not cond.get("labels_csv"):
            problems.append("conditioning.num_classes > 0 needs conditioning.labels_csv (a CSV "
                            "name,label for the latents in latents.dir)")
        elif k and not (lat is not None and lat.get("dir")):
            problems.append(f"conditioning.labels_csv={cond.labels_csv!r} needs latents.dir "
                            "(labels are matched to extracted latents by file name); extract "
                            "them with ldm-jax extract and set "
                            "--config.latents.dir=LATENTS")
    from ldm_jax.diffusion.aligned import aligned_problems
    problems += context_problems(config) + controlnet_problems(config) + aligned_problems(
        config, config.data.volume_size if "data" in config else None)
    decay = float(config.train.get("ema_decay", 0.0))
    if not 0.0 <= decay < 1.0:
        problems.append(f"train.ema_decay must be in [0, 1) (0: no averaging), got {decay}")
    return problems


def context_problems(config) -> list[str]:
    """unet.with_conditioning and conditioning.context_dir: both or neither, and the
    contexts need extracted latents (they are matched by file name)."""
    with_cond = bool(config.get("unet", {}).get("with_conditioning", False))
    ctx_dir = (config.get("conditioning") or {}).get("context_dir")
    if with_cond and not ctx_dir:
        return ["unet.with_conditioning=True needs conditioning.context_dir (a folder with one "
                "NAME.npy context (S, unet.cross_attention_dim) per latent in latents.dir); set "
                "--config.conditioning.context_dir=DIR, or remove unet.with_conditioning and "
                "unet.cross_attention_dim from the config"]
    if ctx_dir and not with_cond:
        return [f"conditioning.context_dir={ctx_dir!r} is set but unet.with_conditioning=False "
                "(the UNet has no cross-attention); set --config.unet.with_conditioning=True "
                "--config.unet.cross_attention_dim=D (D = the contexts' last axis), or "
                "--config.conditioning.context_dir=''"]
    if ctx_dir and not config.get("latents", {}).get("dir"):
        return [f"conditioning.context_dir={ctx_dir!r} needs latents.dir (contexts are matched "
                "to extracted latents by file name); extract them with "
                "ldm-jax extract and set --config.latents.dir=LATENTS"]
    return []


def controlnet_problems(config) -> list[str]:
    """One-line problems of `config.controlnet` when it is switched on (unet_workdir set):
    the condition kind and the latents source it needs."""
    cn = config.get("controlnet") or {}
    if not cn.get("unet_workdir"):
        return []
    cond = cn.get("condition") or {}
    kind = cond.get("kind", "foreground_mask")
    on_the_fly = not (config.get("latents") or {}).get("dir")
    if kind not in CONDITION_KINDS:
        return [f"controlnet.condition.kind={kind!r} is not known; use 'foreground_mask' "
                "or 'inpainting' (computed from each volume) or 'files' "
                "(controlnet.condition.dir)"]
    if kind == "inpainting":
        lo, hi = (float(f) for f in cond.get("box_fraction", (0.25, 0.75)))
        if not 0 < lo <= hi <= 1:
            return [f"controlnet.condition.box_fraction=({lo}, {hi}) must satisfy 0 < min <= "
                    "max <= 1 (the hole's side per axis as a fraction of the volume), e.g. "
                    "--config.controlnet.condition.box_fraction='(0.25,0.75)'"]
    if kind in ("foreground_mask", "inpainting") and not on_the_fly:
        return [f"controlnet.condition.kind={kind!r} computes each condition from its "
                "training volume, which extracted latents (latents.dir) do not carry; train on "
                "the fly (--config.latents.dir='') or pair files with the latents "
                "(--config.controlnet.condition.kind=files --config.controlnet.condition.dir=DIR)"]
    if kind == "files" and on_the_fly:
        return ["controlnet.condition.kind='files' needs latents.dir (conditions are matched to "
                "extracted latents by name; on the fly volumes are cropped and flipped at random, "
                "so a file would not stay aligned); extract them with ldm-jax extract and set "
                "--config.latents.dir=LATENTS"]
    if kind == "files" and not cond.get("dir"):
        return ["controlnet.condition.kind='files' needs controlnet.condition.dir (a folder with "
                "NAME.nii.gz or NAME.npy per latent NAME in latents.dir)"]
    return []


def prepare_config(config):
    """A resolved copy of a stage-2 config, validated (raises ConfigError listing every
    problem): the UNet and scheduler sections by their own validators, the rest here."""
    from ldm_jax.models import validate_unet
    from ldm_jax.optim import train_problems
    from ldm_jax.schedulers import build_scheduler

    config = config.copy_and_resolve_references()
    if config.train.get("remat") is not None:
        config.unet.remat = config.train.remat
    cond = config.get("conditioning")
    if cond is not None and int(cond.get("num_classes", 0) or 0) > 0:
        config.unet.num_class_embeds = int(cond.num_classes) + 1  # + the "no class" label
    problems = diffusion_problems(config) + train_problems(config.train)
    raise_problems(problems)
    validate_unet(config.unet)
    build_scheduler(config.scheduler)
    return config
