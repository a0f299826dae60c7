"""Voxel-space diffusion: stage 2 without an autoencoder.

A stage-2 config with no `latents.autoencoder_workdir` and a `data` section (a stage-1
data section: source, volume_size, intensity window) trains the UNet on the preprocessed
volumes themselves, as MONAI's 3D DDPM tutorial and the original project's conditional
model do. `VoxelSpace` stands where the frozen autoencoder stands in the latent path, so
the trainer, sampler, pipeline and commands are the same: its "latents" are the volumes
mapped from [data.b_min, data.b_max] to [-1, 1] (DDPM's convention, Ho et al. 2020), its
"decoder" maps back. The scale factor is 1 (set in the config; the data are already in
[-1, 1]).
"""

from __future__ import annotations

import hashlib
import json

import ml_collections
import numpy as np


def is_voxel_space(config) -> bool:
    """True for a stage-2 config without an autoencoder and with a data section."""
    lat = config.get("latents") or {}
    return not lat.get("autoencoder_workdir") and "data" in config


class VoxelSpace:
    """The identity 'autoencoder' of voxel-space diffusion (see the module docstring).

    Attributes as `ldm_jax.autoencoder.inference.Autoencoder`'s that stage 2 reads:
    config (a stage-1-like config: the run's `data` and `autoencoder.in_channels`),
    params (None), step (0), workdir (None), config_hash, factor (1, 1, 1), in_channels,
    latent_channels, background.
    """

    kind = "voxel"

    def __init__(self, config):
        d = config.data
        channels = int(config.unet.out_channels)
        if str(config.scheduler.get("variance_type", "")).startswith("learned"):
            channels //= 2
        self.config = ml_collections.ConfigDict({
            "data": d.to_dict(),
            "autoencoder": {"in_channels": channels, "kind": "voxel"}})
        self.params, self.step, self.workdir = None, 0, None
        self.factor = (1, 1, 1)
        self.in_channels = self.latent_channels = channels
        self.lo, self.hi = sorted((float(d.b_min), float(d.b_max)))
        self.background = float(d.b_max if d.get("invert", False) else d.b_min)
        self.config_hash = "voxel:" + hashlib.sha256(json.dumps(
            self.config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def latent_shape(self) -> tuple:
        """(X, Y, Z, C) of one training volume."""
        return (*(int(s) for s in self.config.data.volume_size), self.in_channels)

    def _to_unit(self, x):
        return 2.0 * (x - self.lo) / (self.hi - self.lo) - 1.0

    def encode_fn(self, params, x):
        """(B, X, Y, Z, C) -> (z_mu, z_sigma): the volume in [-1, 1] and zeros."""
        del params
        z = self._to_unit(x)
        return z, z * 0.0

    def encode(self, x):
        import jax.numpy as jnp
        return self.encode_fn(None, jnp.asarray(x, jnp.float32))

    def decode(self, z):
        return (z + 1.0) * 0.5 * (self.hi - self.lo) + self.lo

    def encode_volume(self, volume, **kwargs):
        """One volume (X, Y, Z[, C]) -> (X, Y, Z, C) in [-1, 1], numpy float32."""
        v = np.asarray(volume, np.float32)
        v = v[..., None] if v.ndim == 3 else v
        z = self._to_unit(v)
        if kwargs.get("return_sigma"):
            return z, np.zeros_like(z)
        return z

    def decode_volume(self, latent, *, shape=None, **kwargs):
        """(X, Y, Z, C) in [-1, 1] -> the volume in [b_min, b_max], numpy float32."""
        out = np.asarray(self.decode(np.asarray(latent, np.float32)), np.float32)
        if shape is not None:
            out = out[:int(shape[0]), :int(shape[1]), :int(shape[2])]
        return out
