"""The latent space stage 2 works in: the frozen autoencoder, and the symmetric padding
that makes latents fit the UNet (MONAI's LatentDiffusionInferer `ldm_latent_shape`:
SpatialPad, then CenterSpatialCrop back)."""

from __future__ import annotations

import os


def pad_widths(shape, target):
    """Symmetric ((lo, hi), ...) zero padding from spatial `shape` to `target` (MONAI's
    LatentDiffusionInferer: lo = (target - n) // 2)."""
    return tuple(((t - s) // 2, (t - s) - (t - s) // 2) for s, t in zip(shape, target))


def crop(z, widths):
    """Undo `pad_widths` on (B, X, Y, Z, C)."""
    sl = tuple(slice(lo, z.shape[i + 1] - hi) for i, (lo, hi) in enumerate(widths))
    return z[(slice(None), *sl)]


def load_frozen_autoencoder(config):
    """The stage-1 autoencoder named by `config.latents` (float32, whole-volume window
    unless it does not fit). Raises CheckpointNotFoundError naming the command to run."""
    from ldm_jax import checkpoint as ckpt
    from ldm_jax.autoencoder.inference import load_autoencoder

    lat = config.latents
    wd = os.path.abspath(os.path.expanduser(str(lat.autoencoder_workdir)))
    try:
        return load_autoencoder(wd, lat.get("autoencoder_step", "best") or "best",
                                window="training")
    except ckpt.CheckpointNotFoundError as e:
        from ldm_jax import options
        moved = options.setting("latents.autoencoder_workdir", "DIR")
        cmd = options.current()
        if moved and cmd is not None and not cmd.config_overrides:  # a trained model's
            # stage 1 cannot be trained again: only its new place helps (ldm-jax sample)
            raise ckpt.CheckpointNotFoundError(
                f"The stage-1 autoencoder this diffusion model was trained with is not "
                f"found: {e} If that run moved, pass its new folder: {moved}.") from None
        raise ckpt.CheckpointNotFoundError(
            f"No trained autoencoder for the diffusion stage: {e} Train stage 1 first: "
            f"python train.py --config {lat.get('autoencoder_config') or 'CONFIG'} --workdir "
            f"{lat.autoencoder_workdir}"
            + (f", or, if the stage-1 run moved, pass its new folder: {moved}." if moved
               else ".")) from None


