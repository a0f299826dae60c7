"""ldm-jax plan: the shape table, parameter counts, and the command line's exit codes."""

import os
import subprocess
import sys

import pytest

from ldm_jax.autoencoder.plan import format_plan, human_bytes, param_counts
from ldm_jax.config import load_config
from ldm_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cfg(name):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "ldm_jax", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(256 * 2**20) == "256.0 MiB"


def test_format_plan_balanced_shapes():
    text = format_plan(cfg("balanced_nearest"), with_params=False)
    assert "latent: 16x16x4 x 3 channels" in text
    # 16^3 input voxels per position over 3 channels.
    assert "1,365.3 input values per latent value" in text
    assert "total downsampling factor: 16x" in text
    lines = text.splitlines()
    # Level 1 of balanced: 32x32x8 x 64 channels in bf16 = 1 MiB for one volume.
    level1 = [l for l in lines if "level 1" in l]
    assert len(level1) == 2 and all("32x32x8" in l and "1.0 MiB" in l for l in level1)
    # The seed's head convolves 32 channels at full resolution: 256x256x64x32x2 B.
    assert any("head: nearest x2" in l and "256.0 MiB" in l for l in lines)
    assert "parameters" not in text
    assert "upsample_head nearest_conv," in lines[0]
    # With a stem of 1 there is no head to name (MONAI's decoder).
    assert "upsample_head none (stem 1)," in format_plan(cfg("monai_3d_ldm"), with_params=False)


def test_format_plan_anisotropic_and_invalid():
    c = cfg("balanced")
    c.autoencoder.initial_downsample_factor = (2, 2, 1)
    c.data.volume_size = (256, 256, 32)
    text = format_plan(c, with_params=False)
    assert "total downsampling factor: (16, 16, 8)" in text
    assert "subpixel" in text
    c.data.volume_size = (256, 256, 60)
    with pytest.raises(ConfigError, match=r"\(Z\) = 60.*nearest valid sizes: 56 or 64"):
        format_plan(c)


def test_param_counts_match_monai():
    # monai.networks.nets.AutoencoderKL / PatchDiscriminator (MONAI 1.6.1) with the same
    # settings as configs/monai_3d_ldm.py have 2,299,208 and 2,771,873 parameters.
    counts = param_counts(cfg("monai_3d_ldm"))
    assert counts == {"autoencoder": 2_299_208, "discriminator": 2_771_873}


def test_param_counts_in_plan_large_volume_abstract():
    # extreme.py is 512x512x128 with a 64x factor: counting must not allocate the volume.
    text = format_plan(cfg("extreme"))
    assert "latent: 8x8x2 x 8 channels" in text and "64x" in text
    assert "parameters: autoencoder " in text and "discriminator " in text


def test_cli_balanced():
    r = run_plan("--config", "configs/balanced.py")
    assert r.returncode == 0, r.stderr
    assert "16x16x4" in r.stdout and "total downsampling factor: 16x" in r.stdout
    assert "parameters: autoencoder" in r.stdout


def test_cli_override_breaking_divisibility_is_a_clear_error():
    r = run_plan("--config", "configs/balanced.py", "--config.data.volume_size=(250,256,64)")
    assert r.returncode == 2
    assert "data.volume_size[0] (X) = 250" in r.stderr
    assert "nearest valid sizes: 240 or 256" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_per_axis_override_and_missing_file():
    r = run_plan("--config=configs/balanced.py",
                 "--config.autoencoder.initial_downsample_factor=(2,2,1)",
                 "--config.data.volume_size=(256,256,32)")
    assert r.returncode == 0, r.stderr
    assert "total downsampling factor: (16, 16, 8)" in r.stdout
    r = run_plan("--config", "configs/no_such.py")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
