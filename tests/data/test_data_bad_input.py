"""Bad input: each case gets a specific message naming the file and what to do."""

import gzip
import os
import re
import warnings

import numpy as np
import pytest

from ldm_jax import data
from tests.data.test_data import SIZE, make_config, take, write_nifti


def good_files(tmp_path, n=4, shape=(32, 32, 16)):
    rng = np.random.default_rng(0)
    return [
        write_nifti(tmp_path / f"good{i}.nii.gz", rng.integers(0, 256, shape).astype(np.uint8))
        for i in range(n)
    ]


def nifti_config(tmp_path, **kw):
    return make_config(source="nifti", train_dir=str(tmp_path), val_fraction=0.0, **kw)


def test_corrupt_file_errors_or_is_skipped(tmp_path):
    good_files(tmp_path)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(data.BadFileError) as err:
        data.make_train_loader(nifti_config(tmp_path), batch_size=2, seed=0, process_index=0, process_count=1)
    msg = str(err.value)
    assert str(bad) in msg and "NIfTI header" in msg and "skip_bad_files=True" in msg
    with pytest.warns(data.DataWarning, match=r"Skipped 1 of 5 file\(s\)") as rec:
        loader = data.make_train_loader(
            nifti_config(tmp_path, skip_bad_files=True), batch_size=2, seed=0, process_index=0, process_count=1
        )
    assert any(str(bad) in str(w.message) for w in rec)
    # Skipping is already on: the warning does not tell the user to turn it on.
    assert not any("set data.skip_bad_files=True" in str(w.message) for w in rec)
    assert len(loader.source) == 4
    assert take(nifti_config(tmp_path, skip_bad_files=True), 1)[0].shape == (2,) + SIZE + (1,)
    # Split 3 + 2: the warning counts the files of the bad file's split and names it.
    config = make_config(source="nifti", train_dir=str(tmp_path), val_fraction=0.4,
                         skip_bad_files=True)
    with pytest.warns(data.DataWarning) as rec:
        data.make_train_loader(config, batch_size=1, seed=0, process_index=0, process_count=1)
        data.make_eval_batches(config, batch_size=1)
    [skipped] = [str(w.message) for w in rec if "Skipped" in str(w.message)]
    assert re.search(rf"Skipped 1 of (3 file\(s\) in the train|2 file\(s\) in the "
                     rf"validation) split of {re.escape(str(tmp_path))} ", skipped)


def test_truncated_data_fails_at_read_or_is_skipped(tmp_path):
    good_files(tmp_path, n=3)
    path = write_nifti(tmp_path / "trunc.nii.gz", np.ones((64, 64, 32), np.float32))
    raw = gzip.decompress(open(path, "rb").read())
    with open(path, "wb") as f:  # valid gzip stream with the voxel data cut short
        f.write(gzip.compress(raw[: len(raw) // 3])[:-8])
    with pytest.raises(data.BadFileError, match="truncated or corrupt") as err:
        data.load_volume(path, nifti_config(tmp_path))
    assert path in str(err.value)
    # When skipping, the loader drops it at read time with a counted warning.
    config = nifti_config(tmp_path, skip_bad_files=True, flip_prob=0.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        batches = take(config, 4, batch_size=2)
    assert all(b.shape == (2,) + SIZE + (1,) for b in batches)
    skip_msgs = [str(w.message) for w in rec if "Skipping" in str(w.message)]
    assert skip_msgs and path in skip_msgs[0] and "file(s) skipped" in skip_msgs[0]


def test_4d_volume_needs_frame_or_channels(tmp_path):
    vol = np.stack([np.full((32, 32, 16), 50 * t, np.uint8) for t in range(3)], axis=-1)
    path = write_nifti(tmp_path / "fmri.nii.gz", vol)
    with pytest.raises(data.VolumeShapeError) as err:
        data.load_volume(path, nifti_config(tmp_path))
    msg = str(err.value)
    assert path in msg and "data.frame=K" in msg and "in_channels=3" in msg
    picked, _ = data.load_volume(path, nifti_config(tmp_path, frame=2))
    assert picked.shape == (32, 32, 16, 1) and np.allclose(picked, 100 / 255)
    config = nifti_config(tmp_path)
    config.autoencoder.in_channels = 3
    channels, _ = data.load_volume(path, config)
    assert channels.shape == (32, 32, 16, 3)
    np.testing.assert_allclose(channels[0, 0, 0], [0, 50 / 255, 100 / 255], rtol=1e-6)
    with pytest.raises(data.VolumeShapeError, match="out of range"):
        data.load_volume(path, nifti_config(tmp_path, frame=3))
    # A layout problem is the user's choice to make, so skip_bad_files does not hide it.
    with pytest.raises(data.VolumeShapeError, match="data.frame"):
        data.make_eval_batches(nifti_config(tmp_path, skip_bad_files=True), batch_size=1)


def test_nan_inf_error_or_replaced(tmp_path):
    vol = np.full((32, 32, 16), 100.0, np.float32)
    vol[0, 0, 0], vol[1, 0, 0], vol[2, 0, 0] = np.nan, np.inf, -np.inf
    path = write_nifti(tmp_path / "nan.nii", vol)
    with pytest.raises(data.NonFiniteError) as err:
        data.load_volume(path, nifti_config(tmp_path))
    assert path in str(err.value) and "3 voxel(s)" in str(err.value) and "nan_to_num=True" in str(err.value)
    with pytest.warns(data.DataWarning, match="replaced 3 NaN/Inf"):
        fixed, _ = data.load_volume(path, nifti_config(tmp_path, nan_to_num=True))
    assert np.isfinite(fixed).all()
    assert fixed[0, 0, 0, 0] == 0.0 and fixed[1, 0, 0, 0] == 1.0 and fixed[2, 0, 0, 0] == 0.0


def test_no_matching_files_names_directory_and_patterns(tmp_path):
    (tmp_path / "readme.txt").write_text("no volumes here")
    with pytest.raises(data.NoFilesError) as err:
        data.make_train_loader(nifti_config(tmp_path), batch_size=1, seed=0, process_index=0, process_count=1)
    msg = str(err.value)
    assert str(tmp_path) in msg and "*.nii" in msg and "*.nii.gz" in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    with pytest.raises(data.NoFilesError, match="does not exist"):
        data.list_volume_files(str(tmp_path / "missing"))
    with pytest.raises(data.NoFilesError, match="No files match the glob"):
        data.list_volume_files(str(tmp_path / "*.nii.gz"))
    np.save(tmp_path / "a.npy", np.zeros((4, 4, 4)))
    with pytest.raises(data.NoFilesError, match=r"\*\.nii"):  # npy present but source=nifti
        data.make_eval_batches(nifti_config(tmp_path), batch_size=1)
    with pytest.raises(data.DataError, match="needs data.train_dir"):
        data.make_eval_batches(make_config(source="nifti"), batch_size=1)


def test_small_volume_is_padded_with_warning(tmp_path):
    path = write_nifti(tmp_path / "small.nii.gz", np.full((20, 32, 10), 255, np.uint8))
    config = nifti_config(tmp_path, flip_prob=0.0)
    with pytest.warns(data.DataWarning, match="smaller than data.volume_size") as rec:
        [batch] = list(data.make_eval_batches(config, batch_size=1))
    assert path in str(rec[0].message)
    vol = batch["image"][0, ..., 0]
    assert vol.shape == SIZE
    assert np.all(vol[6:26, :, 3:13] == 1.0) and vol[:6].max() == 0.0 and vol[:, :, :3].max() == 0.0
    assert take(config, 1, batch_size=1)[0].shape == (1,) + SIZE + (1,)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64])
def test_dtypes_converted_to_float32(tmp_path, dtype):
    vol = np.arange(32 * 32 * 16).reshape(32, 32, 16) % 256
    path = write_nifti(tmp_path / "v.nii.gz", vol.astype(dtype))
    out, _ = data.load_volume(path, nifti_config(tmp_path))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], vol / 255.0, rtol=1e-6)


def test_bad_config_values_have_specific_messages(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((32, 32, 16), np.float32))
    with pytest.raises(data.DataError, match="spacing.*voxel_resize"):
        data.load_volume(str(tmp_path / "a.npy"), make_config(source="npy", spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(data.DataError, match="not one of"):
        data.make_eval_batches(make_config(source="hdf5"), batch_size=1)
    with pytest.raises(data.VolumeShapeError, match="not a 3D volume"):
        np.save(tmp_path / "flat.npy", np.zeros((32, 32), np.float32))
        data.load_volume(str(tmp_path / "flat.npy"), make_config(source="npy"))
    with pytest.raises(data.BadFileError, match="complex"):
        np.save(tmp_path / "c.npy", np.zeros((4, 4, 4), np.complex64))
        data.load_volume(str(tmp_path / "c.npy"), make_config(source="npy"))
    assert os.path.exists(tmp_path / "c.npy")  # never deletes user files
