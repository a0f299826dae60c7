"""Preview PNG: the CLI writes an image of samples; the layout holds 4 views per sample."""

import os
import subprocess
import sys

import numpy as np

from ldm_jax.cli import preview

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_render_layout_and_grey_levels():
    vol = np.zeros((32, 24, 16, 1), np.float32)
    vol[5, 6, 8, 0] = 1.0  # one bright voxel on the mid-Z slice
    views = preview.panels(vol, 0.0, 1.0)
    assert [v.shape for v in views] == [(32, 24), (32, 16), (24, 16), (32, 24)]
    assert views[0][5, 6] == 255 and views[3][5, 6] == 255 and views[1].max() == 0
    img = preview.render([vol, vol], 0.0, 1.0)
    assert img.mode == "L" and img.size[1] > 2 * 128 and np.asarray(img).max() == 255


def test_preview_cli_writes_png(tmp_path):
    out = tmp_path / "preview.png"
    cmd = [
        sys.executable, "-m", "ldm_jax.data.preview", "--config", "configs/balanced.py",
        "--config.data.volume_size=(48,48,16)", "--num_samples=2", f"--out={out}",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 train sample(s)" in res.stdout and "(48, 48, 16, 1)" in res.stdout
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.ndim == 2 and img.shape[0] > 2 * 128 and img.max() > 100  # filaments visible
