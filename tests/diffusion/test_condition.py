"""ldm_jax.diffusion.condition: resampling, masks, files and their refusals (no model)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import condition as cond
from ldm_jax.errors import ConfigError, DataError


def test_resample_block_mean_and_repeat_numpy_and_jax():
    m = np.zeros((1, 4, 4, 2, 1), np.float32)
    m[0, :2, :2, 0] = 1  # one 2x2x2 block half full
    down = cond.resample(m, (2, 2, 1))
    assert down.shape == (1, 2, 2, 1, 1) and down[0, 0, 0, 0, 0] == 0.5 and down.sum() == 0.5
    up = cond.resample(down, (4, 4, 2))
    assert up.shape == m.shape and up[0, 1, 1, 1, 0] == 0.5 and up[0, 2, 2, 0, 0] == 0
    np.testing.assert_array_equal(np.asarray(cond.resample(jnp.asarray(m), (2, 2, 1))), down)
    with pytest.raises(ValueError, match="integer factor"):
        cond.resample(m, (3, 4, 2))


def test_foreground_mask_is_any_channel_above_threshold():
    v = np.zeros((1, 2, 2, 2, 2), np.float32)
    v[0, 0, 0, 0, 1] = 0.5
    v[0, 1, 1, 1, 0] = 0.1  # at the threshold: background
    m = cond.foreground_mask(v, 0.1)
    assert m.shape == (1, 2, 2, 2, 1) and m.dtype == np.float32 and m.sum() == 1
    assert m[0, 0, 0, 0, 0] == 1


def test_to_grid_accepts_both_grids_and_refuses_others():
    kw = {"volume_grid": (8, 8, 4), "condition_grid": (4, 4, 2), "channels": 1, "where": "c"}
    assert cond.to_grid(np.ones((8, 8, 4), bool), **kw).shape == (4, 4, 2, 1)
    assert cond.to_grid(np.ones((4, 4, 2, 1), np.uint8), **kw).dtype == np.float32
    for bad, msg in ((np.ones((8, 8, 3)), "has shape"), (np.ones((8, 8, 4, 2)), "2 channel"),
                     (np.full((4, 4, 2), np.nan), "NaN")):
        with pytest.raises(ConfigError, match=msg):
            cond.to_grid(bad, **kw)
    with pytest.raises(DataError, match="has shape"):
        cond.to_grid(np.ones((5, 5, 5)), **kw, error=DataError)


def test_condition_files(tmp_path):
    for n in ("b", "a"):
        np.save(tmp_path / f"{n}.npy", np.zeros((4, 4, 2)))
    (tmp_path / "notes.txt").write_text("x")
    assert cond.condition_files(str(tmp_path), count=2) == [str(tmp_path / "a.npy"),
                                                            str(tmp_path / "b.npy")]
    assert cond.condition_files(str(tmp_path / "a.npy"), count=3) == [str(tmp_path / "a.npy")] * 3
    assert cond.condition_files(str(tmp_path), names=["b"]) == [str(tmp_path / "b.npy")]
    with pytest.raises(ConfigError, match="holds 2 condition file"):
        cond.condition_files(str(tmp_path), count=3)
    with pytest.raises(ConfigError, match="no condition for 1 input"):
        cond.condition_files(str(tmp_path), names=["a", "c"])
    with pytest.raises(ConfigError, match="not a condition file"):
        cond.read_condition(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.npy").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not a readable condition file"):
        cond.read_condition(str(tmp_path / "broken.npy"))


def test_random_boxes_and_inpainting_condition():
    """One box per volume, its side within box_fraction of each axis; the condition
    blanks the box and appends it; the centre box is the middle half."""
    import jax

    m = np.asarray(cond.random_boxes(jax.random.PRNGKey(3), 64, (16, 12, 8), 0.25, 0.5))
    assert m.shape == (64, 16, 12, 8, 1) and set(np.unique(m)) <= {0.0, 1.0}
    for box in m[..., 0]:
        idx = np.argwhere(box)
        lo, hi = idx.min(0), idx.max(0) + 1
        assert box.sum() == np.prod(hi - lo)  # one solid box
        side = (hi - lo) / np.array([16, 12, 8])
        assert np.all(side >= 0.25 - 1 / 16) and np.all(side <= 0.5 + 1 / 16)
    sizes = {tuple(np.argwhere(b).max(0) - np.argwhere(b).min(0)) for b in m[..., 0]}
    assert len(sizes) > 10  # sizes and places vary
    v = np.random.default_rng(0).random((2, 16, 12, 8, 1)).astype(np.float32)
    c = cond.inpainting_condition(v, m[:2])
    assert c.shape == (2, 16, 12, 8, 2)
    np.testing.assert_array_equal(c[..., 1], m[:2, ..., 0])
    np.testing.assert_array_equal(c[..., 0], np.where(m[:2, ..., 0] > 0, 0, v[..., 0]))
    box = cond.centre_box((16, 12, 8))[..., 0]
    assert box[4:12, 3:9, 2:6].all() and box.sum() == 8 * 6 * 4
