"""The whole point-cloud path on a tiny checkpoint trained 2 steps on synthetic_smlm:
clouds -> volumes -> autoencoder -> volumes -> clouds, scored by ldm-jax reconstruct."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ldm_jax.cli import reconstruct as reconstruct_cli
from ldm_jax.cli import to_points
from ldm_jax.cli.train import train_and_evaluate
from ldm_jax.data.pointcloud import io as pio
from ldm_jax.data.pointcloud.volumes import write_demo_clouds
from tests.tiny import tiny_config

try:
    import h5py
except ImportError:  # h5py is in requirements.txt; without it the HDF5 part is left out
    h5py = None

SHAPE, VOXEL = (16, 16, 8), 20.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("smlm_run")
    config = tiny_config()
    config.data.source = "synthetic_smlm"
    config.data.a_max = 2.0
    config.train.num_steps = 2
    train_and_evaluate(config, str(wd), progress=False)
    return str(wd)


def test_reconstruct_scores_point_clouds(workdir, tmp_path):
    clouds = tmp_path / "clouds"
    write_demo_clouds(str(clouds), 2, SHAPE, VOXEL)
    pts1 = pio.read_cloud(pio.list_clouds([str(clouds / "smlm_001.csv")])[0])
    names = ["smlm_000", "smlm_001"]
    if h5py is not None:
        with h5py.File(clouds / "two.h5", "w") as f:  # two clouds in one file
            f.create_dataset("cells/a", data=pts1)
            f.create_dataset("cells/b", data=pts1[::2])
        names += ["two_cells_a", "two_cells_b"]
    out = str(tmp_path / "rec")
    assert reconstruct_cli.main(["prog", f"--workdir={workdir}", f"--input={clouds}",
                                 f"--output={out}", "--step=latest", "--progress=false"]) == 0
    rows = json.load(open(os.path.join(out, "metrics.json")))["files"]
    assert sorted(rows) == names
    for name, row in rows.items():
        assert row["chamfer_nm"] > 0 and row["chamfer_floor_nm"] > 0 and row["emd_nm"] > 0
        # Voxelising at 20 nm with a 10 nm gaussian costs little: the floor is ~a voxel.
        assert row["chamfer_floor_nm"] < 2 * VOXEL, row
        back = np.loadtxt(os.path.join(out, name + "_points.csv"), delimiter=",", skiprows=1)
        assert len(back) == row["points"]
    assert rows["smlm_001"]["points"] == len(pts1)
    if h5py is not None:
        assert rows["two_cells_a"]["points"] == len(pts1)
        assert rows["two_cells_b"]["points"] == len(pts1[::2])
    mean = json.load(open(os.path.join(out, "metrics.json")))["mean"]
    assert mean["chamfer_nm"] == pytest.approx(np.mean([r["chamfer_nm"] for r in rows.values()]))
    # The reconstruction NIfTI has the micrometre affine; to_points reads it back in nm.
    img = nib.load(os.path.join(out, "smlm_001.nii.gz"))
    np.testing.assert_allclose(np.diag(img.affine)[:3], VOXEL / 1000, rtol=1e-6)
    pts_out = str(tmp_path / "pts")
    assert to_points.main(["prog", f"--input={os.path.join(out, 'smlm_001.nii.gz')}",
                           f"--output={pts_out}", "--num_points=500"]) == 0
    back = np.loadtxt(os.path.join(pts_out, "smlm_001.csv"), delimiter=",", skiprows=1)
    lo = np.floor(pts1.min(0) / VOXEL) * VOXEL
    assert np.all(back >= lo - VOXEL) and np.all(back <= pts1.max(0) + VOXEL)


def test_data_line_names_the_synthetic_smlm_source():
    from ldm_jax import data

    config = tiny_config()
    config.data.source = "synthetic_smlm"
    line = data.describe(config)
    assert line.startswith("Data: built-in synthetic SMLM-like localisations")
    assert "8 training and 2 validation clouds voxelised to 16x16x8 voxels of 20.0 nm" in line
