"""ldm-jax: JAX/Flax 3D latent diffusion autoencoders."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import ldm_jax` stays light (no jax/flax import until used).
    if name == "load_autoencoder":
        from ldm_jax.inference import load_autoencoder
        return load_autoencoder
    raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")
