"""`python -m ldm_jax.evaluate`: see `ldm_jax.cli.evaluate`."""

import sys

from ldm_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
