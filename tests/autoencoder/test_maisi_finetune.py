"""Fine-tuning MAISI's autoencoder (`autoencoder.kind = "maisi"`): started from a weight file
written by MONAI's own AutoencoderKlMaisi (tiny, random, in MAISI's released layout), a
few steps on the built-in filaments, exact resume, the one-line refusals, and the
downstream reader (`load_autoencoder`) decoding a fine-tuned workdir."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai.apps.generation.maisi.networks")

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (  # noqa: E402
    AutoencoderKlMaisi as MonaiAutoencoderKlMaisi,
)

import ldm_jax.data  # noqa: E402
from ldm_jax.autoencoder.config import prepare_config  # noqa: E402
from ldm_jax.autoencoder.inference import MaisiAutoencoder, load_autoencoder  # noqa: E402
from ldm_jax.autoencoder.kinds import make_task  # noqa: E402
from ldm_jax.autoencoder.maisi_task import MaisiAutoencoderTask  # noqa: E402
from ldm_jax.errors import ConfigError  # noqa: E402
from ldm_jax.models.maisi.convert import autoencoder_maisi_from_monai  # noqa: E402
from ldm_jax.trainer import loop as trainer  # noqa: E402
from tests.autoencoder.test_vqvae_task import _Interrupt, _leaves  # noqa: E402
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

# MONAI's constructor arguments of the tiny network (the config below mirrors them).
MONAI_AE = {"in_channels": 1, "out_channels": 1, "num_res_blocks": (1, 1),
            "num_channels": (8, 16), "attention_levels": (False, False), "latent_channels": 4,
            "norm_num_groups": 4, "norm_eps": 1e-6, "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False}


@pytest.fixture(scope="module")
def monai_file(tmp_path_factory):
    """(path, MONAI module): MAISI's v2 autoencoder layout {"unet_state_dict": ...}."""
    m = perturb(MonaiAutoencoderKlMaisi(spatial_dims=3, num_splits=1, **MONAI_AE))
    path = tmp_path_factory.mktemp("maisi_ae") / "autoencoder_tiny.pt"
    torch.save({"epoch": 1, "unet_state_dict": m.state_dict()}, path)
    return str(path), m


def maisi_config(init_from=None):
    """tests/tiny.py's run (16x16x8 filaments, 4 steps, PatchGAN from step 1) with the
    tiny MAISI autoencoder: latent 8x8x4 x 4 channels."""
    config = tiny_config()
    ae = config.autoencoder
    ae.kind = "maisi"
    ae.num_res_blocks = (1, 1)
    ae.latent_channels = 4
    ae.norm_eps = 1e-6
    ae.include_fc = False
    ae.use_combined_linear = False
    ae.norm_float16 = False
    ae.init_from = init_from
    return config


def test_kind_builds_maisi_and_starts_from_the_file(monai_file):
    path, m = monai_file
    task = make_task(prepare_config(maisi_config(path)))
    assert type(task) is MaisiAutoencoderTask
    state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
    want = autoencoder_maisi_from_monai(m.state_dict(), task.ae)
    for a, b in zip(_leaves(state.g_params), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    # the shapes-only trace (a resumed run's) needs no values
    shapes = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    assert jax.tree.map(lambda a: a.shape, shapes.g_params) == jax.tree.map(
        lambda a: a.shape, state.g_params)
    x = np.random.default_rng(0).random((1, 16, 16, 8, 1)).astype(np.float32)
    with torch.no_grad():
        ref = to_ours(m.reconstruct(to_torch(x)))
    got = task.ae.apply({"params": state.g_params}, jnp.asarray(x), method="reconstruct")
    assert rel_err(ref, got) <= 1e-5
    assert "MAISI AutoencoderKlMaisi" in task.describe()


def test_missing_and_mismatched_files_are_one_line(monai_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_task(prepare_config(maisi_config(str(tmp_path / "nope.pt"))))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("autoencoder.init_from=") and "no such file" in msg
    config = maisi_config(monai_file[0])
    config.autoencoder.num_channels = (8, 32)  # the file's level 1 has 16
    with pytest.raises(ConfigError) as err:
        make_task(prepare_config(config))
    msg = str(err.value)
    assert "\n" not in msg and "autoencoder.init_from=" in msg and len(msg) < 500, msg
    config = maisi_config()
    config.autoencoder.initial_downsample_factor = 2
    with pytest.raises(ConfigError, match="initial_downsample_factor must be 1 for kind"):
        prepare_config(config)


def test_fine_tune_resumes_exactly_and_decodes_downstream(monai_file, tmp_path, monkeypatch):
    """4 steps from the MONAI-written weights (checkpoints at 2 and 4), against a run cut
    while fetching batch 3 and run again: the same autoencoder and discriminator params,
    exactly. Then `load_autoencoder` reads the workdir as a MaisiAutoencoder whose decode
    is the model's."""
    task = make_task(prepare_config(maisi_config(monai_file[0])))
    whole = trainer.train(task, str(tmp_path / "whole"), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert [r["step"] for r in rows if "val_l1" in r] == [2, 4]

    real = ldm_jax.data.make_train_loader

    class Loader:
        def __init__(self, *a, **k):
            self.loader = real(*a, **k)

        def __iter__(self):
            return _Interrupt(iter(self.loader), 3)

    monkeypatch.setattr(ldm_jax.data, "make_train_loader", Loader)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(task, str(tmp_path / "cut"), progress=False)
    monkeypatch.undo()
    resumed = trainer.train(task, str(tmp_path / "cut"), progress=False)
    assert int(resumed.step) == 4
    for a, b in zip(_leaves((whole.g_params, whole.d_params)),
                    _leaves((resumed.g_params, resumed.d_params))):
        np.testing.assert_array_equal(a, b)
    start = autoencoder_maisi_from_monai(monai_file[1].state_dict(), task.ae)
    assert max(float(np.abs(a - b).max()) for a, b in zip(
        _leaves(whole.g_params), _leaves(start))) > 0  # it trained

    ae = load_autoencoder(str(tmp_path / "whole"), step="latest")
    assert type(ae) is MaisiAutoencoder and ae.factor == (2, 2, 2)
    assert tuple(ae.latent_shape()) == (8, 8, 4, 4)
    z = np.random.default_rng(1).standard_normal((8, 8, 4, 4)).astype(np.float32)
    out = ae.decode_volume(z, window="whole")
    want = task.ae.apply({"params": whole.g_params}, jnp.asarray(z[None]), method="decode")[0]
    assert out.shape == (16, 16, 8, 1)
    np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)
    latent = ae.encode_volume(np.zeros((16, 16, 8, 1), np.float32))
    assert latent.shape == (8, 8, 4, 4)
