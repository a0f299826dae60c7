"""benchmarks.levers: each variant's train.py command differs from its parent's only by its
lever, and the table reads the last validation row."""

import json

from benchmarks import levers


def _overrides(cmd):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if a.startswith("--config.")}


def test_a_variant_changes_only_its_lever(tmp_path):
    base = _overrides(levers.command("base", tmp_path / "a", 600, "64,64,32", 200))
    child = _overrides(levers.command("base_c8", tmp_path / "b", 600, "64,64,32", 200))
    assert base["--config.data.volume_size"] == "(64,64,32)"
    assert {k: v for k, v in child.items() if base.get(k) != v} == {
        "--config.autoencoder.latent_channels": "8"}
    for name, (parent, *_rest) in levers.VARIANTS.items():
        assert parent is None or parent in levers.VARIANTS, name


def test_table_reads_the_last_validation_row(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    rows = [{"step": 1, "loss": 0.5},
            {"step": 200, "val_dice": 0.1, "val_psnr": 17.0, "val_psnr_blank": 17.2},
            {"step": 400, "val_dice": 0.8, "val_psnr": 26.0, "val_psnr_blank": 17.2,
             "val_psnr_fg": 20.0, "val_recon_fg_fraction": 0.12, "val_fg_fraction": 0.124}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = levers.last_eval(wd)
    assert last["step"] == 400 and last["val_dice"] == 0.8
    text = levers.table([dict(name="x", lever="y", wall_s=120.0, **last)])
    assert "| `x` | y | 0.800 | 26.00 (17.20) | +8.80 | 20.00 | 12.0 (12.4) | 2.0 |" in text
