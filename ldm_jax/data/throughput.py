"""`python -m ldm_jax.data.throughput` (older name of `python -m ldm_jax.throughput`)."""

import sys

from ldm_jax.cli.throughput import main

if __name__ == "__main__":
    sys.exit(main())
