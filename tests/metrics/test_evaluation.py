"""Sample-quality evaluation: Fréchet distances, MS-SSIM (against MONAI), intensity and
latent distances, and `ldm-jax evaluate` end to end on tiny volumes."""

import json
import os

import numpy as np
import pytest

from ldm_jax.cli import evaluate as cli_evaluate
from ldm_jax.data.synthetic.filaments import render_filaments
from ldm_jax.metrics import diversity, frechet, intensity
from ldm_jax.metrics import evaluation as ev
from ldm_jax.metrics import image as metrics

SIZE = (32, 32, 32)  # the smallest cube VGG16 and AlexNet slices both accept


def _filaments(n, seed, shape=SIZE):
    """(n, X, Y, Z, 1) float32 synthetic filament volumes in [0, 1]."""
    return np.stack([render_filaments(shape, seed=seed, index=i, split=1, num_filaments=(2, 4))
                     for i in range(n)])[..., None].astype(np.float32) / 255.0


def _blur(v, sigma):
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(v, sigma=(0, sigma, sigma, sigma, 0)).astype(np.float32)


# --- Fréchet distance --------------------------------------------------------------------


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    # Commuting covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2.
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expect, rel=1e-9)
    assert frechet.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-9)


def test_frechet_features_sqrtm_and_low_rank_paths_agree(monkeypatch):
    rs = np.random.RandomState(0)
    a = rs.randn(40, 64) @ rs.randn(64, 64) * 0.1
    b = rs.randn(30, 64) @ rs.randn(64, 64) * 0.1 + 0.05
    full = frechet.frechet_distance_features(a, b)
    assert full["method"].startswith("sqrtm") and full["num"] == [40, 30]
    assert "warning" in full  # N < D
    monkeypatch.setattr(frechet, "SQRTM_MAX_DIM", 0)
    low = frechet.frechet_distance_features(a, b)
    assert low["method"] == "low-rank"
    assert low["fd"] == pytest.approx(full["fd"], rel=1e-6)
    assert frechet.frechet_distance_features(a, a)["fd"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet.frechet_distance_features(a, b[:, :10])


def test_slice_positions_evenly_spaced_and_capped():
    np.testing.assert_array_equal(frechet.slice_positions(32, 1), [16])
    np.testing.assert_array_equal(frechet.slice_positions(32, 4), [4, 12, 20, 28])
    np.testing.assert_array_equal(frechet.slice_positions(3, 10), [0, 1, 2])


def test_volume_slices_shapes_and_range():
    v = np.zeros((2, 20, 18, 16, 2), np.float32)
    v[0, 10] = 1.0  # one bright X-plane in the first volume, channel 0 and 1
    s = frechet.volume_slices(v, 3, (0.0, 1.0))
    assert s["x"].shape == (2 * 3 * 2, 18, 16, 3)
    assert s["y"].shape == (12, 20, 16, 3) and s["z"].shape == (12, 20, 18, 3)
    assert s["x"].min() == -1.0 and s["x"].max() == 1.0  # [0, 1] -> [-1, 1]
    np.testing.assert_array_equal(s["x"][..., 0], s["x"][..., 2])  # grey -> RGB


def test_vgg16_features_deepest_layer_mean():
    fn = frechet.make_feature_fn("vgg16")
    x = np.random.RandomState(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    f = fn(x)
    assert f.shape == (3, 512) and np.all(np.isfinite(f)) and f.min() >= 0  # relu5_3 means
    assert np.abs(f[0] - f[1]).max() > 0
    assert frechet.make_feature_fn("vgg16") is fn  # loaded and compiled once per process


def test_slice_fd_zero_for_same_set_and_grows_with_blur_and_shift():
    # AlexNet (relu5, 256 features): the cheap net on CPU; VGG16 goes through the same code.
    real = _filaments(3, seed=0)
    fn = frechet.make_feature_fn("alexnet")
    feats = {name: frechet.slice_features(v, fn, 2, (0.0, 1.0)) for name, v in {
        "real": real, "blur1": _blur(real, 1.0), "blur2": _blur(real, 2.0),
        "shift": real + 0.25, "shift2": real + 0.5}.items()}
    assert feats["real"]["x"].shape == (3 * 2, 256)
    fd = {k: frechet.slice_frechet(feats["real"], f)["fd"] for k, f in feats.items()}
    assert fd["real"] < 1e-3 * fd["blur1"]
    assert 0 < fd["blur1"] < fd["blur2"]
    assert 0 < fd["shift"] < fd["shift2"]


# --- MS-SSIM -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,kernel,weights", [
    ((2, 32, 32, 32, 1), 2, metrics.MS_SSIM_WEIGHTS),  # MONAI's 5 weights fit 32^3 at k=2
    ((2, 17, 16, 18, 2), 3, (0.2, 0.3, 0.5)),  # odd sizes (floor pooling), 2 channels
])
def test_ms_ssim3d_matches_monai(shape, kernel, weights):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rs = np.random.RandomState(1)
    x = _blur(rs.rand(*shape).astype(np.float32), 1.0)
    y = np.clip(x + 0.1 * rs.randn(*shape), 0, 1).astype(np.float32)
    ours = np.asarray(metrics.ms_ssim3d(x, y, win_size=kernel, weights=weights))
    ref = monai_metrics.MultiScaleSSIMMetric(
        spatial_dims=3, kernel_size=kernel, weights=weights, reduction="none")(
        torch.from_numpy(np.moveaxis(x, -1, 1)), torch.from_numpy(np.moveaxis(y, -1, 1)))
    np.testing.assert_allclose(ours, ref.numpy().ravel(), rtol=1e-4, atol=1e-5)
    assert 0 < ours.min() < 0.99  # a real difference, not a trivial 1
    np.testing.assert_allclose(metrics.ms_ssim3d(x, x, win_size=kernel, weights=weights),
                               1.0, atol=1e-5)


def test_ms_ssim3d_min_size():
    assert metrics.ms_ssim_min_size(4, 5) == 64 and metrics.ms_ssim_min_size(11, 5) == 176
    x = np.zeros((1, 63, 64, 64, 1), np.float32)
    with pytest.raises(ValueError, match=">= 64"):
        metrics.ms_ssim3d(x, x, win_size=4)
    assert diversity.fit_ms_ssim_scales((32, 32, 32), 4) == 4
    assert diversity.fit_ms_ssim_scales((64, 70, 80), 4) == 5
    assert diversity.fit_ms_ssim_scales((3, 32, 32), 4) == 0
    w = diversity.ms_ssim_weights(3)
    assert sum(w) == pytest.approx(1.0) and w[0] < w[1] < w[2]


def test_pairwise_ms_ssim_identical_volumes_and_pair_subset():
    v = np.repeat(_blur(np.random.RandomState(0).rand(1, 16, 16, 16, 1), 1.0), 3, axis=0)
    out = diversity.pairwise_ms_ssim(v, data_range=1.0, kernel=3, weights=(0.5, 0.5))
    assert out["num_pairs"] == 3 and out["mean"] == pytest.approx(1.0, abs=1e-5)
    p = diversity.pair_indices(10, 7, seed=3)
    assert p.shape == (7, 2) and np.all(p[:, 0] < p[:, 1])
    np.testing.assert_array_equal(p, diversity.pair_indices(10, 7, seed=3))
    assert len(diversity.pair_indices(10, 0, seed=0)) == 45
    assert diversity.pairwise_ms_ssim(v[:1], data_range=1.0, kernel=3, weights=(1.0,))["mean"] is None


# --- intensities and latents -------------------------------------------------------------


def test_intensity_distances_identical_and_shifted():
    v = _filaments(2, seed=0, shape=(16, 16, 16))
    same = intensity.intensity_distances(v, v.copy())
    assert same["wasserstein1"] == 0.0 and same["histogram_intersection"] == pytest.approx(1.0)
    shifted = intensity.intensity_distances(v, v + 0.1)
    assert shifted["wasserstein1"] == pytest.approx(0.1, rel=1e-4)  # W1 of a shift = shift
    assert shifted["histogram_intersection"] < 0.5
    sub = intensity.intensity_distances(v, v + 0.1, max_voxels=1000)
    assert sub["voxels_used"] == [1000, 1000]
    assert sub["wasserstein1"] == pytest.approx(0.1, abs=0.02)


def test_latent_distances_identical_shifted_and_mismatched():
    rs = np.random.RandomState(0)
    ref = [rs.randn(4, 4, 4, 2).astype(np.float32) for _ in range(5)]
    same = frechet.latent_distances(ref, ref)
    assert same["fd_voxel"] == pytest.approx(0, abs=1e-6)
    assert same["fd_volume"] == pytest.approx(0, abs=1e-4)
    # Equal covariances: the FD is the squared mean shift, C per voxel, D per volume.
    moved = frechet.latent_distances([z + 1.0 for z in ref], ref)
    assert moved["fd_voxel"] == pytest.approx(2.0, rel=1e-6)
    assert moved["fd_volume"] == pytest.approx(4 * 4 * 4 * 2, rel=1e-3)
    assert "fd_volume_warning" in moved  # 5 latents, dimension 128
    other = frechet.latent_distances([rs.randn(6, 4, 4, 2).astype(np.float32)] * 2, ref)
    assert other["fd_volume"] is None and "differ" in other["fd_volume_note"]
    with pytest.raises(ValueError, match="channel counts"):
        frechet.latent_distances([rs.randn(4, 4, 4, 3)], ref)


# --- reading inputs and the command line -------------------------------------------------


def _write_set(folder, vols, prefix):
    os.makedirs(folder, exist_ok=True)
    for i, v in enumerate(vols):
        np.save(os.path.join(folder, f"{prefix}{i}.npy"), v[..., 0])
    return str(folder)


def _write_latents(folder, latents, with_json, scale_factor=2.0):
    os.makedirs(folder, exist_ok=True)
    files = {}
    for i, z in enumerate(latents):
        np.save(os.path.join(folder, f"l{i}.npy"), z)
        files[f"l{i}"] = {"outputs": [f"l{i}.npy"]}
    if with_json:
        with open(os.path.join(folder, "latents.json"), "w") as f:
            json.dump({"files": files, "scale_factor": scale_factor}, f)
    return str(folder)


def test_cli_end_to_end_with_latents(tmp_path, capsys):
    real = _filaments(3, seed=0)
    fake = _filaments(3, seed=1)
    samples = _write_set(tmp_path / "samples", fake, "s")
    reference = _write_set(tmp_path / "real", real, "r")
    rs = np.random.RandomState(0)
    ref_lat = [rs.randn(4, 4, 4, 2).astype(np.float32) for _ in range(4)]
    # Generated latents saved scaled by 2: --latent_scale_factor 2 undoes it.
    _write_latents(tmp_path / "samples" / "latents", [2 * z for z in ref_lat[:3]], False)
    ref_lat_dir = _write_latents(tmp_path / "reflat", ref_lat, True)
    out = tmp_path / "out" / "eval.json"
    rc = cli_evaluate.main(["evaluate", "--samples", samples, "--reference", reference,
                            "--num-slices", "2", "--features", "alexnet",
                            "--output", str(out),
                            "--reference_latents", ref_lat_dir,
                            "--latent_scale_factor", "2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert result["samples"]["num_volumes"] == 3 and result["reference"]["shape"] == [*SIZE, 1]
    fd = result["frechet"]
    assert fd["net"] == "alexnet" and fd["dim"] == 256
    assert fd["num"] == {"samples": 18, "reference": 18} and fd["fd"] > 0
    assert "warning" in fd and any("N = 18" in n for n in result["notes"])
    ms = result["ms_ssim"]
    assert ms["samples"]["num_pairs"] == 3 and ms["num_scales"] == 4
    assert 0 < ms["samples"]["mean"] < 1 and 0 < ms["reference"]["mean"] < 1
    assert result["intensity"]["wasserstein1"] > 0
    lat = result["latent"]
    assert lat["num"] == [3, 4] and lat["samples"]["std"] == pytest.approx(
        np.concatenate([z.ravel() for z in ref_lat[:3]]).std(), rel=1e-5)
    assert lat["fd_voxel"] < 0.2  # the same distribution once unscaled
    assert lat["reference_scale_factor"] == 2.0 and "note" not in lat
    assert "FD alexnet slices" in printed and "MS-SSIM pairs" in printed
    assert "Wrote" in printed
    # A rerun with the same inputs and options reuses the results (the file untouched);
    # other options are refused in one line, unless --overwrite.
    argv = ["evaluate", "--samples", samples, "--reference", reference, "--num-slices", "2",
            "--features", "alexnet", "--output", str(out), "--reference_latents", ref_lat_dir,
            "--latent_scale_factor", "2"]
    before = out.read_bytes()
    assert cli_evaluate.main(argv) == 0
    assert "already holds these results" in capsys.readouterr().out
    assert out.read_bytes() == before
    assert cli_evaluate.main(argv + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "options.seed 0 there, 1 here" in err
    assert out.read_bytes() == before


def test_latent_section_notes_scaled_latents(tmp_path):
    rs = np.random.RandomState(0)
    ref = [rs.randn(4, 4, 4, 2).astype(np.float32) for _ in range(4)]
    ref_dir = _write_latents(tmp_path / "reflat", ref, True)  # scale_factor 2.0
    _write_latents(tmp_path / "samples" / "latents", [2 * z for z in ref], False)
    lat = ev._latent_section(str(tmp_path / "samples"), None, ref_dir, 1.0)
    assert "--latent_scale_factor 2" in lat["note"]
    with pytest.raises(FileNotFoundError, match="no latents.json"):
        ev.read_reference_latents(str(tmp_path / "samples" / "latents"))


def test_cli_reference_config_and_small_volumes(tmp_path, capsys):
    cfg = tmp_path / "tiny_eval.py"
    cfg.write_text("from configs import default\n\n\ndef get_config():\n"
                   "    c = default.get_config()\n    c.data.volume_size = (16, 16, 16)\n"
                   "    c.data.num_val_volumes = 3\n    c.data.num_filaments = (2, 4)\n"
                   "    return c\n")
    samples = _write_set(tmp_path / "samples", _filaments(2, seed=5, shape=(16, 16, 16)), "s")
    result = ev.evaluate(samples, str(cfg), features="alexnet", num_slices=2,
                         log=lambda m: None)
    assert result["reference"]["kind"] == "config validation volumes"
    assert result["reference"]["num_volumes"] == 3
    assert result["value_range"] == [0.0, 1.0]  # the config's b_min, b_max
    assert "skipped" in result["frechet"] and "31" in result["frechet"]["skipped"]
    assert result["ms_ssim"]["num_scales"] == 3  # 16 >= 4 * 2**2
    assert result["ms_ssim"]["reference"]["num_pairs"] == 3
    assert "skipped" in result["latent"]
    rc = cli_evaluate.main(["evaluate", "--samples", samples, "--reference", str(cfg),
                            "--ms_ssim_scales", "5", "--features", "alexnet"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs >= 64" in err and "--ms_ssim_scales <= 3" in err


@pytest.mark.parametrize("case,expect", [
    ("empty", "holds no volumes"),
    ("missing", "does not exist"),
    ("shapes", "same shape"),
    ("mixed", "differ in shape"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, case, expect):
    samples = _write_set(tmp_path / "samples", np.zeros((2, 16, 16, 16, 1), np.float32), "s")
    reference = _write_set(tmp_path / "real", np.zeros((2, 16, 16, 16, 1), np.float32), "r")
    if case == "empty":
        samples = str(tmp_path / "nothing")
        os.makedirs(samples)
    elif case == "missing":
        reference = str(tmp_path / "no_such_dir")
    elif case == "shapes":
        reference = _write_set(tmp_path / "real2", np.zeros((2, 16, 16, 8, 1), np.float32), "r")
    else:
        np.save(os.path.join(samples, "odd.npy"), np.zeros((16, 16, 12), np.float32))
    rc = cli_evaluate.main(["evaluate", "--samples", samples, "--reference", reference])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err


def test_cli_requires_samples_and_reference(capsys):
    assert cli_evaluate.main(["evaluate", "--samples", "x"]) == 2
    assert "--reference required" in capsys.readouterr().err
    assert cli_evaluate.main(["evaluate", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "MS-SSIM" in help_text and "--num_slices" in help_text


def test_latent_section_does_not_note_unscaled_latents_near_scale_one(tmp_path):
    """scale_factor 1.25 and samples with the reference's spread: no 'look scaled' note."""
    rs = np.random.RandomState(0)
    ref = [rs.randn(4, 4, 4, 2).astype(np.float32) for _ in range(4)]
    ref_dir = _write_latents(tmp_path / "reflat", ref, True, scale_factor=1.26)
    _write_latents(tmp_path / "samples" / "latents", [1.02 * z for z in ref], False)
    lat = ev._latent_section(str(tmp_path / "samples"), None, ref_dir, 1.0)
    assert "note" not in lat
