"""`python -m ldm_jax.reconstruct`: see `ldm_jax.cli.reconstruct`."""

import sys

from ldm_jax.cli.reconstruct import main

if __name__ == "__main__":
    sys.exit(main())
