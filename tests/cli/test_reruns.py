"""Interrupted and repeated runs of the commands that write many files: an interrupted
run (SIGINT at a chosen point, or killed between writing an output and renaming it) and
its rerun give the same files, byte for byte, as one uninterrupted run; a rerun with
another checkpoint or other options refuses in one line and changes nothing."""

import json
import os

import numpy as np
import pytest

from ldm_jax import outputs as vf
from ldm_jax.cli import decode as decode_cli
from ldm_jax.cli import extract as extract_cli
from ldm_jax.cli import reconstruct as reconstruct_cli
from ldm_jax.cli import to_points as to_points_cli
from ldm_jax.cli import voxelize as voxelize_cli
from ldm_jax.data.latents import read_latent_folder
from ldm_jax.data.synthetic.filaments import render_filaments
from ldm_jax.errors import DataError


def _files(path):
    """{relative path: bytes} of every file under `path`."""
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def _sigint_after(monkeypatch, k):
    """Ctrl-C right after the k-th output is written: the KeyboardInterrupt that Python's
    SIGINT handler raises, raised there directly (an os.kill'ed SIGINT can land inside a
    garbage-collection finaliser, where Python prints and drops it: a flaky test)."""
    real, count = vf.Outputs.write, [0]

    def write(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt
    monkeypatch.setattr(vf.Outputs, "write", write)


def _killed_before_rename(monkeypatch, k):
    """The k-th output's files are written and recorded, then the run dies before
    renaming them into place (as a SIGKILL there would leave it, less the temporary
    files, which the dying run removes here and a killed one leaves hidden)."""
    real, count = os.replace, [0]

    def replace(src, dst):
        if ".partial" in os.path.basename(src) and not dst.endswith(vf.RECORD):
            count[0] += 1
            if count[0] == k:
                raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(vf.os, "replace", replace)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vols")
    for i in range(3):
        v = render_filaments((16, 16, 8), seed=20 + i, index=0, num_filaments=(3, 3))
        np.save(d / f"v{i}.npy", v.astype(np.float32))
    return str(d)


def _run(module, *args):
    quiet = [] if module is to_points_cli else ["--noprogress"]  # it has no progress bar
    return module.main(["prog", *args, *quiet])


def test_extract_interrupted_then_rerun_equals_one_run(tiny_run, volumes, tmp_path,
                                                        monkeypatch, capsys):
    args = [f"--workdir={tiny_run.workdir}", f"--input={volumes}", "--step=2"]
    once, cut, killed = (str(tmp_path / n) for n in ("once", "cut", "killed"))
    assert _run(extract_cli, *args, f"--output={once}") == 0
    _sigint_after(monkeypatch, 1)
    assert _run(extract_cli, *args, f"--output={cut}") == 130
    monkeypatch.undo()
    # Interrupted: latents.json covers the one latent written and says it is incomplete;
    # stage 2 refuses the folder until the extraction is completed.
    meta = json.load(open(os.path.join(cut, "latents.json")))
    assert meta["complete"] is False and list(meta["files"]) == ["v0"]
    with pytest.raises(DataError, match="was interrupted.*run the same ldm-jax extract"):
        read_latent_folder(cut)
    # (a) rerun with another --step: refused in one line, nothing changed.
    before = _files(cut)
    capsys.readouterr()
    assert _run(extract_cli, *args[:-1], "--step=4", f"--output={cut}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.step 2 there, 4 here" in err
    assert _files(cut) == before
    assert _run(extract_cli, *args, f"--output={cut}") == 0
    assert "Reusing 1 complete latent(s) made the same way (v0); making the 2 missing." \
        in capsys.readouterr().out
    assert _files(cut) == _files(once)
    # Killed between writing the second latent (and its record) and renaming it; a
    # killed run's hidden temporary file and torn last record line are left behind.
    _killed_before_rename(monkeypatch, 2)
    assert _run(extract_cli, *args, f"--output={killed}") == 130
    monkeypatch.undo()
    assert sorted(os.listdir(killed)) == ["latents.json", "provenance.jsonl", "v0.npy"]
    with open(os.path.join(killed, ".v1.0badf00d.partial.npy"), "wb") as f:
        f.write(b"\x93NUMPY truncated")
    with open(os.path.join(killed, vf.RECORD), "a") as f:
        f.write('{"name": "v2", "fil')
    assert _run(extract_cli, *args, f"--output={killed}") == 0
    got, want = _files(killed), _files(once)
    assert got.pop(".v1.0badf00d.partial.npy")  # left as it was, never taken as output
    lines = got.pop(vf.RECORD).decode().splitlines()
    want.pop(vf.RECORD)
    assert got == want  # the latents and latents.json of one run
    assert '{"name": "v2", "fil' in lines  # the torn line stays, ignored
    names = [json.loads(line)["name"] for line in lines if line.endswith("}")]
    assert names == ["v0", "v1", "v1", "v2"]  # v1's unrenamed write, then its rewrite


def test_reconstruct_decode_to_points_interrupted_then_rerun_equal_one_run(
        tiny_run, volumes, tmp_path, monkeypatch, capsys):
    """(b) reconstruct interrupted after 1 of 3: the rerun scores every file (metrics.json
    covers all three, the same bytes as one run); decode and to_points the same."""
    model = [f"--workdir={tiny_run.workdir}", "--step=2"]
    latents = str(tmp_path / "latents")
    assert _run(extract_cli, *model, f"--input={volumes}", f"--output={latents}") == 0
    cases = [(reconstruct_cli, model + [f"--input={volumes}"]),
             (decode_cli, model + [f"--input={latents}"]),
             (to_points_cli, [f"--input={volumes}", "--num_points=50", "--voxel_size=20"])]
    for module, args in cases:
        once, cut = str(tmp_path / f"{module.__name__}_once"), str(tmp_path / module.__name__)
        assert _run(module, *args, f"--output={once}") == 0
        _sigint_after(monkeypatch, 1)
        assert _run(module, *args, f"--output={cut}") == 130, module.__name__
        monkeypatch.undo()
        assert _run(module, *args, f"--output={cut}") == 0
        assert _files(cut) == _files(once), module.__name__
    metrics = json.load(open(tmp_path / "ldm_jax.cli.reconstruct" / "metrics.json"))
    assert sorted(metrics["files"]) == ["v0", "v1", "v2"] and "psnr" in metrics["mean"]
    # The same command with another checkpoint: refused, naming it.
    capsys.readouterr()
    assert _run(reconstruct_cli, f"--workdir={tiny_run.workdir}", "--step=4",
                f"--input={volumes}", f"--output={tmp_path / 'ldm_jax.cli.reconstruct'}") == 2
    assert "checkpoint.step 2 there, 4 here" in capsys.readouterr().err


def test_voxelize_interrupted_then_rerun_lists_every_volume(tmp_path, monkeypatch):
    """(c) the manifest of an interrupted-then-completed voxelisation covers every
    volume, the same bytes as one run."""
    clouds = str(tmp_path / "clouds")
    assert _run(voxelize_cli, "--demo_clouds=3", f"--output={clouds}",
                "--demo_shape=16,16,8") == 0
    once, cut = str(tmp_path / "once"), str(tmp_path / "cut")
    assert _run(voxelize_cli, f"--input={clouds}", f"--output={once}") == 0
    _sigint_after(monkeypatch, 1)
    assert _run(voxelize_cli, f"--input={clouds}", f"--output={cut}") == 130
    monkeypatch.undo()
    assert sorted(json.load(open(os.path.join(cut, "voxelize.json")))["clouds"]) == \
        ["smlm_000"]
    assert _run(voxelize_cli, f"--input={clouds}", f"--output={cut}") == 0
    assert _files(cut) == _files(once)
    assert len(json.load(open(os.path.join(cut, "voxelize.json")))["clouds"]) == 3
