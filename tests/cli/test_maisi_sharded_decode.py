"""The MAISI decode split along X over simulated CPU devices (tests/conftest.py gives 8)
equals the one-device decode (float32 norms within 2e-5; with MAISI's norm_float16 the
all-reduced GroupNorm statistics differ in their last bits, and the float16 rounding after
them passes that on at half precision), and `decode` picks the devices that divide x."""

import jax
import numpy as np

from ldm_jax.diffusion.maisi import MaisiModels, decode, spatial_decoder, spatial_devices
from ldm_jax.models.maisi import AutoencoderKlMaisi

AE = AutoencoderKlMaisi(in_channels=1, out_channels=1, num_res_blocks=(1, 1, 1),
                        num_channels=(8, 8, 16), attention_levels=(False, False, False),
                        latent_channels=4, norm_num_groups=4, norm_float16=False)
AE16 = AE.clone(norm_float16=True)  # MAISI's released setting


def _params():
    x = np.zeros((1, 16, 16, 16, 1), np.float32)
    params = AE.init({"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)},
                     x)["params"]
    rng = np.random.default_rng(0)  # non-trivial norms and biases
    return jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape)
                        .astype(np.float32), params)


def test_split_decode_equals_one_device():
    params = _params()
    z = np.random.default_rng(1).standard_normal((1, 8, 4, 4, 4)).astype(np.float32)
    for model, tol in ((AE, 2e-5), (AE16, 1e-2)):
        one = np.asarray(spatial_decoder(model, jax.devices()[:1])(params, z))
        for n in (2, 4, 8):
            out = spatial_decoder(model, jax.devices()[:n])(params, z)
            assert len(out.sharding.device_set) == n
            np.testing.assert_allclose(np.asarray(out), one, atol=tol, rtol=0)


def test_decode_uses_the_devices_that_divide_x():
    assert len(spatial_devices(6, jax.devices()[:8])) == 6
    assert len(spatial_devices(7, jax.devices()[:4])) == 1
    models = MaisiModels(AE, _params(), None, None, 1.0)
    z = np.random.default_rng(2).standard_normal((4, 4, 4, 4)).astype(np.float32)
    out, how = decode(models, z, window="whole", devices=jax.devices()[:4])
    ref, _ = decode(models, z, window="whole", devices=jax.devices()[:1])
    assert "X split over 4 devices" in how and out.shape == (16, 16, 16, 1)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
