"""Stage-1 training loop: data -> jitted sharded step -> eval, images, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; `train.py` is its command line.
A second run on the same workdir resumes from the latest checkpoint, exactly: the train
state (params, optimiser states, step, rng) and the data iterator are both restored.
"""

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import config as config_lib
from ldm_jax import data as data_lib
from ldm_jax import sharding, visualize
from ldm_jax.models import build_autoencoder, build_discriminator
from ldm_jax.steps import Stage1


class TrainingDivergedError(RuntimeError):
    pass


def prepare_config(config):
    """Applies `train.remat` to the model and validates the whole config."""
    config = config.copy_and_resolve_references()
    if config.train.get("remat") is not None:
        config.autoencoder.remat = config.train.remat
    config_lib.validate(config)
    return config


def _init_shape(config):
    """A small input for init: params do not depend on the volume size."""
    tf = config_lib.total_factor(config.autoencoder)
    vol = tuple(min(v, max(f, 32) // f * f) for v, f in zip(config.data.volume_size, tf))
    return (1, *vol, config.autoencoder.in_channels)


def build_stage1(config):
    """Models, optional perceptual loss and the step functions for a config."""
    ae = build_autoencoder(config.autoencoder)
    disc = build_discriminator(config.discriminator)
    perceptual_fn, perceptual_params = None, None
    if config.loss.perceptual_weight > 0:
        from ldm_jax import perceptual
        perceptual_fn, perceptual_params = perceptual.make_perceptual_loss(config.loss)
    return Stage1(config, ae, disc, perceptual_fn), perceptual_params


def compile_train_step(stage, mesh, abstract_state):
    """One jax.jit over the whole update: replicated state, batch sharded, state donated."""
    repl = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: repl, abstract_state)
    return jax.jit(stage.train_step,
                   in_shardings=(state_sh, sharding.batch_sharding(mesh), repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))


def init_train_state(stage, config, mesh):
    rng = jax.random.PRNGKey(int(config.train.seed))
    shape = _init_shape(config)
    init = functools.partial(stage.init_state, sample_shape=shape)
    abstract = jax.eval_shape(init, rng)
    repl = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: repl, abstract)
    state = jax.jit(init, out_shardings=state_sh)(rng)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_sh)
    return state, abstract


class _Writers:
    """metrics.jsonl and TensorBoard events, written by process 0 only."""

    def __init__(self, workdir):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # events are optional; metrics.jsonl always written
                self.tb = None

    def write(self, step, values):
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def evaluate(stage, eval_fn, state, eval_batches, mesh, workdir, step):
    """Averages validation metrics over the eval set and writes images/step_<N>.png."""
    totals, count, shown_x, shown_r = {}, 0, [], []
    for batch in eval_batches:
        gbatch = {"image": sharding.put_global_batch(batch["image"], mesh)}
        out, recon = eval_fn(state.g_params, gbatch)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += 1
        if len(shown_x) < 4:
            shown_x += list(batch["image"])
            shown_r += list(np.asarray(jax.device_get(recon)))
    if count == 0:
        return {}
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
        d = stage.config.data
        rows = visualize.comparison_rows(shown_x, shown_r, (float(d.b_min), float(d.b_max)))
        visualize.save_grid(rows, os.path.join(workdir, "images", f"step_{step}.png"))
    return {k: v / count for k, v in totals.items()}


def _say(msg):
    if jax.process_index() == 0:
        print(msg, flush=True)


def quick_volume(config, smallest=32):
    """Smallest volume of at least `smallest` voxels per axis that the config's total factor
    divides: what a CPU can train in minutes per hundred steps."""
    return tuple(-(-max(smallest, f) // f) * f for f in config_lib.total_factor(config.autoencoder))


def _cpu_hint(config, seconds, first_seconds):
    steps = int(config.train.num_steps) * int(config.train.grad_accum_steps)
    vol = ",".join(str(v) for v in quick_volume(config))
    _say(f"CPU only: the first step (compiling it) took {first_seconds:.0f} s, then "
         f"{seconds:.2f} s per step: about {seconds * steps / 3600:.1f} h "
         f"for {steps} steps. For a quick run on a CPU try:\n"
         f"  python train.py --config <config> --workdir runs/quick "
         f"--config.data.volume_size='({vol})' --config.train.num_steps=300")


def train_and_evaluate(config, workdir, progress=True):
    """Trains stage 1 in `workdir`; returns the final train state."""
    config = prepare_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    global_batch = int(config.train.batch_size)
    sharding.check_batch_fits(mesh, global_batch, tuple(config.data.volume_size))
    if global_batch % jax.process_count():
        raise config_lib.ConfigError(
            f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} "
            "processes.")

    from ldm_jax.plan import format_plan
    _say(format_plan(config))
    _say(f"Mesh: data={mesh.shape['data']} x spatial={mesh.shape['spatial']} over "
         f"{mesh.devices.size} of {len(jax.devices())} {jax.devices()[0].platform} "
         f"device(s), {jax.process_count()} process(es)")

    stage, perceptual_params = build_stage1(config)
    state, abstract_state = init_train_state(stage, config, mesh)
    train_iter = iter(data_lib.make_train_loader(
        config, batch_size=global_batch // jax.process_count(), seed=int(config.data.seed)))
    eval_batches = data_lib.make_eval_batches(config, batch_size=max(
        mesh.shape["data"], min(global_batch, 4)))

    manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints)
    accum = int(config.train.grad_accum_steps)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        state = ckpt.restore_train(manager, latest, abstract_state, train_iter)
        start = int(latest)
        _say(f"Resuming from the checkpoint at step {start} in {manager.directory}")

    step_fn = compile_train_step(stage, mesh, abstract_state)
    eval_fn = jax.jit(stage.eval_step)
    writers = _Writers(workdir)
    num_steps = int(config.train.num_steps)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True,
                   file=sys.stdout)

    last_metrics, t_log, n_log = {}, time.perf_counter(), 0
    step_times = []
    try:
        for step in range(start + 1, num_steps + 1):
            t0 = time.perf_counter()
            for _ in range(accum):
                batch = next(train_iter)
                gbatch = {"image": sharding.put_global_batch(batch["image"], mesh)}
                state, metrics = step_fn(state, gbatch, perceptual_params)
            bad = int(state.bad_steps)  # syncs: the guard must see this step
            step_times.append(time.perf_counter() - t0)
            if bad >= int(config.train.max_bad_steps):
                raise TrainingDivergedError(
                    f"Stopped at step {step}: {bad} steps in a row had non-finite losses or "
                    f"gradients (train.max_bad_steps={config.train.max_bad_steps}). The last "
                    f"good checkpoint in {manager.directory} is untouched. Lower "
                    "train.learning_rate, check the data for extreme values, or raise "
                    "train.grad_clip_norm strictness.")
            if step == start + 3 and jax.devices()[0].platform == "cpu":
                _cpu_hint(config, float(np.median(step_times[1:])), step_times[0])
            n_log += 1
            if step % int(config.train.log_every_steps) == 0 or step == num_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["steps_per_s"] = n_log / (time.perf_counter() - t_log)
                values["skipped_steps"] = int(state.skipped_steps)
                writers.write(step, values)
                last_metrics.update(values)
                t_log, n_log = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}",
                                    rec=f"{values['recon_loss']:.4f}",
                                    it_s=f"{values['steps_per_s']:.2f}")
            val = None
            if step % int(config.train.eval_every_steps) == 0 or step == num_steps:
                val = evaluate(stage, eval_fn, state, eval_batches, mesh, workdir, step)
                writers.write(step, val)
                last_metrics.update(val)
                _say(f"\nstep {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            # No checkpoint during a streak of skipped steps: the last good one stays latest.
            if bad == 0 and (step % int(config.train.save_every_steps) == 0
                             or step == num_steps):
                ckpt.save(manager, step, state, config, train_iter,
                          dict(last_metrics, **(val or {})) if val else last_metrics)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        writers.close()
        manager.close()
    return state
