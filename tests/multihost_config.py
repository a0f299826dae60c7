"""Tiny configs for tests/trainer/test_multihost.py, given to train.py as a config file:

    --config=tests/multihost_config.py:autoencoder,RECORD_DIR
    --config=tests/multihost_config.py:diffusion,RECORD_DIR,AE_WORKDIR,LATENTS_DIR

Both use all devices (`mesh.data=-1`) and a global batch of 4. Loading one also makes
every process append a fingerprint of each training batch it reads (one JSON line of
per-volume sha1s) to RECORD_DIR/process_I.jsonl, so the test can tell which process read
what. The repository root must be importable (PYTHONPATH).
"""

import hashlib
import json
import os


def autoencoder_config():
    from tests.tiny import tiny_config
    c = tiny_config()
    c.mesh.data = -1
    c.train.batch_size = 4
    return c


def diffusion_config(ae_workdir, latents_dir):
    from tests.diffusion.test_diffusion import tiny_diffusion_config
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.mesh.data = -1
    c.train.batch_size = 4
    c.train.eval_every_steps = 2
    return c


def fingerprints(batch):
    """sha1 of every volume of a batch ({"image"} or {"latent"}), in batch order."""
    key = "image" if "image" in batch else "latent"
    return [hashlib.sha1(v.tobytes()).hexdigest()[:16] for v in batch[key]]


class _Recorded:
    """A training-batch iterator (state and all) that logs every batch it hands out."""

    def __init__(self, it, path):
        self.it, self.path = it, path

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        with open(self.path(), "a") as f:
            f.write(json.dumps(fingerprints(batch)) + "\n")
        return batch

    def __getattr__(self, name):  # get_state, set_state, close, ...
        return getattr(self.it, name)


def recording(make_loader, record_dir):
    """`make_loader` (a loader factory) whose iterators log to record_dir/process_I.jsonl."""
    def path():
        import jax
        return os.path.join(record_dir, f"process_{jax.process_index()}.jsonl")

    if getattr(make_loader, "recording", False):  # get_config may run more than once
        return make_loader

    class Loader:
        recording = True

        def __init__(self, *args, **kwargs):
            self.loader = make_loader(*args, **kwargs)

        def __iter__(self):
            return _Recorded(iter(self.loader), path)

    return Loader


def get_config(arg):
    stage, record_dir, *dirs = arg.split(",")
    os.makedirs(record_dir, exist_ok=True)
    if stage == "autoencoder":
        import ldm_jax.data
        ldm_jax.data.make_train_loader = recording(ldm_jax.data.make_train_loader, record_dir)
        return autoencoder_config()
    import ldm_jax.data.latents
    ldm_jax.data.latents.make_latent_loader = recording(
        ldm_jax.data.latents.make_latent_loader, record_dir)
    return diffusion_config(*dirs)
