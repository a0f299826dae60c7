"""The stage-1 model switch: `config.autoencoder.kind` -> the trainer task that trains it.

"kl" (the default) is `AutoencoderTask` (AutoencoderKL + PatchGAN); "vqvae" is
`VQVAETask` (MONAI's VQVAE with its EMA codebook, `ldm_jax.autoencoder.vq_task`); "maisi"
is `MaisiAutoencoderTask` (MAISI's AutoencoderKlMaisi in the KL task, optionally started
from a weight file, `ldm_jax.autoencoder.maisi_task`). The
valid names and their config checks live in `ldm_jax.autoencoder.config` (`KINDS`).
"""

from __future__ import annotations


def make_task(config):
    """The stage-1 task of a config prepared by `ldm_jax.autoencoder.config.prepare_config`
    (so its kind is valid)."""
    from ldm_jax.autoencoder.config import kind_of

    if kind_of(config) == "vqvae":
        from ldm_jax.autoencoder.vq_task import VQVAETask
        return VQVAETask(config)
    if kind_of(config) == "maisi":
        from ldm_jax.autoencoder.maisi_task import MaisiAutoencoderTask
        return MaisiAutoencoderTask(config)
    from ldm_jax.autoencoder.task import AutoencoderTask
    return AutoencoderTask(config)
