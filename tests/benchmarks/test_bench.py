"""The bench's own logic at tiny sizes: rows, JSON, the seed table, the MONAI translation.

No timing is asserted: only that numbers exist, are consistent and mean what they say.
One training step is compiled (the CLI test); everything else is shape-level or cheap.
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from benchmarks import bench, bench_monai, bench_plot, common
from ldm_jax.autoencoder import config as ae_config
from ldm_jax.autoencoder import geometry
from ldm_jax.errors import ConfigError
from ldm_jax.models import build_autoencoder, build_discriminator
from tests.tiny import tiny_config

REQUIRED = ("name", "volume", "latent_shape", "params", "flops", "peak_memory_bytes",
            "compile_s", "step_s")


def _tiny_file(tmp_path, volume=(16, 16, 8)):
    path = tmp_path / "tiny_bench.py"
    path.write_text(
        "from tests.tiny import tiny_config\n\n"
        "def get_config():\n"
        "    c = tiny_config()\n"
        f"    c.data.volume_size = {tuple(volume)}\n"
        "    c.train.batch_size = 1\n"
        "    return c\n")
    return path


def _param_count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_cli_json_and_table_with_real_steps(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = bench.main(["--config", str(_tiny_file(tmp_path)), "--in-process", "--steps", "2",
                       "--warmup", "0", "--buffers", "3", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    for key in REQUIRED:
        assert key in row, key
    assert row["volume"] == [16, 16, 8] and row["batch"] == 1
    config = tiny_config()
    assert tuple(row["latent_shape"]) == geometry.latent_shape(config)
    assert row["total_factor"] == list(geometry.total_factor(config.autoencoder))
    ae = build_autoencoder(config.autoencoder)
    params = jax.eval_shape(lambda: ae.init(
        {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)},
        np.zeros((1, 16, 16, 8, 1), np.float32)))["params"]
    assert row["params"] == _param_count(params)
    # The state (params + two Adam moments, both networks) is an argument of the step.
    state_bytes = 4 * 3 * (row["params"] + row["disc_params"])
    mem = row["xla_memory"]
    assert mem["argument"] >= state_bytes
    assert row["peak_memory_bytes"] == (mem["argument"] + mem["output"] - mem["alias"]
                                        + mem["temp"])
    assert mem["alias"] >= state_bytes  # the state is donated
    assert row["flops"] > 0 and row["compile_s"] > 0
    assert row["step_s"] > 0 and len(row["step_times"]) == 2 and row["step_cpu_s"] > 0
    assert np.isfinite(row["loss"])
    assert row["backend"] == "cpu" and row["device_peak_bytes"] is None
    if os.path.exists("/proc/self/status"):
        assert row["host_peak_bytes"] is not None
    # --buffers: the largest buffers live at the peak, largest first, each named.
    bufs = row["buffers"]
    assert 1 <= len(bufs) <= 3 and bufs[0]["bytes"] >= bufs[-1]["bytes"] > 0
    assert bufs[0]["bytes"] <= row["peak_memory_bytes"] and bufs[0]["opcode"] != "?"
    table = capsys.readouterr().out
    assert "| tiny_bench |" in table and "argument + output - alias + temp" in table
    assert "Largest buffers live at the peak of tiny_bench" in table


def test_seed_table_configs_match_the_seed():
    rows = bench.seed_table_configs()
    names = [n for n, _, _ in rows]
    assert names == ["A", "B nearest_conv", "B subpixel", "C nearest_conv", "C subpixel",
                     "D nearest_conv", "D subpixel", "aggressive nearest_conv",
                     "aggressive subpixel"]
    by_name = {n: (c, claim) for n, c, claim in rows}
    expect = {"A": (1, (4, 2), 8, 3.1), "B subpixel": (2, (4, 2), 16, 1.8),
              "C nearest_conv": (4, (4, 2), 32, 1.2), "D subpixel": (2, (8, 2), 32, 1.3)}
    for name, (init, factors, total, claim) in expect.items():
        c, got_claim = by_name[name]
        assert c.autoencoder.initial_downsample_factor == init
        assert tuple(c.autoencoder.downsample_factors) == factors
        assert geometry.total_factor(c.autoencoder) == (total,) * 3
        assert tuple(c.data.volume_size) == (256, 256, 64)
        assert got_claim == claim
    for name, c, _ in rows:
        ae_config.validate(c)
        assert c.train.batch_size == 1
        assert c.autoencoder.dtype == c.discriminator.dtype == "bfloat16"
        assert c.loss.adv_warmup_steps == 0  # the full step is measured
        if name.split()[-1] in bench.HEADS:
            assert c.autoencoder.upsample_head == name.split()[-1]
    agg, claim = by_name["aggressive subpixel"]
    assert tuple(agg.data.volume_size) == (512, 512, 128) and claim == 2.3
    assert tuple(agg.autoencoder.num_channels) == (16, 32, 64)


def test_plan_rows_expand_heads_remat_and_spatial(tmp_path):
    args = bench._parse_args(["--config", "configs/balanced.py", "--head", "both",
                              "--remat", "none,levels", "--spatial", "1,4",
                              "--volume", "128,128,32", "--batch", "2"])
    rows = bench.plan_rows(args)
    assert len(rows) == 2 * 2 * 2
    names = [r[0] for r in rows]
    assert "balanced subpixel remat=levels spatial=4" in names
    assert "balanced nearest_conv" in names
    for name, c, claim, spatial in rows:
        assert tuple(c.data.volume_size) == (128, 128, 32) and c.train.batch_size == 2
        assert claim is None
        assert c.autoencoder.remat == ("levels" if "remat=levels" in name else "none")
        assert spatial == (4 if "spatial=4" in name else 1)


def test_only_filters_rows_by_name_prefix():
    args = bench._parse_args(["--table", "seed", "--only", "A,C sub"])
    assert [r[0] for r in bench.plan_rows(args)] == ["A", "C subpixel"]
    with pytest.raises(ConfigError, match="matches no row"):
        bench.plan_rows(bench._parse_args(["--table", "seed", "--only", "Z"]))


def test_set_overrides_fields_and_names_the_row():
    args = bench._parse_args(["--config", "configs/aggressive.py", "--set",
                              "discriminator.num_channels=16", "--set", "loss.recon=mse"])
    [(name, c, _, _)] = bench.plan_rows(args)
    assert c.discriminator.num_channels == 16 and c.loss.recon == "mse"
    assert name == "aggressive subpixel discriminator.num_channels=16 loss.recon=mse"
    with pytest.raises(ConfigError, match="existing field"):
        bench.apply_override(c, "discriminator.channels=16")


def test_bad_arguments_fail_with_a_message(capsys):
    assert bench.main(["--config", "configs/balanced.py", "--volume", "250,256,64"]) == 2
    err = capsys.readouterr().err
    assert "volume_size[0]" in err and "16" in err
    assert bench.main(["--config", "configs/balanced.py", "--remat", "all"]) == 2
    assert "--remat all" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="3 positive ints"):
        common.parse_ints("256,256", "--volume", 3)
    with pytest.raises(ConfigError, match="does not exist"):
        common.load("configs/nope.py")


def test_worker_spec_round_trip_keeps_the_model():
    config = bench.bench_config(tiny_config(), head="subpixel", remat="levels")
    back = ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))
    ae_config.validate(back)
    assert build_autoencoder(back.autoencoder) == build_autoencoder(config.autoencoder)
    assert build_discriminator(back.discriminator) == build_discriminator(config.discriminator)
    assert back.train.remat == "levels" and back.loss.adv_warmup_steps == 0


def test_subprocess_json_reads_the_marker_line_and_reports_failures():
    ok = common.subprocess_json(
        [sys.executable, "-c", "print('noise'); print('MARK {\"a\": 1}')"], "MARK")
    assert ok == {"a": 1}
    bad = common.subprocess_json([sys.executable, "-c", "import sys; sys.exit(3)"], "MARK")
    assert "exit code 3" in bad["error"]


def test_device_count_flag_is_merged_not_duplicated():
    env = {"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=2"}
    common.set_device_count(env, 8)
    assert env["XLA_FLAGS"].split() == ["--foo=1", "--xla_force_host_platform_device_count=8"]
    common.set_device_count(env, 4)  # never lowers what is already there
    assert env["XLA_FLAGS"].endswith("=8")


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 (simulated) devices")
def test_devices_fall_back_to_simulated_cpu_devices():
    devices, simulated = bench._devices(2)
    assert len(devices) == 2 and not simulated
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count"):
        bench._devices(len(jax.devices("cpu")) + 1)


# ---------------------------------------------------------------------------- MONAI side


def _monai_counts(config):
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator
    ae_kw, d_kw = bench_monai.monai_kwargs(config)
    ae, d = AutoencoderKL(**ae_kw), PatchDiscriminator(**d_kw)
    return (sum(p.numel() for p in ae.parameters()), sum(p.numel() for p in d.parameters()))


@pytest.mark.parametrize("which", ["tiny", "monai_3d_ldm"])
def test_monai_translation_builds_the_same_architecture(which):
    pytest.importorskip("monai")
    config = tiny_config() if which == "tiny" else bench.load("configs/monai_3d_ldm.py")
    assert bench_monai.unsupported_reasons(config) == []
    ae_kw, d_kw = bench_monai.monai_kwargs(config)
    assert ae_kw["channels"] == tuple(config.autoencoder.num_channels)
    assert ae_kw["attention_levels"] == tuple(config.autoencoder.attention_levels)
    assert d_kw["norm"] == "BATCH" and d_kw["num_layers_d"] == config.discriminator.num_layers_d
    x = np.zeros((1, 32, 32, 32, 1), np.float32)
    ours = jax.eval_shape(lambda: build_autoencoder(config.autoencoder).init(
        {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)}, x))["params"]
    disc = jax.eval_shape(lambda: build_discriminator(config.discriminator).init(
        jax.random.PRNGKey(0), x, train=False))["params"]
    assert _monai_counts(config) == (_param_count(ours), _param_count(disc))


def test_monai_refuses_configs_it_cannot_express():
    config = bench.load("configs/balanced.py")
    reasons = bench_monai.unsupported_reasons(config)
    assert any("initial_downsample_factor" in r for r in reasons)
    assert any("downsample_factors" in r for r in reasons)
    with pytest.raises(bench_monai.MonaiUnsupported, match="monai_3d_ldm"):
        bench_monai.monai_kwargs(config)
    config.autoencoder.initial_downsample_factor = 1
    config.autoencoder.downsample_factors = (2, 2)
    config.loss.recon = "dice"
    assert bench_monai.unsupported_reasons(config) == [
        "loss.recon='dice' (the MONAI side implements l1, mse, weighted)"]
    # The bench says so instead of spawning a process.
    assert "not comparable" in bench.measure_monai(bench.load("configs/balanced.py"),
                                                   steps=1, warmup=0)["error"]


def test_monai_step_runs_and_reports_memory():
    pytest.importorskip("monai")
    config = bench.bench_config(tiny_config())
    out = bench_monai.run(dict(config=config.to_dict(), volume=[16, 16, 8], batch=1, steps=1,
                               warmup=0, dtype="float32", device="cpu", threads=1))
    assert out["step_s"] > 0 and out["step_cpu_s"] > 0 and out["loss_finite"]
    assert out["params"] == _monai_counts(config)[0]
    if os.path.exists("/proc/self/status"):
        assert out["peak_memory_bytes"] is not None and out["peak_memory_bytes"] >= 0


def test_ratios_compare_like_with_like():
    row = {"step_s": 2.0, "step_cpu_s": 4.0, "host_peak_bytes": 100}
    bench.add_monai_ratios(row, {"step_s": 5.0, "step_cpu_s": 2.0, "peak_memory_bytes": 300})
    assert row["monai_step_ratio"] == 2.5 and row["monai_memory_ratio"] == 3.0
    assert row["monai_step_cpu_ratio"] == 0.5
    row = {"step_s": None, "host_peak_bytes": None}
    bench.add_monai_ratios(row, {"error": "not comparable"})
    assert "monai_step_ratio" not in row and row["monai"]["error"] == "not comparable"


# ---------------------------------------------------------------------------- plot


def _fake_row(name, init, total, head, gb, claim=None):
    return dict(name=name, params=1, volume=[256, 256, 64], initial_factor=[init] * 3,
                total_factor=[total] * 3, upsample_head=head, peak_memory_bytes=gb * 1e9,
                seed_claim_gb=claim)


def test_memory_plot_series_and_png(tmp_path):
    rows = [_fake_row("A", 1, 8, "nearest_conv", 4.0, 3.1),
            _fake_row("B nearest_conv", 2, 16, "nearest_conv", 3.0, 1.8),
            _fake_row("B subpixel", 2, 16, "subpixel", 1.0, 1.8),
            dict(_fake_row("X", 2, 16, "subpixel", 9.0), volume=[512, 512, 128])]
    series = bench_plot.memory_series(rows)
    assert series["nearest_conv"] == [(8, 4.0, "A"), (16, 3.0, "B")]
    assert series["subpixel"] == [(8, 4.0, "A"), (16, 1.0, "B")]  # A has no head choice
    assert series["seed claim"] == [(8, 3.1, "A"), (16, 1.8, "B")]  # once per letter
    path = bench_plot.plot_memory(rows, str(tmp_path / "m.png"), "test")
    from PIL import Image
    with Image.open(path) as img:
        assert img.size == (900, 560)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 3  # something drawn
    with pytest.raises(ValueError, match="no rows"):
        bench_plot.plot_memory(rows, str(tmp_path / "n.png"), "t", volume=(1, 2, 3))


def test_benchmark_modules_import_no_circle_and_no_private_names():
    """benchmarks.common holds what the benches share: no import circle among
    benchmarks.*, and no module imports another's underscore name."""
    import ast
    from pathlib import Path

    root = Path(common.__file__).parent
    graph = {}
    for path in sorted(root.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [a.name for a in node.names]
                if node.module == "benchmarks":
                    deps.update(f"benchmarks.{n}" for n in names)
                elif node.module.startswith("benchmarks."):
                    deps.add(node.module)
                    private = [n for n in names if n.startswith("_")]
                    assert not private, f"{path.name} imports {private} from {node.module}"
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("benchmarks."))
        graph[f"benchmarks.{path.stem}"] = deps & {f"benchmarks.{p.stem}" for p in
                                                    root.glob("*.py")}

    def visit(mod, stack):
        assert mod not in stack, "import circle: " + " -> ".join([*stack, mod])
        for dep in graph[mod]:
            visit(dep, [*stack, mod])

    for mod in graph:
        visit(mod, [])
