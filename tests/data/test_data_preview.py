"""Preview PNG: the CLI writes a labelled image of samples, 4 views per sample, panels
enlarged to >= 128 pixels."""

import os
import subprocess
import sys

import numpy as np

from ldm_jax import visualize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_views_and_layout():
    vol = np.zeros((32, 24, 16, 1), np.float32)
    vol[5, 6, 8, 0] = 1.0  # one bright voxel on the mid-Z slice
    views = visualize.views(vol)
    assert [t for t, _ in views] == ["XY at z=8", "XZ at y=12", "YZ at x=16", "max over Z"]
    assert [v.shape for _, v in views] == [(32, 24), (32, 16), (24, 16), (32, 24)]
    assert views[0][1][5, 6] == 1 and views[3][1][5, 6] == 1 and views[1][1].max() == 0
    assert visualize.panel_scale(vol.shape) == 8  # 16 voxels -> 128 pixels
    img = visualize.samples_image([vol, vol], ["a.nii.gz", "b"], (0.0, 1.0), "title")
    rgb = np.asarray(img)
    # two rows of panels 32*8 pixels high, four panels at least 16*8 wide
    assert img.size[1] > 2 * 32 * 8 and img.size[0] > (24 + 16 + 16 + 24) * 8
    assert rgb.max() == 255 and (rgb == 0).any()


def test_comparison_image_titles_and_error_bar():
    x = np.zeros((16, 16, 8), np.float32)
    r = x.copy()
    r[8, 8, 4] = 0.5
    img = visualize.comparison_image([x], [r], ["/data/vol1.nii.gz"])
    rgb = np.asarray(img).astype(int)
    # |error| panels and the colour bar are coloured (red-yellow), the rest grey
    coloured = (np.abs(rgb[..., 0] - rgb[..., 2]) > 50).sum()
    assert coloured > 16 * 128  # at least the colour bar
    assert img.size[1] > 3 * 16 * 8
    assert visualize.psnr(x, r, 1.0) == 10 * np.log10(1 / (0.25 / (16 * 16 * 8)))


def test_preview_cli_writes_png(tmp_path):
    out = tmp_path / "preview.png"
    cmd = [
        sys.executable, "-m", "ldm_jax", "preview", "--config", "configs/balanced.py",
        "--config.data.volume_size=(48,48,16)", "--num_samples=2", f"--output={out}",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 train sample(s)" in res.stdout and "(48, 48, 16, 1)" in res.stdout
    assert "Data: built-in synthetic filaments" in res.stdout
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 2 * 128 and img.max() > 100  # filaments visible
