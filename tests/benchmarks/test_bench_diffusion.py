"""The stage-2 bench at tiny sizes: compile-only and real-steps rows, the CLI's JSON and
table, and MONAI's side. No timing is asserted, only that numbers exist and are consistent."""

import json

import jax
import numpy as np
import pytest

from benchmarks import bench_diffusion
from benchmarks.bench_diffusion_monai import monai_unet_kwargs, unsupported_reasons
from tests.diffusion.test_diffusion import tiny_diffusion_config

LATENT = (8, 8, 4, 2)


def _tiny(batch=1, levels=1, **unet):
    c = tiny_diffusion_config("unused", levels=levels)  # shapes only: no autoencoder loaded
    c.latents.latent_shape = LATENT
    c.unet.update(unet)
    return bench_diffusion.bench_config(c, batch=batch)


def _param_count(config):
    from ldm_jax.diffusion.task import DiffusionTask
    shapes = jax.eval_shape(DiffusionTask(config, autoencoder=None).init_state,
                            jax.random.PRNGKey(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.params)))


def test_compile_only_row_has_memory_and_flops():
    config = _tiny(batch=2)
    row = bench_diffusion.measure(config, name="tiny", sample_steps=2, compile_only=True)
    assert row["latent_shape"] == list(LATENT) and row["padded_shape"] == list(LATENT[:3])
    assert row["batch"] == 2 and row["dtype"] == "float32"
    assert row["params"] == _param_count(config)
    mem = row["xla_memory"]
    # The state (params, EMA, two Adam moments) is an argument of the step and donated.
    state_bytes = 4 * 4 * row["params"]
    assert mem["argument"] >= state_bytes and mem["alias"] >= state_bytes
    assert row["peak_memory_bytes"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    assert row["flops"] > 0 and row["compile_s"] > 0
    # Sampling holds the params (no optimiser state): less than the training step.
    assert 4 * row["params"] <= row["sample_peak_memory_bytes"] < row["peak_memory_bytes"]
    assert row["step_s"] is None and row["sample_s"] is None


def test_cli_real_steps_row_json_and_table(tmp_path, capsys):
    path = tmp_path / "tiny_stage2.py"
    path.write_text("from tests.diffusion.test_diffusion import tiny_diffusion_config\n\n"
                    "def get_config():\n"
                    "    c = tiny_diffusion_config('unused')\n"
                    f"    c.latents.latent_shape = {LATENT}\n"
                    "    return c\n")
    out = tmp_path / "rows.json"
    # The compile-only test's config and batch: its compiled programs are cache hits here.
    code = bench_diffusion.main(["--config", str(path), "--in-process", "--steps", "1",
                                 "--warmup", "0", "--sample-steps", "2", "--batch", "2",
                                 "--json", str(out)])
    assert code == 0
    [row] = json.loads(out.read_text())
    assert row["name"] == "tiny_stage2 float32" and row["batch"] == 2
    assert row["peak_memory_bytes"] > 0 and row["flops"] > 0
    assert len(row["step_times"]) == 1 and row["step_s"] > 0 and row["step_cpu_s"] > 0
    assert np.isfinite(row["loss"])
    assert row["sample_steps"] == 2 and row["sample_s"] > 0 and row["sample_cpu_s"] > 0
    assert row["sample_finite"]
    table = capsys.readouterr().out
    assert "| tiny_stage2 float32 | float32 | 8x8x4x2 |" in table
    assert "argument + output - alias + temp" in table


def test_bad_arguments_fail_with_a_message(capsys):
    with pytest.raises(SystemExit):
        bench_diffusion.main(["--config", "configs/diffusion/balanced.py", "--steps", "-1"])
    assert "--steps must be >= 0" in capsys.readouterr().err
    config = _tiny()
    config.latents.latent_shape = None
    with pytest.raises(ValueError, match="latent_shape"):
        bench_diffusion.measure(config, compile_only=True)


def test_monai_side_times_a_step_and_a_sampling():
    pytest.importorskip("monai")
    torch = pytest.importorskip("torch")
    from monai.networks.nets import DiffusionModelUNet

    from benchmarks import bench_diffusion_monai

    config = _tiny(batch=2, levels=2, num_res_blocks=(1, 2))
    kwargs = monai_unet_kwargs(config.unet)
    assert kwargs["channels"] == [8, 16] and kwargs["num_res_blocks"] == [1, 2]
    monai_params = sum(p.numel() for p in DiffusionModelUNet(**kwargs).parameters())
    assert monai_params == _param_count(config)  # the same architecture

    threads = torch.get_num_threads()
    out = bench_diffusion_monai.run(dict(
        config=config.to_dict(), shape=list(LATENT), batch=2, steps=2, warmup=1,
        sample_steps=3, dtype="float32", device="cpu", threads=1))
    assert torch.get_num_threads() == threads  # restored
    assert out["params"] == monai_params and out["threads"] == 1
    assert out["step_s"] > 0 and out["step_cpu_s"] > 0 and len(out["step_times"]) == 2
    assert out["loss_finite"] and out["sample_finite"]
    assert out["sample_steps"] == 3 and out["sample_s"] > 0 and out["sample_cpu_s"] > 0


def test_monai_side_refuses_what_it_cannot_mirror():
    config = _tiny()
    assert unsupported_reasons(config.to_dict()) == []
    config.scheduler.name = "rflow"
    config.loss.type = "l1"
    reasons = unsupported_reasons(config.to_dict())
    assert len(reasons) == 2 and "rflow" in reasons[0] and "MSE" in reasons[1]
    row = {"step_s": 2.0, "step_cpu_s": 3.0, "sample_s": None, "host_peak_bytes": 10}
    bench_diffusion.add_monai_ratios(row, {"step_s": 4.0, "step_cpu_s": 3.0,
                                           "peak_memory_bytes": 20})
    assert row["vs_monai_step"] == 0.5 and row["vs_monai_step_cpu"] == 1.0
    assert row["vs_monai_memory"] == 0.5 and "vs_monai_sample" not in row
