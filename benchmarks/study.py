r"""Reconstruction quality against downsampling: the seed's configurations A-D, measured.

    python -m benchmarks.study --out benchmarks/quality                  # CPU-sized defaults
    python -m benchmarks.study --out runs/q --volume 128,128,64 --channels 32,64,64 \
        --norm-groups 32 --dtype bfloat16 --batch 2 --steps 3000          # on a GPU
    SHARDS=8 bash benchmarks/quality/gpu_study.sh runs/q 600 [same args]  # parallel shards
    python -m benchmarks.study --out runs/q --report --bench-json bench.json  # tables, PNGs

Why: the seed claims the stem factor 2 costs "< 2%" reconstruction quality but never
computed a PSNR. A user trading memory for quality needs the measured trade-off, and the
project's defaults (decoder head, stem kernel) should rest on it. Every configuration is
trained with the same recipe, steps, data order and seed, then scored on held-out volumes
(never seen in training) one volume at a time, so each metric is reported as
mean ± std over volumes, with paired differences against configuration A.

Configurations (`variants()`): A (stem 1, levels (4, 2)), B (2, (4, 2)), C (4, (4, 2)),
D (2, (8, 2)); B-D with both decoder heads (A's stem is 1, where the heads coincide); and
each of A-D with the seed's kernel-3 strided stages (`strided_kernel=3`, nearest_conv head)
against our voxel-complete kernels. All four have a stride-4 or 8 stage, which kernel 3
under-covers: on the raw input for C's stem, on features for the level downsamples.

Each run writes `<out>/runs/<dataset>__<variant>.json` (+ a PNG strip of one held-out
reconstruction) as soon as it finishes; a rerun with the same settings skips finished
runs, so an interrupted study resumes and shards (`--shard i/n`) can run in parallel
processes. `--report` (also run at the end of an unsharded study) gathers the runs into
`<out>/study.json`, `<out>/table.md` and `<out>/recon_<dataset>.png`; the peak-memory
column comes from `--memory` (the bench's compile-only analysis, per variant) or from
`python -m benchmarks.bench --json` files given with `--bench-json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from benchmarks.common import REPO_ROOT, write_json
from ldm_jax import config as config_lib
from ldm_jax.autoencoder import config as ae_config
from ldm_jax.autoencoder import geometry
from ldm_jax.errors import ConfigError

# The seed's configurations: (stem factor, level factors).
BASES = {"A": (1, (4, 2)), "B": (2, (4, 2)), "C": (4, (4, 2)), "D": (2, (8, 2))}
DATASETS = {"filaments": "synthetic_filaments", "mni152": "mni152"}
METRICS = ("psnr", "psnr_blank", "ssim", "mae", "dice")
SEED_KERNEL = 3  # the seed's strided-conv kernel


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model configuration of the study."""

    base: str  # "A".."D"
    head: str = "nearest_conv"  # decoder head
    strided_kernel: Optional[int] = None  # None: voxel-complete; 3: the seed's

    @property
    def key(self) -> str:
        stem = "k3" if self.strided_kernel == SEED_KERNEL else "vc"
        head = "nearest" if self.head == "nearest_conv" else self.head
        return f"{self.base}_{head}_{stem}"

    @property
    def label(self) -> str:
        init, factors = BASES[self.base]
        stem = "seed k3" if self.strided_kernel == SEED_KERNEL else "voxel-complete"
        return f"{self.base} stem {init} levels {factors} {self.head} {stem}"


def variants() -> list:
    """A-D voxel-complete with every head that differs, then A-D with the seed's kernel 3."""
    out = []
    for base, (init, _) in BASES.items():
        for head in (("nearest_conv",) if init == 1 else ae_config.UPSAMPLE_HEADS):
            out.append(Variant(base, head))
    out += [Variant(base, "nearest_conv", SEED_KERNEL) for base in BASES]
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that makes two runs comparable; stored in every run's JSON."""

    steps: int = 150
    volume: tuple = (64, 64, 32)
    channels: tuple = (16, 32, 32)
    norm_groups: int = 8
    latent_channels: int = 3
    batch: int = 1
    lr: float = 1e-3
    dtype: str = "float32"
    num_train: int = 64
    num_val: int = 8
    dice_threshold: float = 0.1  # the threshold of val_dice (eval.fg_threshold)
    ssim_window: int = 7
    seed: int = 0
    fast_compile: bool = False  # XLA backend optimisation level 0 (CPU: compile-bound runs)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def study_config(variant: Variant, dataset: str, s: Settings):
    """configs/balanced.py with the variant's factors/head/stem and the study's recipe.

    Recipe (same for every run): L1 + 1e-6 KL, Adam with a 5% warm-up then cosine decay,
    no adversarial term (adv_warmup_steps > steps: a GAN makes short runs noisy and
    costs a discriminator step), no perceptual loss.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    config = config_lib.load_config(REPO_ROOT / "configs" / "balanced.py")
    ae = config.autoencoder
    init, factors = BASES[variant.base]
    ae.initial_downsample_factor = init
    ae.downsample_factors = factors
    ae.upsample_head = variant.head
    ae.strided_kernel = variant.strided_kernel
    ae.num_channels = tuple(s.channels)
    ae.attention_levels = (False,) * len(s.channels)
    ae.norm_num_groups = s.norm_groups
    ae.latent_channels = s.latent_channels
    ae.dtype = s.dtype
    config.discriminator.dtype = s.dtype
    d = config.data
    d.source = DATASETS[dataset]
    d.volume_size = tuple(s.volume)
    d.num_train_volumes = s.num_train
    d.num_val_volumes = s.num_val
    d.seed = s.seed
    d.mni152_resolution = 2  # 99x117x95: a CPU-sized crop still covers much of the brain
    loss = config.loss
    loss.recon = "l1"
    loss.perceptual_weight = 0.0
    loss.adv_warmup_steps = s.steps + 1
    t = config.train
    t.num_steps = s.steps
    t.batch_size = s.batch
    t.learning_rate = s.lr
    t.schedule = "cosine"
    t.warmup_steps = max(1, s.steps // 20)
    t.seed = s.seed
    config.mesh.data, config.mesh.spatial = 1, 1
    return config


# ----------------------------------------------------------------------------------------
# Aggregation (pure numpy: tested on its own).


def summarize(values: Sequence[float]) -> dict:
    """{"mean", "std", "n"}: std is the sample std (ddof=1), 0.0 for one value."""
    v = np.asarray([float(x) for x in values], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def paired(values: Sequence[float], reference: Sequence[float]) -> dict:
    """Per-volume differences values - reference (same held-out volumes), summarized."""
    if len(values) != len(reference):
        raise ValueError(f"paired comparison needs equal lengths, got {len(values)} and "
                         f"{len(reference)} (were the runs made with different --num-val?)")
    return summarize(np.asarray(values, np.float64) - np.asarray(reference, np.float64))


def fmt(summary: Optional[dict], digits: int = 2) -> str:
    """'mean ± std' for a table cell; '-' for a missing metric."""
    if not summary or summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


# ----------------------------------------------------------------------------------------
# Train and evaluate one configuration.


class _WarningLog(logging.Handler):
    """Collects the model's warnings (the kernel-3 stem's 'skips voxels' message)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def make_eval_fn(stage, s: Settings, with_dice: bool):
    """jit(params, x) -> (recon, per-sample metrics) on mu: the validation metrics."""
    from ldm_jax.metrics import image as metrics
    data_range = float(stage.config.data.b_max - stage.config.data.b_min)

    def fn(params, x):
        z_mu, _ = stage.ae.apply({"params": params}, x, method="encode")
        recon = stage.ae.apply({"params": params}, z_mu, method="decode")
        out = dict(psnr=metrics.psnr(recon, x, data_range=data_range),
                   ssim=metrics.ssim3d(recon, x, data_range=data_range, win_size=s.ssim_window),
                   mae=metrics.mae(recon, x),
                   psnr_blank=metrics.constant_psnr(x, float(stage.config.data.b_min),
                                                    data_range))
        if with_dice:
            out["dice"] = metrics.dice_score(recon, x, threshold=s.dice_threshold)
        return recon, out

    return _jit(fn, s.fast_compile)


def _jit(fn, fast_compile: bool, **kw):
    """jax.jit, optionally with XLA's cheap backend optimisation: on CPU a short run is
    dominated by compiling (minutes on a busy machine), while its convolutions run in
    library kernels that the optimisation level does not touch."""
    import jax

    if fast_compile:
        kw["compiler_options"] = {"xla_backend_optimization_level": 0}
    return jax.jit(fn, **kw)


def make_train_step(stage, fast_compile: bool = False):
    """jit((state, batch)) -> (state, metrics): the stage-1 task's own step. The study
    sets loss.adv_weight = 0, so the task leaves the discriminator out of the program
    (the step then compiles several times faster on CPU than the adversarial one)."""
    return _jit(lambda state, batch: stage.train_step(state, batch, None), fast_compile,
                donate_argnums=(0,))


def train_and_score(variant: Variant, dataset: str, s: Settings, log=print):
    """Trains one configuration and scores it per held-out volume.

    Returns (result dict, (input, reconstruction) of held-out volume 0).
    """
    import jax

    from ldm_jax import data as data_lib
    from ldm_jax.autoencoder.config import prepare_config
    from ldm_jax.autoencoder.task import AutoencoderTask
    config = prepare_config(study_config(variant, dataset, s))
    config.loss.adv_weight = 0.0  # reconstruction + KL only (see make_train_step)
    warn = _WarningLog()
    model_log = logging.getLogger("ldm_jax.models")
    model_log.addHandler(warn)
    try:
        stage = AutoencoderTask(config)
        state = jax.jit(stage.init_state)(jax.random.PRNGKey(int(config.train.seed)))
    finally:
        model_log.removeHandler(warn)
    step_fn = make_train_step(stage, s.fast_compile)
    loader = data_lib.make_train_loader(config, batch_size=s.batch, seed=s.seed)
    it = iter(loader)
    curve, times = [], []
    t_start = time.perf_counter()
    for step in range(1, s.steps + 1):
        batch = next(it)
        t = time.perf_counter()
        state, metrics = step_fn(state, {"image": batch["image"]})
        loss = float(metrics["recon_loss"])  # blocks: the step time is real
        times.append(time.perf_counter() - t)
        if not math.isfinite(loss) or not float(metrics["finite"]):
            raise FloatingPointError(f"{variant.key} on {dataset}: non-finite loss at step "
                                     f"{step}; lower --lr")
        if step == 1 or step % max(1, s.steps // 20) == 0 or step == s.steps:
            curve.append([step, loss])
            log(f"  {dataset} {variant.key} step {step}/{s.steps} l1={loss:.4f}")
    train_s = time.perf_counter() - t_start
    if hasattr(it, "close"):
        it.close()

    with_dice = dataset == "filaments"
    eval_fn = make_eval_fn(stage, s, with_dice)
    evals = data_lib.make_eval_batches(config, batch_size=1)
    per_volume = {k: [] for k in METRICS if with_dice or k != "dice"}
    shown = None
    params = state.g_params
    for batch in evals:
        recon, out = eval_fn(params, batch["image"])
        for k, v in out.items():
            per_volume[k].append(float(np.asarray(v)[0]))
        if shown is None:
            shown = (batch["image"][0], np.asarray(recon)[0])
    n = evals.num_volumes
    per_volume = {k: v[:n] for k, v in per_volume.items()}  # drop the wrap-around fill

    ae = config.autoencoder
    result = dict(
        dataset=dataset, variant=variant.key, label=variant.label, base=variant.base,
        head=variant.head, strided_kernel=variant.strided_kernel,
        initial_factor=list(geometry.initial_factor(ae)),
        downsample_factors=[list(f) for f in geometry.level_factors(ae)],
        total_factor=list(geometry.total_factor(ae)),
        latent_shape=list(geometry.latent_shape(config)),
        params=int(sum(x.size for x in jax.tree.leaves(params))),
        skips_voxels_warning=[m for m in warn.messages if "never reach" in m],
        settings=s.to_json(), per_volume=per_volume,
        summary={k: summarize(v) for k, v in per_volume.items()},
        train_curve=curve, train_s=round(train_s, 1),
        step_s=round(float(np.median(times[1:] if len(times) > 1 else times)), 4),
        first_step_s=round(times[0], 1),
        backend=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
    )
    return result, shown


def peak_memory(variant: Variant, volume, channels, dtype="bfloat16", batch=1) -> dict:
    """The bench's peak memory (XLA memory analysis, compile only) of a variant's full
    training step at a given size; benchmarks.bench enables the discriminator step."""
    from benchmarks import bench

    s = Settings(channels=tuple(channels), volume=tuple(volume), dtype=dtype, batch=batch)
    base = study_config(variant, "filaments", s)
    base.autoencoder.norm_num_groups = 32 if min(channels) % 32 == 0 else s.norm_groups
    c = bench.bench_config(base, volume=volume, batch=batch, dtype=dtype)
    row = bench.measure(c, name=variant.key, compile_only=True)
    return dict(variant=variant.key, volume=list(volume), channels=list(channels),
                dtype=dtype, batch=batch, peak_memory_bytes=row["peak_memory_bytes"],
                flops=row["flops"], params=row["params"], memory_method=row["memory_method"],
                backend=row["backend"], device_kind=row["device_kind"])


# ----------------------------------------------------------------------------------------
# Files.


def run_path(out: Path, dataset: str, variant: Variant) -> Path:
    return out / "runs" / f"{dataset}__{variant.key}.json"


def _done(path: Path, s: Settings) -> bool:
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("settings") == s.to_json()
    except (OSError, ValueError):
        return False


def _save_strip(path: Path, volume, lo=0.0, hi=1.0) -> None:
    from PIL import Image

    from ldm_jax import visualize
    Image.fromarray(visualize.orthoview(volume, lo, hi)).save(path)


def _load_strip(path: Path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("L"))


def _label(strip, text: str, width: int = 180):
    """A strip with `text` written in a white margin on its left (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    h = max(strip.shape[0], 14)
    canvas = Image.new("L", (width + strip.shape[1], h), 255)
    canvas.paste(Image.fromarray(strip), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(text.split("\n")):
        draw.text((4, 2 + 11 * i), line, fill=0)
    return np.asarray(canvas)


# ----------------------------------------------------------------------------------------
# Report.


def bench_memory(bench_rows: Sequence[dict], run: dict) -> Optional[dict]:
    """The bench's row for a run's model (same stem, levels, head; batch 1, no remat, one
    device), as {"bytes", "volume", "dtype", "kind", "approx"}.

    The bench does not vary the strided kernel: a kernel-3 variant gets its voxel-complete
    row (same activation shapes; only the strided weights are smaller), marked approx.
    """
    for b in bench_rows:
        if (b.get("initial_factor") == run["initial_factor"]
                and b.get("downsample_factors") == run["downsample_factors"]
                and (run["initial_factor"] == [1, 1, 1] or b.get("upsample_head") == run["head"])
                and b.get("remat", "none") == "none" and b.get("spatial", 1) == 1
                and b.get("batch") == 1 and b.get("peak_memory_bytes") is not None):
            device = b.get("device_peak_bytes")
            return dict(bytes=device or b["peak_memory_bytes"], volume=b["volume"],
                        dtype=b["dtype"], kind="device peak" if device else "XLA analysis",
                        approx=run["strided_kernel"] is not None)
    return None


def gather(out: Path, bench_json: Sequence[str] = ()) -> dict:
    """All finished runs under out/runs, grouped by dataset, with paired deltas vs A and
    peak memory (out/memory*.json from --memory, else the bench's rows in bench_json)."""
    runs = []
    for p in sorted((out / "runs").glob("*__*.json")):
        r = json.loads(p.read_text())
        if "dataset" in r:
            runs.append(r)
    order = {v.key: i for i, v in enumerate(variants())}
    runs.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), order.get(r["variant"], 99)))
    memory = {}
    for mem_path in sorted(out.glob("memory*.json")):  # memory.json or one per shard
        memory.update({m["variant"]: m for m in json.loads(mem_path.read_text())})
    bench_rows = []
    for path in bench_json:
        rows = json.loads(Path(path).read_text())
        bench_rows += rows["rows"] if isinstance(rows, dict) else rows
    for r in runs:
        ref = next((x for x in runs if x["dataset"] == r["dataset"]
                    and x["variant"] == "A_nearest_vc"), None)
        if ref is not None:
            r["vs_A"] = {k: paired(r["per_volume"][k], ref["per_volume"][k])
                         for k in r["per_volume"] if k in ref["per_volume"]}
            a = ref["summary"]["psnr"]["mean"]
            r["psnr_change_vs_A_percent"] = 100.0 * (r["summary"]["psnr"]["mean"] - a) / a
        if r["variant"] in memory:
            m = memory[r["variant"]]
            r["memory"] = dict(bytes=m["peak_memory_bytes"], volume=m["volume"],
                               dtype=m["dtype"], kind="XLA analysis", approx=False)
        elif bench_rows:
            found = bench_memory(bench_rows, r)
            if found:
                r["memory"] = found
    return {"runs": runs, "memory": list(memory.values())}


def _gb(m: Optional[dict]) -> str:
    if not m:
        return "-"
    return f"{'≈' if m.get('approx') else ''}{m['bytes'] / 1e9:.2f}"


def format_table(study: dict) -> str:
    """Markdown table, one row per (dataset, variant)."""
    mems = [r["memory"] for r in study["runs"] if r.get("memory")]
    mem_note = ""
    if mems:
        m = mems[0]
        mem_note = (f"peak GB: the bench's full training step (discriminator on) at "
                    f"{'x'.join(map(str, m['volume']))}, {m['dtype']}, batch 1 "
                    f"({m['kind']}); ≈ = the voxel-complete row of the same model")
    lines = [
        "| data | config | stem | levels | head | strided kernel | total | latent | "
        "peak GB | PSNR dB | blank PSNR dB | ΔPSNR vs A (paired) | SSIM | MAE | Dice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in study["runs"]:
        s = r["summary"]
        tf = r["total_factor"]
        total = str(tf[0]) if len(set(tf)) == 1 else "x".join(map(str, tf))
        latent = "x".join(str(v) for v in r["latent_shape"])
        init, factors = BASES[r["base"]]
        kernel = "3 (seed)" if r["strided_kernel"] == SEED_KERNEL else "s+1 (complete)"
        head = "-" if init == 1 else r["head"]
        delta = "-" if r["variant"] == "A_nearest_vc" or "vs_A" not in r else fmt(
            r["vs_A"]["psnr"])
        lines.append(
            f"| {r['dataset']} | {r['base']} | {init} | {tuple(factors)} | {head} | {kernel} | "
            f"{total} | {latent} | {_gb(r.get('memory'))} | {fmt(s['psnr'])} | "
            f"{fmt(s.get('psnr_blank'))} | {delta} | "
            f"{fmt(s['ssim'], 3)} | {fmt(s['mae'], 4)} | {fmt(s.get('dice'), 3)} |")
    if mem_note:
        lines.append(f"\n{mem_note}")
    return "\n".join(lines)


CONTRASTS = (  # (name, variant, reference variant): what each verdict compares
    ("kernel 3 - voxel-complete", "{b}_nearest_k3", "{b}_nearest_vc"),
    ("subpixel - nearest_conv", "{b}_subpixel_vc", "{b}_nearest_vc"),
)


def contrasts(study: dict) -> list:
    """Paired per-volume differences for the two design questions, per dataset and base:
    the seed's kernel-3 strided stages against voxel-complete ones, and the subpixel head
    against nearest+conv. `wins` counts volumes where the first is better (higher PSNR)."""
    runs = {(r["dataset"], r["variant"]): r for r in study["runs"]}
    rows = []
    for dataset in DATASETS:
        for name, a, b in CONTRASTS:
            for base in BASES:
                x, y = runs.get((dataset, a.format(b=base))), runs.get((dataset, b.format(b=base)))
                if x is None or y is None:
                    continue
                d = {k: paired(x["per_volume"][k], y["per_volume"][k]) for k in x["per_volume"]}
                diff = np.asarray(x["per_volume"]["psnr"]) - np.asarray(y["per_volume"]["psnr"])
                rows.append(dict(dataset=dataset, base=base, contrast=name, delta=d,
                                 wins=int((diff > 0).sum()), n=int(diff.size)))
    return rows


def format_contrasts(rows: list) -> str:
    lines = ["| data | config | contrast (paired, same volumes) | ΔPSNR dB | ΔSSIM | ΔDice | "
             "PSNR better on |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        d = c["delta"]
        lines.append(f"| {c['dataset']} | {c['base']} | {c['contrast']} | {fmt(d['psnr'])} | "
                     f"{fmt(d['ssim'], 3)} | {fmt(d.get('dice'), 3)} | {c['wins']}/{c['n']} |")
    return "\n".join(lines)


def write_report(out: Path, bench_json: Sequence[str] = ()) -> dict:
    """study.json, recon_<dataset>.png and table.md from the finished runs."""
    study = gather(out, bench_json)
    study["contrasts"] = contrasts(study)
    write_json(out / "study.json", study)
    (out / "table.md").write_text(format_table(study) + "\n\n" +
                                  format_contrasts(study["contrasts"]) + "\n")
    for dataset in DATASETS:
        runs = [r for r in study["runs"] if r["dataset"] == dataset]
        input_png = out / "runs" / f"{dataset}__input.png"
        if not runs or not input_png.exists():
            continue
        rows = [_label(_load_strip(input_png), "held-out volume 0 (input)\nmid-slices XY | XZ | YZ"
                       "\nand the XY max projection")]
        for r in runs:
            strip = out / "runs" / f"{dataset}__{r['variant']}.png"
            if strip.exists():
                p = r["summary"]["psnr"]
                init, factors = BASES[r["base"]]
                stem = "seed kernel 3" if r["strided_kernel"] == SEED_KERNEL else "voxel-complete"
                text = (f"{r['base']}: stem {init}, levels {factors}\n"
                        f"{r['head'] if init > 1 else 'head: conv'}, {stem}\n"
                        f"PSNR {p['mean']:.2f} dB (held-out mean)")
                rows.append(_label(_load_strip(strip), text))
        from ldm_jax import visualize
        visualize.save_grid(rows, out / f"recon_{dataset}.png")
    return study


# ----------------------------------------------------------------------------------------
# Command line.


def _ints(text: str, name: str) -> tuple:
    try:
        v = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        v = ()
    if not v or min(v) < 1:
        raise ConfigError(f"{name} must be positive integers like 64,64,32; got {text!r}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.study",
                                description="\n\n".join(__doc__.split("\n\n")[:3]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument("--out", default="benchmarks/quality", help="output folder")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    p.add_argument("--volume", default="64,64,32",
                   help="X,Y,Z of every volume; each axis divisible by 32 (C and D's factor)")
    p.add_argument("--channels", default="16,32,32", help="num_channels of the autoencoder")
    p.add_argument("--norm-groups", type=int, default=d.norm_groups)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"))
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val, help="held-out volumes")
    p.add_argument("--dice-threshold", type=float, default=d.dice_threshold,
                   help="foreground threshold of the filament Dice (data in 0..1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA backend optimisation level 0: much faster compiles on CPU")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list of "
                   f"{list(DATASETS)}")
    p.add_argument("--only", default="", help="comma list of variant keys (e.g. A_nearest_vc,"
                   "B_subpixel_vc) or bases (A,B); default all")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    p.add_argument("--report", action="store_true", help="only gather finished runs")
    p.add_argument("--memory", action="store_true",
                   help="also compute the bench's peak memory per variant (compile only)")
    p.add_argument("--memory-volume", default="256,256,64")
    p.add_argument("--memory-channels", default="32,64,64")
    p.add_argument("--bench-json", default="", help="comma list of `python -m benchmarks.bench "
                   "--json` outputs to take the peak-memory column from")
    return p.parse_args(argv)


def settings_from_args(a) -> Settings:
    vol = _ints(a.volume, "--volume")
    if len(vol) != 3:
        raise ConfigError(f"--volume needs 3 sizes X,Y,Z; got {a.volume!r}")
    bad = [v for v in vol if v % 32]
    if bad:
        raise ConfigError(f"--volume {vol}: every axis must be divisible by 32 (the total "
                          "factor of C and D), e.g. 64,64,32 or 96,96,64")
    return Settings(steps=a.steps, volume=vol, channels=_ints(a.channels, "--channels"),
                    norm_groups=a.norm_groups, batch=a.batch, lr=a.lr, dtype=a.dtype,
                    num_train=a.num_train, num_val=a.num_val, dice_threshold=a.dice_threshold,
                    seed=a.seed, fast_compile=a.fast_compile)


def select(only: str) -> list:
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    vs = variants()
    if not wanted:
        return vs
    keys = {v.key for v in vs}
    unknown = [w for w in wanted if w not in keys and w not in BASES]
    if unknown:
        raise ConfigError(f"--only: unknown {unknown}; variant keys are {sorted(keys)} "
                          f"and bases are {list(BASES)}")
    return [v for v in vs if v.key in wanted or v.base in wanted]


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    import jax
    if jax.default_backend() == "cpu":
        # As train.py does: XLA:CPU compiles partitionable threefry ~10x slower (the
        # params' initialisers dominate a short run's compile time).
        jax.config.update("jax_threefry_partitionable", False)
    bench_json = [p for p in a.bench_json.split(",") if p.strip()]
    if a.report:
        study = write_report(out, bench_json)
        print(format_table(study))
        return 0
    s = settings_from_args(a)
    datasets = [x.strip() for x in a.datasets.split(",") if x.strip()]
    unknown = [x for x in datasets if x not in DATASETS]
    if unknown:
        raise ConfigError(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    try:
        i, n = (int(t) for t in a.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {a.shard!r}") from None
    todo = [(ds, v) for ds in datasets for v in select(a.only)][i::n]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for k, (ds, v) in enumerate(todo):
        path = run_path(out, ds, v)
        if _done(path, s):
            print(f"[{k + 1}/{len(todo)}] {ds} {v.key}: done already, skipped", flush=True)
            continue
        print(f"[{k + 1}/{len(todo)}] {ds} {v.label} ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
        result, (x, recon) = train_and_score(v, ds, s, log=lambda m: print(m, flush=True))
        _save_strip(out / "runs" / f"{ds}__input.png", x)
        _save_strip(out / "runs" / f"{ds}__{v.key}.png", recon)
        write_json(path, result)
        p = result["summary"]["psnr"]
        print(f"    PSNR {fmt(p)} dB, {result['train_s']:.0f} s training", flush=True)
    if a.memory:
        vol, ch = _ints(a.memory_volume, "--memory-volume"), _ints(a.memory_channels,
                                                                 "--memory-channels")
        rows = []
        for v in select(a.only)[i::n]:
            print(f"memory {v.key} at {vol} channels {ch}", flush=True)
            rows.append(peak_memory(v, vol, ch))
        suffix = "" if n == 1 else f"_{i}of{n}"
        write_json(out / f"memory{suffix}.json", rows)
    if n == 1:
        study = write_report(out, bench_json)
        print(format_table(study))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
