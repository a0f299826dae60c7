"""The per-voxel variational bound is MONAI's `DiffusionInferer.get_likelihood` on the
same model, weights and noise (float32), for epsilon and v-prediction, with and without
x0 clipping, all timesteps or a subset."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")
monai_inferers = pytest.importorskip("monai.inferers")
monai_sched = pytest.importorskip("monai.networks.schedulers")

from ldm_jax.diffusion.likelihood import make_likelihood, to_image_grid
from ldm_jax.errors import ConfigError
from ldm_jax.models import build_unet
from ldm_jax.models.unet_convert import unet_from_monai
from ldm_jax.schedulers import build_scheduler

CFG = {"in_channels": 2, "out_channels": 2, "num_res_blocks": 1, "num_channels": (8, 16),
       "attention_levels": (False, True), "num_head_channels": (0, 8), "norm_num_groups": 4}


def _monai_unet(seed=0):
    torch.manual_seed(seed)
    m = monai_nets.DiffusionModelUNet(spatial_dims=3, channels=CFG["num_channels"],
                                      **{k: v for k, v in CFG.items() if k != "num_channels"})
    with torch.no_grad():
        for p in m.parameters():
            p.add_((0.1 if p.ndim == 1 else p[0].numel() ** -0.5) * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("prediction_type,clip,steps", [("epsilon", True, None),
                                                         ("v_prediction", False, None),
                                                         ("epsilon", False, 5)])
def test_likelihood_matches_monai(prediction_type, clip, steps):
    T = 20
    m = _monai_unet()
    ms = monai_sched.DDPMScheduler(num_train_timesteps=T, schedule="scaled_linear_beta",
                                   beta_start=0.0015, beta_end=0.0195,
                                   prediction_type=prediction_type, clip_sample=clip)
    if steps:
        ms.set_timesteps(steps)
    inferer = monai_inferers.DiffusionInferer(ms)
    rng = np.random.default_rng(0)
    x0 = (1.2 * rng.standard_normal((2, 8, 8, 4, 2))).astype(np.float32)  # some beyond +-0.999
    torch.manual_seed(5)
    noise = torch.randn(2, 2, 8, 8, 4)
    torch.manual_seed(5)  # get_likelihood draws randn_like(inputs): the same noise
    x_monai = torch.from_numpy(x0).permute(0, 4, 1, 2, 3).contiguous()  # MONAI .view()s it
    total_ref, inter = inferer.get_likelihood(x_monai, m,
                                              save_intermediates=True, verbose=False)
    map_ref = sum(k.sum(1) for k in inter).numpy()  # over t and channels: (B, X, Y, Z)

    sched = build_scheduler({"name": "ddpm", "num_train_timesteps": T,
                             "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                             "beta_end": 0.0195, "prediction_type": prediction_type,
                             "clip_sample": clip, "monai_prev_timestep": True})
    fn = make_likelihood(build_unet(CFG), sched, steps=steps)
    total, kl_map = fn(unet_from_monai(m.state_dict(), CFG), jax.random.key(0), x0,
                       noise=noise.permute(0, 2, 3, 4, 1).numpy())
    np.testing.assert_allclose(np.asarray(total), total_ref.numpy(), rtol=1e-5)
    err = np.abs(np.asarray(kl_map) - map_ref).max() / np.abs(map_ref).max()
    print(f"{prediction_type} clip={clip} steps={steps}: total {np.asarray(total)} vs "
          f"{total_ref.numpy()}, map max rel err {err:.1e}")
    assert err <= 1e-5
    np.testing.assert_allclose(np.asarray(kl_map).mean(axis=(1, 2, 3)) / 2, np.asarray(total),
                               rtol=1e-5)
    # Without the t = 0 term: MONAI's intermediates of t >= 1 only (the last is t = 0).
    fn0 = make_likelihood(build_unet(CFG), sched, steps=steps, decoder_term=False)
    _, kl_map0 = fn0(unet_from_monai(m.state_dict(), CFG), jax.random.key(0), x0,
                     noise=noise.permute(0, 2, 3, 4, 1).numpy())
    map_ref0 = sum(k.sum(1) for k in inter[:-1]).numpy()
    assert np.abs(map_ref - map_ref0).max() > 1.0  # the t = 0 term is not negligible
    np.testing.assert_allclose(np.asarray(kl_map0), map_ref0, rtol=1e-4,
                               atol=1e-5 * np.abs(map_ref0).max())


def test_only_ddpm_and_the_image_grid():
    ddim = build_scheduler({"name": "ddim", "num_train_timesteps": 10})
    with pytest.raises(ConfigError, match="DDPM models only"):
        make_likelihood(build_unet(CFG), ddim)
    m = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    up = to_image_grid(m, (2, 2, 1))
    assert up.shape == (1, 4, 4, 2) and up[0, 3, 3, 1] == m[0, 1, 1, 1]
