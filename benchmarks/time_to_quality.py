r"""Time to quality, side by side with MONAI: validation Dice and PSNR against training time.

    python -m benchmarks.time_to_quality --out runs/ttq --minutes 40 --cpus 0,1   # all three
    python -m benchmarks.time_to_quality --out runs/ttq --only monai_tutorial --minutes 40
    python -m benchmarks.time_to_quality --out runs/ttq --report \
        --png benchmarks/quality/ttq_curves.png --table benchmarks/quality/ttq_table.md

What a user gets from each tool's recommended setup on the same data, machine and threads
(`SETUPS`):

- `ours_main`: our main job as shipped (configs/balanced_4x.py: stem 2, channels (32, 64),
  one level /2, 8 latent channels, subpixel head; its recipe: L1 + 1e-6 KL, Adam 5e-4 b1
  0.9 with global-norm clipping 1.0 and cosine decay, batch 1), as docs/training.md runs
  it on a CPU at 64x64x32: 1200 steps, PatchGAN after step 2000 (i.e. off), float32
  compute (the config's bfloat16 is for accelerators).
- `ours_monai`: our implementation with MONAI's tutorial architecture and recipe
  (configs/monai_3d_ldm.py + `tutorial_recipe`), so the implementation and the recipe show
  separately.
- `monai_tutorial`: MONAI's 3D LDM tutorial (Project-MONAI/tutorials,
  generation/3d_ldm/3d_ldm_tutorial.ipynb), stage 1, in PyTorch: its AutoencoderKL and
  PatchDiscriminator as it builds them, L1 + kl_weight 1e-6 KL + adv_weight 0.01
  least-squares adversarial from epoch 6 on, Adam lr 1e-4 (torch defaults otherwise) for
  both nets, batch 2, float32, no clipping. Its perceptual term (perceptual_weight 0.001,
  SqueezeNet LPIPS) is left out on both MONAI-recipe sides: it needs the `lpips` package
  and pretrained weights downloaded on first use, which this offline machine cannot do.

Data (every side): the built-in synthetic filaments (ldm_jax.data, data.seed 0: the same 64
training volumes, the same 4 held-out validation volumes, the same loader and
augmentation, loader seed data.seed), crop `--volume`. A tutorial "epoch" is one pass over
the 64 training volumes: 32 steps at batch 2, so its adversarial term starts at step 192.

Each setup trains in a fresh process pinned to one core (sched_setaffinity, plus
`--xla_cpu_multi_thread_eigen=false` for XLA and torch.set_num_threads(1)); every
`--eval-every-s` CPU seconds of training it reconstructs the held-out volumes from mu
(no sampling) and scores them with the same code (`score`: ldm_jax.metrics on numpy
arrays, torch outputs moved to channels-last): Dice at eval.fg_threshold, PSNR, the
PSNR of a blank volume, foreground PSNR. Rows (step, training wall s, training process CPU
s, the metrics, the load average) go to `<out>/<setup>.jsonl` as they come. The clock
starts before the models are built (initialisation and compilation count) and stops
during evaluations. A setup stops at Dice >= `--stop-dice` on `--sustain` evaluations in
a row, or at the `--minutes` of CPU time (or `--wall-minutes`). `--report` writes the
curves (PNG), the table and the time ratios at Dice 0.8, or at the highest Dice both
sides reach.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT

SETUPS = {
    "ours_main": ("jax", "ours: main job (balanced_4x.py) and its recipe"),
    "ours_monai": ("jax", "ours: MONAI tutorial architecture and recipe"),
    "monai_tutorial": ("torch", "MONAI 1.x tutorial (AutoencoderKL + PatchDiscriminator)"),
}
# MONAI's 3D LDM tutorial, stage 1, as it writes it.
TUTORIAL_AE = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
               "channels": (32, 64, 64), "latent_channels": 3, "num_res_blocks": 1,
               "norm_num_groups": 16, "attention_levels": (False, False, True)}
TUTORIAL_DISC = {"spatial_dims": 3, "num_layers_d": 3, "channels": 32, "in_channels": 1,
                 "out_channels": 1}
TUTORIAL = {"batch_size": 2, "lr": 1e-4, "adv_weight": 0.01, "kl_weight": 1e-6,
            "perceptual_weight": 0.001, "warm_up_n_epochs": 5, "seed": 42}
MARKER = "TTQ_DONE"


# ----------------------------------------------------------------------------------------
# The setups' configurations.


def tutorial_adv_start(num_train: int, batch: int = TUTORIAL["batch_size"]) -> int:
    """The step at which the tutorial's adversarial term starts: `epoch >
    autoencoder_warm_up_n_epochs`, i.e. after warm_up + 1 epochs of ceil(n / batch) steps."""
    return (TUTORIAL["warm_up_n_epochs"] + 1) * math.ceil(num_train / batch)


def tutorial_recipe(config):
    """MONAI's tutorial recipe on one of our configs (in place; returned)."""
    t, loss = config.train, config.loss
    t.batch_size = TUTORIAL["batch_size"]
    t.learning_rate = t.disc_learning_rate = TUTORIAL["lr"]
    t.b1, t.b2, t.eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
    t.grad_clip_norm = 0.0
    t.schedule, t.warmup_steps = "constant", 0
    loss.recon = "l1"
    loss.kl_weight = TUTORIAL["kl_weight"]
    loss.adv_weight = TUTORIAL["adv_weight"]
    loss.adv_warmup_steps = tutorial_adv_start(int(config.data.num_train_volumes))
    loss.perceptual_weight = 0.0  # see the module docstring
    loss.sample_posterior = True
    config.autoencoder.dtype = config.discriminator.dtype = "float32"  # no autocast
    return config


def setup_config(name: str, volume):
    """The resolved, validated config of setup `name` at crop `volume` (for the MONAI
    side: the data section it reads, and the recipe its step implements)."""
    from benchmarks.common import load
    from ldm_jax.autoencoder.config import prepare_config
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}; known: {', '.join(SETUPS)}")
    if name == "ours_main":
        config = load("configs/balanced_4x.py")
        # docs/training.md's 64x64x32 CPU command: cosine decay over 1200 steps, no GAN,
        # float32 compute (17% less step time than bfloat16 on this CPU: QUALITY.md).
        config.train.num_steps, config.loss.adv_warmup_steps = 1200, 2000
        config.autoencoder.dtype = "float32"
    else:
        config = tutorial_recipe(load("configs/monai_3d_ldm.py"))
    config.data.volume_size = tuple(int(v) for v in volume)
    config.mesh.data, config.mesh.spatial = 1, 1
    return prepare_config(config)


# ----------------------------------------------------------------------------------------
# Scoring: the same code for every side.


def score(recons, inputs, config) -> dict:
    """Takes reconstructions and inputs (numpy, channels-last (N, X, Y, Z, C)) and the
    config; gives the held-out means: dice (at eval.fg_threshold), psnr, psnr_blank (a
    b_min volume), psnr_fg (foreground voxels), recon_fg / input_fg fractions."""
    import numpy as np

    from ldm_jax.metrics import image as m
    d = config.data
    rng = float(d.b_max - d.b_min)
    thr = float(d.b_min) + float(config.eval.fg_threshold) * rng
    r, x = np.asarray(recons, np.float32), np.asarray(inputs, np.float32)
    out = {"dice": m.dice_score(r, x, threshold=thr), "psnr": m.psnr(r, x, data_range=rng),
           "psnr_blank": m.constant_psnr(x, float(d.b_min), rng),
           "psnr_fg": m.foreground_psnr(r, x, thr, rng),
           "recon_fg": m.foreground_fraction(r, thr),
           "input_fg": m.foreground_fraction(x, thr)}
    return {k: float(np.nanmean(np.asarray(v))) for k, v in out.items()}


def eval_volumes(config):
    """The held-out volumes, (N, X, Y, Z, C) numpy."""
    import numpy as np

    from ldm_jax import data as data_lib
    batches = data_lib.make_eval_batches(config, batch_size=1)
    vols = [np.asarray(b["image"]) for b in batches]
    return np.concatenate(vols)[:batches.num_volumes]


# ----------------------------------------------------------------------------------------
# The worker: one setup, one process, one core.


class Clock:
    """Training time (wall and process CPU) since `start`, evaluations excluded."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.paused_wall = self.paused_cpu = 0.0

    def now(self):
        return (time.perf_counter() - self.wall0 - self.paused_wall,
                time.process_time() - self.cpu0 - self.paused_cpu)

    def pause(self):
        return time.perf_counter(), time.process_time()

    def resume(self, mark):
        self.paused_wall += time.perf_counter() - mark[0]
        self.paused_cpu += time.process_time() - mark[1]


def _jax_trainer(config):
    """(init(): params count, step(batch) -> loss, recon(x numpy) -> numpy)."""
    import jax
    import numpy as np

    from benchmarks.common import like_train_py
    from ldm_jax.autoencoder.task import AutoencoderTask
    like_train_py()
    task = AutoencoderTask(config)
    box = {}

    def init():
        box["state"] = jax.jit(task.init_state)(jax.random.PRNGKey(int(config.train.seed)))
        return int(sum(x.size for x in jax.tree.leaves(box["state"].g_params)))

    step_fn = jax.jit(lambda s, b: task.train_step(s, b, None), donate_argnums=(0,))

    def step(images):
        box["state"], metrics = step_fn(box["state"], {"image": images})
        loss = float(metrics["recon_loss"])  # blocks: the step is done
        if not float(metrics["finite"]):
            raise FloatingPointError("non-finite step")
        return loss

    def _recon(params, x):
        z_mu, _ = task.ae.apply({"params": params}, x, method="encode")
        return task.ae.apply({"params": params}, z_mu, method="decode")

    recon_fn = jax.jit(_recon)

    def recon(x):
        return np.concatenate([np.asarray(recon_fn(box["state"].g_params, x[i:i + 1]))
                               for i in range(len(x))])

    return init, step, recon


def _torch_trainer(config):
    """MONAI's tutorial stage-1 loop body (perceptual term left out), same interface."""
    import numpy as np
    import torch
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator
    from monai.utils import set_determinism
    torch.set_num_threads(1)
    box = {"step": 0}
    adv_start = int(config.loss.adv_warmup_steps)  # tutorial_adv_start(num_train)

    def kl_loss(z_mu, z_sigma):
        klloss = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1,
                                 dim=[1, 2, 3, 4])
        return torch.sum(klloss) / klloss.shape[0]

    def init():
        set_determinism(TUTORIAL["seed"])
        box["ae"] = AutoencoderKL(**TUTORIAL_AE)
        box["disc"] = PatchDiscriminator(**TUTORIAL_DISC)
        box["opt_g"] = torch.optim.Adam(params=box["ae"].parameters(), lr=TUTORIAL["lr"])
        box["opt_d"] = torch.optim.Adam(params=box["disc"].parameters(), lr=TUTORIAL["lr"])
        box["l1"] = torch.nn.L1Loss()
        box["adv"] = PatchAdversarialLoss(criterion="least_squares")
        return int(sum(p.numel() for p in box["ae"].parameters()))

    def step(images_np):
        ae, disc, opt_g, opt_d = box["ae"], box["disc"], box["opt_g"], box["opt_d"]
        ae.train()
        disc.train()
        images = torch.from_numpy(np.ascontiguousarray(
            np.moveaxis(np.asarray(images_np, np.float32), -1, 1)))
        adversarial = box["step"] >= adv_start
        opt_g.zero_grad(set_to_none=True)
        reconstruction, z_mu, z_sigma = ae(images)
        klloss = kl_loss(z_mu, z_sigma)
        recons_loss = box["l1"](reconstruction.float(), images.float())
        loss_g = recons_loss + TUTORIAL["kl_weight"] * klloss
        if adversarial:
            logits_fake = disc(reconstruction.contiguous().float())[-1]
            generator_loss = box["adv"](logits_fake, target_is_real=True,
                                        for_discriminator=False)
            loss_g += TUTORIAL["adv_weight"] * generator_loss
        loss_g.backward()
        opt_g.step()
        if adversarial:
            opt_d.zero_grad(set_to_none=True)
            logits_fake = disc(reconstruction.contiguous().detach())[-1]
            loss_d_fake = box["adv"](logits_fake, target_is_real=False, for_discriminator=True)
            logits_real = disc(images.contiguous().detach())[-1]
            loss_d_real = box["adv"](logits_real, target_is_real=True, for_discriminator=True)
            loss_d = TUTORIAL["adv_weight"] * (loss_d_fake + loss_d_real) * 0.5
            loss_d.backward()
            opt_d.step()
        box["step"] += 1
        loss = float(recons_loss.item())
        if not math.isfinite(loss):
            raise FloatingPointError("non-finite step")
        return loss

    def recon(x):
        ae = box["ae"]
        ae.eval()
        out = []
        with torch.no_grad():
            for i in range(len(x)):
                t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x[i:i + 1], -1, 1)))
                z_mu, _ = ae.encode(t)
                out.append(np.moveaxis(ae.decode(z_mu).numpy(), 1, -1))
        ae.train()
        return np.concatenate(out)

    return init, step, recon


def framework_versions(kind: str) -> str:
    if kind == "torch":
        import monai
        import torch
        return f"monai {monai.__version__} / torch {torch.__version__}"
    import jax
    return f"jax {jax.__version__}"


def train_worker(spec: dict) -> dict:
    """Trains setup spec["setup"] until the stop rule; appends rows to spec["jsonl"]."""
    import platform

    import numpy as np

    from ldm_jax import data as data_lib
    name = spec["setup"]
    kind = SETUPS[name][0]
    config = setup_config(name, spec["volume"])
    path = Path(spec["jsonl"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def write(row):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    batch = int(config.train.batch_size)
    xs = eval_volumes(config)
    clock = Clock()
    init, step, recon = (_torch_trainer if kind == "torch" else _jax_trainer)(config)
    params = init()
    loader = iter(data_lib.make_train_loader(config, batch_size=batch,
                                             seed=int(config.data.seed)))
    write({"kind": "meta", "setup": name, "label": SETUPS[name][1], "framework": kind,
           "versions": framework_versions(kind), "volume": list(spec["volume"]),
           "batch": batch, "params": params, "cpus": sorted(os.sched_getaffinity(0)),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
           "lr": float(config.train.learning_rate), "b1": float(config.train.b1),
           "adv_start": int(config.loss.adv_warmup_steps),
           "dtype": str(config.autoencoder.dtype), "num_val": len(xs),
           "fg_threshold": float(config.eval.fg_threshold), "spec": spec})
    stop_dice, sustain = float(spec["stop_dice"]), int(spec["sustain"])
    max_cpu, max_wall = 60.0 * float(spec["minutes"]), 60.0 * float(spec["wall_minutes"])
    every_s, every_steps = float(spec.get("eval_every_s") or 0), int(
        spec.get("eval_every") or 0)
    max_steps = int(spec.get("max_steps") or 0)
    n, losses, streak, last_eval_cpu, reason = 0, [], 0, 0.0, None

    def evaluate():
        wall, cpu = clock.now()
        mark = clock.pause()
        metrics = score(recon(xs), xs, config)
        row = dict(kind="eval", step=n, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                   train_l1=(round(float(np.mean(losses)), 5) if losses else None),
                   load=round(os.getloadavg()[0], 2), **metrics)
        clock.resume(mark)
        row["eval_wall_s"] = round(time.perf_counter() - mark[0], 2)
        write(row)
        print(f"{name} step {n} cpu {cpu:.0f} s wall {wall:.0f} s dice {metrics['dice']:.3f} "
              f"psnr {metrics['psnr']:.2f} (blank {metrics['psnr_blank']:.2f})", flush=True)
        return metrics["dice"], cpu

    evaluate()  # the untrained model, at time 0
    while reason is None:
        losses.append(step(next(loader)["image"]))
        n += 1
        wall, cpu = clock.now()
        due = (every_steps and n % every_steps == 0) or (
            every_s and cpu - last_eval_cpu >= every_s)
        last = (max_steps and n >= max_steps) or cpu >= max_cpu or wall >= max_wall
        if due or last:
            dice, last_eval_cpu = evaluate()
            losses = []
            streak = streak + 1 if dice >= stop_dice else 0
            if streak >= sustain:
                reason = f"dice >= {stop_dice} on {sustain} evaluations in a row"
            elif max_steps and n >= max_steps:
                reason = f"max_steps {max_steps}"
            elif cpu >= max_cpu:
                reason = f"CPU cap {max_cpu:.0f} s"
            elif wall >= max_wall:
                reason = f"wall cap {max_wall:.0f} s"
    wall, cpu = clock.now()
    end = {"kind": "end", "setup": name, "reason": reason, "steps": n,
           "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    write(end)
    if hasattr(loader, "close"):
        loader.close()
    return end


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    cpu = spec.get("cpu")
    if cpu is not None:  # before JAX or torch size their thread pools
        os.sched_setaffinity(0, {int(cpu)})
    flags = os.environ.get("XLA_FLAGS", "")
    if "multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    end = train_worker(spec)
    print(MARKER + " " + json.dumps(end), flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# The driver: one fresh process per setup, at most one per core at a time.


def run_setups(names, out: Path, cpus, spec_base: dict, log=print) -> None:
    """Runs each setup in a fresh process pinned to one of `cpus` (as many at once as
    cores given); a setup whose JSONL already ends with an "end" row is skipped, an
    unfinished one starts over (its time would not be comparable)."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not finished(out / f"{n}.jsonl")]
    for n in names:
        if n not in todo:
            log(f"{n}: finished already, skipped")
    free, running = list(cpus), {}
    while todo or running:
        while todo and free:
            name, cpu = todo.pop(0), free.pop(0)
            spec = dict(spec_base, setup=name, cpu=cpu, jsonl=str(out / f"{name}.jsonl"))
            spec_path = out / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec, indent=1))
            logf = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed when it exits)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.time_to_quality", "--_worker",
                 str(spec_path)], cwd=str(REPO_ROOT), stdout=logf, stderr=subprocess.STDOUT,
                env=env)
            running[name] = (proc, cpu, logf)
            log(f"{name}: started on CPU {cpu} (pid {proc.pid}), log {out / (name + '.log')}")
        time.sleep(1.0)
        for name, (proc, cpu, logf) in list(running.items()):
            if proc.poll() is not None:
                logf.close()
                del running[name]
                free.append(cpu)
                log(f"{name}: exited with {proc.returncode}")
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed; see {out / (name + '.log')}")


def finished(path: Path) -> bool:
    rows = read_jsonl(path)
    return bool(rows) and rows[-1].get("kind") == "end"


def read_jsonl(path: Path) -> list:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------
# Report: times to a Dice, ratios, table, curves.


METRICS = {  # what a time is measured to: Dice, and PSNR above a blank volume's (dB)
    "dice": lambda r: r["dice"],
    "psnr_gain": lambda r: r["psnr"] - r["psnr_blank"],
}


def time_to(rows, value: float, key: str = "cpu_s", metric: str = "dice"):
    """The `key` time of the first evaluation with `metric` >= value, or None."""
    for r in rows:
        if r.get("kind") == "eval" and METRICS[metric](r) >= value:
            return r[key]
    return None


def best(rows, metric: str = "dice") -> float:
    return max((METRICS[metric](r) for r in rows if r.get("kind") == "eval"),
               default=float("nan"))


def best_dice(rows) -> float:
    return best(rows, "dice")


def compare(ours, theirs, target: float = 0.8, metric: str = "dice") -> dict:
    """Takes two setups' rows and a target (of `metric`, Dice by default); gives the level
    compared (`target` if both reach it, else the highest both reach), both times to it
    (CPU and wall) and the ratios ours / theirs, plus what bounds them when one side never
    reached the target."""
    reached = {k: time_to(v, target, metric=metric) is not None
               for k, v in (("ours", ours), ("theirs", theirs))}
    level = target if all(reached.values()) else min(best(ours, metric), best(theirs, metric))
    out = {"target": target, "level": level, "reached": reached, "metric": metric}
    for key in ("cpu_s", "wall_s"):
        a, b = (time_to(ours, level, key, metric), time_to(theirs, level, key, metric))
        out[f"ours_{key}"], out[f"theirs_{key}"] = a, b
        out[f"ratio_{key}"] = (a / b) if a is not None and b else None
    if reached["ours"] and not reached["theirs"]:
        end = [r for r in theirs if r.get("kind") == "eval"][-1]
        out["theirs_bound_cpu_s"] = end["cpu_s"]
        out["ratio_cpu_s_at_most"] = time_to(ours, target, metric=metric) / end["cpu_s"]
    return out


PAIRS = (("ours_main", "monai_tutorial"), ("ours_monai", "monai_tutorial"),
         ("ours_main", "ours_monai"))


def load_runs(out: Path) -> dict:
    return {n: read_jsonl(out / f"{n}.jsonl") for n in SETUPS if (out / f"{n}.jsonl").exists()}


def _t(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def report_table(runs: dict, target: float = 0.8, gain_target: float = 5.0) -> str:
    head = ("| setup | framework | batch | params | steps | training CPU s | wall s | "
            f"best Dice | CPU s to Dice {target} | wall s to Dice {target} | PSNR at it dB "
            "(blank) | stopped by |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        meta = next((r for r in rows if r.get("kind") == "meta"), {})
        end = next((r for r in rows if r.get("kind") == "end"), None)
        evals = [r for r in rows if r.get("kind") == "eval"]
        if not evals:
            continue
        hit = next((r for r in evals if r["dice"] >= target), None)
        last = evals[-1]
        psnr = (f"{hit['psnr']:.2f} ({hit['psnr_blank']:.2f})" if hit else
                f"{last['psnr']:.2f} ({last['psnr_blank']:.2f}) at the end")
        lines.append(
            f"| `{name}` | {meta.get('versions', '?')} | {meta.get('batch', '?')} | "
            f"{meta.get('params', 0) / 1e6:.2f} M | {last['step']} | {last['cpu_s']:.0f} | "
            f"{last['wall_s']:.0f} | {best_dice(rows):.3f} | {_t(hit and hit['cpu_s'])} | "
            f"{_t(hit and hit['wall_s'])} | {psnr} | "
            f"{end['reason'] if end else 'unfinished'} |")
    head = ("| ours | against | compared at | CPU s (ours / theirs) | ratio CPU | "
            "wall s (ours / theirs) | ratio wall |")
    lines += ["", head, "|---|---|---|---|---|---|---|"]
    for metric, goal, name, fmt in (("dice", target, "Dice", "{:.3f}"),
                                    ("psnr_gain", gain_target, "dB above blank", "{:+.2f}")):
        for a, b in PAIRS:
            if a not in runs or b not in runs:
                continue
            c = compare(runs[a], runs[b], goal, metric)
            level = f"{name} {fmt.format(c['level'])}"
            if c["level"] != goal:
                level += (f" (highest both reach; {fmt.format(goal)} not reached by "
                          f"{', '.join(k for k, v in c['reached'].items() if not v)})")
            ratio = _t(c["ratio_cpu_s"], 2)
            if "ratio_cpu_s_at_most" in c:
                ratio += (f"; at {name} {fmt.format(goal)}: ≤ {c['ratio_cpu_s_at_most']:.2f} "
                          f"(theirs not there in {c['theirs_bound_cpu_s']:.0f} CPU s)")
            lines.append(f"| `{a}` | `{b}` | {level} | {_t(c['ours_cpu_s'])} / "
                         f"{_t(c['theirs_cpu_s'])} | {ratio} | {_t(c['ours_wall_s'])} / "
                         f"{_t(c['theirs_wall_s'])} | {_t(c['ratio_wall_s'], 2)} |")
    return "\n".join(lines)


COLORS = {"ours_main": (31, 119, 180), "ours_monai": (44, 160, 44),
          "monai_tutorial": (214, 39, 40)}


def plot(runs: dict, path: Path, target: float = 0.8) -> None:
    """2 x 2 panels (Pillow): Dice and PSNR (blank dashed) against CPU s and wall s."""
    from PIL import Image, ImageDraw

    from benchmarks.bench_plot import font as plot_font
    W, H, M = 520, 340, (62, 18, 30, 46)  # panel size; margins left, right, top, bottom
    img = Image.new("RGB", (2 * W, 2 * H + 16 + 16 * len(runs)), "white")
    draw = ImageDraw.Draw(img)
    font, small = plot_font(14), plot_font(11)
    evals = {n: [r for r in rows if r.get("kind") == "eval"] for n, rows in runs.items()}
    panels = [("dice", "cpu_s", "Dice"), ("dice", "wall_s", "Dice"),
              ("psnr", "cpu_s", "PSNR dB"), ("psnr", "wall_s", "PSNR dB")]
    for i, (ykey, xkey, ylabel) in enumerate(panels):
        ox, oy = (i % 2) * W, (i // 2) * H
        x0, x1, y0, y1 = ox + M[0], ox + W - M[1], oy + M[2], oy + H - M[3]
        xmax = max((r[xkey] for rs in evals.values() for r in rs), default=1.0) or 1.0
        ys = [r[ykey] for rs in evals.values() for r in rs]
        ys += [r["psnr_blank"] for rs in evals.values() for r in rs] if ykey == "psnr" else []
        lo, hi = (0.0, 1.0) if ykey == "dice" else (math.floor(min(ys, default=0)),
                                                    math.ceil(max(ys, default=1)))
        hi = hi if hi > lo else lo + 1

        def px(x, y, lo=lo, hi=hi, xmax=xmax, x0=x0, x1=x1, y0=y0, y1=y1):
            return (x0 + (x1 - x0) * x / xmax, y1 - (y1 - y0) * (y - lo) / (hi - lo))

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for k in range(5):
            xv, yv = xmax * k / 4, lo + (hi - lo) * k / 4
            draw.text((px(xv, lo)[0] - 10, y1 + 4), f"{xv:.0f}", fill=(0, 0, 0), font=small)
            draw.text((ox + 8, px(0, yv)[1] - 6), f"{yv:.2f}" if ykey == "dice" else
                      f"{yv:.0f}", fill=(0, 0, 0), font=small)
        draw.text((x0 + 120, y1 + 20), "training " + ("process CPU s (1 core)"
                  if xkey == "cpu_s" else "wall s"), fill=(0, 0, 0), font=font)
        draw.text((x0 + 4, y0 + 2), ylabel, fill=(0, 0, 0), font=font)
        if ykey == "dice":
            ty = px(0, target)[1]
            for xs in range(int(x0), int(x1), 8):
                draw.line([xs, ty, xs + 4, ty], fill=(150, 150, 150))
        for name, rs in evals.items():
            if not rs:
                continue
            color = COLORS.get(name, (0, 0, 0))
            draw.line([px(r[xkey], r[ykey]) for r in rs], fill=color, width=2)
            if ykey == "psnr":
                pts = [px(r[xkey], r["psnr_blank"]) for r in rs]
                for a, b in zip(pts[::2], pts[1::2]):
                    draw.line([a, b], fill=color, width=1)
    for k, name in enumerate(evals):  # one legend line per setup
        y = 2 * H + 6 + 16 * k
        draw.rectangle([10, y + 2, 28, y + 12], fill=COLORS.get(name, (0, 0, 0)))
        draw.text((34, y), f"{name}: {SETUPS[name][1]}", fill=(0, 0, 0), font=small)
    draw.text((2 * W - 330, 2 * H + 6), f"dotted: Dice {target}; thin dashes: PSNR of a "
              "blank volume", fill=(90, 90, 90), font=small)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# ----------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ttq", help="output folder (JSONL, logs)")
    p.add_argument("--only", default="", help=f"comma list of {', '.join(SETUPS)}")
    p.add_argument("--volume", default="64,64,32", help="X,Y,Z crop")
    p.add_argument("--minutes", type=float, default=40.0,
                   help="cap per setup: minutes of training process CPU time")
    p.add_argument("--wall-minutes", type=float, default=None,
                   help="cap per setup in wall minutes (default: 3 x --minutes)")
    p.add_argument("--eval-every-s", type=float, default=30.0,
                   help="evaluate every this many CPU seconds of training")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every this many steps instead (0: by time)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    p.add_argument("--stop-dice", type=float, default=0.8)
    p.add_argument("--sustain", type=int, default=2,
                   help="stop after this many evaluations in a row at >= --stop-dice")
    p.add_argument("--cpus", default="0",
                   help="cores to pin setups to, one setup per core at a time (e.g. 0,1)")
    p.add_argument("--report", action="store_true", help="only write the report")
    p.add_argument("--png", default=None, help="curves PNG (default <out>/ttq_curves.png)")
    p.add_argument("--table", default=None, help="markdown table (default <out>/ttq_table.md)")
    p.add_argument("--target", type=float, default=0.8, help="Dice of the time ratios")
    p.add_argument("--gain-target", type=float, default=5.0,
                   help="PSNR above a blank volume's (dB) of the second time ratios")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        return worker_main(a._worker)
    out = Path(a.out)
    names = [n for n in a.only.split(",") if n] or list(SETUPS)
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
    if not a.report:
        volume = [int(v) for v in a.volume.replace("x", ",").split(",")]
        spec = {"volume": volume, "minutes": a.minutes,
                "wall_minutes": a.wall_minutes or 3 * a.minutes,
                "eval_every_s": a.eval_every_s, "eval_every": a.eval_every,
                "max_steps": a.max_steps, "stop_dice": a.stop_dice, "sustain": a.sustain}
        run_setups(names, out, [int(c) for c in a.cpus.split(",")], spec)
    runs = load_runs(out)
    text = report_table(runs, a.target, a.gain_target)
    Path(a.table or out / "ttq_table.md").parent.mkdir(parents=True, exist_ok=True)
    Path(a.table or out / "ttq_table.md").write_text(text + "\n")
    if runs:
        plot(runs, Path(a.png or out / "ttq_curves.png"), a.target)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
