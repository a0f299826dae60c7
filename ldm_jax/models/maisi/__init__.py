"""MAISI's three networks (MONAI `monai.apps.generation.maisi.networks`) in Flax, weight
for weight, and their converters (`ldm_jax.models.maisi.convert`)."""

from ldm_jax.models.maisi.autoencoder import AutoencoderKlMaisi
from ldm_jax.models.maisi.build import (
    build_autoencoder_maisi,
    build_controlnet_maisi,
    build_unet_maisi,
)
from ldm_jax.models.maisi.controlnet import ControlNetMaisi, controlnet_maisi_from_unet
from ldm_jax.models.maisi.unet import DiffusionModelUNetMaisi

__all__ = ["AutoencoderKlMaisi", "ControlNetMaisi", "DiffusionModelUNetMaisi",
           "build_autoencoder_maisi", "build_controlnet_maisi", "build_unet_maisi",
           "controlnet_maisi_from_unet"]
