"""The workdir of a run: one writer at a time (a second process refused, a stale lock of a
dead process taken over, process 0 only on multi-host); a full disk, a read-only file
system and a file in place of the workdir each end in one line, the last good checkpoint
untouched. Runs share the session's `tiny_run` and its compiled step."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import orbax.checkpoint as ocp
import pytest

from ldm_jax import checkpoint as ckpt
from ldm_jax import lock, storage
from ldm_jax.errors import StorageError, WorkdirInUseError
from ldm_jax.trainer import loop as trainer
from ldm_jax.trainer import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy(tiny_run, tmp_path, drop=()):
    wd = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, wd)
    for step in drop:
        shutil.rmtree(wd / "checkpoints" / str(step))
    return str(wd)


def _files(path):
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(path) for f in files}


def _tiny_config_file(tmp_path):
    """A config file of tests/tiny.py's config (4 steps, checkpoints at 2 and 4)."""
    path = tmp_path / "tiny_config.py"
    path.write_text("from tests.tiny import tiny_config\n\n\ndef get_config():\n"
                    "    return tiny_config()\n")
    return str(path)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    return env


def test_a_second_writer_is_refused_naming_host_and_pid(tiny_run, tmp_path, capsys):
    """Another live process holds the workdir: the run stops in one line naming that
    process, before anything is restored or written."""
    from ldm_jax.cli import train as train_cli
    wd = _copy(tiny_run, tmp_path)
    before = _files(os.path.join(wd, "checkpoints"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ldm_jax import lock\n"
         "held = lock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)", wd],
        stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = train_cli.main(["train.py", f"--config={_tiny_config_file(tmp_path)}",
                               f"--workdir={wd}", "--noprogress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert err.startswith(f"error: {wd} is in use by process {holder.pid} on host "
                              f"{socket.gethostname()}") and "Wait for that run" in err
    finally:
        holder.kill()
        holder.wait()
    assert _files(os.path.join(wd, "checkpoints")) == before
    # The holder died without releasing: its lock is stale and taken over, with a line.
    capsys.readouterr()
    trainer.train(tiny_run.task, wd, progress=False)  # finished: nothing to train
    out = capsys.readouterr().out
    assert f"note: took over {os.path.join(wd, lock.LOCK_NAME)} from process {holder.pid}" \
        in out and "no longer running" in out and "is finished" in out
    assert not os.path.exists(os.path.join(wd, lock.LOCK_NAME))  # released at the end


def test_a_lock_of_another_host_is_refused_with_the_file_to_remove(tiny_run, tmp_path):
    wd = _copy(tiny_run, tmp_path)
    path = os.path.join(wd, lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"host": "elsewhere-node", "pid": 4242, "started": "then"}, f)
    with pytest.raises(WorkdirInUseError, match=r"locked by process 4242 on host "
                       r"elsewhere-node .* If that run is over, remove .*train\.lock"):
        trainer.train(tiny_run.task, wd, progress=False)
    os.remove(path)  # as the message says: the run then goes ahead
    trainer.train(tiny_run.task, wd, progress=False)


def test_only_process_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lib.jax, "process_index", lambda: 1)
    assert workdir_lib.open_workdir(str(tmp_path / "w")) is None
    assert not os.path.exists(tmp_path / "w" / lock.LOCK_NAME)
    monkeypatch.undo()
    held = workdir_lib.open_workdir(str(tmp_path / "w"))
    info = json.load(open(tmp_path / "w" / lock.LOCK_NAME))
    assert (info["host"], info["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(WorkdirInUseError, match=f"in use by process {os.getpid()}"):
        workdir_lib.open_workdir(str(tmp_path / "w"))
    held.release()
    assert not os.path.exists(tmp_path / "w" / lock.LOCK_NAME)


def test_a_file_in_place_of_the_workdir_is_one_line(tmp_path, capsys):
    from ldm_jax.cli import train as train_cli
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    code = train_cli.main(["train.py", f"--config={_tiny_config_file(tmp_path)}",
                           f"--workdir={blocker}/x", "--noprogress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"--workdir {blocker}/x: {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(
        tiny_run, tmp_path, monkeypatch):
    """Two faults injected at the step-4 save of a run resumed from step 2: free space
    below the last checkpoint's size (found before orbax writes), and orbax's own
    failure mid-write (as tensorstore reports ENOSPC). Step 2 stays as it was (a rerun
    resumes from it exactly, as tests/trainer/test_resume.py shows for step 2)."""
    wd = _copy(tiny_run, tmp_path, drop=(4,))
    step2 = _files(os.path.join(wd, "checkpoints", "2"))
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(StorageError) as err:
        trainer.train(tiny_run.task, wd, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no space left for the checkpoint of step 4")
    assert "1000 bytes are free in" in msg and "The checkpoint at step 2 is untouched" in msg
    monkeypatch.undo()

    def full(self, *args, **kwargs):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write '
            "80265 bytes to file 16: No space left on device [os_error_code='28']")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(StorageError) as err:
        trainer.train(tiny_run.task, wd, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "no space left on the device while writing the checkpoint " \
        "of step 4" in msg and " free in " in msg and "step 2 is untouched" in msg
    monkeypatch.undo()
    assert _files(os.path.join(wd, "checkpoints", "2")) == step2
    assert sorted(ckpt.step_folders(wd)) == [2]
    assert not os.path.exists(os.path.join(wd, lock.LOCK_NAME))  # released on the error


def test_storage_errors_name_path_and_cause(tmp_path):
    err = storage.storage_error(OSError(errno.EROFS, "Read-only file system"),
                                str(tmp_path / "w" / "f"), "writing f", "Fix it.")
    assert str(err) == f"the file system is read-only while writing f: {tmp_path} cannot be " \
        "written. Fix it."
    assert storage.storage_error(ValueError("shape mismatch"), "x", "y", "z") is None
    assert storage.errno_of(ValueError("... [os_error_code='28']")) == errno.ENOSPC


def _unshare_works():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs "
                            "/mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces to mount a tmpfs")
def test_real_full_and_read_only_file_systems(tmp_path):
    """train.py's main on a read-only file system and on a 1.4 MB one (room for one
    checkpoint), mounted in a user namespace (one process for both): one line each, exit
    2, the first checkpoint intact."""
    config = _tiny_config_file(tmp_path)
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import contextlib, sys
        from ldm_jax.cli import train
        for name, wd in (("ro", "{ro}/w"), ("full", "{full}/w")):
            with open(f"{tmp_path}/{{name}}.err", "w") as err, \\
                    open(f"{tmp_path}/{{name}}.out", "w") as out, \\
                    contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = train.main(["train.py", "--config={config}", f"--workdir={{wd}}",
                                   "--noprogress"])
            open(f"{tmp_path}/{{name}}.rc", "w").write(str(code))
    """))
    script = (f"mount -t tmpfs -o size=1400k tmpfs {full} && "
              f"mount -t tmpfs -o size=64k,ro tmpfs {ro} && cd {REPO} && "
              f"{sys.executable} {driver} && ls {full}/w/checkpoints > {tmp_path}/full.ls")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=600,
                   check=True)
    def read(name):
        return (tmp_path / name).read_text().strip()
    assert read("full.rc") == "2" and read("ro.rc") == "2", (read("full.err"), read("ro.err"))
    for name, text in (("full.err", "no space left"), ("ro.err", "read-only")):
        lines = read(name).splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines
    assert "Traceback" not in read("full.out") + read("ro.out")
    assert read("full.ls").split() == ["2"]  # the step-4 save never started
