"""A tiny but complete config for fast tests: 16x16x8 volumes, 8/16 channels."""

import contextlib

from configs import default


def tiny_config():
    config = default.get_config()
    ae = config.autoencoder
    ae.num_channels = (8, 16)
    ae.norm_num_groups = 4
    ae.latent_channels = 2
    ae.num_res_blocks = 1
    ae.attention_levels = (False, False)
    ae.with_encoder_nonlocal_attn = False
    ae.with_decoder_nonlocal_attn = False
    ae.initial_downsample_factor = 1
    ae.downsample_factors = (2,)
    ae.dtype = "float32"
    d = config.discriminator
    d.num_layers_d = 1
    d.num_channels = 8
    d.dtype = "float32"
    config.data.volume_size = (16, 16, 8)
    config.data.num_train_volumes = 8
    config.data.num_val_volumes = 2
    config.data.num_filaments = (2, 4)
    config.loss.adv_warmup_steps = 1  # every run (2 or 4 steps) crosses the warm-up
    config.train.batch_size = 2
    config.train.num_steps = 4
    config.train.learning_rate = 1e-3
    config.train.log_every_steps = 1
    config.train.eval_every_steps = 2
    config.train.save_every_steps = 2
    config.train.num_eval_batches = 1
    config.mesh.data = 1
    return config


def train_tiny(workdir, num_steps=2):
    """Trains tiny_config() for `num_steps` in `workdir` (a str); returns the workdir.

    Every module that needs a trained checkpoint uses this same config, so the persistent
    compilation cache turns its compilations into hits.
    """
    from ldm_jax.cli.train import train_and_evaluate
    config = tiny_config()
    config.train.num_steps = num_steps
    train_and_evaluate(config, str(workdir), progress=False)
    return str(workdir)


@contextlib.contextmanager
def changed(section, **values):
    """Sets fields of a config section (an ml_collections.ConfigDict) for the block and
    puts the old values back after it. (pytest's monkeypatch.setattr deletes a ConfigDict
    field on undo instead of restoring it.)"""
    old = {k: section[k] for k in values}
    section.update(values)
    try:
        yield section
    finally:
        section.update(old)


def extract_filament_latents(ae_workdir, folder, num_volumes, shape=(16, 16, 8)):
    """Renders `num_volumes` filament volumes of `shape` into folder/vols (npy) and
    extracts their latents with `ae_workdir`'s autoencoder by `ldm-jax extract`
    into folder/latents; returns that latents folder (a str)."""
    import os

    import numpy as np

    from ldm_jax.cli import extract as extract_cli
    from ldm_jax.data.synthetic.filaments import render_filaments

    vols, out = os.path.join(folder, "vols"), os.path.join(folder, "latents")
    os.makedirs(vols)
    for i in range(num_volumes):
        v = render_filaments(tuple(shape), seed=i, index=0, num_filaments=(3, 3))
        np.save(os.path.join(vols, f"v{i}.npy"), v.astype(np.float32))
    assert extract_cli.main(["x", f"--workdir={ae_workdir}", f"--input={vols}",
                             f"--output={out}", "--step=latest", "--noprogress"]) == 0
    return out
