"""Inpainting (replace-known-region and RePaint) and SDEdit on a tiny pipeline: the
trained tiny autoencoder and a 1-level UNet with random (non-zero) weights, so every
property here is of the algorithm, not of a trained model."""

import jax
import numpy as np
import pytest

from ldm_jax.data.synthetic.filaments import render_filaments
from ldm_jax.diffusion import editing
from ldm_jax.diffusion.inpainting import (
    box_mask,
    check_mask,
    latent_mask,
    parse_box,
    repaint_schedule,
)
from ldm_jax.errors import ConfigError


def tiny_pipeline(ae_workdir, seed=0, **unet):
    """A Pipeline over the tiny autoencoder with a random, perturbed 1-level UNet."""
    from ldm_jax.diffusion.latent_space import load_frozen_autoencoder
    from ldm_jax.diffusion.pipeline import Pipeline
    from ldm_jax.models import build_unet
    from tests.diffusion.test_diffusion import tiny_diffusion_config

    c = tiny_diffusion_config(ae_workdir)
    c.unet.update(unet)
    c.latents.scale_factor = 1.5
    model = build_unet(c.unet)
    params = model.init(jax.random.key(seed), **model.dummy_inputs())["params"]
    params = jax.tree.map(lambda a: a + 0.05 * np.sin(np.arange(a.size) + seed)
                          .reshape(a.shape).astype(np.float32), params)
    return Pipeline(c, model, params, load_frozen_autoencoder(c))


@pytest.fixture(scope="module")
def pipe(ae_workdir):
    return tiny_pipeline(ae_workdir)


def _volumes(n=2, seed=0):
    return np.stack([render_filaments((16, 16, 8), seed=seed, index=i, num_filaments=(2, 4))
                     [..., None] / 255.0 for i in range(n)]).astype(np.float32)


def test_repaint_schedule_is_lugmayrs():
    plain = repaint_schedule(5, 1, 1)
    assert plain == [(i, False) for i in range(5)]
    moves = repaint_schedule(6, 2, 3)
    downs = sum(not u for _, u in moves)
    ups = sum(u for _, u in moves)
    # jumps at RePaint times 0 and 2 (range(0, 6 - 2, 2)), 2 extra passes of 2 steps each
    assert ups == 2 * 2 * 2 and downs == 6 + ups
    assert moves[-1] == (5, False)  # the last move ends clean
    pos = 0  # every move starts where the previous one ended
    for i, u in moves:
        assert i == pos
        pos = i - 1 if u else i + 1
    with pytest.raises(ConfigError, match="jump_length"):
        repaint_schedule(5, 0, 2)


def test_masks():
    m = box_mask((16, 16, 8), "4:12,4:8,2:6")
    assert m.sum() == 8 * 4 * 4 and m[4, 4, 2] and not m[12, 4, 2]
    lm = latent_mask(m, (8, 8, 4))
    assert lm.shape == (8, 8, 4, 1) and lm.sum() == 4 * 2 * 2
    m2 = np.zeros((16, 16, 8), bool)
    m2[5, 5, 3] = True  # one voxel: its latent voxel is generated
    assert latent_mask(m2, (8, 8, 4))[2, 2, 1, 0] == 1
    for bad, msg in (("4:12,4:8", "three voxel ranges"), ("4:20,0:4,0:4", "0 <= start < end")):
        with pytest.raises(ConfigError, match=msg):
            parse_box(bad, (16, 16, 8))
    with pytest.raises(ConfigError, match="empty"):
        check_mask(np.zeros((16, 16, 8)), (16, 16, 8))
    with pytest.raises(ConfigError, match="whole volume"):
        check_mask(np.ones((16, 16, 8)), (16, 16, 8))
    with pytest.raises(ConfigError, match="shape"):
        check_mask(np.ones((8, 8, 8)), (16, 16, 8))


@pytest.mark.parametrize("jumps", [(1, 1), (2, 2)])
def test_inpainting_keeps_the_known_region_exactly(pipe, jumps):
    vols = _volumes()
    mask = box_mask((16, 16, 8), "4:12,4:12,2:6")
    rng = jax.random.PRNGKey(0)
    out, lat = editing.inpaint(pipe, vols, mask, rng, steps=4, jump_length=jumps[0],
                               jump_n_sample=jumps[1], blend_width=2)
    assert out.shape == vols.shape and lat.shape == (2, 8, 8, 4, 2)
    assert np.abs(out - vols)[:, ~mask].max() == 0.0  # outside the mask: the input's voxels
    assert np.abs(out - vols)[:, mask].max() > 1e-3  # inside: generated
    # In latent space the known latents (outside the pooled mask) are the input's.
    z = np.asarray(editing.encode(pipe, vols)) / pipe.scale_factor
    keep = latent_mask(mask, (8, 8, 4))[..., 0] == 0
    np.testing.assert_allclose(lat[:, keep], z[:, keep], rtol=0, atol=1e-6)
    again, _ = editing.inpaint(pipe, vols, mask, rng, steps=4, jump_length=jumps[0],
                               jump_n_sample=jumps[1], blend_width=2)
    np.testing.assert_array_equal(out, again)


def test_sdedit_strength_ends(pipe):
    vols = _volumes(1)
    rng = jax.random.PRNGKey(3)
    recon, _ = editing.sdedit(pipe, vols, rng, strength=0.0, steps=4)
    z = np.asarray(editing.encode(pipe, vols))[:, :, :, :] / pipe.scale_factor
    np.testing.assert_allclose(recon, pipe.decode(z), atol=1e-6)
    _full, lat = editing.sdedit(pipe, vols, rng, strength=1.0, steps=4)
    ref = pipe.sample_batch(rng, 0, 1, steps=4)
    np.testing.assert_allclose(lat, ref, atol=1e-5)
    half, _ = editing.sdedit(pipe, vols, rng, strength=0.5, steps=4)
    assert 0 < np.abs(half - recon).max()
    with pytest.raises(ConfigError, match="--strength"):
        editing.sdedit(pipe, vols, rng, strength=1.5, steps=4)
    with pytest.raises(ConfigError, match="edits volumes of"):
        editing.sdedit(pipe, vols[:, :8], rng, strength=0.5, steps=4)
    with pytest.raises(ConfigError, match="no ControlNet is attached"):
        editing.sdedit(pipe, vols, rng, strength=0.5, steps=4, condition=vols[0])


def test_likelihood_map_on_the_volume_grid(pipe):
    vols = _volumes(2)
    maps, lat, total = editing.likelihood(pipe, vols, jax.random.PRNGKey(0), steps=5)
    assert maps.shape == (2, 16, 16, 8, 1) and lat.shape == (2, 8, 8, 4)
    assert np.isfinite(total).all() and (lat >= 0).all()
    np.testing.assert_array_equal(maps[:, ::2, ::2, ::2, 0], lat)  # nearest


def test_anomaly_map_is_the_distance_to_the_mean_sdedit(pipe):
    vols = _volumes(2)
    rng = jax.random.PRNGKey(5)
    maps, healthy, scores = editing.anomaly(pipe, vols, rng, 1, strength=0.6, num_repeats=2,
                                            steps=4)
    key = jax.random.fold_in(rng, 1)
    draws = [editing.sdedit(pipe, vols, key, k, strength=0.6, steps=4)[0] for k in range(2)]
    assert np.abs(draws[0] - draws[1]).max() > 0  # the repeats differ
    np.testing.assert_allclose(healthy, (draws[0] + draws[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(maps, np.abs(healthy - vols).sum(-1, keepdims=True),
                               atol=1e-6)
    np.testing.assert_allclose(scores, maps.reshape(2, -1).mean(1), rtol=1e-6)
    with pytest.raises(ConfigError, match="--num_repeats=0"):
        editing.anomaly(pipe, vols, rng, num_repeats=0, steps=4)


def test_a_controlnet_steers_inpainting_and_sdedit(ae_workdir):
    """A zero-initialised ControlNet copied from the UNet adds nothing; a perturbed one
    changes the result, and its condition is checked."""
    from ldm_jax.models.controlnet import build_controlnet, controlnet_from_unet

    p = tiny_pipeline(ae_workdir)
    vols = _volumes(1)
    rng = jax.random.PRNGKey(1)
    plain, _ = editing.sdedit(p, vols, rng, strength=0.5, steps=3)
    cn = build_controlnet({"conditioning_embedding_num_channels": (4, 8)}, p.config.unet)
    init = cn.init(jax.random.key(0), **cn.dummy_inputs())["params"]
    p.attach_controlnet(cn, controlnet_from_unet(init, p.params))
    cond = (vols[0] > 0.1).astype(np.float32)  # thresholded foreground, 2x the latent
    same, _ = editing.sdedit(p, vols, rng, strength=0.5, steps=3, condition=cond)
    np.testing.assert_allclose(same, plain, atol=1e-5)
    p.attach_controlnet(cn, jax.tree.map(lambda a: a + 0.05, p.controlnet_params))
    steered, _ = editing.sdedit(p, vols, rng, strength=0.5, steps=3, condition=cond)
    assert np.abs(steered - plain).max() > 1e-3
    mask = box_mask((16, 16, 8), "4:12,4:12,2:6")
    out, _ = editing.inpaint(p, vols, mask, rng, steps=3, condition=cond)
    assert np.abs(out - vols)[:, ~mask].max() == 0.0
    with pytest.raises(ConfigError, match="the condition has shape"):
        editing.sdedit(p, vols, rng, strength=0.5, steps=3, condition=cond[:8])


def test_an_inpainting_unet_fills_from_its_condition(ae_workdir):
    """A UNet with the inpainting condition concatenated (conditioning.aligned=
    "inpainting"): inpaint builds the condition from the volumes and the mask (the same
    fill as that condition passed explicitly), keeps the known region, and the condition
    steers the fill; likelihood maps are refused."""
    from ldm_jax.diffusion.aligned import build_unet_for, compute_condition
    from ldm_jax.diffusion.condition import inpainting_condition
    from ldm_jax.diffusion.latent_space import load_frozen_autoencoder
    from ldm_jax.diffusion.pipeline import Pipeline
    from tests.diffusion.test_diffusion import tiny_diffusion_config

    c = tiny_diffusion_config(ae_workdir)
    c.conditioning.aligned = "inpainting"
    c.latents.scale_factor = 1.5
    model = build_unet_for(c, (16, 16, 8), (8, 8, 4, 2), 1)
    assert model.in_channels == 2 + 2 * 8  # latents + (blanked volume, mask) folded 2^3
    params = model.init(jax.random.key(0), **model.dummy_inputs())["params"]
    params = jax.tree.map(lambda a: a + 0.05 * np.sin(np.arange(a.size)).reshape(a.shape)
                          .astype(np.float32), params)
    p = Pipeline(c, model, params, load_frozen_autoencoder(c))
    vols = _volumes(2)
    mask = box_mask((16, 16, 8), "4:12,4:12,2:6")
    rng = jax.random.PRNGKey(0)
    out, _ = editing.inpaint(p, vols, mask, rng, steps=3)
    assert np.abs(out - vols)[:, ~mask].max() == 0.0 and np.abs(out - vols)[:, mask].max() > 0
    cond = inpainting_condition(vols, np.broadcast_to(mask, vols.shape[:4]))
    same, _ = editing.inpaint(p, vols, mask, rng, steps=3, condition=cond)
    np.testing.assert_array_equal(out, same)
    other, _ = editing.inpaint(p, vols, mask, rng, steps=3, condition=cond[::-1])
    assert np.abs(other - out)[:, mask].max() > 1e-4
    # num_repeats: the mean of fills drawn from fold_in(fold_in(rng, index), r).
    mean, lat = editing.inpaint(p, vols, mask, rng, 1, steps=3, num_repeats=2)
    draws = [editing.inpaint(p, vols, mask, jax.random.fold_in(rng, 1), r, steps=3)
             for r in range(2)]
    np.testing.assert_allclose(mean, (draws[0][0] + draws[1][0]) / 2, atol=1e-6)
    np.testing.assert_allclose(lat, (draws[0][1] + draws[1][1]) / 2, atol=1e-6)
    assert np.abs(mean - vols)[:, ~mask].max() == 0.0
    # A volume as the condition: its centre half blanked (what `sample --condition` takes).
    np.testing.assert_array_equal(p.aligned_for(2, vols[0]),
                                  np.broadcast_to(compute_condition(vols[:1], c.conditioning),
                                                  (2, 16, 16, 8, 2)))
    s, _ = editing.sdedit(p, vols, rng, strength=0.5, steps=3, condition=cond)
    assert s.shape == vols.shape
    with pytest.raises(ConfigError, match="likelihood maps take an unconditioned"):
        editing.likelihood(p, vols, rng)
    # Inpainting-based anomaly map: 8 boxes, each voxel covered once: the fill's error.
    maps, healthy, scores = editing.patched_anomaly(p, vols, rng, patch=(8, 8, 4),
                                                    stride=(8, 8, 4), steps=2)
    assert maps.shape == (2, 16, 16, 8, 1) and (maps >= 0).all() and maps.max() > 0
    np.testing.assert_allclose(scores, maps.reshape(2, -1).mean(1), rtol=1e-6)
    box = np.zeros((16, 16, 8), bool)
    box[8:, :8, 4:] = True  # box 5 of the (x, y, z) grid, in C order
    fill, _ = editing.inpaint(p, vols, box, jax.random.fold_in(jax.random.fold_in(rng, 0), 5),
                              0, steps=2)
    np.testing.assert_allclose(healthy[:, box], fill[:, box], atol=1e-6)
    np.testing.assert_allclose(maps[:, box, 0], np.abs(fill - vols)[:, box, 0], atol=1e-6)
    _, mean2, _, spread = editing.patched_anomaly(p, vols, rng, patch=(8, 8, 4),
                                                  stride=(8, 8, 4), steps=2, num_repeats=2,
                                                  return_spread=True)
    key = jax.random.fold_in(jax.random.fold_in(rng, 0), 5)
    two = [editing.inpaint(p, vols, box, key, r, steps=2)[0] for r in range(2)]
    np.testing.assert_allclose(mean2[:, box], ((two[0] + two[1]) / 2)[:, box], atol=1e-6)
    np.testing.assert_allclose(spread[:, box], (np.abs(two[0] - two[1]) / 2)[:, box],
                               atol=1e-5)
    with pytest.raises(ConfigError, match="need an inpainting model"):
        editing.patched_anomaly(tiny_pipeline(ae_workdir), vols, rng)
    with pytest.raises(ConfigError, match="smaller than the volume"):
        editing.patched_anomaly(p, vols, rng, patch=8, stride=4)  # Z is 8 voxels


def test_patch_starts_cover_the_axis():
    assert editing.patch_starts(32, 16, 8) == [0, 8, 16]
    assert editing.patch_starts(10, 4, 4) == [0, 4, 6]
    assert editing.patch_starts(10, 4, 3) == [0, 3, 6]
    with pytest.raises(ConfigError, match="stride=0"):
        editing.patch_starts(10, 4, 0)


def test_an_inpainting_unet_trains_on_the_fly(ae_workdir, tmp_path):
    """Two steps of configs/diffusion/inpainting_4x.py's kind of model on the tiny
    autoencoder: finite losses, the held-out conditions (centre box) written as
    `--condition` files, the sample sheet beside them."""
    import json
    import os

    from ldm_jax.cli.train import train_and_evaluate
    from tests.diffusion.test_diffusion import tiny_diffusion_config

    c = tiny_diffusion_config(ae_workdir)
    c.conditioning.aligned = "inpainting"
    c.conditioning.drop_prob = 0.0
    c.train.num_steps = 2
    wd = str(tmp_path / "inpaint")
    state = train_and_evaluate(c, wd, progress=False)
    assert int(state.step) == 2 and int(state.skipped_steps) == 0
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert any(np.isfinite(r.get("val_loss", np.nan)) for r in rows)
    cond = np.load(os.path.join(wd, "conditions", "val_0000.npy"))
    assert cond.shape == (16, 16, 8, 2) and cond[4:12, 4:12, 2:6, 1].all()
    assert cond[..., 1].sum() == 8 * 8 * 4 and not cond[4:12, 4:12, 2:6, 0].any()
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(wd, "images")))
