r"""Print what a config does to a volume: shapes per level, activation sizes, parameters.

    ldm-jax plan --config configs/balanced.py \
        --config.autoencoder.initial_downsample_factor=4
    ldm-jax plan --config configs/diffusion/balanced.py

A config that cannot work stops with one `error:` line (exit 2) before anything is
compiled.
"""

from __future__ import annotations


def diffusion_plan(config) -> str:
    """The stage-2 plan of a diffusion config, on `latents.latent_shape` (the paired
    stage-1 config's latent; no checkpoint is read)."""
    from ldm_jax.diffusion.config import prepare_config
    from ldm_jax.diffusion.plan import format_unet_plan
    from ldm_jax.errors import ConfigError
    from ldm_jax.models import unet_padded_shape

    config = prepare_config(config)
    shape = config.latents.get("latent_shape")
    if not shape:
        raise ConfigError("latents.latent_shape is not set; pair the config with its stage-1 "
                          "config (configs/diffusion/balanced.py shows how) or set "
                          "--config.latents.latent_shape='(x,y,z,C)'.")
    padded = unet_padded_shape(tuple(shape)[:3], config.unet)
    return format_unet_plan(config, tuple(shape), padded,
                            extra=f"autoencoder: {config.latents.autoencoder_workdir}")


def _body(fv):
    from ldm_jax import cli
    from ldm_jax.autoencoder.plan import format_plan

    title = f"plan for {cli.config_path(fv)}"
    if fv.config.get("stage", "autoencoder") == "diffusion":
        print(title + "\n" + diffusion_plan(fv.config))
    else:
        print(format_plan(fv.config, title=title))


def main(argv=None) -> int:
    from ldm_jax import cli

    return cli.run("ldm-jax plan", __doc__, lambda fv: None, _body, argv, config="required")
