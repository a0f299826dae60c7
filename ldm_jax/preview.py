"""`python -m ldm_jax.preview`: see `ldm_jax.cli.preview`."""

import sys

from ldm_jax.cli.preview import main

if __name__ == "__main__":
    sys.exit(main())
