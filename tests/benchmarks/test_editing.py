"""benchmarks.editing's pure functions: AUROC, sphere insertion, the border-extension
baseline, the box hole, monotonicity and the tables (no model)."""

import json
import math

import numpy as np
import pytest

from benchmarks import editing


def test_auroc_ranks_with_ties():
    assert editing.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert editing.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert editing.auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # all tied: chance
    # one positive (0.5) above one of the two negatives (0.4), below the other (0.6),
    # and the other positive (0.7) above both: (1 + 2) / 4.
    assert editing.auroc([0.4, 0.6, 0.5, 0.7], [0, 0, 1, 1]) == 0.75
    # a tie between a positive and a negative counts one half
    assert editing.auroc([0.5, 0.5, 0.9], [0, 1, 1]) == 0.75
    assert math.isnan(editing.auroc([1, 2], [0, 0]))


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, (6, 5, 4)).astype(float)  # many ties
    y = rng.random((6, 5, 4)) < 0.3
    pos, neg = s[y], s[~y]
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert editing.auroc(s, y) == pytest.approx(want, abs=1e-12)


def test_insert_spheres_sets_the_ball_voxels_only():
    v = np.zeros((16, 16, 16, 1), np.float32)
    v[0, 0, 0] = 0.3
    out, m = editing.insert_spheres(v, [((8, 8, 8), 3.0)], 0.9)
    assert m.sum() == 123  # lattice points within radius 3 of a lattice point
    assert m[8, 8, 8] and m[11, 8, 8] and not m[12, 8, 8] and not m[10, 10, 10]
    np.testing.assert_array_equal(out[m], np.float32(0.9))
    np.testing.assert_array_equal(out[~m], v[~m])
    assert v[8, 8, 8, 0] == 0  # the input is not changed in place


def test_sphere_value_max_or_foreground_percentile():
    v = np.zeros((4, 4, 4), np.float32)
    v[0, 0, :] = [0.2, 0.4, 0.6, 1.0]  # the foreground (> 0.1)
    assert editing.sphere_value(v, "max") == 1.0
    assert editing.sphere_value(v, "p50") == pytest.approx(0.5)
    assert editing.sphere_value(v, "p0") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'max' or 'pNN'"):
        editing.sphere_value(v, "median")


def test_sphere_centres_fit_inside_and_apart():
    rng = np.random.default_rng(1)
    balls = editing.sphere_centres((32, 32, 32), [5.0, 4.0, 3.0], rng)
    for c, r in balls:
        assert all(r <= x <= 32 - 1 - r for x in c)
    for i, (c1, r1) in enumerate(balls):
        for c2, r2 in balls[:i]:
            assert np.linalg.norm(np.subtract(c1, c2)) > r1 + r2 + 1
    with pytest.raises(ValueError):
        editing.sphere_centres((8, 8, 8), [3.5, 3.5], np.random.default_rng(0), attempts=50)


def test_border_extension_keeps_the_known_voxels_and_extends_a_ramp():
    x = np.broadcast_to(np.linspace(0, 1, 16)[:, None, None], (16, 8, 8)).astype(np.float32)
    hole = np.zeros((16, 8, 8), bool)
    hole[6:10, 2:6, 2:6] = True
    out = editing.border_extension(x[..., None], hole, sigma=1.5)
    assert out.shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(out[~hole], x[~hole][:, None])
    # A ramp along X: the fill grows along X inside the hole and stays within the ramp's
    # values there, much closer to the truth than a constant fill with the known mean.
    f = out[6:10, 4, 4, 0]
    assert np.all(np.diff(f) > 0) and 6 / 15 - 0.1 < f.mean() < 9 / 15 + 0.1
    err = np.abs(out[hole, 0] - x[hole]).mean()
    assert err < 0.5 * np.abs(x[~hole].mean() - x[hole]).mean()


def test_border_extension_far_from_known_voxels_takes_the_nearest():
    x = np.zeros((40, 4, 4), np.float32)
    x[0] = 1.0
    hole = np.zeros((40, 4, 4), bool)
    hole[1:] = True  # the only known voxels are the slab x = 0
    out = editing.border_extension(x, hole, sigma=0.5)
    np.testing.assert_allclose(out, 1.0)  # the blur never reaches; the nearest is 1


def test_centre_box_is_whole_latent_voxels():
    assert editing.centre_box((32, 32, 32), (4, 4, 4)) == "8:24,8:24,8:24"
    assert editing.centre_box((16, 16, 8), (2, 2, 2)) == "4:12,4:12,2:6"
    box = editing.centre_box((20, 20, 8), (4, 4, 4))
    for part in box.split(","):
        a, b = (int(v) for v in part.split(":"))
        assert a % 4 == 0 and b % 4 == 0 and b > a


def test_psnr_dice_band_and_monotone():
    a = np.zeros((4, 4, 4, 1))
    b = a.copy()
    b[0, 0, 0] = 1.0
    where = np.zeros((4, 4, 4), bool)
    where[0, 0, :2] = True
    assert editing.psnr(a, b, 1.0, where) == pytest.approx(10 * math.log10(2))
    assert editing.psnr(a, b, 1.0, ~where) == math.inf
    assert editing.foreground_dice(b, b, 0.5) == 1.0
    assert editing.foreground_dice(a, b, 0.5) == 0.0
    assert editing.foreground_dice(a, a, 0.5) == 1.0  # both empty
    m = np.zeros((9, 9, 9), bool)
    m[1:8, 1:8, 1:8] = True
    band = editing.border_band(m, 1)
    assert band[1, 4, 4] and not band[4, 4, 4] and not band[0, 4, 4]
    assert editing.monotone([None, 30.0, 20.0, 20.0, 5.0], decreasing=True)
    assert not editing.monotone([None, 30.0, 31.0], decreasing=True)
    assert editing.monotone([1.0, 2.0, None], decreasing=False)
    assert editing.finite(math.inf) is None and editing.finite(2.0) == 2.0


def test_tables_print_the_parts_that_exist(tmp_path):
    rec = {"num": 2, "steps": 3, "real_foreground_fraction": 0.1, "strengths": [0.0, 1.0],
           "sweep": [{"strength": 0.0, "psnr_to_reconstruction": None,
                      "l1_to_reconstruction": 0.0, "psnr_to_input": 20.0,
                      "psnr_to_sample": 15.0, "foreground_fraction": 0.1},
                     {"strength": 1.0, "psnr_to_reconstruction": 15.0,
                      "l1_to_reconstruction": 0.1, "psnr_to_input": 14.0,
                      "psnr_to_sample": None, "foreground_fraction": 0.2}],
           "monotone_psnr_to_reconstruction": True, "monotone_l1_to_reconstruction": True,
           "monotone_psnr_to_sample": False}
    (tmp_path / "editing_sdedit.json").write_text(json.dumps(rec))
    md = editing.tables(str(tmp_path))
    assert "SDEdit" in md and "| 0 | ∞ | 0.0000 | 20.00 | 15.00 | 0.100 |" in md
    assert "PSNR to the sample rises NO" in md
    assert "ControlNet" not in md and "Inpainting" not in md
    assert editing.tables(str(tmp_path), ("anomaly",)) == ""


def test_held_out_volumes_extend_the_validation_set():
    from tests.tiny import tiny_config

    cfg = tiny_config()  # 2 validation volumes
    six = editing.held_out_volumes(cfg, 6)
    assert six.shape == (6, 16, 16, 8, 1) and cfg.data.num_val_volumes == 2  # not changed
    np.testing.assert_array_equal(editing.held_out_volumes(cfg, 2), six[:2])
    assert len({v.tobytes() for v in six}) == 6 and all(v.max() > 0.1 for v in six)
