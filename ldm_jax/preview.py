"""`python -m ldm_jax.preview`: see `ldm_jax.cli.preview`."""

from ldm_jax.cli.preview import main

if __name__ == "__main__":
    main()
