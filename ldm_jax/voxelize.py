"""`python -m ldm_jax.voxelize`: see `ldm_jax.cli.voxelize`."""

import sys

from ldm_jax.cli.voxelize import main

if __name__ == "__main__":
    sys.exit(main())
