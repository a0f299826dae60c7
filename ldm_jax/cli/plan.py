"""Print what a config does to a volume: shapes per level, activation sizes, parameters.

    python -m ldm_jax.plan --config configs/balanced.py \
        --config.autoencoder.initial_downsample_factor=4
    python -m ldm_jax.plan --config configs/diffusion/balanced.py

A config that cannot work stops with one `error:` line (exit 2) before anything is
compiled.
"""

from __future__ import annotations

import sys
from pathlib import Path




def _config_path_from_argv(argv) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _prepare(argv) -> None:
    """Fails cleanly on a missing config file (absl's message is a long traceback)."""
    path = _config_path_from_argv(argv)
    if path is None:
        return  # absl reports the missing required flag
    p = Path(path.split(":", 1)[0]).expanduser()
    if not p.is_file():
        print(f"error: config file {str(p)!r} does not exist; pass a path like "
              "configs/balanced.py", file=sys.stderr)
        sys.exit(2)


def diffusion_plan(config) -> str:
    """The stage-2 plan of a diffusion config, on `latents.latent_shape` (the paired
    stage-1 config's latent; no checkpoint is read)."""
    from ldm_jax.config import ConfigError
    from ldm_jax.diffusion.plan import format_unet_plan
    from ldm_jax.diffusion.task import prepare_config
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


def main(argv=None) -> None:
    _prepare(sys.argv[1:] if argv is None else argv[1:])
    from absl import app, flags
    from ml_collections import config_flags

    from ldm_jax.autoencoder.plan import format_plan
    from ldm_jax.config import ConfigError

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Path to a configs/*.py file; override fields with --config.a.b=v.",
        lock_config=True)

    def run(argv):
        from absl import logging

        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # hide jax's backend probing at INFO
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        title = f"plan for {_config_path_from_argv(sys.argv[1:])}"
        try:
            config = config_flag.value
            if config.get("stage", "autoencoder") == "diffusion":
                text = title + "\n" + diffusion_plan(config)
            else:
                text = format_plan(config, title=title)
        except ConfigError as e:
            print(f"error: invalid config: {e}", file=sys.stderr)
            sys.exit(2)
        print(text)

    flags.mark_flag_as_required("config")
    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
