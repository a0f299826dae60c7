"""ldm-jax voxelize --projection: 2D images from 2D tables (z = 0) and 3D tables (a sum)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ldm_jax.cli import voxelize
from ldm_jax.diffusion import condition as cond


def _run(*args):
    return voxelize.main(["prog", *args, "--progress=false"])


def _csv(path, header, rows):
    np.savetxt(path, np.asarray(rows, float), delimiter=",", fmt="%.3f",
               header=header, comments="")
    return str(path)


@pytest.fixture()
def table2d(tmp_path):
    d = tmp_path / "locs"
    d.mkdir()
    # x, y in nm; two localisations at (550, 350): voxel (5, 3) at 100 nm.
    _csv(d / "cell.csv", "x [nm],y [nm]", [[0, 0], [550, 350], [550, 350], [1050, 650]])
    return str(d)


def test_2d_table_to_image(table2d, tmp_path):
    out = str(tmp_path / "img")
    assert _run(f"--input={table2d}", f"--output={out}", "--voxel_size=100",
                "--projection=z", "--sigma=30") == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("cell")) == ["cell.npy",
                                                                          "cell.png"]
    img = np.load(os.path.join(out, "cell.npy"))
    assert img.dtype == np.float32 and img.shape == (11, 7)  # (X, Y): 0..1050, 0..650 nm
    assert np.unravel_index(np.argmax(img), img.shape) == (5, 3)
    assert img.sum() == pytest.approx(4, rel=1e-5)  # gaussian keeps the count
    # The preview reads as a condition image in the same (X, Y) order.
    png = cond.read_condition(os.path.join(out, "cell.png"))
    assert png.shape == (11, 7) and png.dtype == np.uint8 and png[5, 3] == 255
    # A folder of them is one condition per cloud: the .npy.
    assert cond.condition_files(out, count=1) == [os.path.join(out, "cell.npy")]
    row = json.load(open(os.path.join(out, "voxelize.json")))["clouds"]["cell"]
    assert row["projection"] == "z" and row["shape"] == [11, 7]
    assert row["max"] == pytest.approx(float(img.max()))
    # A rerun reuses; another projection is refused (made otherwise).
    assert _run(f"--input={table2d}", f"--output={out}", "--voxel_size=100",
                "--projection=z", "--sigma=30") == 0


def test_headerless_2d_table_with_two_columns(tmp_path):
    d = tmp_path / "locs"
    d.mkdir()
    _csv(d / "c.csv", "", [[100, 900], [100, 900], [700, 0]])
    out = str(tmp_path / "img")
    assert _run(f"--input={d}", f"--output={out}", "--voxel_size=100", "--projection=z",
                "--method=density", "--columns=0,1") == 0
    img = np.load(os.path.join(out, "c.npy"))
    assert img.shape == (7, 10) and img[0, 9] == 2 and img[6, 0] == 1 and img.sum() == 3


@pytest.mark.parametrize("method", ["gaussian", "density"])
def test_3d_projection_is_the_render_summed(tmp_path, method):
    d = tmp_path / "locs"
    d.mkdir()
    rng = np.random.default_rng(0)
    _csv(d / "cell.csv", "x [nm],y [nm],z [nm]", rng.uniform(0, [800, 600, 400], (200, 3)))
    vols, imgs, side = (str(tmp_path / n) for n in ("vols", "imgs", "side"))
    common = ["--voxel_size=50", f"--method={method}", "--sigma=40"]
    assert _run(f"--input={d}", f"--output={vols}", *common) == 0
    assert _run(f"--input={d}", f"--output={imgs}", "--projection=z", *common) == 0
    assert _run(f"--input={d}", f"--output={side}", "--projection=x", *common) == 0
    vol = np.asarray(nib.load(os.path.join(vols, "cell.nii.gz")).dataobj)
    np.testing.assert_allclose(np.load(os.path.join(imgs, "cell.npy")), vol.sum(axis=2),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(os.path.join(side, "cell.npy")), vol.sum(axis=0),
                               rtol=1e-5, atol=1e-6)


def test_refusals_are_one_line(table2d, tmp_path, capsys):
    def err(*args):
        assert _run(*args) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error: ") and "\n" not in msg, msg
        return msg

    out = str(tmp_path / "o")
    assert "with --projection z" in err(f"--input={table2d}", f"--output={out}",
                                        "--columns=x,y")
    assert "with --projection z" in err(f"--input={table2d}", f"--output={out}",
                                        "--columns=x,y", "--projection=x")
    assert "no z column" in err(f"--input={table2d}", f"--output={out}", "--projection=y")
    assert "no z column" in err(f"--input={table2d}", f"--output={out}")
    assert "--projection renders images" in err("--demo_clouds=1", f"--output={out}",
                                                "--projection=z")
    d = tmp_path / "named"
    d.mkdir()
    _csv(d / "c.csv", "a,b", [[1, 2]])
    msg = err(f"--input={d}", f"--output={out}", "--projection=z")
    assert "no x column" in msg and "--columns X,Y" in msg
    # A folder of images made with --projection z is not completed with another projection.
    imgs = str(tmp_path / "imgs")
    assert _run(f"--input={table2d}", f"--output={imgs}", "--projection=z") == 0
    capsys.readouterr()
    assert "projection" in err(f"--input={table2d}", f"--output={imgs}", "--projection=x",
                               "--columns=x,y,x")
