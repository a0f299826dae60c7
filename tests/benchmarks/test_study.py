"""The quality study: its aggregation, its configurations, and a tiny end-to-end run."""

import json
import math

import numpy as np
import pytest

from benchmarks import study
from ldm_jax.autoencoder import config as ae_config
from ldm_jax.autoencoder import geometry
from ldm_jax.errors import ConfigError


# ------------------------------------------------------------------ aggregation
def test_summarize_is_mean_and_sample_std():
    s = study.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(math.sqrt(5.0 / 3.0))  # ddof=1
    one = study.summarize([7.0])
    assert one == {"mean": 7.0, "std": 0.0, "n": 1}
    assert study.summarize([])["mean"] is None


def test_paired_difference_uses_matching_volumes():
    d = study.paired([30.0, 28.0, 26.0], [31.0, 30.0, 26.5])
    assert d["mean"] == pytest.approx(-7.0 / 6.0)
    assert d["std"] == pytest.approx(np.std([-1.0, -2.0, -0.5], ddof=1))
    with pytest.raises(ValueError, match="equal lengths"):
        study.paired([1.0], [1.0, 2.0])


def test_fmt():
    assert study.fmt({"mean": 27.8123, "std": 0.4567, "n": 3}) == "27.81 ± 0.46"
    assert study.fmt({"mean": 0.91234, "std": 0.01, "n": 3}, 3) == "0.912 ± 0.010"
    assert study.fmt(None) == "-"


def test_eval_metrics_match_closed_forms():
    """The study's per-volume metrics (metrics.py via make_eval_fn's formulas) on known
    inputs: PSNR of a constant error, SSIM of identical volumes, Dice of known masks."""
    from ldm_jax.metrics import image as metrics
    x = np.zeros((2, 8, 8, 8, 1), np.float32)
    y = x + 0.1  # MSE 0.01 -> PSNR 20 dB with data range 1
    np.testing.assert_allclose(np.asarray(metrics.psnr(y, x)), [20.0, 20.0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.mae(y, x)), [0.1, 0.1], rtol=1e-5)
    r = np.random.default_rng(0).uniform(size=(1, 8, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.ssim3d(r, r, win_size=7)), [1.0], rtol=1e-5)
    a = np.zeros((1, 4, 4, 4, 1), np.float32)
    b = np.zeros_like(a)
    a[0, :2] = 1.0  # 32 voxels
    b[0, 1:3] = 1.0  # 32 voxels, 16 shared -> Dice 2*16/64
    np.testing.assert_allclose(np.asarray(metrics.dice_score(a, b, 0.2)), [0.5], rtol=1e-6)


def test_gather_builds_rows_and_paired_deltas(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()

    def fake(variant, psnr):
        v = next(v for v in study.variants() if v.key == variant)
        init, factors = study.BASES[v.base]
        r = dict(dataset="filaments", variant=v.key, label=v.label, base=v.base, head=v.head,
                 strided_kernel=v.strided_kernel, total_factor=[8, 8, 8],
                 latent_shape=[8, 8, 4, 3], per_volume={"psnr": psnr, "ssim": [0.9] * 3,
                                                       "mae": [0.01] * 3, "dice": [0.8] * 3})
        r["summary"] = {k: study.summarize(x) for k, x in r["per_volume"].items()}
        (runs / f"filaments__{v.key}.json").write_text(json.dumps(r))

    fake("B_subpixel_vc", [27.0, 26.0, 25.0])
    fake("A_nearest_vc", [28.0, 28.0, 28.0])
    (tmp_path / "memory.json").write_text(json.dumps([dict(
        variant="A_nearest_vc", volume=[256, 256, 64], channels=[32, 64, 64], dtype="bfloat16",
        batch=1, peak_memory_bytes=3 * 2**30)]))
    s = study.gather(tmp_path)
    assert [r["variant"] for r in s["runs"]] == ["A_nearest_vc", "B_subpixel_vc"]  # A first
    b = s["runs"][1]
    assert b["vs_A"]["psnr"]["mean"] == pytest.approx(-2.0)
    assert b["vs_A"]["psnr"]["std"] == pytest.approx(1.0)
    assert b["psnr_change_vs_A_percent"] == pytest.approx(-100 * 2 / 28)
    table = study.format_table(s)
    assert table.count("\n| filaments |") == 2
    assert "26.00 ± 1.00" in table and "-2.00 ± 1.00" in table
    assert "| 3.22 |" in table  # 3 GiB in GB
    assert s["runs"][1].get("memory") is None  # no row for B: no made-up number


def test_bench_memory_matches_model_and_marks_kernel3_approximate():
    bench_rows = [
        dict(name="B subpixel", initial_factor=[2, 2, 2], downsample_factors=[[4, 4, 4], [2, 2, 2]],
             upsample_head="subpixel", remat="none", spatial=1, batch=1, volume=[256, 256, 64],
             dtype="bfloat16", peak_memory_bytes=2e9, device_peak_bytes=None),
        dict(name="B nearest_conv", initial_factor=[2, 2, 2],
             downsample_factors=[[4, 4, 4], [2, 2, 2]], upsample_head="nearest_conv",
             remat="none", spatial=1, batch=1, volume=[256, 256, 64], dtype="bfloat16",
             peak_memory_bytes=3e9, device_peak_bytes=2.5e9),
    ]
    run = dict(initial_factor=[2, 2, 2], downsample_factors=[[4, 4, 4], [2, 2, 2]],
               head="nearest_conv", strided_kernel=None)
    m = study.bench_memory(bench_rows, run)
    assert m["bytes"] == 2.5e9 and m["kind"] == "device peak" and not m["approx"]
    m = study.bench_memory(bench_rows, dict(run, head="subpixel", strided_kernel=3))
    assert m["bytes"] == 2e9 and m["approx"] and study._gb(m) == "≈2.00"
    assert study.bench_memory(bench_rows, dict(run, initial_factor=[4, 4, 4])) is None


# ------------------------------------------------------------------ configurations
def test_variants_cover_the_issue():
    keys = [v.key for v in study.variants()]
    assert len(keys) == len(set(keys)) == 11
    assert "A_nearest_vc" in keys and "A_subpixel_vc" not in keys  # stem 1: heads coincide
    for base in "BCD":
        assert f"{base}_nearest_vc" in keys and f"{base}_subpixel_vc" in keys
    assert {k for k in keys if k.endswith("_k3")} == {f"{b}_nearest_k3" for b in "ABCD"}


@pytest.mark.parametrize("key,total", [("A_nearest_vc", 8), ("B_subpixel_vc", 16),
                                       ("C_nearest_k3", 32), ("D_subpixel_vc", 32)])
def test_study_config_is_valid_and_same_recipe(key, total):
    v = next(v for v in study.variants() if v.key == key)
    s = study.Settings(steps=10, volume=(64, 64, 32))
    c = study.study_config(v, "filaments", s)
    ae_config.validate(c)
    assert geometry.total_factor(c.autoencoder) == (total,) * 3
    assert c.loss.adv_warmup_steps > s.steps  # adversarial term never on
    assert c.autoencoder.strided_kernel == v.strided_kernel
    assert c.data.source == "synthetic_filaments"
    assert study.study_config(v, "mni152", s).data.source == "mni152"


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="divisible by 32"):
        study.settings_from_args(study.parse_args(["--volume", "48,48,48"]))
    with pytest.raises(ConfigError, match="unknown"):
        study.select("E")
    assert [v.key for v in study.select("C_subpixel_vc,A")] == ["A_nearest_vc",
                                                                "C_subpixel_vc", "A_nearest_k3"]


def test_contrasts_pair_k3_with_its_voxel_complete_twin():
    def run(variant, psnr):
        pv = {"psnr": psnr, "ssim": [0.5] * len(psnr), "mae": [0.1] * len(psnr)}
        return dict(dataset="mni152", variant=variant, per_volume=pv)

    study_ = {"runs": [run("C_nearest_vc", [20.0, 21.0, 22.0]),
                       run("C_nearest_k3", [19.0, 21.5, 21.0]),
                       run("B_subpixel_vc", [18.0])]}  # no nearest twin: no row
    rows = study.contrasts(study_)
    assert len(rows) == 1
    c = rows[0]
    assert (c["base"], c["contrast"]) == ("C", "kernel 3 - voxel-complete")
    assert c["delta"]["psnr"]["mean"] == pytest.approx(-0.5)
    assert (c["wins"], c["n"]) == (1, 3)
    assert "| mni152 | C | kernel 3 - voxel-complete | -0.50 ± 0.87 |" in study.format_contrasts(rows)


@pytest.mark.parametrize("key,warns", [("A_nearest_vc", False), ("D_subpixel_vc", False),
                                       ("B_nearest_k3", True), ("C_nearest_k3", True)])
def test_only_kernel3_variants_log_the_skipped_voxels_warning(key, warns, caplog):
    import jax
    import jax.numpy as jnp

    from ldm_jax.models import build_autoencoder

    v = next(v for v in study.variants() if v.key == key)
    c = study.study_config(v, "filaments", study.Settings(volume=(32, 32, 32)))
    ae = build_autoencoder(c.autoencoder)
    with caplog.at_level("WARNING", logger="ldm_jax.models"):
        jax.eval_shape(lambda: ae.init({"params": jax.random.PRNGKey(0),
                                        "sample": jax.random.PRNGKey(1)},
                                       jnp.zeros((1, 32, 32, 32, 1))))
    assert any("never reach the latent" in r.getMessage() for r in caplog.records) == warns


# ------------------------------------------------------------------ end to end
def test_tiny_study_end_to_end(tmp_path):
    """One configuration, 2 steps, 2 held-out volumes: files, per-volume rows, the warning
    recorded, and resuming (a second call retrains nothing)."""
    out = tmp_path / "q"
    argv = ["--out", str(out), "--volume", "32,32,32", "--channels", "4,4,4", "--norm-groups",
            "4", "--steps", "2", "--num-train", "2", "--num-val", "2", "--datasets",
            "filaments", "--only", "C_nearest_k3", "--fast-compile"]
    assert study.main(argv) == 0
    res = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in res["runs"]] == ["C_nearest_k3"]
    r = res["runs"][0]
    assert len(r["per_volume"]["psnr"]) == 2  # one value per held-out volume
    assert all(math.isfinite(x) for x in r["per_volume"]["psnr"])
    assert r["summary"]["psnr"]["n"] == 2
    assert 0.0 <= r["summary"]["dice"]["mean"] <= 1.0
    assert r["settings"]["steps"] == 2 and len(r["train_curve"]) == 2
    assert r["skips_voxels_warning"]  # the seed's stem is flagged in the record
    assert r["latent_shape"] == [1, 1, 1, 3] and r["total_factor"] == [32, 32, 32]
    assert (out / "recon_filaments.png").stat().st_size > 0
    assert "| filaments | C | 4 | (4, 2) | nearest_conv | 3 (seed) |" in (
        out / "table.md").read_text()
    before = (out / "runs" / "filaments__C_nearest_k3.json").stat().st_mtime_ns
    assert study.main(argv) == 0
    assert (out / "runs" / "filaments__C_nearest_k3.json").stat().st_mtime_ns == before
