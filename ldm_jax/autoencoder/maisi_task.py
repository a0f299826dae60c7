"""Stage 1 with MAISI's autoencoder (`autoencoder.kind = "maisi"`): fine-tuning
AutoencoderKlMaisi in the shared loop.

The step, losses, PatchGAN, evaluation, sharding and resume are `AutoencoderTask`'s (the
KL loss of MONAI's tutorials: reconstruction + kl_weight x KL + optional perceptual and
adversarial terms); only the model differs: MONAI's `AutoencoderKlMaisi`
(`ldm_jax.models.maisi`), built from the `autoencoder` section's MONAI-named fields
(`ldm_jax.models.maisi.finetune.build_autoencoder_from_config`).

`autoencoder.init_from` (a path, or None for a random start) names a weight file in
MONAI's or MAISI's layout (`autoencoder_v1.pt`, a bare state dict or
`{"unet_state_dict": ...}`); it is read when the task is built (a missing or mismatched
file is one ConfigError line) and its params replace the random ones in the initial state.
A resumed run restores its checkpoint instead (the file is still read at start), and may
change the path. docs/maisi.md, "Fine-tuning", is the guide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.autoencoder.task import AutoencoderTask
from ldm_jax.models.maisi.finetune import build_autoencoder_from_config, replace_params
from ldm_jax.models.maisi.init_from import load_init


class MaisiAutoencoderTask(AutoencoderTask):
    """Stage 1 for `ldm_jax.trainer.train` with MAISI's AutoencoderKlMaisi, optionally
    started from `config.autoencoder.init_from`; batches are {"image": (B, X, Y, Z, C)}.
    Raises ConfigError (one line) for a missing or mismatched weight file."""

    resume_free = (*AutoencoderTask.resume_free, "autoencoder.init_from")

    def __init__(self, config, discriminator=None, perceptual_fn=None,
                 perceptual_params=None):
        super().__init__(config, autoencoder=build_autoencoder_from_config(config.autoencoder),
                         discriminator=discriminator, perceptual_fn=perceptual_fn,
                         perceptual_params=perceptual_params)
        path = config.autoencoder.get("init_from")
        self.init_params = None
        if path:
            self.init_params, _ = load_init(path, self.ae, "autoencoder.init_from")

    def describe(self) -> str:
        """The plan's shapes (the KL geometry: 2 per level), MAISI's parameter count and
        where the weights start from, then the data line."""
        from ldm_jax import data as data_lib
        from ldm_jax.autoencoder.plan import format_plan

        x = jnp.zeros((1, *(self.ae.factor,) * 3, int(self.ae.in_channels)), jnp.float32)
        key = jax.random.PRNGKey(0)
        shapes = jax.eval_shape(lambda: self.ae.init({"params": key, "sample": key}, x))
        n = sum(int(v.size) for v in jax.tree.leaves(shapes["params"]))
        start = self.config.autoencoder.get("init_from") or "random (no autoencoder.init_from)"
        return "\n".join([
            format_plan(self.config, with_params=False),
            f"model: MAISI AutoencoderKlMaisi (MONAI), {n:,} parameters, include_fc "
            f"{bool(self.ae.include_fc)}, norm_float16 {bool(self.ae.norm_float16)}; "
            f"weights from {start}",
            data_lib.describe(self.config)])

    def init_state(self, rng, sample_shape=None):
        """`AutoencoderTask.init_state` with the autoencoder params of `init_from` (when
        set) in place of the random ones; works under jax.eval_shape (no file read)."""
        state = super().init_state(rng, sample_shape)
        if self.init_params is None:
            return state
        g_params = replace_params(state.g_params, self.init_params, "autoencoder.init_from")
        return state.replace(g_params=g_params, g_opt=self.g_tx.init(g_params))
