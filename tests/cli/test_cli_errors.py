"""Every command line: a user error is one `error:` line on stderr, exit status 2, no
traceback (unless --verbosity=1), and nothing is created on disk."""

import os
import subprocess
import sys

import pytest

from ldm_jax.cli import common

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_CLIS = {"train": ["train.py"], "plan": ["-m", "ldm_jax", "plan"],
               "preview": ["-m", "ldm_jax", "preview"], "throughput": ["-m", "ldm_jax", "throughput"]}
MODEL_CLIS = ("extract", "reconstruct", "decode")


def _cases(tmp):
    """{(cli, case): (argv after the interpreter, text the error line must contain)}."""
    nifti = ["--config.data.source=nifti", f"--config.data.train_dir={tmp}/nope"]
    missing_input = {
        # (mesh.data=1: the tests simulate 8 devices, which batch 1 cannot fill)
        "train": (nifti + [f"--workdir={tmp}/run", "--config.mesh.data=1"],
                  f"'{tmp}/nope' does not exist"),
        # plan reads no data; its input is the config, here one the discriminator rejects
        "plan": (["--config.data.volume_size=(32,32,16)"], "too small for the discriminator"),
        "preview": (nifti + [f"--output={tmp}/p.png"], f"'{tmp}/nope' does not exist"),
        "throughput": (nifti, f"'{tmp}/nope' does not exist"),
    }
    cases = {}
    for name, prog in CONFIG_CLIS.items():
        cases[name, "config path"] = (prog + ["--config", "configs/balance.py"],
                                      "Did you mean configs/balanced.py?")
        cases[name, "override"] = (prog + ["--config=configs/monai_3d_ldm.py",
                                           "--config.train.num_step=10"],
                                   "Did you mean train.num_steps?")
        args, text = missing_input[name]
        cases[name, "input"] = (prog + ["--config=configs/monai_3d_ldm.py"] + args, text)
    for name in MODEL_CLIS:
        io = [f"--workdir={tmp}/run", f"--output={tmp}/out"]
        prog = ["-m", "ldm_jax", name]
        cases[name, "config path"] = (prog + io + [f"--input={tmp}", "--config=configs/balance.py"],
                                      "Did you mean configs/balanced.py?")
        cases[name, "override"] = (prog + io + [f"--input={tmp}", "--wrkdir=x"],
                                   "Did you mean: workdir?")
        cases[name, "input"] = (prog + io + [f"--input={tmp}/nope"],
                                f"--input '{tmp}/nope' does not exist")
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All commands run at once (each is a short process; most time is interpreter start)."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    procs = {key: (subprocess.Popen([sys.executable, *args], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE), text)
             for key, (args, text) in _cases(tmp).items()}
    out = {}
    for key, (p, text) in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[key] = (p.returncode, stdout, stderr, text)
    return tmp, out


@pytest.mark.parametrize("cli", [*CONFIG_CLIS, *MODEL_CLIS])
@pytest.mark.parametrize("case", ["config path", "override", "input"])
def test_user_error_is_one_line_exit_2(results, cli, case):
    tmp, out = results
    code, stdout, stderr, text = out[cli, case]
    lines = stderr.strip().splitlines()
    assert code == 2, (stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert text in lines[0] and "Traceback" not in stderr
    assert not os.path.exists(os.path.join(tmp, "run"))  # no workdir for a failed check
    assert not os.path.exists(os.path.join(tmp, "out"))


def test_verbosity_1_adds_the_traceback(capsys):
    from ldm_jax.cli import plan

    assert plan.main(["plan", "--config=configs/balanced.py", "--verbosity=1",
                      "--config.data.volume_size=(250,256,64)"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_overrides_are_checked_against_the_config():
    from ldm_jax.config import load_config
    from ldm_jax.errors import ConfigError
    config = load_config(os.path.join(REPO, "configs", "balanced.py"))
    common.check_overrides(config, [("--config.data.volume_size", "data.volume_size")], "c.py")
    with pytest.raises(ConfigError, match=r"no field loss\.kl_wieght\. Did you mean "
                                          r"loss\.kl_weight\?"):
        common.check_overrides(config, [("--config.loss.kl_wieght", "loss.kl_wieght")], "c.py")
    with pytest.raises(ConfigError, match="Fields of data: "):
        common.check_overrides(config, [("--config.data.zzz", "data.zzz")], "c.py")


def test_synthetic_source_with_a_data_folder_is_an_error(tmp_path):
    import numpy as np

    from ldm_jax.autoencoder.config import validate
    from ldm_jax.errors import ConfigError
    from tests.tiny import tiny_config

    np.save(tmp_path / "a.npy", np.zeros((4, 4, 4), np.float32))
    config = tiny_config()
    config.data.train_dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"data.source='synthetic_filaments' reads no files.*"
                                          r"--config.data.source=npy"):
        validate(config)
    config.data.source = "npy"
    validate(config)


def test_flags_out_of_range_and_bad_config_types_are_one_line(tmp_path, capsys):
    """Checked before any work (no model loaded, nothing created): the flag, what it
    takes and its value in one line."""
    from ldm_jax.cli import evaluate, extract, to_points, train
    out = str(tmp_path / "out")
    cases = [
        (extract, ["--workdir=/nowhere", f"--input={tmp_path}", f"--output={out}",
                   "--overlap=1.5"], "--overlap=1.5 must be in [0, 1)"),
        (extract, ["--workdir=/nowhere", f"--input={tmp_path}", f"--output={out}",
                   "--windows_per_batch=-1"], "--windows_per_batch=-1 must be >= 0"),
        (to_points, [f"--input={tmp_path}", f"--output={out}", "--num_points=0"],
         "--num_points=0 must be >= 1"),
        (evaluate, [f"--samples={tmp_path}", f"--reference={tmp_path}", "--range=1,0"],
         "needs finite LO < HI"),
        (evaluate, [f"--samples={tmp_path}", f"--reference={tmp_path}", "--num_slices=0"],
         "--num_slices=0 must be >= 1"),
    ]
    for body, text in (("return None", "returned None (no return statement?)"),
                       ("return {'a': 1}", "returned dict; it must return an "
                        "ml_collections.ConfigDict (wrap it")):
        cfg = tmp_path / f"cfg_{len(cases)}.py"
        cfg.write_text(f"def get_config():\n    {body}\n")
        cases.append((train, [f"--config={cfg}", f"--workdir={out}"], text))
    for module, args, text in cases:
        assert module.main(["x", *args]) == 2, (module.__name__, args)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err
    assert not os.path.exists(out)
