"""`python -m ldm_jax.to_points`: see `ldm_jax.cli.to_points`."""

import sys

from ldm_jax.cli.to_points import main

if __name__ == "__main__":
    sys.exit(main())
