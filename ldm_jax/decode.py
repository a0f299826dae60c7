"""`python -m ldm_jax.decode`: see `ldm_jax.cli.decode`."""

import sys

from ldm_jax.cli.decode import main

if __name__ == "__main__":
    sys.exit(main())
