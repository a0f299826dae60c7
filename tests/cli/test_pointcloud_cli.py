"""ldm-jax voxelize / to_points end to end, in process, on tmp data."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ldm_jax.cli import to_points, voxelize
from ldm_jax.data.pointcloud import io as pio


def _run(module, *args):
    return module.main(["prog", *args, "--progress=false"] if module is voxelize
                       else ["prog", *args])


@pytest.fixture()
def clouds(tmp_path):
    out = str(tmp_path / "clouds")
    assert _run(voxelize, "--demo_clouds=2", f"--output={out}", "--demo_shape=24,24,12") == 0
    return out


def test_demo_clouds_voxelize_and_back(clouds, tmp_path):
    files = sorted(os.listdir(clouds))
    assert files == ["smlm_000.csv", "smlm_001.csv"]
    with open(os.path.join(clouds, files[0])) as f:
        assert f.readline().strip() == "x [nm],y [nm],z [nm]"
    pts = pio.read_cloud(pio.list_clouds([os.path.join(clouds, files[0])])[0])
    assert len(pts) > 100 and np.all(pts >= 0) and np.all(pts < [480, 480, 240])

    vols = str(tmp_path / "vols")
    assert _run(voxelize, f"--input={clouds}", f"--output={vols}", "--voxel_size=20",
                "--method=gaussian", "--sigma=15") == 0
    img = nib.load(os.path.join(vols, "smlm_000.nii.gz"))
    assert img.header.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(np.diag(img.affine)[:3], 0.02, rtol=1e-6)  # 20 nm in um
    vol = np.asarray(img.dataobj)
    assert vol.sum() == pytest.approx(len(pts), rel=1e-5)  # gaussian keeps the count
    manifest = json.load(open(os.path.join(vols, "voxelize.json")))["clouds"]
    assert manifest["smlm_000"]["points_in_grid"] == len(pts)
    assert manifest["smlm_000"]["voxel_size_nm"] == [20.0, 20.0, 20.0]

    back = str(tmp_path / "back")
    assert _run(to_points, f"--input={vols}", f"--output={back}", "--num_points=5000",
                "--seed=3") == 0
    got = pio.read_cloud(pio.list_clouds([os.path.join(back, "smlm_000.csv")])[0])
    assert got.shape == (5000, 3)
    # Positions come back in nm: the centroid within a voxel (20 nm) of the cloud's.
    assert np.all(np.abs(got.mean(0) - pts.mean(0)) < 20.0)
    # points per unit intensity on a density volume: one point per localisation.
    dens, back2 = str(tmp_path / "dens"), str(tmp_path / "back2")
    assert _run(voxelize, f"--input={clouds}", f"--output={dens}", "--method=density") == 0
    assert _run(to_points, f"--input={dens}", f"--output={back2}",
                "--points_per_unit_intensity=1", "--jitter=gaussian") == 0
    assert len(np.loadtxt(os.path.join(back2, "smlm_001.csv"), delimiter=",", skiprows=1)) == len(
        pio.read_cloud(pio.list_clouds([os.path.join(clouds, "smlm_001.csv")])[0]))


def test_to_points_npy_needs_voxel_size_for_nm(tmp_path, capsys):
    d = tmp_path / "npy"
    d.mkdir()
    vol = np.zeros((4, 4, 4), np.float32)
    vol[2, 1, 3] = 1.0
    np.save(d / "v.npy", vol)
    out = str(tmp_path / "pts")
    assert _run(to_points, f"--input={d}", f"--output={out}", "--num_points=10",
                "--voxel_size=20", "--jitter=none") == 0
    pts = np.loadtxt(os.path.join(out, "v.csv"), delimiter=",", skiprows=1)
    np.testing.assert_allclose(pts, [[50.0, 30.0, 70.0]] * 10)  # voxel (2, 1, 3) centre, nm


def test_never_overwrites_without_overwrite(clouds, tmp_path, capsys):
    vols = str(tmp_path / "vols")
    assert _run(voxelize, f"--input={clouds}", f"--output={vols}") == 0
    target = os.path.join(vols, "smlm_000.nii.gz")
    before = os.path.getmtime(target), os.path.getsize(target)
    os.utime(target, (1, 1))
    capsys.readouterr()
    # Other settings: refused in one line naming the difference, the volume untouched.
    assert _run(voxelize, f"--input={clouds}", f"--output={vols}", "--sigma=40") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.sigma [10.0, 10.0, 10.0] there, [40.0, 40.0, " \
        "40.0] here" in err
    assert os.path.getmtime(target) == 1
    assert _run(voxelize, f"--input={clouds}", f"--output={vols}", "--sigma=40",
                "--overwrite") == 0
    assert os.path.getmtime(target) > 1 and before[1] > 0
    manifest = json.load(open(os.path.join(vols, "voxelize.json")))
    assert sorted(manifest["clouds"]) == ["smlm_000", "smlm_001"]
    # demo clouds too: existing CSVs are kept.
    csv = os.path.join(clouds, "smlm_000.csv")
    os.utime(csv, (1, 1))
    assert _run(voxelize, "--demo_clouds=2", f"--output={clouds}", "--demo_shape=24,24,12") == 0
    assert os.path.getmtime(csv) == 1
    assert sorted(os.listdir(clouds)) == ["smlm_000.csv", "smlm_001.csv"]  # nothing deleted


def test_errors_are_one_line(clouds, tmp_path, capsys):
    def err(module, *args):
        assert _run(module, *args) == 2
        msg = capsys.readouterr().err.strip()
        assert msg.startswith("error: ") and "\n" not in msg, msg
        return msg

    out = str(tmp_path / "o")
    assert "no column 'q'" in err(voxelize, f"--input={clouds}", f"--output={out}",
                                  "--columns=x,y,q")
    assert "is the directory of the input files" in err(voxelize, f"--input={clouds}",
                                                         f"--output={clouds}")
    assert "over the limit of 1e-06 GiB" in err(voxelize, f"--input={clouds}",
                                                f"--output={out}", "--max_gib=0.000001")
    np.save(tmp_path / "v.npy", np.zeros((3, 3, 3)))
    assert "exactly one" in err(to_points, f"--input={tmp_path / 'v.npy'}", f"--output={out}")
    assert "no voxel is above the threshold 0" in err(
        to_points, f"--input={tmp_path / 'v.npy'}", f"--output={out}", "--num_points=3")
    assert "needs 6 comma-separated numbers" in err(voxelize, f"--input={clouds}",
                                                    f"--output={out}", "--fov=1,2,3")
    assert "--input is required" in err(voxelize, f"--output={out}")
