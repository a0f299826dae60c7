"""ldm_jax.config: factor normalisation, validation messages, derived shapes, loading."""

import glob
import os

import pytest

from ldm_jax.autoencoder.config import validate
from ldm_jax.autoencoder.geometry import (
    format_factor,
    latent_shape,
    level_factors,
    level_shapes,
    total_factor,
)
from ldm_jax.config import as_triple, load_config
from ldm_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


def cfg(name="balanced"):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def problems_of(config) -> str:
    with pytest.raises(ConfigError) as e:
        validate(config)
    return str(e.value)


# --- as_triple -------------------------------------------------------------------------


@pytest.mark.parametrize("f, want", [
    (2, (2, 2, 2)), (1, (1, 1, 1)), ((2, 2, 1), (2, 2, 1)), ([4, 4, 2], (4, 4, 2)),
])
def test_as_triple_accepts(f, want):
    assert as_triple(f) == want


def test_as_triple_accepts_numpy_ints():
    import numpy as np

    assert as_triple(np.int64(4)) == (4, 4, 4)
    assert as_triple((np.int32(2), 2, 1)) == (2, 2, 1)


@pytest.mark.parametrize("bad", [0, -1, 2.5, (2, 2), "2", (2, 0, 2), (2, 2, 2.0), True, None])
def test_as_triple_rejects(bad):
    with pytest.raises(ConfigError, match=r"initial_downsample_factor must be a positive int "
                                          r"or a 3-tuple of positive ints like \(2, 2, 1\)"):
        as_triple(bad, "initial_downsample_factor")


def test_as_triple_error_shows_what_was_given():
    with pytest.raises(ConfigError, match=r"got \(2, 2\)"):
        as_triple((2, 2))
    assert issubclass(ConfigError, ValueError)


# --- factors ---------------------------------------------------------------------------


def test_level_factors_default_to_two():
    c = cfg("default")
    c.autoencoder.num_channels = (8, 16, 16, 32)
    assert level_factors(c.autoencoder) == [(2, 2, 2)] * 3
    assert total_factor(c.autoencoder) == (8, 8, 8)


def test_per_axis_total_factor():
    c = cfg("default")
    c.autoencoder.initial_downsample_factor = (2, 2, 1)
    c.autoencoder.downsample_factors = ((2, 2, 1), (2, 2, 2))
    assert level_factors(c.autoencoder) == [(2, 2, 1), (2, 2, 2)]
    assert total_factor(c.autoencoder) == (8, 8, 2)


def test_lists_from_ml_collections_are_accepted():
    c = cfg("default")
    c.autoencoder.downsample_factors = [[4, 4, 2], 2]
    assert total_factor(c.autoencoder) == (8, 8, 4)


def test_format_factor():
    assert format_factor((16, 16, 16)) == "16x"
    assert format_factor(4) == "4x"
    assert format_factor((8, 8, 4)) == "(8, 8, 4)"


# --- every shipped config --------------------------------------------------------------


def test_configs_found():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {"default", "balanced", "balanced_nearest", "conservative", "aggressive", "extreme",
            "monai_3d_ldm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_config_validates(path):
    config = load_config(path)
    assert validate(config) is None
    shape = latent_shape(config)
    assert len(shape) == 4 and all(s > 0 for s in shape)


@pytest.mark.parametrize("name, want, total", [
    ("balanced", (16, 16, 4, 3), (16, 16, 16)),
    ("balanced_nearest", (16, 16, 4, 3), (16, 16, 16)),
    ("conservative", (32, 32, 8, 3), (8, 8, 8)),
    ("aggressive", (16, 16, 4, 3), (32, 32, 32)),
    ("extreme", (8, 8, 2, 8), (64, 64, 64)),
    ("monai_3d_ldm", (24, 24, 16, 3), (4, 4, 4)),
])
def test_latent_shapes(name, want, total):
    config = cfg(name)
    assert latent_shape(config) == want
    assert total_factor(config.autoencoder) == total


def test_level_shapes_balanced():
    rows = level_shapes(cfg("balanced_nearest"))
    enc = [(r["shape"], r["channels"]) for r in rows if r["path"] == "encoder"]
    assert enc == [((256, 256, 64), 1), ((128, 128, 32), 32), ((128, 128, 32), 32),
                   ((32, 32, 8), 64), ((16, 16, 4), 64)]
    dec = [(r["shape"], r["channels"]) for r in rows if r["path"] == "decoder"]
    # Levels back up, the seed's full-resolution head (32 channels), then the output.
    assert dec == [((16, 16, 4), 64), ((32, 32, 8), 64), ((128, 128, 32), 32),
                   ((256, 256, 64), 32), ((256, 256, 64), 1)]
    assert [r["factor"] for r in rows if r["path"] == "latent"] == [(16, 16, 16)]


def test_level_shapes_subpixel_head_and_anisotropic():
    c = cfg("balanced")
    c.autoencoder.initial_downsample_factor = (2, 2, 1)
    c.data.volume_size = (256, 256, 32)
    rows = level_shapes(c)
    head = [r for r in rows if r["name"].startswith("head")]
    assert head[0]["shape"] == (128, 128, 32) and head[0]["channels"] == 4
    assert latent_shape(c) == (16, 16, 4, 3)


# --- validation messages ---------------------------------------------------------------


def test_volume_not_divisible_names_axis_and_nearest_sizes():
    c = cfg("balanced")
    c.data.volume_size = (256, 256, 60)
    msg = problems_of(c)
    assert "data.volume_size[2] (Z) = 60" in msg
    assert "total downsampling factor 16 on that axis" in msg
    assert "nearest valid sizes: 48 or 64" in msg
    assert "(X)" not in msg and "(Y)" not in msg


def test_volume_smaller_than_factor():
    c = cfg("extreme")
    c.data.volume_size = (512, 512, 32)
    msg = problems_of(c)
    assert "(Z) = 32" in msg and "factor 64" in msg and "nearest valid size: 64" in msg


def test_volume_anisotropic_factor_per_axis():
    c = cfg("balanced")
    c.autoencoder.initial_downsample_factor = (2, 2, 1)
    c.data.volume_size = (256, 256, 36)  # Z factor is 8
    msg = problems_of(c)
    assert "(Z) = 36" in msg and "factor 8 on that axis" in msg and "32 or 40" in msg


@pytest.mark.parametrize("size", [(256, 256), (256, 256, 0), (256, 256, 64.0), (256, 256, 64, 1)])
def test_volume_size_shape(size):
    c = cfg("balanced")
    c.data.volume_size = size
    assert "data.volume_size must be 3 positive ints" in problems_of(c)


def test_bad_initial_factor():
    c = cfg("balanced")
    c.autoencoder.initial_downsample_factor = 0
    assert ("initial_downsample_factor must be a positive int or a 3-tuple"
            in problems_of(c))


def test_bad_level_factor_names_the_index():
    c = cfg("balanced")
    c.autoencoder.downsample_factors = (4, (2, 2))
    assert "autoencoder.downsample_factors[1] must be a positive int" in problems_of(c)


def test_wrong_number_of_level_factors_says_why():
    c = cfg("balanced")
    c.autoencoder.downsample_factors = (4, 2, 2)
    msg = problems_of(c)
    assert "has 3 entries but 2 are expected" in msg
    assert "one per transition between the 3 levels" in msg


def test_groups_must_divide_channels():
    c = cfg("balanced")
    c.autoencoder.num_channels = (32, 48, 64)
    msg = problems_of(c)
    assert "level 1 (48)" in msg and "level 0" not in msg
    assert "1, 2, 4, 8, 16" in msg  # divisors of gcd(32, 48, 64)


def test_attention_levels_and_res_blocks_lengths():
    c = cfg("balanced")
    c.autoencoder.attention_levels = (False, True)
    c.autoencoder.num_res_blocks = (1, 2)
    msg = problems_of(c)
    assert "attention_levels must have one bool per level (3" in msg
    assert "num_res_blocks must be an int or have one entry per level (3" in msg
    assert msg.startswith("2 problems")


def test_num_res_blocks_sequence_ok():
    c = cfg("balanced")
    c.autoencoder.num_res_blocks = (1, 2, 2)
    validate(c)


@pytest.mark.parametrize("field, value, expect", [
    ("upsample_head", "bilinear", "autoencoder.upsample_head must be one of 'nearest_conv', "
                                  "'subpixel'; got 'bilinear'"),
    ("dtype", "float16", "autoencoder.dtype must be one of 'float32', 'bfloat16'"),
    ("remat", "all", "autoencoder.remat must be one of 'none', 'res_blocks', 'levels'"),
    ("latent_channels", 0, "autoencoder.latent_channels must be a positive int"),
])
def test_choices(field, value, expect):
    c = cfg("balanced")
    c.autoencoder[field] = value
    assert expect in problems_of(c)


def test_discriminator_and_mesh():
    c = cfg("balanced")
    c.discriminator.norm = "layer"
    c.mesh.data = 0
    c.mesh.spatial = -1
    msg = problems_of(c)
    assert "discriminator.norm must be one of 'batch', 'instance'; got 'layer'" in msg
    assert "mesh.data must be a positive int (devices on that axis) or -1" in msg
    assert "mesh.spatial" not in msg  # -1 is allowed
    c.mesh.data = -1
    assert "only one of mesh.data and mesh.spatial may be -1" in problems_of(c)


def test_several_problems_in_one_message():
    c = cfg("balanced")
    c.data.volume_size = (250, 256, 64)
    c.autoencoder.dtype = "fp8"
    msg = problems_of(c)
    assert msg.startswith("2 problems in the config")
    assert "(X) = 250" in msg and "240 or 256" in msg and "autoencoder.dtype" in msg


def test_level_shapes_raises_on_bad_volume():
    c = cfg("balanced")
    c.data.volume_size = (256, 256, 60)
    with pytest.raises(ConfigError, match="nearest valid sizes: 48 or 64"):
        latent_shape(c)


# --- load_config -----------------------------------------------------------------------


def test_load_config_missing_file():
    with pytest.raises(ConfigError, match="does not exist.*balanced.py"):
        load_config(os.path.join(ROOT, "configs", "no_such_config.py"))


def test_missing_config_suggests_a_config_that_exists(tmp_path, monkeypatch):
    """A bare name or a misspelt path gets the closest configs/ file, and the suggestion
    exists; files without a get_config() are never offered."""
    monkeypatch.chdir(ROOT)
    for typed, meant in (("balanced", "configs/balanced.py"),
                         ("configs/balance.py", "configs/balanced.py"),
                         ("configs/diffusion/monai_3d.py", "configs/diffusion/monai_3d_ldm.py")):
        with pytest.raises(ConfigError) as err:
            load_config(typed)
        assert str(err.value).endswith(f"Did you mean {meant}?") and os.path.isfile(meant)
    (tmp_path / "helpers.py").write_text("x = 1\n")
    (tmp_path / "mine.py").write_text("def get_config():\n    return None\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "zzz.py"))
    assert str(err.value).endswith(f"Configs in {tmp_path}: mine.py.")


def test_load_config_without_get_config(tmp_path):
    p = tmp_path / "empty.py"
    p.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        load_config(p)


def test_load_config_import_error_names_file(tmp_path):
    p = tmp_path / "broken.py"
    p.write_text("import not_a_module_xyz\n")
    with pytest.raises(ConfigError, match="broken.py.*ModuleNotFoundError"):
        load_config(p)


def test_load_config_outside_repo_can_import_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "mine.py"
    p.write_text("from configs import balanced\n\n"
                 "def get_config():\n"
                 "    c = balanced.get_config()\n"
                 "    c.data.volume_size = (128, 128, 32)\n"
                 "    return c\n")
    c = load_config(str(p))
    assert latent_shape(c) == (8, 8, 2, 3)
