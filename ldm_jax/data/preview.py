"""`python -m ldm_jax.data.preview` (older name of `python -m ldm_jax.preview`)."""

import sys

from ldm_jax.cli.preview import main

if __name__ == "__main__":
    sys.exit(main())
