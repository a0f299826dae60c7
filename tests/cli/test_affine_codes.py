"""Affines written as they came: the sform with its code, a qform only where it is exact."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ldm_jax import outputs as vf
from ldm_jax.autoencoder.inference import latent_affine
from ldm_jax.cli import decode as decode_cli
from ldm_jax.cli import extract as extract_cli
from ldm_jax.cli import reconstruct as reconstruct_cli

FACTOR = (2, 2, 2)  # tests/tiny.py


def _rotated(flip=False):
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag(
        [0.7, 1.2, 3.0])
    if flip:
        a[:3, 0] *= -1  # a left-handed grid: a qform holds it with qfac = -1
    a[:3, 3] = [10.0, -200.0, 33.0]
    return a


SHEARED = np.array([[1, .15, 0, -16], [0, 1, 0, -16], [0, 0, 1.5, -24], [0, 0, 0, 1.0]])
# name -> (affine, (sform_code, qform_code) of the input, expected output codes)
CASES = {
    "rotated": (_rotated(), (2, 1), (2, 1)),
    "flipped": (_rotated(flip=True), (1, 1), (1, 1)),
    "sheared": (SHEARED, (2, 0), (2, 0)),
    "sheared_both": (SHEARED, (2, 1), (2, 0)),  # the input's qform could never hold it
    "qform_only": (_rotated(), (0, 1), (0, 1)),
}


def _write_input(path, vol, affine, codes):
    img = nib.Nifti1Image(vol, None)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine if codes[1] else None, code=codes[1])
    nib.save(img, str(path))


def _check(path, affine, codes):
    """The output at `path` carries `affine` as its sform (always) / qform (code > 0)."""
    h = nib.load(str(path)).header
    assert (int(h["sform_code"]), int(h["qform_code"])) == codes, path
    np.testing.assert_allclose(h.get_sform(), affine, atol=1e-4)
    np.testing.assert_allclose(nib.load(str(path)).affine, affine, atol=1e-4)
    if codes[1]:
        np.testing.assert_allclose(h.get_qform(), affine, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_nifti_keeps_codes_and_never_writes_an_inexact_qform(name, tmp_path):
    affine, codes, expected = CASES[name]
    assert vf.qform_holds(affine) == (name not in ("sheared", "sheared_both"))
    vf.save_nifti(str(tmp_path / "o.nii.gz"), np.zeros((4, 4, 4), np.float32), affine, codes)
    _check(tmp_path / "o.nii.gz", affine, expected)


def test_save_nifti_without_source_codes_and_never_losing_the_affine(tmp_path):
    vf.save_nifti(str(tmp_path / "a.nii.gz"), np.zeros((4, 4, 4)), _rotated(), None)
    _check(tmp_path / "a.nii.gz", _rotated(), (1, 1))
    # A qform-only source whose (resampled) affine a qform cannot hold: the sform takes it.
    vf.save_nifti(str(tmp_path / "b.nii.gz"), np.zeros((4, 4, 4)), SHEARED, (0, 1))
    _check(tmp_path / "b.nii.gz", SHEARED, (1, 0))


def test_extract_reconstruct_decode_write_affines_as_they_came(tiny_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, (affine, codes, _) in CASES.items():
        _write_input(inputs / f"{name}.nii.gz",
                     rng.uniform(0, 255, (16, 16, 8)).astype(np.float32), affine, codes)
    lat, rec, dec = (str(tmp_path / n) for n in ("lat", "rec", "dec"))
    common = [f"--workdir={tiny_run.workdir}", "--step=latest", "--progress=false"]
    assert extract_cli.main(["x", *common, f"--input={inputs}", f"--output={lat}",
                             "--format=both"]) == 0
    assert reconstruct_cli.main(["x", *common, f"--input={inputs}", f"--output={rec}"]) == 0
    assert decode_cli.main(["x", *common, f"--input={lat}", f"--output={dec}"]) == 0
    meta = json.load(open(os.path.join(lat, "latents.json")))
    for name, (affine, codes, expected) in CASES.items():
        _check(os.path.join(rec, f"{name}.nii.gz"), affine, expected)
        _check(os.path.join(dec, f"{name}.nii.gz"), affine, expected)
        lat_expected = (expected[0] or (0 if vf.qform_holds(affine) else expected[1]),
                        expected[1])
        _check(os.path.join(lat, f"{name}.nii.gz"), latent_affine(affine, FACTOR),
               lat_expected)
        entry = meta["files"][name]
        assert (entry["sform_code"], entry["qform_code"]) == codes
    # Without latents.json the codes come from the latent NIfTI's own header.
    alone = str(tmp_path / "alone")
    assert decode_cli.main(["x", *common, f"--input={lat}/sheared.nii.gz",
                            f"--output={alone}", "--latents_json=none"]) == 0
    _check(os.path.join(alone, "sheared.nii.gz"), SHEARED, (2, 0))
