"""Every error message suggests only options its command has, and following them works.

Each case triggers a message through a command (extract / reconstruct via their `main`,
train.py's data errors through the loader inside `options.command(options.TRAIN)`),
checks every `--flag` it names against that command's flags (and every
`--config.a.b` against the config), then runs the suggested command line.
"""

import ast
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from ldm_jax import data, options
from ldm_jax.cli import extract as extract_cli
from ldm_jax.cli import reconstruct as reconstruct_cli
from tests.data.test_data import make_config

_FLAG = re.compile(r"(?<![\w.-])--([A-Za-z_][\w.]*[\w])(?:=([^\s,;)]*[^\s,;).]))?")
_BARE_FIELD = re.compile(r"(?<![\w.-])(?:data|autoencoder|train|loss)\.[a-z_]+=")


def suggested(text):
    """[(flag name, value or '')] of every --flag in `text`."""
    return _FLAG.findall(text)


def check_suggestions(text, flag_names=(), config=None):
    """Asserts every --flag of `text` exists: --config.a.b in `config` (train.py), others
    in `flag_names`; without `config`, no config field may be suggested at all. Returns
    the suggestions."""
    found = suggested(text)
    for name, _ in found:
        if name.startswith("config."):
            assert config is not None, f"--{name} suggested where there is no --config: {text}"
            node = config
            for part in name.split(".")[1:]:
                assert part in node, f"--{name}: no config field {part!r}: {text}"
                node = node[part]
        else:
            assert name in flag_names, f"--{name} is not a flag of this command: {text}"
    if config is None:
        assert not _BARE_FIELD.search(text), f"suggests a config field: {text}"
    return found


def _flag_names(module):
    fv = flags.FlagValues()
    module._define(fv)
    return set(fv)


def _run(module, capsys, *args):
    capsys.readouterr()
    rc = module.main(["prog", *args, "--progress=false"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """One 4D NIfTI (16, 16, 8, 3): frame t holds 60 * (t + 1)."""
    d = tmp_path_factory.mktemp("frames")
    vol = np.stack([np.full((16, 16, 8), 60.0 * (t + 1), np.float32) for t in range(3)], -1)
    vol[4:8, 4:8, 2:6] += 50
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(d / "four.nii.gz"))
    return str(d)


@pytest.mark.parametrize("module", [extract_cli, reconstruct_cli])
def test_4d_hint_is_a_flag_of_the_command_and_works(module, tiny_run, frames_dir,
                                                    tmp_path, capsys):
    names = _flag_names(module)
    common = [f"--workdir={tiny_run.workdir}", f"--input={frames_dir}", "--step=latest"]
    rc, err = _run(module, capsys, *common, f"--output={tmp_path / 'a'}")
    assert rc == 2 and err.startswith("error: ")
    found = dict(check_suggestions(err, names))
    assert "frame" in found and "--frame=all" in err
    # Follow the hints: one frame, then every frame as its own volume.
    rc, err = _run(module, capsys, *common, f"--output={tmp_path / 'b'}", "--frame=1")
    assert rc == 0, err
    rc, err = _run(module, capsys, *common, f"--output={tmp_path / 'c'}", "--frame=all")
    assert rc == 0, err
    suffix = ".npy" if module is extract_cli else ".nii.gz"
    produced = sorted(f for f in os.listdir(tmp_path / "c") if f.endswith(suffix))
    assert produced == [f"four_t000{t}{suffix}" for t in range(3)]
    if module is extract_cli:  # frame 1 alone == frame 1 of --frame=all
        np.testing.assert_array_equal(np.load(tmp_path / "b" / "four.npy"),
                                      np.load(tmp_path / "c" / "four_t0001.npy"))
        meta = json.load(open(tmp_path / "c" / "latents.json"))
        assert [meta["files"][f"four_t000{t}"]["frame"] for t in range(3)] == [0, 1, 2]
        assert meta["encoding"]["frame"] == "all"


def _inputs(tmp_path):
    """name -> (input argument, extra flags) of inputs that each trigger one message."""
    cases = {}

    def folder(name):
        d = tmp_path / name
        d.mkdir()
        return d

    d = folder("broken")
    np.save(d / "good.npy", np.full((16, 16, 8), 100.0, np.float32))
    (d / "broken.nii.gz").write_bytes(b"not a nifti")
    cases["unreadable"] = (str(d), [])
    d = folder("nan")
    vol = np.full((16, 16, 8), 100.0, np.float32)
    vol[0, 0, 0] = np.nan
    np.save(d / "nan.npy", vol)
    cases["non-finite"] = (str(d), [])
    d = folder("complex")
    np.save(d / "c.npy", np.ones((16, 16, 8), np.complex64))
    cases["complex"] = (str(d), [])
    d = folder("text")
    (d / "notes.txt").write_text("x")
    cases["unsupported file"] = (str(d / "notes.txt"), [])
    cases["empty dir"] = (str(d), [])
    cases["missing dir"] = (str(tmp_path / "missing"), [])
    cases["glob"] = (str(tmp_path / "*.nii.gz"), [])
    d = folder("frames")
    np.save(d / "four.npy", np.ones((16, 16, 8, 3), np.float32))
    cases["frame out of range"] = (str(d), ["--frame=7"])
    cases["frame not a number"] = (str(d), ["--frame=last"])
    return cases


def test_extract_messages_suggest_only_extract_flags(tiny_run, tmp_path, capsys):
    names = _flag_names(extract_cli)
    for case, (arg, extra) in _inputs(tmp_path).items():
        rc, err = _run(extract_cli, capsys, f"--workdir={tiny_run.workdir}", f"--input={arg}",
                       f"--output={tmp_path / 'out' / case.replace(' ', '_')}",
                       "--step=latest", *extra)
        assert rc == 2 and err.startswith("error: "), (case, err)
        found = dict(check_suggestions(err, names))
        if case in ("unreadable", "complex", "unsupported file", "non-finite"):
            assert "skip_bad_files" in found, (case, err)
            rc, err = _run(extract_cli, capsys, f"--workdir={tiny_run.workdir}", f"--input={arg}",
                           f"--output={tmp_path / 'skip' / case.replace(' ', '_')}",
                           "--step=latest", "--skip_bad_files", *extra)
            # Skipping leaves nothing to encode when the only input is the bad one.
            assert rc == (0 if case == "unreadable" else 2), (case, err)
        if case in ("missing dir", "glob"):
            assert found.get("input") == "DIR", (case, err)
        if case.startswith("frame"):
            assert "frame" in found, (case, err)


def _apply(config, suggestion):
    """Sets config field a.b from '--config.a.b=VALUE' (metavars K -> 1)."""
    name, value = suggestion
    parts = name.split(".")[1:]
    node = config
    for p in parts[:-1]:
        node = node[p]
    value = {"K": "1", "DIR": None}.get(value, value)
    if value is None:
        return False
    try:  # as ml_collections' config flags parse an override: a literal, else a string
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    node[parts[-1]] = value
    return True


def _first_batch(config):
    it = iter(data.make_train_loader(config, batch_size=1, seed=0, process_index=0,
                                     process_count=1))
    try:
        return next(it)
    finally:
        it.close()


def test_train_data_messages_suggest_config_overrides_that_work(tmp_path):
    cases = {}
    d4 = tmp_path / "four"
    d4.mkdir()
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16, 3), np.float32), np.eye(4)),
             str(d4 / "a.nii.gz"))
    cases["4D"] = make_config(source="nifti", train_dir=str(d4), val_fraction=0.0)
    db = tmp_path / "bad"
    db.mkdir()
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16), np.float32), np.eye(4)), str(db / "a.nii.gz"))
    (db / "b.nii.gz").write_bytes(b"broken")
    cases["unreadable"] = make_config(source="nifti", train_dir=str(db), val_fraction=0.0)
    dn = tmp_path / "nan"
    dn.mkdir()
    vol = np.ones((32, 32, 16), np.float32)
    vol[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(dn / "a.nii.gz"))
    cases["non-finite"] = make_config(source="nifti", train_dir=str(dn), val_fraction=0.0)
    de = tmp_path / "empty"
    (de / "sub").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((32, 32, 16), np.float32), np.eye(4)),
             str(de / "sub" / "a.nii.gz"))
    cases["subdirectory"] = make_config(source="nifti", train_dir=str(de), val_fraction=0.0)
    cases["missing"] = make_config(source="nifti", train_dir=str(tmp_path / "missing"))
    with options.command(options.TRAIN):
        for case, config in cases.items():
            with pytest.raises(data.DataError) as err:
                _first_batch(config)
            found = check_suggestions(str(err.value), config=config)
            config_fixes = [f for f in found if f[0].startswith("config.")]
            assert config_fixes, (case, str(err.value))
            # The first suggestion that names a value fixes it.
            assert any(_apply(config, f) for f in config_fixes), (case, str(err.value))
            batch = _first_batch(config)
            assert batch["image"].shape[0] == 1, case
            assert batch["name"].shape == (1,)  # batches carry their file names


def test_library_use_spells_config_fields():
    from ldm_jax.data import io
    v = io.VolumeInfo("x.nii", (4, 4, 4, 3), "float32", (1.0, 1.0, 1.0), np.eye(4))
    with pytest.raises(data.VolumeShapeError) as err:
        io.channel_layout(v, None, 1)
    assert "data.frame=K" in str(err.value) and "--" not in str(err.value)
    with options.command(options.TRAIN), pytest.raises(data.VolumeShapeError) as err:
        io.channel_layout(v, None, 1)
    assert "--config.data.frame=K" in str(err.value)
    assert "--frame=all" not in str(err.value)  # train.py has no such flag
