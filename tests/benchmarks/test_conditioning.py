"""benchmarks.conditioning's pure functions: the row scores, summaries and tables (no
model)."""

import math

import numpy as np
import pytest

from benchmarks import conditioning as bc
from ldm_jax.metrics import conditioning as cm


def _truth(seed=0, shape=(8, 8, 12, 1)):
    rs = np.random.RandomState(seed)
    v = np.zeros(shape, np.float32)
    for _ in range(10):
        v[rs.randint(shape[0]), rs.randint(shape[1]), rs.randint(2, shape[2] - 4), 0] = 0.8
    return v


def _project(v):
    return cm.minmax(np.asarray(v).sum(axis=3, keepdims=True)).astype(np.float32)


def test_parse_model():
    assert bc.parse_model("concat, cue=runs/a@300") == ("concat, cue", "runs/a", 300)
    assert bc.parse_model("runs/b/") == ("b", "runs/b/", "latest")
    assert bc.parse_model("x=runs/c@best", "latest") == ("x", "runs/c", "best")
    assert bc.parse_model("runs/d", 7) == ("d", "runs/d", 7)
    assert bc.slug("concat, depth cue") == "concat__depth_cue"


def test_score_volume_of_the_truth_and_a_shift():
    t = _truth()
    c = _project(t[None])[0]
    perfect = bc.score_volume(np.stack([t, t]), t, c, _project, axis=2, threshold=0.1,
                              data_range=1.0)
    assert perfect["cons_r"] == pytest.approx(1.0)
    assert perfect["dice"] == 1.0 and perfect["dice_mean"] == 1.0
    assert perfect["depth_vox"] == 0.0 and perfect["depth_cov"] == 1.0
    assert perfect["div_std"] == 0.0 and math.isinf(perfect["psnr"])
    # Shifted by 2 in z: the same projection (consistent), depth error 2, no Dice overlap.
    s = np.roll(t, 2, axis=2)
    out = bc.score_volume(np.stack([s, t]), t, c, _project, axis=2, threshold=0.1,
                          data_range=1.0)
    assert out["cons_r"] == pytest.approx(1.0)
    assert out["depth_vox"] == pytest.approx(1.0)  # mean over the K=2 samples: (2 + 0) / 2
    assert out["dice"] == pytest.approx(0.5)
    assert out["div_dice"] == pytest.approx(0.0)
    # The mean of the two: foreground 0.4 at both depths -> centroid 1 voxel off.
    assert out["depth_vox_mean"] == pytest.approx(1.0)
    # A blank sample counts r = 0 (not left out).
    blank = bc.score_volume(np.stack([t, 0 * t]), t, c, _project, axis=2, threshold=0.1,
                            data_range=1.0)
    assert blank["cons_r"] == pytest.approx(0.5)
    # No condition: no consistency scores.
    assert "cons_r" not in bc.score_volume(t[None], t, None, None, axis=2, threshold=0.1,
                                           data_range=1.0)


def test_summarise_and_tables():
    per = [{"dice": 0.5, "depth_vox": 1.0, "cons_r": 0.9},
           {"dice": 0.7, "depth_vox": float("nan"), "cons_r": 0.95}]
    s = bc.summarise(per, voxel_nm=20.0)
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["n"] == 2
    assert s["depth_vox"] == {"mean": 1.0, "std": 0.0, "n": 1, "nan": 1}
    assert s["depth_nm"]["mean"] == 20.0
    base = [{"dice": 0.6, "depth_vox": 3.0, "cons_r": 0.8},
            {"dice": 0.6, "depth_vox": 2.0, "cons_r": 0.8}]
    rows = [{"name": "model", "kind": "model", "per_volume": per, "summary": s},
            {"name": "bp", "kind": "baseline", "per_volume": base,
             "summary": bc.summarise(base, 20.0)}]
    md = bc.markdown_table(rows)
    assert "| model | 0.925 |" in md and "| bp |" in md
    assert "Dice" in md and "pairwise PSNR" not in md  # absent columns are left out
    paired = bc.paired_table(rows, "bp")
    line = next(x for x in paired.splitlines() if x.startswith("| model"))
    # dice: (-0.1, +0.1) -> mean 0, 1 win of 2; depth: only volume 0 finite, 1 < 3: a win.
    assert "+0 (1/2)" in line and "-2 (1/1)" in line
    assert bc.paired_table(rows, "nobody") == ""


def test_condition_on_grid():
    proj = np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)
    g = bc.condition_on_grid(proj, (2, 3, 4))
    assert g.shape == (2, 3, 4, 1) and np.all(g[:, :, 3] == proj[:, :, 0])
    coarse = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1)
    g = bc.condition_on_grid(coarse, (4, 4, 4))
    assert g[3, 3, 3, 0] == 7 and g[0, 1, 0, 0] == 0
    with pytest.raises(ValueError):
        bc.condition_on_grid(coarse, (3, 4, 4))


def test_regression_baseline_learns_the_planes():
    """benchmarks.condition_regression on tiny filament volumes: predictions have the
    volume's shape, and 60 steps bring the MSE on training-like volumes below that of
    the untrained network (0 steps)."""
    from benchmarks.condition_regression import train_regressor
    from ldm_jax.diffusion.aligned import compute_condition
    from tests.diffusion.test_voxel_space import voxel_config

    cfg = voxel_config("projection")
    vols = bc.training_volumes(cfg, 4, seed=5)
    conds = np.asarray(compute_condition(vols, cfg.conditioning))
    errors = []
    for steps in (0, 60):
        pred = train_regressor(cfg, cfg.conditioning, steps, batch=4, seed=0,
                               log=lambda *_: None)(conds)
        assert pred.shape == vols.shape and pred.dtype == np.float32
        errors.append(float(np.mean((pred - vols) ** 2)))
    assert errors[1] < 0.5 * errors[0], errors


def test_regression_baseline_refuses_other_axes():
    from benchmarks.condition_regression import train_regressor
    from tests.diffusion.test_voxel_space import voxel_config

    cfg = voxel_config("projection")
    cfg.conditioning.projection.axis = 0
    with pytest.raises(SystemExit, match="axis 2"):
        train_regressor(cfg, cfg.conditioning, 1)


def test_cue_probe_scores_the_truth_perfectly_and_applies_the_cue():
    """benchmarks.cue_probe on tiny volumes: the truth row is perfect (the predictions are
    scored against their own volumes), and the cue's fields reach the conditions."""
    from benchmarks import cue_probe
    from tests.diffusion.test_voxel_space import voxel_config

    res = cue_probe.probe(voxel_config("projection"), {}, steps=2, num=2, fit_volumes=4)
    assert set(res) == {"back-projection", "regression", "truth"}
    assert res["truth"] == {"dice": 1.0, "depth_vox": 0.0, "covered": 1.0}
    assert 0.0 <= res["back-projection"]["dice"] < 1.0
    cfg = voxel_config("projection")
    cue_probe.probe(cfg, {"focal_plane": -6.0}, steps=0, num=2, fit_volumes=4)
    assert cfg.conditioning.projection.focal_plane == -6.0


def test_cue_probe_parses_cues():
    from benchmarks.cue_probe import parse_cue

    assert parse_cue("middle=") == ("middle", {})
    assert parse_cue("b=focal_plane=-10,psf=defocus") == ("b", {"focal_plane": -10.0,
                                                                 "psf": "defocus"})
    for bad in ("nofields", "=x=1", "a=focal_plane"):
        with pytest.raises(SystemExit, match="--cue"):
            parse_cue(bad)
