"""ldm-jax: JAX/Flax 3D latent diffusion autoencoders."""

__version__ = "0.1.0"
