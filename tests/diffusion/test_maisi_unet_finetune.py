"""Fine-tuning MAISI's diffusion UNet (`unet.kind = "maisi"`): started from a file in MAISI's
released layout written by MONAI's own DiffusionModelUNetMaisi (tiny, random, every
conditioning input), its spacing / region / modality inputs fed from the config, a few
steps on latents encoded on the fly, exact resume and the one-line refusals."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai.apps.generation.maisi.networks")

from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (  # noqa: E402
    DiffusionModelUNetMaisi as MonaiUNetMaisi,
)

import ldm_jax.data  # noqa: E402
from ldm_jax.cli.train import make_task  # noqa: E402
from ldm_jax.errors import ConfigError  # noqa: E402
from ldm_jax.models.maisi.convert import unet_maisi_from_monai  # noqa: E402
from ldm_jax.models.maisi.finetune import MaisiUNetFixedInputs  # noqa: E402
from ldm_jax.trainer import loop as trainer  # noqa: E402
from tests.autoencoder.test_vqvae_task import _Interrupt, _leaves  # noqa: E402
from tests.diffusion.test_diffusion import tiny_diffusion_config  # noqa: E402
from tests.models.maisi_helpers import perturb, rel_err, to_ours, to_torch  # noqa: E402

# tiny_config's latents have 2 channels; every MAISI conditioning input switched on.
MONAI_UNET = {"in_channels": 2, "out_channels": 2, "num_channels": (8,),
              "attention_levels": (False,), "num_head_channels": (8,), "num_res_blocks": 1,
              "norm_num_groups": 4, "include_spacing_input": True,
              "include_top_region_index_input": True,
              "include_bottom_region_index_input": True, "num_class_embeds": 4}
SPACING, TOP, BOTTOM, MODALITY = (1.5, 1.5, 2.0), (0, 1, 0, 0), (0, 0, 1, 0), 1


@pytest.fixture(scope="module")
def monai_file(tmp_path_factory):
    """(path, MONAI module) in MAISI's diffusion-UNet layout, scale_factor 0.8."""
    m = perturb(MonaiUNetMaisi(spatial_dims=3, **MONAI_UNET))
    path = tmp_path_factory.mktemp("maisi_unet") / "diff_unet_tiny.pt"
    torch.save({"epoch": 1, "loss": 0.5, "num_train_timesteps": 100,
                "scale_factor": torch.tensor(0.8), "unet_state_dict": m.state_dict()}, path)
    return str(path), m


def maisi_unet_config(ae_workdir, init_from=None):
    c = tiny_diffusion_config(ae_workdir)
    u = c.unet
    u.kind = "maisi"
    for k in ("include_spacing_input", "include_top_region_index_input",
              "include_bottom_region_index_input", "num_class_embeds"):
        u[k] = MONAI_UNET[k]
    u.init_from = init_from
    u.maisi = ml_collections.ConfigDict({"spacing": SPACING, "top_region_index": TOP,
                                         "bottom_region_index": BOTTOM,
                                         "modality": MODALITY})
    return c


def test_starts_from_the_file_and_feeds_the_config_inputs(ae_workdir, monai_file):
    path, m = monai_file
    task = make_task(maisi_unet_config(ae_workdir, path))
    assert type(task.unet) is MaisiUNetFixedInputs
    assert f"UNet weights from {path}" in task.describe()  # the log names the file
    assert task.scale_factor == pytest.approx(0.8)  # the file's (latents.scale_factor unset)
    state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
    want = unet_maisi_from_monai(m.state_dict(), task.unet)
    for a, b in zip(_leaves(state.params), _leaves(want)):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4, 2)).astype(np.float32)
    t = np.array([3, 70])

    def half(v):  # MAISI's inference: x100 in float16
        return torch.tensor(np.asarray(np.asarray(v) * 1e2, np.float16)[None].repeat(2, 0)
                            ).float()

    with torch.no_grad():
        ref = to_ours(m(to_torch(x), torch.from_numpy(t), class_labels=torch.tensor([1, 1]),
                        top_region_index_tensor=half(TOP),
                        bottom_region_index_tensor=half(BOTTOM),
                        spacing_tensor=half(SPACING)))
    got = task.unet.apply({"params": state.params}, jnp.asarray(x), jnp.asarray(t))
    assert rel_err(ref, got) <= 1e-5


def test_refusals_are_one_line(ae_workdir, monai_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        make_task(maisi_unet_config(ae_workdir, str(tmp_path / "missing.pt")))
    assert "\n" not in str(err.value) and "unet.init_from=" in str(err.value)
    assert "no such file" in str(err.value)
    c = maisi_unet_config(ae_workdir, monai_file[0])
    c.unet.num_channels = (16,)
    c.unet.num_head_channels = (16,)
    with pytest.raises(ConfigError) as err:
        make_task(c)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unet.init_from=") and len(msg) < 500, msg
    c = maisi_unet_config(ae_workdir, monai_file[0])
    c.unet.kind = "monai"
    with pytest.raises(ConfigError, match="needs unet.kind='maisi'"):
        make_task(c)
    c = maisi_unet_config(ae_workdir)
    c.unet.maisi.spacing = (1.5, 1.5)
    with pytest.raises(ConfigError, match="unet.maisi.spacing: 3 numbers"):
        make_task(c)


def test_fine_tune_resumes_exactly(ae_workdir, monai_file, tmp_path, monkeypatch):
    """4 steps (checkpoints and evaluations, with a decoded sample, at 2 and 4) against a
    run cut while fetching batch 3 and run again: the same params and EMA, exactly."""
    task = make_task(maisi_unet_config(ae_workdir, monai_file[0]))
    whole = trainer.train(task, str(tmp_path / "whole"), progress=False)
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
    for a, b in zip(_leaves((whole.params, whole.ema_params)),
                    _leaves((resumed.params, resumed.ema_params))):
        np.testing.assert_array_equal(a, b)
    start = unet_maisi_from_monai(monai_file[1].state_dict(), task.unet)
    assert max(float(np.abs(a - b).max()) for a, b in zip(
        _leaves(whole.params), _leaves(start))) > 0  # it trained
    assert (tmp_path / "whole" / "images" / "step_4.png").exists()
