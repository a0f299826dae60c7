"""The VQ-VAE codebook in training: how many codes are used, and dead-code restarts.

Codebook collapse (a few codes take every latent vector) is the known failure of VQ
models; `usage` measures it and `restart_dead_codes` counters it as Jukebox (Dhariwal et
al. 2020, https://arxiv.org/abs/2005.00341) and medicaldiffusion's VQ-GAN do: codes whose
EMA cluster size fell below a threshold move onto random encoder outputs of the batch.
The codebook is the `EMAQuantizer`'s "codebook" collection
(`ldm_jax.models.vqvae`): {"embedding" (K, D), "ema_cluster_size" (K,), "ema_w" (K, D)}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# MONAI's VectorQuantizer adds this inside the log of its perplexity.
_LOG_EPS = 1e-10


def code_counts(indices: jax.Array, num_embeddings: int) -> jax.Array:
    """How many latent vectors chose each code: indices (any shape) int -> (K,) float32."""
    return jnp.zeros((num_embeddings,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def usage(counts) -> dict:
    """Codebook usage from per-code counts (K,) (summed over any number of batches):
    `perplexity` = exp(entropy of the code frequencies), MONAI's VectorQuantizer formula
    (1 when one code takes everything, K when all are used equally), and `codes_used`,
    the fraction of the K codes chosen at least once. float32 scalars."""
    counts = jnp.asarray(counts, jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    perplexity = jnp.exp(-jnp.sum(p * jnp.log(p + _LOG_EPS)))
    return {"perplexity": perplexity, "codes_used": jnp.mean((counts > 0).astype(jnp.float32))}


def restart_dead_codes(codebook: dict, z, key, threshold: float) -> tuple[dict, jax.Array]:
    """Moves every dead code (EMA cluster size < `threshold`) onto a random row of `z`.

    Args:
        codebook: the quantizer's {"embedding", "ema_cluster_size", "ema_w"} (float32).
        z: encoder outputs (..., D), any float dtype (the batch's continuous latents).
        key: a jax PRNG key choosing the rows (uniformly, with replacement).
        threshold: > 0, in units of latent vectors per step (the EMA cluster size is the
            decayed average of each code's count per batch).

    Returns:
        (codebook, number of codes restarted (int32 scalar)). A restarted code gets the
        chosen vector as embedding, cluster size `threshold` and `ema_w` = vector x
        threshold, so the following EMA updates average it with its new assignments (as
        Jukebox's reset sets count 1 and sum to the vector); live codes are unchanged.
    """
    emb, cs, w = codebook["embedding"], codebook["ema_cluster_size"], codebook["ema_w"]
    flat = jax.lax.stop_gradient(z).astype(jnp.float32).reshape(-1, emb.shape[-1])
    pick = jax.random.randint(key, (emb.shape[0],), 0, flat.shape[0])
    fresh = jnp.take(flat, pick, axis=0)
    dead = cs < threshold
    thr = jnp.float32(threshold)
    new = dict(codebook)
    new["embedding"] = jnp.where(dead[:, None], fresh, emb)
    new["ema_w"] = jnp.where(dead[:, None], fresh * thr, w)
    new["ema_cluster_size"] = jnp.where(dead, thr, cs)
    return new, jnp.sum(dead.astype(jnp.int32))
