"""`python -m ldm_jax.sample`: see `ldm_jax.cli.sample`."""

import sys

from ldm_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
