"""`python -m ldm_jax.throughput`: see `ldm_jax.cli.throughput`."""

import sys

from ldm_jax.cli.throughput import main

if __name__ == "__main__":
    sys.exit(main())
