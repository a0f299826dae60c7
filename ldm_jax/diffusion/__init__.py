"""Stage 2: a latent diffusion model on the frozen autoencoder's latents.

- `task`: `DiffusionTask` (UNet state with EMA, jitted noise-prediction step, validation
  loss at fixed timesteps and sample sheets) for `ldm_jax.trainer`.
- `latents`: the frozen autoencoder and the symmetric padding to the UNet's shape.
- `sampling`: the jitted denoising loop with classifier-free guidance.
- `pipeline`: `load_pipeline(workdir)` -> UNet + its autoencoder; `.sample(n, rng)`.
- `plan`: the UNet's level table.
- `evaluate`: sample quality (slice-feature Frechet distance, MS-SSIM diversity, latent
  Frechet distance, intensity distances) for `ldm-jax evaluate`.
"""
