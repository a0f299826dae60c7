"""The VQ-VAE's memory levers (issue 31, item 1): the KL autoencoder's strided first conv,
per-level factors, subpixel / nearest_conv heads and voxel-complete kernels, as
`autoencoder.vqvae` options whose defaults leave MONAI's model (its parity:
tests/models/test_vqvae_parity_monai.py).

Shapes, that every input voxel reaches the latent, the ICNR start of the subpixel head,
the checks, and that the levers lower the compile-only training-step memory (XLA's
memory analysis, as benchmarks.vq_memory and the README's table measure it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.autoencoder.config import prepare_config
from ldm_jax.autoencoder.vq_config import total, vqvae_problems
from ldm_jax.errors import ConfigError, ConversionError
from ldm_jax.models.vqvae import VQVAE, Convolution, build_vqvae, vqvae_shapes
from ldm_jax.models.vqvae_convert import vqvae_from_monai
from tests.autoencoder.test_vqvae_task import vq_config

BASE = dict(channels=(8, 16), num_res_layers=1, num_res_channels=(8, 16),
            downsample_parameters=((2, 4, 1, 1),) * 2,
            upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=16, embedding_dim=4)

LEVERS = {  # name: (levers, latent grid for a 16x16x8 input, total factor)
    "stem4_subpixel": (dict(initial_downsample_factor=4, downsample_factors=(1,),
                            upsample_head="subpixel"), (4, 4, 2), (4, 4, 4)),
    "stem2_levels_nearest": (dict(initial_downsample_factor=2, downsample_factors=(2,),
                                  upsample_head="nearest_conv"), (4, 4, 2), (4, 4, 4)),
    "anisotropic": (dict(initial_downsample_factor=(2, 2, 1), downsample_factors=((2, 2, 1),),
                         upsample_head="subpixel"), (4, 4, 8), (4, 4, 1)),
    "subpixel_head_only": (dict(upsample_head="subpixel"), (4, 4, 2), (4, 4, 4)),
    "levels_only": (dict(downsample_factors=(4,)), (2, 2, 1), (8, 8, 8)),
}


def _init(model, size=(16, 16, 8)):
    x = jax.random.uniform(jax.random.key(1), (1, *size, model.in_channels))
    return x, model.init(jax.random.key(0), x)


def test_defaults_are_monais_model():
    model = VQVAE(**BASE)
    assert not model.uses_levers
    config = vq_config()
    assert not build_vqvae(config.autoencoder).uses_levers  # configs/default.py's values
    for key, value in (("initial_downsample_factor", None), ("downsample_factors", None),
                       ("upsample_head", "deconv"), ("strided_kernel", None)):
        assert config.autoencoder.vqvae[key] == value


@pytest.mark.parametrize("name", LEVERS)
def test_lever_shapes(name):
    levers, latent, factor = LEVERS[name]
    model = VQVAE(**BASE, **levers)
    assert model.uses_levers and total(model) == factor
    levels, out = vqvae_shapes(model, (16, 16, 8))
    assert levels[-1] == latent and out == (16, 16, 8)
    x, variables = _init(model)
    z = model.apply(variables, x, method="encode")
    assert z.shape == (1, *latent, 4)
    y, loss = model.apply(variables, x)
    assert y.shape == x.shape and loss.shape == () and bool(jnp.isfinite(y).all())
    y2 = model.apply(variables, z, method="decode_latents")
    assert y2.shape == x.shape


@pytest.mark.parametrize("levers", [dict(initial_downsample_factor=4, downsample_factors=(1,)),
                                    dict(initial_downsample_factor=(4, 2, 1),
                                         downsample_factors=(2,)),
                                    dict(initial_downsample_factor=8, downsample_factors=(1,))])
def test_every_input_voxel_reaches_the_latent(levers):
    model = VQVAE(**BASE, **levers, upsample_head="subpixel")
    x, variables = _init(model, (16, 16, 16))
    w = jax.random.normal(jax.random.key(2), model.apply(variables, x, method="encode").shape)
    g = jax.grad(lambda x: jnp.sum(model.apply(variables, x, method="encode") * w))(x)
    assert bool((jnp.abs(g) > 0).all())


def test_a_kernel_below_the_stride_skips_voxels_and_warns(caplog):
    model = VQVAE(**BASE, initial_downsample_factor=4, downsample_factors=(1,),
                  upsample_head="subpixel", strided_kernel=3)
    with caplog.at_level("WARNING"):
        x, variables = _init(model, (16, 16, 16))
    assert "never reach the latent" in caplog.text
    w = jnp.ones(model.apply(variables, x, method="encode").shape)
    g = jax.grad(lambda x: jnp.sum(model.apply(variables, x, method="encode") * w))(x)
    assert not bool((jnp.abs(g) > 0).all())


def test_subpixel_head_starts_as_a_nearest_upsample():
    conv = Convolution(3, up_factor=(2, 2, 1), upsample="subpixel", conv_only=True)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 4, 5))
    variables = conv.init(jax.random.key(1), x)
    y = np.asarray(conv.apply(variables, x))
    assert y.shape == (1, 8, 8, 4, 3)
    np.testing.assert_allclose(y, np.repeat(np.repeat(y[:, ::2, ::2], 2, 1), 2, 2), atol=1e-6)


def test_lever_checks_name_the_field():
    with pytest.raises(ConfigError, match="downsample_factors needs 1"):
        VQVAE(**BASE, downsample_factors=(2, 2)).lever_layout()
    with pytest.raises(ConfigError, match="upsample_head must be one of"):
        VQVAE(**BASE, upsample_head="pixelshuffle").lever_layout()
    config = vq_config()
    config.autoencoder.vqvae.initial_downsample_factor = 4  # the deconv head undoes only 2
    (msg,) = vqvae_problems(config)
    assert "does not come back whole" in msg and "upsample_head" in msg
    config.autoencoder.vqvae.upsample_head = "subpixel"
    assert vqvae_problems(config) == []
    config.autoencoder.vqvae.strided_kernel = 0
    (msg,) = vqvae_problems(config)
    assert "strided_kernel" in msg


def test_a_lever_model_does_not_convert_to_monai():
    with pytest.raises(ConversionError, match="memory levers"):
        vqvae_from_monai({}, VQVAE(**BASE, upsample_head="subpixel"))


def test_levers_lower_the_training_step_memory():
    """Compile-only step (the trainer's, float32) at 32x32x16, channels (8, 16), same
    latent grid (8x8x4): the first conv strided by 4 (voxel-complete kernel 5) with the
    subpixel head needs less temporary memory (XLA's arena of intermediates: level 0 at
    1/4 instead of 1/2 per axis, no transposed conv at full resolution) and less at the
    peak than MONAI's rows."""
    from benchmarks.vq_memory import step_memory

    def measure(**levers):
        config = vq_config()
        config.data.volume_size = (32, 32, 16)
        config.autoencoder.dtype = "float32"
        config.autoencoder.vqvae.update(levers)
        return step_memory(prepare_config(config))

    monai = measure()
    stem = measure(initial_downsample_factor=4, downsample_factors=(1,), upsample_head="subpixel")
    assert stem["xla"]["temp"] < 0.8 * monai["xla"]["temp"], (monai, stem)
    assert stem["peak_bytes"] < monai["peak_bytes"], (monai, stem)
