"""Reading an extracted latents folder and its class labels: one-line errors for labels
that are not class numbers and for folders whose extraction was cut short."""

import json

import numpy as np
import pytest

from ldm_jax.data.latents import read_labels, read_latent_folder
from ldm_jax.errors import DataError
from ldm_jax.outputs import RECORD


def test_labels_must_be_class_numbers(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("name,label\na,1\nb, 0\n")
    np.testing.assert_array_equal(read_labels(str(csv), ["a", "b"], 2), [1, 0])
    csv.write_text("name,label\na,1\nb,cat\n")
    with pytest.raises(DataError) as err:
        read_labels(str(csv), ["a", "b"], 2)
    assert "\n" not in str(err.value)
    assert "the label of 'b' is 'cat', not a class number; labels are integers in [0, 2)" \
        in str(err.value)
    csv.write_text("name,label\na,1\nb,2\n")
    with pytest.raises(DataError, match=r"label 2 is outside \[0, 2\)"):
        read_labels(str(csv), ["a", "b"], 2)


def test_a_folder_with_latents_its_summary_does_not_list_is_refused(tmp_path):
    """A run killed before it rewrote latents.json: provenance.jsonl records a latent
    latents.json lacks."""
    for name in ("v0", "v1"):
        np.save(tmp_path / f"{name}.npy", np.zeros((2, 2, 2, 1), np.float32))
    meta = {"checkpoint": {"config_hash": "h"}, "complete": True,
            "files": {"v0": {"outputs": ["v0.npy"]}}}
    (tmp_path / "latents.json").write_text(json.dumps(meta))
    names, latents, _ = read_latent_folder(str(tmp_path))  # no record: as listed
    assert names == ["v0"]
    (tmp_path / RECORD).write_text("".join(
        json.dumps({"name": n, "made_by": {"command": "extract"}, "files": {}}) + "\n"
        for n in ("v0", "v1")))
    with pytest.raises(DataError, match=r"holds 1 latent\(s\) that its latents.json does not "
                       r"list \(e.g. v1\): an extraction into it was interrupted; run the "
                       r"same ldm-jax extract command again"):
        read_latent_folder(str(tmp_path))
