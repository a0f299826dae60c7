"""`python -m ldm_jax.extract`: see `ldm_jax.cli.extract`."""

import sys

from ldm_jax.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
