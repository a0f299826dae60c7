"""benchmarks.time_to_quality: the times to a Dice and their ratios, the MONAI-recipe
configs, and a tiny run of every setup (records, then the report)."""

import json
import math

import pytest

from benchmarks import time_to_quality as ttq


def _rows(points):
    """JSONL-like rows from (step, cpu_s, wall_s, dice)."""
    return ([{"kind": "meta"}]
            + [{"kind": "eval", "step": s, "cpu_s": c, "wall_s": w, "dice": d, "psnr": 20.0,
                "psnr_blank": 17.0} for s, c, w, d in points]
            + [{"kind": "end", "reason": "test"}])


def test_time_to_is_the_first_evaluation_at_the_dice():
    rows = _rows([(0, 0.0, 0.0, 0.2), (10, 30.0, 60.0, 0.79), (20, 60.0, 100.0, 0.81),
                  (30, 90.0, 150.0, 0.78), (40, 120.0, 200.0, 0.9)])
    assert ttq.time_to(rows, 0.8) == 60.0
    assert ttq.time_to(rows, 0.8, "wall_s") == 100.0
    assert ttq.time_to(rows, 0.85) == 120.0  # after the dip, not before
    assert ttq.time_to(rows, 0.95) is None
    assert ttq.best_dice(rows) == 0.9


def test_compare_at_the_target_when_both_reach_it():
    ours = _rows([(0, 0.0, 0.0, 0.1), (100, 50.0, 80.0, 0.82)])
    theirs = _rows([(0, 0.0, 0.0, 0.1), (100, 100.0, 120.0, 0.7), (200, 200.0, 400.0, 0.85)])
    c = ttq.compare(ours, theirs, 0.8)
    assert c["level"] == 0.8 and c["reached"] == {"ours": True, "theirs": True}
    assert c["ratio_cpu_s"] == pytest.approx(0.25)
    assert c["ratio_wall_s"] == pytest.approx(0.2)
    assert "ratio_cpu_s_at_most" not in c


def test_compare_falls_back_to_the_highest_dice_both_reach_and_bounds_the_target():
    ours = _rows([(0, 0.0, 0.0, 0.1), (100, 50.0, 80.0, 0.6), (200, 100.0, 160.0, 0.85)])
    theirs = _rows([(0, 0.0, 0.0, 0.1), (100, 300.0, 400.0, 0.5), (200, 600.0, 800.0, 0.65)])
    c = ttq.compare(ours, theirs, 0.8)
    assert c["reached"] == {"ours": True, "theirs": False}
    assert c["level"] == pytest.approx(0.65)  # the highest Dice both reach
    assert c["ours_cpu_s"] == 100.0 and c["theirs_cpu_s"] == 600.0
    assert c["ratio_cpu_s"] == pytest.approx(1 / 6)
    # Theirs never reached 0.8 in its 600 CPU s: ours' 100 s is at most 1/6 of theirs.
    assert c["theirs_bound_cpu_s"] == 600.0
    assert c["ratio_cpu_s_at_most"] == pytest.approx(1 / 6)
    table = ttq.report_table({"ours_main": ours, "monai_tutorial": theirs}, 0.8)
    assert "| `ours_main` | `monai_tutorial` | Dice 0.650 (highest both reach; 0.800 not " \
           "reached by theirs) | 100 / 600 | 0.17; at Dice 0.800: ≤ 0.17" in table
    # PSNR above blank: both sides +3 dB from their first evaluation on (ratio 0/0: none).
    gain = ttq.compare(ours, theirs, 5.0, "psnr_gain")
    assert gain["level"] == pytest.approx(3.0) and gain["ours_cpu_s"] == 0.0
    assert gain["ratio_cpu_s"] is None


def test_setups_are_the_main_job_and_the_tutorial_recipe():
    from benchmarks import bench_monai
    main = ttq.setup_config("ours_main", (64, 64, 32))
    assert main.autoencoder.num_channels == (32, 64)
    assert main.autoencoder.initial_downsample_factor == 2
    assert (main.train.learning_rate, main.train.b1, main.train.batch_size) == (5e-4, 0.9, 1)
    assert (main.train.num_steps, main.train.schedule, main.autoencoder.dtype) == (
        1200, "cosine", "float32")
    monai = ttq.setup_config("ours_monai", (64, 64, 32))
    assert tuple(monai.data.volume_size) == (64, 64, 32)
    ae_kwargs, disc_kwargs = bench_monai.monai_kwargs(monai)
    assert {k: ae_kwargs[k] for k in ttq.TUTORIAL_AE} == ttq.TUTORIAL_AE
    assert {k: disc_kwargs[k] for k in ttq.TUTORIAL_DISC} == ttq.TUTORIAL_DISC
    t = monai.train
    assert (t.batch_size, t.learning_rate, t.disc_learning_rate, t.b1, t.b2) == (
        2, 1e-4, 1e-4, 0.9, 0.999)
    assert t.grad_clip_norm == 0.0 and monai.loss.perceptual_weight == 0.0
    # 64 training volumes at batch 2 are 32 steps an epoch; `epoch > 5` starts at epoch 6.
    assert monai.loss.adv_warmup_steps == ttq.tutorial_adv_start(64) == 192
    assert monai.autoencoder.dtype == "float32"


def test_tiny_run_of_every_setup_records_and_reports(tmp_path):
    """Each setup 2 steps at 32x32x32, evaluated after every step: the rows, the same
    parameter count for our MONAI-architecture model and MONAI's, then the report."""
    spec = {"volume": [32, 32, 32], "minutes": 10.0, "wall_minutes": 30.0,
            "eval_every_s": 0, "eval_every": 1, "max_steps": 2, "stop_dice": 0.8,
            "sustain": 2}
    params = {}
    for name in ttq.SETUPS:
        end = ttq.train_worker(dict(spec, setup=name, jsonl=str(tmp_path / f"{name}.jsonl")))
        assert end["steps"] == 2
        assert end["reason"] in ("max_steps 2", "dice >= 0.8 on 2 evaluations in a row")
        rows = ttq.read_jsonl(tmp_path / f"{name}.jsonl")
        assert [r["kind"] for r in rows] == ["meta", "eval", "eval", "eval", "end"]
        evals = rows[1:4]
        assert [r["step"] for r in evals] == [0, 1, 2]
        assert evals[0]["cpu_s"] > 0  # building (and compiling) the models counts
        assert evals[0]["cpu_s"] < evals[1]["cpu_s"] < evals[2]["cpu_s"]
        for r in evals:
            assert 0.0 <= r["dice"] <= 1.0 and math.isfinite(r["psnr"])
            assert r["psnr_blank"] == pytest.approx(evals[0]["psnr_blank"])
        assert evals[1]["train_l1"] is not None
        params[name] = rows[0]["params"]
        assert rows[0]["batch"] == (1 if name == "ours_main" else 2)
    assert params["ours_monai"] == params["monai_tutorial"]  # weight for weight
    assert ttq.main(["--out", str(tmp_path), "--report"]) == 0
    assert (tmp_path / "ttq_curves.png").stat().st_size > 0
    table = (tmp_path / "ttq_table.md").read_text()
    for name in ttq.SETUPS:  # one row each in the setups' table, then the pairs' rows
        assert table.count(f"| `{name}` | {'monai' if 'tutorial' in name else 'jax'}") == 1
    assert "| `ours_main` | `monai_tutorial` |" in table
    assert json.loads(json.dumps(ttq.load_runs(tmp_path)))  # JSON-able rows
