"""Point clouds: reading (CSV / npy / npz / HDF5), voxelising, sampling back, metrics,
the built-in SMLM-like clouds and the data sources. Tiny clouds and grids only."""

import numpy as np
import pytest
from scipy import stats

from ldm_jax.data import DataError
from ldm_jax.data.pointcloud import io as pio
from ldm_jax.data.pointcloud.grid import Grid, make_grid, voxelize
from ldm_jax.data.pointcloud.sample import num_points_for, sample_points
from ldm_jax.data.pointcloud.spec import CloudSpec
from ldm_jax.data.synthetic.smlm import SMLMParams, simulate_localisations
from ldm_jax.metrics.pointcloud import chamfer_distance, emd_approx


def _cloud(n=3000, seed=0):
    """Points on two crossing segments plus a blob, in nm, away from the origin."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, size=(n // 3, 1))
    a = np.array([1000.0, 2000.0, 500.0]) + t * np.array([400.0, 100.0, 60.0])
    b = np.array([1100.0, 2200.0, 520.0]) + t * np.array([150.0, -300.0, 20.0])
    c = rng.normal([1300.0, 1950.0, 540.0], 15.0, size=(n - 2 * (n // 3), 3))
    return np.concatenate([a, b, c]) + rng.normal(0, 5, size=(n - n % 1, 3))[: n]


# ---------------------------------------------------------------------------------------
# Voxelise and sample back.
# ---------------------------------------------------------------------------------------


def test_round_trip_keeps_centroid_and_extent_within_a_voxel():
    pts = _cloud()
    v = 20.0
    grid = make_grid(pts, voxel_size=v)
    # Per-cloud bounds on the voxel lattice: the origin is a multiple of the voxel size.
    np.testing.assert_allclose(np.asarray(grid.origin) / v, np.round(np.asarray(grid.origin) / v))
    vol, n_in = voxelize(pts, grid, "density")
    assert n_in == len(pts) and vol.sum() == len(pts)
    back = sample_points(vol, grid.affine, len(pts), rng=np.random.default_rng(1))
    assert np.all(np.abs(back.mean(0) - pts.mean(0)) < v)
    # The extent: each bound moves by less than a voxel (the box grows by < 2 voxels).
    assert np.all(np.abs(back.min(0) - pts.min(0)) < v)
    assert np.all(np.abs(back.max(0) - pts.max(0)) < v)
    # Every point sampled back lies in a voxel that held points.
    idx = np.floor(grid.coordinates(back)).astype(int)
    assert np.all(vol[tuple(idx.T)] > 0)


def test_affine_maps_voxel_centres_to_nm():
    grid = Grid((4, 5, 6), (100.0, -40.0, 7.0), (20.0, 20.0, 50.0))
    a = grid.affine
    np.testing.assert_allclose(a @ [0, 0, 0, 1], [110.0, -30.0, 32.0, 1])
    np.testing.assert_allclose(a @ [3, 4, 5, 1], [170.0, 50.0, 282.0, 1])
    assert grid.fov[1] == pytest.approx((180.0, 60.0, 307.0))


@pytest.mark.parametrize("sigma", [5.0, 30.0, (10.0, 10.0, 40.0)])
def test_gaussian_integrates_to_the_point_count(sigma):
    pts = _cloud(600)
    grid = make_grid(pts, voxel_size=20.0)  # tight bounds: much of the blur would fall outside
    vol, n_in = voxelize(pts, grid, "gaussian", sigma)
    assert n_in == 600
    assert vol.sum() == pytest.approx(600, rel=1e-5)
    assert vol.min() >= 0
    # A fixed field of view leaves points out; the volume sums to the points kept.
    fov = ((1000.0, 1900.0, 480.0), (1200.0, 2100.0, 560.0))
    g2 = make_grid(pts, voxel_size=20.0, fov=fov)
    vol2, n2 = voxelize(pts, g2, "gaussian", sigma)
    assert 0 < n2 < 600 and n2 == int(g2.inside(pts).sum())
    assert vol2.sum() == pytest.approx(n2, rel=1e-5)


def test_gaussian_spreads_like_sigma():
    """One point in the middle of a voxel: the voxel values follow the gaussian's integrals."""
    grid = Grid((21, 21, 21), (0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    vol, _ = voxelize(np.array([[105.0, 105.0, 105.0]]), grid, "gaussian", 10.0)
    line = vol[:, 10, 10] / vol[10, 10, 10]
    edges = (np.arange(22) * 10.0 - 105.0) / 10.0
    expect = np.diff(stats.norm.cdf(edges))
    # Truncated at 4 sigma (values below ~1e-5 of the peak are 0), renormalised.
    np.testing.assert_allclose(line, expect / expect[10], rtol=1e-4, atol=1e-5)
    assert vol.sum() == pytest.approx(1.0, rel=1e-6)


def test_occupancy_and_density():
    pts = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [15.0, 1.0, 1.0]])
    grid = Grid((2, 1, 1), (0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    dens, _ = voxelize(pts, grid, "density")
    occ, _ = voxelize(pts, grid, "occupancy")
    np.testing.assert_array_equal(dens[:, 0, 0], [2, 1])
    np.testing.assert_array_equal(occ[:, 0, 0], [1, 1])


def test_grid_from_shape_and_from_fov():
    pts = _cloud(300)
    fit = make_grid(pts, shape=(16, 16, 8))
    assert fit.shape == (16, 16, 8) and len(set(fit.voxel_size)) == 1  # cubic voxels
    assert fit.inside(pts).all()
    centred = make_grid(pts, voxel_size=10.0, shape=(8, 8, 8))
    lo, hi = centred.fov
    np.testing.assert_allclose((np.asarray(lo) + hi) / 2, (pts.min(0) + pts.max(0)) / 2)
    fixed = make_grid(pts, voxel_size=30.0, fov=((0, 0, 0), (100, 100, 95)))
    assert fixed.shape == (4, 4, 4) and fixed.origin == (0.0, 0.0, 0.0)


def test_sampling_follows_intensity_chi_square():
    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1, size=(3, 3, 2))
    vol[0, 0, 0] = 0.0
    vol[1, 1, 1] = 0.05  # below the threshold: no points
    threshold = 0.1
    affine = np.diag([20.0, 20.0, 50.0, 1.0])
    n = 20000
    pts = sample_points(vol, affine, n, threshold=threshold, rng=np.random.default_rng(1))
    assert pts.shape == (n, 3)
    idx = np.floor(pts / [20.0, 20.0, 50.0] + 0.5).astype(int)  # voxel centre at index * size
    counts = np.zeros(vol.shape)
    np.add.at(counts, tuple(idx.T), 1)
    w = np.clip(vol - threshold, 0, None)
    assert counts[w == 0].sum() == 0
    observed, expected = counts[w > 0], n * w[w > 0] / w.sum()
    p = stats.chisquare(observed, expected).pvalue
    assert p > 1e-3, p
    # A volume that is not followed is rejected by the same test (the test has power).
    assert stats.chisquare(observed, n * np.full(len(expected), 1 / len(expected))).pvalue < 1e-6


def test_num_points_and_jitter():
    vol = np.zeros((4, 4, 4))
    vol[1, 2, 3] = 2.5
    assert num_points_for(vol, points_per_unit=4.0) == 10
    with pytest.raises(DataError, match="exactly one"):
        num_points_for(vol)
    centre = sample_points(vol, np.eye(4), 5, jitter="none")
    np.testing.assert_array_equal(centre, [[1, 2, 3]] * 5)
    uni = sample_points(vol, np.eye(4), 500, jitter="uniform")
    assert np.all(np.abs(uni - [1, 2, 3]) <= 0.5)
    gau = sample_points(vol, np.eye(4), 4000, jitter="gaussian")
    assert np.std(gau - [1, 2, 3]) == pytest.approx(1 / np.sqrt(12), rel=0.1)
    with pytest.raises(DataError, match="no voxel is above the threshold 3"):
        sample_points(vol, np.eye(4), 5, threshold=3.0)


# ---------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------


def test_chamfer_and_emd():
    pts = _cloud(300)
    assert chamfer_distance(pts, pts[::-1])["chamfer"] == 0.0
    assert emd_approx(pts, pts[np.random.default_rng(0).permutation(300)], 300) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([3.0, 0.0, 4.0])  # 5 nm
    assert emd_approx(pts, pts + shift, 300) == pytest.approx(5.0)
    c = chamfer_distance(pts, pts + shift)
    assert 0 < c["chamfer"] <= 5.0 and c["a_to_b"] > 0 and c["b_to_a"] > 0
    far = chamfer_distance(np.zeros((1, 3)), np.array([[6.0, 8.0, 0.0], [0.0, 0.0, 20.0]]))
    assert far["a_to_b"] == 10.0 and far["b_to_a"] == 15.0 and far["chamfer"] == 12.5
    with pytest.raises(DataError, match="empty"):
        chamfer_distance(pts, np.zeros((0, 3)))


# ---------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------

POINTS = np.array([[10.5, 20.25, -3.0], [11.0, 21.0, 4.5], [12.0, 19.0, 0.0]])


def _write(path, text):
    path.write_text(text)
    return str(path)


def _csv_rows(delim=","):
    return "\n".join(delim.join(str(v) for v in row) for row in POINTS) + "\n"


@pytest.mark.parametrize("header,extra", [
    # thunderSTORM: quoted names with units and more columns.
    ('"id","frame","x [nm]","y [nm]","z [nm]","sigma [nm]","uncertainty_xy [nm]"', 4),
    ("x_nm,y_nm,z_nm", 0),  # underscore units
    ("frame,xnm,ynm,znm,phot", 2),  # SMAP
    ("X (nm),Y (nm),Z (nm)", 0),
    ("x,y,z", 0),  # plain (Picasso's names)
])
def test_csv_headers_of_common_tools(tmp_path, header, extra):
    names = next(iter(__import__("csv").reader([header])))
    xi = [pio.normalise_name(n) for n in names].index("x")
    rows = []
    for p in POINTS:
        row = [str(100 + k) for k in range(len(names))]
        row[xi:xi + 3] = [str(v) for v in p]
        rows.append(",".join(row))
    path = _write(tmp_path / "c.csv", header + "\n" + "\n".join(rows) + "\n")
    ref = pio.list_clouds([path])[0]
    np.testing.assert_allclose(pio.read_cloud(ref), POINTS)
    assert len(names) - 3 == extra


def test_csv_tab_headerless_and_named_columns(tmp_path):
    tab = _write(tmp_path / "t.tsv", "x [nm]\ty [nm]\tz [nm]\n" + _csv_rows("\t"))
    np.testing.assert_allclose(pio.read_cloud(pio.list_clouds([tab])[0]), POINTS)
    bare = _write(tmp_path / "b.csv", _csv_rows())
    np.testing.assert_allclose(pio.read_cloud(pio.list_clouds([bare])[0]), POINTS)
    np.testing.assert_allclose(pio.read_cloud(pio.list_clouds([bare])[0], columns=(2, 1, 0)),
                               POINTS[:, ::-1])
    named = _write(tmp_path / "n.csv", "a,b,c\n" + _csv_rows())
    got = pio.read_cloud(pio.list_clouds([named])[0], columns=("c", "a", "b"), scale=(2, 1, 1))
    np.testing.assert_allclose(got, POINTS[:, [2, 0, 1]] * [2, 1, 1])


def test_npy_and_npz(tmp_path):
    np.save(tmp_path / "plain.npy", np.concatenate([POINTS, np.ones((3, 2))], axis=1))
    rec = np.zeros(3, dtype=[("frame", "i4"), ("x", "f4"), ("y", "f4"), ("z", "f4")])
    rec["x"], rec["y"], rec["z"] = POINTS.T
    np.save(tmp_path / "struct.npy", rec)
    np.savez(tmp_path / "many.npz", cell_a=POINTS, cell_b=POINTS + 100)
    refs = pio.list_clouds(sorted(str(p) for p in tmp_path.iterdir()))
    assert [r.name for r in refs] == ["many_cell_a", "many_cell_b", "plain", "struct"]
    got = {r.name: pio.read_cloud(r) for r in refs}
    np.testing.assert_allclose(got["plain"], POINTS)
    np.testing.assert_allclose(got["struct"], POINTS, rtol=1e-6)
    np.testing.assert_allclose(got["many_cell_b"], POINTS + 100)
    assert pio.is_cloud_file(str(tmp_path / "plain.npy"))
    np.save(tmp_path / "vol.npy", np.zeros((4, 4, 4)))
    assert not pio.is_cloud_file(str(tmp_path / "vol.npy"))


def _picasso_locs(xyz_px_nm):
    locs = np.zeros(len(xyz_px_nm), dtype=[("frame", "u4"), ("x", "f4"), ("y", "f4"),
                                           ("photons", "f4"), ("z", "f4"), ("lpx", "f4")])
    locs["x"], locs["y"], locs["z"] = xyz_px_nm.T
    return locs


def test_hdf5_picasso_locs_and_many_clouds(tmp_path):
    h5py = pytest.importorskip("h5py")
    px = 130.0
    xyz = np.array([[1.0, 2.0, -50.0], [1.5, 2.5, 0.0], [3.0, 1.0, 80.0]])
    with h5py.File(tmp_path / "picasso.hdf5", "w") as f:
        f.create_dataset("locs", data=_picasso_locs(xyz))
    ref, = pio.list_clouds([str(tmp_path / "picasso.hdf5")])
    assert ref.key == "locs" and ref.name == "picasso"
    np.testing.assert_allclose(pio.read_cloud(ref, scale=(px, px, 1.0)), xyz * [px, px, 1.0], rtol=1e-6)
    with h5py.File(tmp_path / "cells.h5", "w") as f:
        f.create_dataset("cells/c1", data=POINTS)
        f.create_dataset("cells/c2", data=POINTS * 2)
        f.create_dataset("meta/ids", data=np.arange(3.0)[:, None].repeat(3, 1))
    refs = pio.list_clouds([str(tmp_path / "cells.h5")], dataset="cells")
    assert [r.name for r in refs] == ["cells_cells_c1", "cells_cells_c2"]
    np.testing.assert_allclose(pio.read_cloud(refs[1]), POINTS * 2)
    assert len(pio.list_clouds([str(tmp_path / "cells.h5")])) == 3  # no locs: every dataset
    with pytest.raises(DataError, match=r"no HDF5 dataset or group 'nope'.*cells/c1"):
        pio.list_clouds([str(tmp_path / "cells.h5")], dataset="nope")
    bad = _write(tmp_path / "bad.h5", "not hdf5")
    with pytest.raises(DataError, match="bad.h5: cannot read as HDF5"):
        pio.list_clouds([bad])


# ---------------------------------------------------------------------------------------
# Bad inputs, each by its message.
# ---------------------------------------------------------------------------------------


def test_bad_inputs_by_message(tmp_path):
    empty = _write(tmp_path / "empty.csv", "x,y,z\n")
    with pytest.raises(DataError, match="empty.csv: the point cloud is empty"):
        pio.read_cloud(pio.list_clouds([empty])[0])
    nan = _write(tmp_path / "nan.csv", "x,y,z\n1,2,3\n4,nan,6\n")
    with pytest.raises(DataError, match=r"1 of 2 localisation\(s\) have NaN/Inf coordinates \(first: row 1\)"):
        pio.read_cloud(pio.list_clouds([nan])[0])
    two_d = _write(tmp_path / "xy.csv", '"id","x [nm]","y [nm]"\n1,2,3\n')
    with pytest.raises(DataError, match=r"no z column among \['\"id\"', '\"x \[nm\]\"', '\"y \[nm\]\"'\]|"
                                        r"no z column among \['id', 'x \[nm\]', 'y \[nm\]'\]"):
        pio.read_cloud(pio.list_clouds([two_d])[0])
    with pytest.raises(DataError, match=r"no column 'q'; columns found: \['x', 'y', 'z'\]"):
        pio.read_cloud(pio.list_clouds([nan])[0], columns=("x", "y", "q"))
    with pytest.raises(DataError, match="column index 7 is out of range for 3 columns"):
        pio.read_cloud(pio.list_clouds([nan])[0], columns=(0, 1, 7))
    far = np.array([[0.0, 0.0, 0.0], [1e6, 1e6, 1e5]])  # an outlier 1 mm away
    with pytest.raises(DataError, match=r"would need [0-9.]+ GiB, over the limit of 2 GiB"):
        make_grid(far, voxel_size=10.0, name="cell")
    with pytest.raises(DataError, match="'gaussian' voxelisation needs a sigma"):
        voxelize(POINTS, make_grid(POINTS, voxel_size=1.0), "gaussian")
    with pytest.raises(DataError, match="not one of"):
        voxelize(POINTS, make_grid(POINTS, voxel_size=1.0), "splat")
    with pytest.raises(DataError, match="NaN/Inf"):
        CloudSpec().voxelize(np.array([[0.0, np.inf, 0.0]]), "mem")


# ---------------------------------------------------------------------------------------
# Built-in SMLM-like clouds and the data sources.
# ---------------------------------------------------------------------------------------


def test_smlm_clouds_follow_the_filaments_volume():
    from ldm_jax.data.synthetic.filaments import render_filaments

    shape, v = (24, 24, 12), 20.0
    kw = dict(seed=3, index=1, split=0, num_filaments=(3, 3))
    params = SMLMParams(background=0.0, radius=0.0, precision=(5.0, 5.0, 5.0))
    pts = simulate_localisations(shape, v, params=params, **kw)
    again = simulate_localisations(shape, v, params=params, **kw)
    np.testing.assert_array_equal(pts, again)  # deterministic in (seed, split, index)
    assert np.all((pts >= 0) & (pts < np.asarray(shape) * v))
    fil = render_filaments(shape, width=(1.0, 1.0), **kw)
    idx = np.floor(pts / v).astype(int)
    on = (fil[tuple(idx.T)] > 0).mean()
    assert on > 0.95, on  # the localisations lie on the same curves
    bg = simulate_localisations(shape, v, params=SMLMParams(background=0.5), **kw)
    assert (fil[tuple(np.floor(bg / v).astype(int).T)] == 0).mean() > 0.3
    geo = simulate_localisations(shape, v, params=SMLMParams(blinks=3.0, background=0.0), **kw)
    poi = simulate_localisations(shape, v, params=SMLMParams(blinks=3.0, blink_dist="poisson",
                                                             background=0.0), **kw)
    assert 0.7 < len(poi) / len(geo) < 1.3  # same mean multiplicity
    with pytest.raises(DataError, match="smlm_blink_dist"):
        SMLMParams(blink_dist="uniform")


def _tiny(source, **data):
    from tests.tiny import tiny_config

    config = tiny_config()
    config.data.source = source
    config.data.a_max = 2.0
    for k, val in data.items():
        config.data[k] = val
    return config


def test_synthetic_smlm_source_yields_the_configured_shape():
    from ldm_jax.data import make_eval_batches, make_train_loader

    config = _tiny("synthetic_smlm", volume_size=(16, 16, 8), num_train_volumes=2)
    batch = next(iter(make_train_loader(config, batch_size=2, seed=0, process_index=0,
                                        process_count=1)))
    assert batch["image"].shape == (2, 16, 16, 8, 1) and batch["image"].dtype == np.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].max() > 0.1
    ev = next(iter(make_eval_batches(config, batch_size=2)))
    assert ev["image"].shape == (2, 16, 16, 8, 1)
    assert not np.array_equal(ev["image"][0], batch["image"][0])  # val != train


def test_pointcloud_source_from_files(tmp_path):
    from ldm_jax.data import make_train_loader
    from ldm_jax.data.sources.pointcloud import build_cloud_source
    from ldm_jax.data.transforms import Prep

    d = tmp_path / "clouds"
    d.mkdir()
    for i in range(3):
        pio.write_csv(str(d / f"cell{i}.csv"), _cloud(400, seed=i))
    config = _tiny("pointcloud", train_dir=str(d), volume_size=(16, 16, 8), val_fraction=0.34)
    src = build_cloud_source(config, Prep.from_config(config), "train")
    assert len(src) == 2
    rec = src[0]
    spec = CloudSpec.from_config(config)
    grid = spec.grid(pio.read_cloud(src.refs[0]))
    assert rec["image"].shape == (*grid.shape, 1)  # the cloud's own bounds at 20 nm
    batch = next(iter(make_train_loader(config, batch_size=2, seed=0, process_index=0,
                                        process_count=1)))
    assert batch["image"].shape == (2, 16, 16, 8, 1)
    config.data.pointcloud_columns = ("x", "y", "w")
    with pytest.raises(DataError, match=r"no column 'w'; columns found: \['x \[nm\]', 'y \[nm\]', 'z \[nm\]'\]"):
        build_cloud_source(config, Prep.from_config(config), "train")


def test_write_volume_reads_back_in_nm(tmp_path):
    """What `ldm-jax sample` writes for point-cloud models: micrometre NIfTI that
    read_volume_nm (to_points) reads back at the nm voxel size."""
    from ldm_jax.data.pointcloud.volumes import read_volume_nm, write_volume

    path = str(tmp_path / "s.nii.gz")
    write_volume(path, np.ones((4, 5, 6, 1), np.float32), np.diag([20.0, 20.0, 30.0, 1.0]))
    vol, affine_nm = read_volume_nm(path)[:2]
    assert vol.shape[:3] == (4, 5, 6)
    np.testing.assert_allclose(np.diag(affine_nm)[:3], [20.0, 20.0, 30.0], rtol=1e-6)
