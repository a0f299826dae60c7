"""`python -m ldm_jax.export`: see `ldm_jax.cli.export`."""

import sys

from ldm_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
