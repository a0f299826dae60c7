r"""Print what a config does to a volume: shapes per level, activation sizes, parameters.

    ldm-jax plan --config configs/balanced.py \
        --config.autoencoder.initial_downsample_factor=4
    ldm-jax plan --config configs/diffusion/balanced.py

A config that cannot work stops with one `error:` line (exit 2) before anything is
compiled.
"""

from __future__ import annotations


def _volume_grid(config):
    """The volume grid (X, Y, Z) a stage-2 config's conditions are computed on: its own
    data section (voxel space), else the stage-1 config file's (`latents.autoencoder_config`),
    else None."""
    from ldm_jax.config import load_config

    if "data" in config:
        return tuple(int(s) for s in config.data.volume_size)
    path = config.latents.get("autoencoder_config")
    if path:
        return tuple(int(s) for s in load_config(path).data.volume_size)
    return None


def diffusion_plan(config) -> str:
    """The stage-2 plan of a diffusion config, on `latents.latent_shape` (the paired
    stage-1 config's latent; no checkpoint is read), or on the volumes in voxel space; an
    aligned condition's input channels are counted where the volume grid is known."""
    from ldm_jax.diffusion import aligned
    from ldm_jax.diffusion.config import prepare_config
    from ldm_jax.diffusion.plan import format_unet_plan
    from ldm_jax.diffusion.voxel_space import VoxelSpace, is_voxel_space
    from ldm_jax.errors import ConfigError
    from ldm_jax.models import unet_padded_shape

    config = prepare_config(config)
    shape = config.latents.get("latent_shape")
    extra = f"autoencoder: {config.latents.autoencoder_workdir}"
    if not shape and is_voxel_space(config):
        shape = VoxelSpace(config).latent_shape()
        extra = (f"voxel space (no autoencoder): {config.data.source} volumes "
                 f"{'x'.join(map(str, shape[:3]))} mapped to [-1, 1]")
    if not shape:
        raise ConfigError("latents.latent_shape is not set; pair the config with its stage-1 "
                          "config (configs/diffusion/balanced.py shows how) or set "
                          "--config.latents.latent_shape='(x,y,z,C)'.")
    padded = unet_padded_shape(tuple(shape)[:3], config.unet)
    channels = 0
    if aligned.kind_of(config):
        grid = _volume_grid(config)
        if grid is None:
            extra += ("; the aligned condition's input channels are not counted (no "
                      "latents.autoencoder_config to read the volume grid from)")
        else:
            extra += f"; conditioned ({aligned.mode_of(config)}) on the " + aligned.describe(
                config.conditioning, grid)
            if aligned.mode_of(config) == "concat":
                channels = aligned.lifted_channels(config.conditioning, grid,
                                                   tuple(shape)[:3],
                                                   int(config.unet.out_channels))
    return format_unet_plan(config, tuple(shape), padded, extra=extra,
                            condition_channels=channels)


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
