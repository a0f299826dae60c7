"""ldm_jax.diffusion.condition: 2D condition images (PNG, TIFF, 2D .npy) read as stored,
(rows, columns) = (X, Y); colour images refused; folders of images found in name order."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.diffusion import condition as cond
from ldm_jax.errors import ConfigError, DataError


def _xy(shape=(5, 3)):
    """A non-square (X, Y) array whose every value differs, so a transpose shows."""
    return np.arange(np.prod(shape)).reshape(shape)


@pytest.mark.parametrize("name,arr", [
    ("u8.png", (_xy() * 10).astype(np.uint8)),
    ("u16.png", (_xy() * 4000).astype(np.uint16)),
    ("f32.tif", (_xy() / 7.0 - 1).astype(np.float32)),
    ("u16.tiff", (_xy() * 4000).astype(np.uint16)),
])
def test_image_round_trips_values_and_axis_order(tmp_path, name, arr):
    path = str(tmp_path / name)
    Image.fromarray(arr).save(path)
    got = cond.read_condition(path)
    assert got.shape == (5, 3)  # (X, Y): rows are X
    np.testing.assert_array_equal(got, arr)
    assert got[4, 0] == arr[4, 0] and got[0, 2] == arr[0, 2]


def test_projection_of_a_volume_round_trips(tmp_path):
    vol = np.random.default_rng(0).random((6, 4, 3)).astype(np.float32)
    proj = vol.sum(axis=2)
    np.save(tmp_path / "p.npy", proj)
    Image.fromarray(proj).save(tmp_path / "p.tif")
    for f in ("p.npy", "p.tif"):
        got = cond.read_condition(str(tmp_path / f))
        assert got.ndim == 2
        np.testing.assert_array_equal(got, proj)


def test_2d_npy_and_upper_case_suffix(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((4, 2), np.float32))
    assert cond.read_condition(str(tmp_path / "c.npy")).shape == (4, 2)
    Image.fromarray(np.full((4, 2), 7, np.uint8)).save(tmp_path / "C.PNG")
    assert cond.read_condition(str(tmp_path / "C.PNG")).shape == (4, 2)


def test_multipage_tiff_is_pages_last(tmp_path):
    pages = [Image.fromarray(np.full((3, 2), i, np.float32)) for i in range(4)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    got = cond.read_condition(str(tmp_path / "m.tif"))
    assert got.shape == (3, 2, 4)
    np.testing.assert_array_equal(got[0, 0], [0, 1, 2, 3])


def test_folder_of_pngs_in_name_order(tmp_path):
    for i, n in enumerate(("s2", "s0", "s1")):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"{n}.png")
    files = cond.condition_files(str(tmp_path), count=3)
    assert files == [str(tmp_path / f"s{i}.png") for i in range(3)]
    assert [int(cond.read_condition(f)[0, 0]) for f in files] == [1, 2, 0]
    assert cond.condition_files(str(tmp_path), names=["s1"]) == [str(tmp_path / "s1.png")]
    # NAME.npy and its NAME.png preview are one condition: the .npy (first in SUFFIXES).
    np.save(tmp_path / "s1.npy", np.zeros((4, 4)))
    files = cond.condition_files(str(tmp_path), count=3)
    assert files == [str(tmp_path / "s0.png"), str(tmp_path / "s1.npy"),
                     str(tmp_path / "s2.png")]
    with pytest.raises(ConfigError, match="holds 3 condition file"):
        cond.condition_files(str(tmp_path), count=4)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_refused_in_one_line(tmp_path, mode):
    path = str(tmp_path / "c.png")
    Image.new(mode, (4, 3)).save(path)
    with pytest.raises(DataError) as e:
        cond.read_condition(path, "--condition", DataError)
    msg = str(e.value)
    assert "\n" not in msg and "--condition" in msg and path in msg
    assert f"colour ({mode})" in msg and "greyscale" in msg


def test_bad_image_files_one_line(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for path, msg in ((str(tmp_path / "broken.png"), "not a readable condition file"),
                      (str(tmp_path / "missing.tif"), "is not a file"),
                      (str(tmp_path / "broken.png") + ".jpg", "is not a file")):
        with pytest.raises(ConfigError, match=msg) as e:
            cond.read_condition(path, "--cond")
        assert "\n" not in str(e.value) and "--cond" in str(e.value) and path in str(e.value)
    (tmp_path / "x.jpg").write_bytes(b"jpg")
    with pytest.raises(ConfigError, match=r"not a condition file; .*\.png, \.tif, \.tiff"):
        cond.read_condition(str(tmp_path / "x.jpg"))
