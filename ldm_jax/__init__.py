"""ldm-jax: JAX/Flax 3D latent diffusion models (MONAI-exact), trained sharded in bf16.

Layout (dependencies point down): `cli` -> stages `autoencoder`, `diffusion` -> shared
`trainer`, `models`, `schedulers`, `data`, `checkpoint`, `sharding`, `optim`, `metrics`
-> `config`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import ldm_jax` stays light (no jax/flax import until used).
    if name == "load_autoencoder":
        from ldm_jax.autoencoder.inference import load_autoencoder
        return load_autoencoder
    if name == "load_pipeline":
        from ldm_jax.diffusion.pipeline import load_pipeline
        return load_pipeline
    raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")
