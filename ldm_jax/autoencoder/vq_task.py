"""Stage 1 with a VQ-VAE (`autoencoder.kind = "vqvae"`): MONAI's VQVAE in the shared loop.

The step is `AutoencoderTask`'s (reconstruction loss `loss.recon`, optional perceptual and
PatchGAN terms, the same discriminator update, non-finite guard, accumulation and
sharding) with the VQ-VAE's own parts: the quantizer's commitment loss
(commitment_cost x mean((q - z)^2), MONAI's `EMAQuantizer`) in place of the KL term, the
EMA codebook update of every training pass, and optional dead-code restarts
(`ldm_jax.autoencoder.vq_codebook`). The codebook is a field of the train state, so
checkpoints hold it and a resumed run continues exactly. Validation adds codebook usage
(`val_perplexity`, `val_codes_used`) over all its batches. docs/vqvae.md is the guide.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.autoencoder import geometry
from ldm_jax.autoencoder.task import AutoencoderTask, TrainState, _select
from ldm_jax.autoencoder.vq_codebook import code_counts, restart_dead_codes, usage
from ldm_jax.models.vqvae import build_vqvae
from ldm_jax.optim import keep_if


class VQTrainState(TrainState):
    """`TrainState` plus the quantizer's "codebook" collection (embedding, EMA cluster
    sizes, EMA sums): not trained by gradients, updated by every training pass."""

    codebook: Any


class VQVAETask(AutoencoderTask):
    """Stage 1 for `ldm_jax.trainer.train` with MONAI's VQVAE (`ldm_jax.models.vqvae`) built
    from `config.autoencoder.vqvae`; batches are {"image": (B, X, Y, Z, C)}."""

    progress_keys = {"loss": "loss", "rec": "recon_loss", "ppl": "perplexity"}
    # Restart settings steer training only: a resumed run may change them.
    resume_free = (*AutoencoderTask.resume_free, "autoencoder.vqvae.restart_threshold",
                   "autoencoder.vqvae.restart_every")

    def __init__(self, config, discriminator=None, perceptual_fn=None,
                 perceptual_params=None):
        super().__init__(config, autoencoder=build_vqvae(config.autoencoder),
                         discriminator=discriminator, perceptual_fn=perceptual_fn,
                         perceptual_params=perceptual_params)
        self.num_embeddings = int(config.autoencoder.vqvae.num_embeddings)

    def _total_factor(self):
        from ldm_jax.autoencoder.vq_config import total
        return total(self.ae)

    def describe(self) -> str:
        """The VQ-VAE's shapes, codebook and restarts, then the data line."""
        from ldm_jax import data as data_lib
        from ldm_jax.autoencoder.vq_config import format_vq_plan
        return format_vq_plan(self.config) + "\n" + data_lib.describe(self.config)

    def quick_run_hint(self, seconds, first_seconds, steps) -> str:
        vol = ",".join(str(v) for v in geometry.smallest_volume(self._total_factor()))
        config = self.config_path or "CONFIG"
        return (f"CPU only: the first step (compiling it) took {first_seconds:.0f} s, then "
                f"{seconds:.2f} s per step: about {seconds * steps / 3600:.1f} h for the "
                f"{steps} steps to go. A quick CPU run (docs/vqvae.md) at a smaller volume:\n"
                f"  python train.py --config {config} --workdir runs/quick_vqvae "
                f"--config.data.volume_size='({vol})' --config.train.num_steps=300")

    # ---------------------------------------------------------------- initialisation
    def init_state(self, rng, sample_shape=None):
        """Initial state (params, codebook, optimisers); works under jax.eval_shape. The
        init input is the smallest volume of whole latent voxels (>= 32 per axis, at most
        the training volume): params and codebook do not depend on its size."""
        if sample_shape is None:
            vol = tuple(min(v, s) for v, s in zip(
                self.config.data.volume_size, geometry.smallest_volume(self._total_factor())))
            sample_shape = (1, *vol, int(self.config.autoencoder.in_channels))
        g_rng, d_rng, s_rng, run_rng = jax.random.split(rng, 4)
        x = jnp.zeros(sample_shape, jnp.float32)
        variables = self.ae.init({"params": g_rng, "dropout": s_rng}, x)
        g_params, codebook = variables["params"], variables["codebook"]
        d_vars = self.disc.init(d_rng, x, train=False)
        d_params = d_vars["params"]
        return VQTrainState(
            step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params,
            d_stats=d_vars.get("batch_stats", {}), g_opt=self.g_tx.init(g_params),
            d_opt=self.d_tx.init(d_params), rng=run_rng, bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32), codebook=codebook)

    # ---------------------------------------------------------------- training hooks
    def model_forward(self, state, g_params, x_in, rng):
        """Encode, quantize (with the EMA codebook update), decode: (reconstruction,
        commitment loss, {vq_loss, perplexity, codes_used} of this batch, (updated
        codebook, continuous latents))."""
        (recon, q_loss, z, idx), updated = self.ae.apply(
            {"params": g_params, "codebook": state.codebook}, x_in, train=True,
            method="forward_all", mutable=["codebook"], rngs={"dropout": rng})
        u = usage(code_counts(idx, self.num_embeddings))
        return recon, q_loss, dict(vq_loss=q_loss, **u), (updated["codebook"], z)

    def model_update(self, new_state, old_state, model_out, finite, rng):
        """The updated codebook (the old one after a skipped, non-finite step), with dead
        codes restarted every `restart_every` steps when `restart_threshold` > 0."""
        codebook, z = model_out
        vq = self.config.autoencoder.vqvae
        threshold = float(vq.get("restart_threshold", 0.0) or 0.0)
        restarted = jnp.zeros((), jnp.int32)
        if threshold > 0:  # static: off leaves restarts out of the program (MONAI's)
            q = codebook["quantizer"]
            fresh, n = restart_dead_codes(q, z, jax.random.fold_in(rng, 1), threshold)
            due = new_state.step % int(vq.get("restart_every", 1) or 1) == 0
            codebook = dict(codebook, quantizer=_select(due, fresh, q))
            restarted = jnp.where(due, n, 0)
        codebook = keep_if(finite, codebook, old_state.codebook)
        return new_state.replace(codebook=codebook), {
            "codes_restarted": jnp.where(finite, restarted, 0).astype(jnp.float32)}

    # ---------------------------------------------------------------- evaluation
    def eval_variables(self, state):
        return {"params": state.g_params, "codebook": state.codebook}

    def eval_step(self, variables, batch):
        """Validation through the quantizer (no codebook update): L1, the commitment loss
        (`val_vq_loss`), the image metrics of `AutoencoderTask.eval_step`, and the per-code
        counts `code_counts` (K,) that `summarize_eval` turns into codebook usage."""
        x = batch["image"].astype(jnp.float32)
        z = self.ae.apply(variables, x, method="encode")
        q, q_loss, idx = self.ae.apply(variables, z, method="quantize")
        recon = self.ae.apply(variables, q, method="decode").astype(jnp.float32)
        out = dict(val_l1=jnp.mean(jnp.abs(recon - x)), val_vq_loss=q_loss)
        out.update(self.image_metrics(recon, x))
        out["code_counts"] = code_counts(idx, self.num_embeddings)
        return out, recon

    def summarize_eval(self, sums) -> dict:
        """`val_perplexity` and `val_codes_used` over every validation latent voxel."""
        if "code_counts" not in sums:
            return {}
        u = usage(sums["code_counts"])
        return {"val_perplexity": float(u["perplexity"]),
                "val_codes_used": float(u["codes_used"])}
