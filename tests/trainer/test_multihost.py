"""Multi-host for real: `train.py --multihost` as 2 processes x 2 CPU devices, joined by
jax.distributed on 127.0.0.1 (gloo collectives), against 1 process x 4 devices.

Stage 1 trains 2 steps, then resumes for 2 more (coordinator given by flags, then by
JAX_* variables), and must match 4 steps in one process: losses, validation metrics and
final params (relative 1e-5), every global batch split into disjoint halves, one
metrics.jsonl and one set of images (process 0's), a checkpoint that one process restores
and extracts latents from. Stage 2 trains 4 steps on those latents the same way. Three
launches of two processes: about 2 minutes of wall time on 2 cores beside another test
worker.
"""

import itertools
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ldm_jax import checkpoint as ckpt

pytestmark = pytest.mark.multihost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "tests", "multihost_config.py")
LAUNCH_TIMEOUT_S = 600  # per launch of both processes; both are killed after it
_launches = itertools.count()
SCRUB = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices):
    """This environment with `num_devices` CPU devices, the repository importable and no
    cluster variables (the launches name their coordinator themselves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB)}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    env["JAX_PLATFORMS"] = "cpu"
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla + [f"--xla_force_host_platform_device_count={num_devices}"])
    return env


def _run(cmds, env, logs, timeout_s=LAUNCH_TIMEOUT_S):
    """Runs the commands at once; returns (exit codes, outputs). When one fails or the
    time is up, the others are killed."""
    procs = []
    try:
        for cmd, e, log in zip(cmds, env, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=f,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        with open(log) as f:
            outputs.append(f.read())
    return [p.returncode for p in procs], outputs


def launch(workdir, config, *flags, via_env=False, num_processes=2):
    """`train.py --multihost` as `num_processes` processes of 2 CPU devices on 127.0.0.1;
    the coordinator given by flags, or by JAX_* variables with `via_env`. Returns each
    process's output; fails (with their ends) unless all exit 0."""
    address = f"127.0.0.1:{_free_port()}"
    cmds, envs = [], []
    for i in range(num_processes):
        cmd = [sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
               "--multihost", "--noprogress", "--initialization_timeout=120", *flags]
        env = _env(2)
        if via_env:
            env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
                       JAX_PROCESS_ID=str(i))
        else:
            cmd += [f"--coordinator_address={address}", f"--num_processes={num_processes}",
                    f"--process_id={i}"]
        cmds.append(cmd)
        envs.append(env)
    run = next(_launches)
    logs = [f"{workdir}.launch{run}.process_{i}.log" for i in range(num_processes)]
    codes, outputs = _run(cmds, envs, logs)
    assert codes == [0] * num_processes, "\n".join(
        f"--- process {i} exited {c}:\n{out[-3000:]}" for i, (c, out) in
        enumerate(zip(codes, outputs)))
    return outputs


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _values(rows, skip=("steps_per_s",)):
    """{(step, metric): value} - and no metric written twice for a step."""
    out = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and k not in skip:
                assert (r["step"], k) not in out, f"{k} at step {r['step']} written twice"
                out[r["step"], k] = v
    return out


def _batches(record_dir, process):
    with open(os.path.join(record_dir, f"process_{process}.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_halves(multi_dir, single_dir, steps):
    """Process i read rows [2i, 2i + 2) of every global batch of the one-process run."""
    halves = [_batches(multi_dir, p) for p in (0, 1)]
    whole = _batches(single_dir, 0)
    assert len(whole) == steps and all(len(h) == steps for h in halves)
    for k in range(steps):
        assert halves[0][k] + halves[1][k] == whole[k]
        assert not set(halves[0][k]) & set(halves[1][k])


def check_process_0_spoke(outputs, resumed):
    """The plan, mesh and progress lines come from process 0 only."""
    assert "Mesh: data=4 x spatial=1 over 4 of 4 cpu device(s), 2 process(es)" in outputs[0]
    assert ("Resuming from the checkpoint at step 2" in outputs[0]) == resumed
    for line in ("Mesh:", "Resuming", "step ", "parameters"):
        assert line not in outputs[1], outputs[1][-2000:]


def check_outputs(workdir, val_key, image_steps=(2, 4)):
    """One metrics.jsonl (each metric once per step: 4 steps, evaluations at 2 and 4)
    and the images of the evaluations: nothing written twice. Returns the values."""
    values = _values(_rows(workdir))
    assert sorted(s for s, k in values if k == "loss") == [1, 2, 3, 4]
    assert sorted(s for s, k in values if k == val_key) == [2, 4]
    assert all(np.isfinite(v) for v in values.values())
    assert sorted(os.listdir(os.path.join(workdir, "images"))) == [
        f"step_{s}.png" for s in image_steps]
    # One lock (process 0's), released when the run ended; nothing set aside.
    assert not os.path.exists(os.path.join(workdir, "train.lock"))
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "damaged" in d]
    return values


def assert_close_values(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-6, err_msg=str(key))


def assert_close_trees(a, b, rtol=1e-5, atol=1e-5):
    """Params after Adam steps: a gradient near 0 summed in another order (gloo across
    processes vs. one process) can move its weight by up to the learning rate (1e-3)
    times a noticeable fraction, so the absolute tolerance is 1% of it (a run once
    differed by 1.6e-6 at a weight of 0.0176)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def one_process(config, workdir, record_dir, monkeypatch):
    """Stage 1 in this process (1 process, 4 of its devices), batches recorded."""
    import ldm_jax.data
    from ldm_jax.cli.train import train_and_evaluate
    from tests.multihost_config import recording
    monkeypatch.setattr(ldm_jax.data, "make_train_loader",
                        recording(ldm_jax.data.make_train_loader, str(record_dir)))
    os.makedirs(record_dir, exist_ok=True)
    config.mesh.data, config.mesh.spatial = 4, 1
    return train_and_evaluate(config, str(workdir), progress=False)


def check_stage1(tmp_path, monkeypatch):
    """Stage 1 on 2 processes: 2 steps (coordinator by flags), then resumed to 4 steps
    (coordinator by JAX_* variables), against 4 steps in this process. Returns the
    2-process workdir."""
    from ldm_jax.cli.train import train_and_evaluate
    from ldm_jax.errors import ConfigError
    from tests.multihost_config import autoencoder_config

    wd, rec = str(tmp_path / "ae"), str(tmp_path / "ae_batches")
    config = f"{CONFIG}:autoencoder,{rec}"
    check_process_0_spoke(launch(wd, config, "--config.train.num_steps=2"), resumed=False)
    check_process_0_spoke(launch(wd, config, via_env=True), resumed=True)

    single = one_process(autoencoder_config(), tmp_path / "single", tmp_path / "rec",
                         monkeypatch)
    check_halves(rec, tmp_path / "rec", steps=4)
    multi = check_outputs(wd, "val_l1")
    assert_close_values(multi, check_outputs(tmp_path / "single", "val_l1"))
    events = os.listdir(os.path.join(wd, "tb"))
    assert len(events) == 2, events  # one per run: process 0's

    # The checkpoint of 2 processes restores in this one (on one device).
    manager = ckpt.make_manager(wd, read_only=True)
    assert sorted(manager.all_steps()) == [2, 4]
    for key in ("g_params", "d_params"):
        assert_close_trees(ckpt.restore_state_item(manager, 4, key), getattr(single, key))
    manager.close()

    # Resuming it needs 2 processes again: one says so, before touching the workdir.
    config = autoencoder_config()
    config.mesh.data, config.train.num_steps = 4, 6
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\); this run has 1"):
        train_and_evaluate(config, wd, progress=False)
    return wd


def check_stage2(tmp_path, ae):
    """Latents extracted (in this process) from the 2-process stage-1 checkpoint `ae`,
    then stage 2 on 2 processes: 4 steps."""
    from ldm_jax.cli.train import make_task
    from tests.multihost_config import diffusion_config, fingerprints
    from tests.tiny import extract_filament_latents

    lat = extract_filament_latents(ae, str(tmp_path), 6)

    wd, rec = str(tmp_path / "ldm"), str(tmp_path / "ldm_batches")
    config = f"{CONFIG}:diffusion,{rec},{ae},{lat}"
    # Samples (process 0 draws them while process 1 waits) at the end. One launch: resuming
    # is stage 1's code path (the same checkpoint manager and grain TrainLoader).
    check_process_0_spoke(launch(wd, config), resumed=False)

    check_outputs(wd, "val_loss")
    # The global batches are those of one process with the whole batch, split in halves.
    it = iter(make_task(diffusion_config(ae, lat)).train_loader(4))
    os.makedirs(tmp_path / "one")
    with open(tmp_path / "one" / "process_0.jsonl", "w") as f:
        f.writelines(json.dumps(fingerprints(next(it))) + "\n" for _ in range(4))
    it.close()
    check_halves(rec, tmp_path / "one", steps=4)
    manager = ckpt.make_manager(wd, read_only=True, best_metric="val_loss")
    ema = ckpt.restore_state_item(manager, 4, "ema_params")  # in this one process
    manager.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(ema))


@pytest.mark.tap_conv  # the one-process run must trace what train.py's processes trace
def test_two_processes_train_resume_and_match_one(tmp_path, monkeypatch):
    # One test, not two sharing a fixture: under pytest -n 2 each worker would launch
    # stage 1 again.
    ae = check_stage1(tmp_path, monkeypatch)
    check_stage2(tmp_path, ae)


def _train_py(tmp_path, *flags, timeout_s=120):
    """(exit code, output) of one `train.py --multihost` process with 1 CPU device."""
    cmd = [sys.executable, "train.py", f"--config={CONFIG}:autoencoder,{tmp_path / 'rec'}",
           f"--workdir={tmp_path / 'wd'}", "--multihost", "--noprogress", *flags]
    codes, outputs = _run([cmd], [_env(1)], [str(tmp_path / "log")], timeout_s)
    return codes[0], outputs[0]


def test_multihost_without_a_coordinator_says_what_to_set(tmp_path):
    code, out = _train_py(tmp_path)
    assert code == 2
    assert "error: --multihost found no usable cluster setup" in out
    assert "--coordinator_address=HOST:PORT" in out and "JAX_NUM_PROCESSES" in out
    assert "Traceback" not in out


def test_unreachable_coordinator_times_out_with_a_message(tmp_path):
    start = time.monotonic()
    code, out = _train_py(tmp_path, f"--coordinator_address=127.0.0.1:{_free_port()}",
                          "--num_processes=2", "--process_id=1", "--initialization_timeout=5")
    assert code == 2, out[-2000:]
    assert "error: --multihost: not all processes reached the coordinator 127.0.0.1:" in out
    assert "within --initialization_timeout=5 s" in out and "process 1 of 2" in out
    assert "--coordinator_address=HOST:PORT" in out and "Traceback" not in out
    assert time.monotonic() - start < 100
