"""Print what a config does to a volume: shapes per level, activation sizes, parameters.

    python -m ldm_jax.plan --config configs/balanced.py \
        --config.autoencoder.initial_downsample_factor=4
    python -m ldm_jax.plan --config configs/diffusion/balanced.py

A config that cannot work stops with one `error:` line (exit 2) before anything is
compiled.
"""

from __future__ import annotations


def _body(fv):
    from ldm_jax import cli
    from ldm_jax.autoencoder.plan import format_plan

    print(format_plan(fv.config, title=f"plan for {cli.config_path(fv)}"))


def main(argv=None) -> int:
    from ldm_jax import cli

    return cli.run("ldm_jax.plan", __doc__, lambda fv: None, _body, argv, config="required")
