"""`python -m ldm_jax.plan`: see `ldm_jax.cli.plan`."""

import sys

from ldm_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
