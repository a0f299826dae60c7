"""Data pipeline: every source's shapes and ranges, determinism, sharding, resume."""

import socket

import numpy as np
import pytest

from configs import default
from ldm_jax import data
from ldm_jax.data import transforms
from ldm_jax.data.sources import mni152
from ldm_jax.data.synthetic import filaments

SIZE = (32, 32, 16)


def make_config(**fields):
    config = default.get_config()
    config.data.volume_size = SIZE
    config.data.num_train_volumes = 8
    config.data.num_val_volumes = 3
    config.data.num_filaments = (2, 5)
    for k, v in fields.items():
        setattr(config.data, k, v)
    return config


def take(config, n, batch_size=2, seed=0, **kw):
    it = iter(data.make_train_loader(config, batch_size=batch_size, seed=seed, **kw))
    try:
        return [next(it)["image"] for _ in range(n)]
    finally:
        it.close()


def write_nifti(path, arr, zooms=(1.0, 1.0, 1.0)):
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.diag(list(zooms) + [1.0]))
    nib.save(img, str(path))
    return str(path)


def nifti_folder(tmp_path, n=6, shape=(40, 36, 20), dtype=np.uint8):
    rng = np.random.default_rng(0)
    for i in range(n):
        write_nifti(tmp_path / f"vol{i:02d}.nii.gz", rng.integers(0, 256, shape).astype(dtype))
    return str(tmp_path)


# ---------------------------------------------------------------- filaments


def test_filaments_deterministic_and_in_range():
    kw = dict(num_filaments=(3, 6), width=(0.8, 2.0))
    a = filaments.render_filaments((48, 40, 16), seed=1, index=2, **kw)
    b = filaments.render_filaments((48, 40, 16), seed=1, index=2, **kw)
    c = filaments.render_filaments((48, 40, 16), seed=1, index=3, **kw)
    v = filaments.render_filaments((48, 40, 16), seed=1, index=2, split=1, **kw)
    assert a.shape == (48, 40, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, v)
    # Sparse bright curves on a black background, like voxelised microtubules.
    assert a.max() > 100 and 0.005 < (a > 20).mean() < 0.5 and np.median(a) == 0


def test_filament_peak_is_brightness_for_any_width():
    # One straight-ish filament: its on-axis peak must not depend on its width.
    peaks = []
    for w in (0.8, 2.0):
        v = filaments.render_filaments((64, 64, 32), seed=0, index=0, num_filaments=1, width=w)
        peaks.append(int(v.max()))
    assert peaks[0] > 90 and abs(peaks[0] - peaks[1]) <= 0.05 * peaks[0]
    thin = filaments.render_filaments((64, 64, 32), seed=0, index=0, num_filaments=1, width=0.8)
    wide = filaments.render_filaments((64, 64, 32), seed=0, index=0, num_filaments=1, width=2.0)
    assert (wide > 20).sum() > 3 * (thin > 20).sum()


# ---------------------------------------------------------------- sources through the loader


def check_batch(batches, batch_size=2, channels=1):
    for b in batches:
        assert type(b) is np.ndarray and b.dtype == np.float32
        assert b.shape == (batch_size,) + SIZE + (channels,)
        assert b.min() >= 0.0 and b.max() <= 1.0
    assert max(b.max() for b in batches) > 0.3  # not all background


def test_synthetic_source_shape_range_and_eval():
    config = make_config()
    check_batch(take(config, 2))
    evals = list(data.make_eval_batches(config, batch_size=2))
    assert len(evals) == 2  # 3 volumes, last batch wrapped
    check_batch([e["image"] for e in evals])
    np.testing.assert_array_equal(evals[1]["image"][1], evals[0]["image"][0])
    again = list(data.make_eval_batches(config, batch_size=2))
    np.testing.assert_array_equal(evals[0]["image"], again[0]["image"])
    # Validation volumes are never training volumes.
    train = take(make_config(flip_prob=0.0, num_train_volumes=4), 2)
    for t in np.concatenate(train):
        for e in evals[0]["image"]:
            assert not np.array_equal(t, e)


def test_nifti_folder_split_and_crops(tmp_path):
    config = make_config(source="nifti", train_dir=nifti_folder(tmp_path), val_fraction=0.34)
    check_batch(take(config, 3))
    evals = data.make_eval_batches(config, batch_size=2)
    assert evals.num_volumes == 2  # round(0.34 * 6)
    [batch] = list(evals)
    check_batch([batch["image"]])
    # Centre crop of the validation file: (40,36,20) -> (32,32,16) starting at (4,2,2).
    val_path = evals.source.paths[0]
    full, affine = data.load_volume(val_path, config)
    assert full.shape == (40, 36, 20, 1) and affine.shape == (4, 4)
    np.testing.assert_array_equal(batch["image"][0], full[4:36, 2:34, 2:18])
    train_loader = data.make_train_loader(config, batch_size=1, seed=0, process_index=0, process_count=1)
    assert not set(train_loader.source.paths) & set(evals.source.paths)
    assert len(train_loader.source.paths) == 4


def test_npy_folder_and_separate_val_dir(tmp_path):
    (tmp_path / "tr").mkdir()
    (tmp_path / "va").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / "tr" / f"{i}.npy", rng.normal(100, 50, (32, 40, 16)))  # float64
    np.save(tmp_path / "va" / "v.npy", rng.integers(0, 255, (32, 32, 16), dtype=np.int16))
    config = make_config(source="npy", train_dir=str(tmp_path / "tr"), val_dir=str(tmp_path / "va"))
    check_batch(take(config, 2))
    [batch] = list(data.make_eval_batches(config, batch_size=2))
    check_batch([batch["image"]])
    expected = np.load(tmp_path / "va" / "v.npy").astype(np.float32) / 255.0
    np.testing.assert_allclose(batch["image"][0, ..., 0], expected, rtol=1e-6)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_mni152_offline_matches_nilearn(no_network):
    from nilearn.datasets import load_mni152_template

    for res, shape in ((1, (197, 233, 189)), (2, (99, 117, 95))):
        ours, affine, zooms = mni152.load_template(res)
        ref = load_mni152_template(resolution=res)  # reads a file inside nilearn
        assert ours.shape == shape == ref.shape and zooms == (float(res),) * 3
        np.testing.assert_allclose(ours / 255.0, ref.get_fdata(), atol=1e-6)
        np.testing.assert_allclose(affine, ref.affine)


def test_mni152_source_augments(no_network):
    config = make_config(source="mni152", mni152_resolution=2, flip_prob=0.0)
    batches = take(config, 2)
    check_batch(batches)
    vols = np.concatenate(batches)
    assert not np.array_equal(vols[0], vols[1])  # random crops / affines differ
    assert all((v > 0.2).mean() > 0.01 for v in vols)  # crops land on the brain
    evals = list(data.make_eval_batches(config, batch_size=3))
    check_batch([evals[0]["image"]], batch_size=3)
    assert not np.array_equal(evals[0]["image"][0], evals[0]["image"][1])


# ---------------------------------------------------------------- determinism, shards, resume


def test_same_seed_same_batches_and_epochs_reshuffle():
    config = make_config(num_train_volumes=4)
    a, b = take(config, 6, seed=5), take(config, 6, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = take(config, 6, seed=6)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # Without augmentation each volume is its record: every epoch (2 batches) covers all 4,
    # in a new order.
    plain = np.concatenate(take(make_config(num_train_volumes=4, flip_prob=0.0), 6, seed=5))
    keys = [v.tobytes() for v in plain]
    epochs = [keys[0:4], keys[4:8], keys[8:12]]
    assert all(set(e) == set(epochs[0]) and len(set(e)) == 4 for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_processes_read_disjoint_slices_of_the_same_global_batches():
    config = make_config(flip_prob=0.5, num_train_volumes=8)

    def batches(p, count, batch_size):
        it = iter(data.make_train_loader(config, batch_size=batch_size, seed=0,
                                         process_index=p, process_count=count))
        out = [next(it)["image"] for _ in range(4)]  # 16 records: two epochs
        it.close()
        return out

    single = batches(0, 1, 4)
    halves = [batches(p, 2, 2) for p in (0, 1)]
    for k, whole in enumerate(single):
        # Process p holds rows [2p, 2p + 2) of the one-process batch, augmentation included.
        np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), whole)
        assert not {v.tobytes() for v in halves[0][k]} & {v.tobytes() for v in halves[1][k]}
    assert len({v.tobytes() for b in single for v in b}) > 8  # flips differ per epoch


def test_iterator_state_resumes_same_sequence():
    config = make_config(num_train_volumes=5)
    it = iter(data.make_train_loader(config, batch_size=2, seed=1, process_index=0, process_count=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["image"] for _ in range(4)]  # crosses an epoch boundary
    it.close()
    fresh = iter(data.make_train_loader(config, batch_size=2, seed=1, process_index=0, process_count=1))
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["image"], e)
    fresh.close()


def test_latent_loader_reads_two_batches_ahead_and_resumes(monkeypatch):
    """In-memory latents: a bounded read-ahead (grain's default reads 500 records ahead,
    seconds of CPU per loader), and the same exact resume as the volume loader."""
    import time

    from ldm_jax.data import latents as latents_mod
    reads = []
    monkeypatch.setattr(latents_mod._ArraySource, "__getitem__",
                        lambda self, i: reads.append(i) or {"latent": self.latents[i]})
    zs = [np.full((2, 2, 2, 1), i, np.float32) for i in range(5)]
    it = iter(latents_mod.make_latent_loader(zs, batch_size=2, seed=3, process_index=0,
                                             process_count=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    time.sleep(0.3)  # time to read ahead
    assert len(reads) <= 6 + 2 * 2, len(reads)
    expected = [next(it)["latent"] for _ in range(3)]  # crosses an epoch boundary
    it.close()
    fresh = iter(latents_mod.make_latent_loader(zs, batch_size=2, seed=3, process_index=0,
                                                process_count=1))
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["latent"], e)
    fresh.close()


def test_orbax_checkpoint_with_worker_processes(tmp_path):
    import grain.python as gp
    import orbax.checkpoint as ocp

    config = make_config(num_train_volumes=6, num_workers=1)
    make = lambda: iter(data.make_train_loader(config, batch_size=2, seed=2, process_index=0, process_count=1))
    it = make()
    next(it)
    next(it)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(create=True))
    mgr.save(2, args=ocp.args.Composite(data=gp.PyGrainCheckpointSave(it)))
    mgr.wait_until_finished()
    expected = [next(it)["image"] for _ in range(3)]
    it.close()
    restored = make()
    mgr.restore(2, args=ocp.args.Composite(data=gp.PyGrainCheckpointRestore(restored)))
    for e in expected:
        got = next(restored)["image"]
        assert type(got) is np.ndarray  # plain numpy, not grain's shared-memory array
        np.testing.assert_array_equal(got, e)
    restored.close()
    mgr.close()


# ---------------------------------------------------------------- transforms


def test_load_volume_resamples_with_header_spacing(tmp_path):
    x = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((10, 8, 5), np.float32)
    path = write_nifti(tmp_path / "ramp.nii", x * 10, zooms=(2.0, 2.0, 4.0))
    config = make_config(source="nifti", spacing=(1.0, 1.0, 1.0), a_max=100.0)
    vol, affine = data.load_volume(path, config)
    assert vol.shape == (20, 16, 20, 1)
    # Linear in X, unchanged along Y/Z; world position of new voxel centres is consistent:
    # new voxel (1, 0, 0) lies at old voxel (0.25, -0.25, -0.375) -> world (0.5, -0.5, -1.5) mm.
    np.testing.assert_allclose(vol[1:-1, 3, 7, 0], (np.arange(1, 19) * 0.5 - 0.25) / 10, atol=1e-6)
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [0.5, -0.5, -1.5, 1], atol=1e-9)
    resized, _ = data.load_volume(path, make_config(voxel_resize=(5, 4, 5), a_max=100.0))
    assert resized.shape == (5, 4, 5, 1)


def test_window_invert_flip_rot():
    v = np.array([-10.0, 0.0, 127.5, 255.0, 300.0], np.float32)
    np.testing.assert_allclose(transforms.window(v, 0, 255, 0, 1, True), [0, 0, 0.5, 1, 1])
    assert transforms.window(v, 0, 255, -1, 1, False)[-1] > 1
    config = make_config(invert=True, flip_prob=0.0)
    prep = transforms.Prep.from_config(config)
    out, _ = transforms.preprocess(np.zeros((2, 2, 2, 1), np.uint8), prep, "x")
    assert prep.background == 1.0 and np.all(out == 1.0)
    rng = np.random.default_rng(0)
    vol = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2, 1)
    flipped = transforms.flip_rot(vol, rng, 1.0, 0.0)
    np.testing.assert_array_equal(flipped, vol[::-1, ::-1, ::-1])
    rotated = transforms.flip_rot(vol, rng, 0.0, 1.0)
    assert any(np.array_equal(rotated, np.rot90(vol, k, (0, 1))) for k in (1, 2, 3))
    with pytest.raises(data.DataError, match="square"):
        transforms.Prep.from_config(make_config(rot90_prob=0.5, volume_size=(32, 24, 16)))


def test_list_volume_files_sorted(tmp_path):
    for name in ("b.nii.gz", "a.nii", "c.npy", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in data.list_volume_files(str(tmp_path))] == ["a.nii", "b.nii.gz", "c.npy"]
    assert data.list_volume_files(str(tmp_path / "*.npy"))[0].endswith("c.npy")
