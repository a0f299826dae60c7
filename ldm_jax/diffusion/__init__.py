"""Stage 2: latent diffusion on the frozen autoencoder's latents (training, sampling, evaluation)."""
