"""`ldm-jax <command>` / `python -m ldm_jax <command>`: the command list, and every
command's flags in one style (snake_case, --output for outputs)."""

import re
import subprocess
import sys

import pytest

from ldm_jax.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["ldm-jax", "--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s+\S", out, re.M), name


def test_python_dash_m_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ldm_jax", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert main(["ldm-jax", "smaple"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Did you mean sample?" in err and "\n" not in err


def test_no_command_prints_usage_and_exit_2(capsys):
    assert main(["ldm-jax"]) == 2
    assert "usage: ldm-jax <command>" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_is_snake_case(name, capsys):
    assert main(["ldm-jax", name, "--help"]) == 0
    out = capsys.readouterr().out
    flags = set(re.findall(r"^\s+--(?:\[no\])?([\w-]+)", out, re.M))
    assert flags, out
    assert [f for f in flags if "-" in f] == []
    assert "out" not in flags  # outputs are --output everywhere


def test_dashes_are_still_accepted(tmp_path, capsys):
    # --num-samples is read as --num_samples: the error is about the missing workdir.
    assert main(["ldm-jax", "sample", "--num-samples=2", f"--output={tmp_path}/s"]) == 2
    assert "--workdir" in capsys.readouterr().err
