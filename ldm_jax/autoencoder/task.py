"""Stage 1 as a trainer task: the autoencoder + PatchGAN state, step and evaluation.

One step updates generator and discriminator: params and optimiser states of both live in
one pytree (`TrainState`), so one `jax.jit` with in/out shardings and buffer donation
covers the whole update (`ldm_jax.trainer` runs it; see its docstring for the contract).
"""

import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import sharding, visualize
from ldm_jax.autoencoder import geometry, losses
from ldm_jax.autoencoder.inference import PREPROCESS_FIELDS
from ldm_jax.metrics import image as metrics
from ldm_jax.models import build_autoencoder, build_discriminator
from ldm_jax.optim import all_finite, keep_if, make_optimizer
from ldm_jax.trainer.writers import say


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # micro-steps taken (a skipped step counts too)
    g_params: Any
    d_params: Any
    d_stats: Any  # discriminator batch_stats ({} for instance norm)
    g_opt: Any
    d_opt: Any
    rng: jax.Array  # raw uint32 key, checkpointable
    bad_steps: jax.Array  # consecutive non-finite steps
    skipped_steps: jax.Array  # all non-finite steps so far


class AutoencoderTask:
    """Stage 1 for `ldm_jax.trainer.train`: AutoencoderKL + PatchDiscriminator from a
    validated config (see `prepare_config`); batches are {"image": (B, X, Y, Z, C)}."""

    best_metric = "val_l1"
    config_path = None  # the config file, for hints (set by ldm_jax.cli.train.make_task)
    params_key = "g_params"  # the state entry inference restores
    progress_keys = {"loss": "loss", "rec": "recon_loss"}
    loss_metric = "loss"  # watched by the trainer for absurd values
    # What a resumed run must keep (trainer.resume_changes): the models (the state's
    # shapes) and the preprocessing (what the data mean); remat and compute dtypes do
    # not change the state.
    resume_fixed = ("autoencoder", "discriminator", *(f"data.{k}" for k in PREPROCESS_FIELDS))
    resume_free = ("autoencoder.remat", "autoencoder.dtype", "discriminator.dtype")

    def __init__(self, config, autoencoder=None, discriminator=None, perceptual_fn=None,
                 perceptual_params=None):
        self.config = config
        self.ae = autoencoder if autoencoder is not None else build_autoencoder(
            config.autoencoder)
        self.disc = discriminator if discriminator is not None else build_discriminator(
            config.discriminator)
        if perceptual_fn is None and config.loss.perceptual_weight > 0:
            from ldm_jax.autoencoder import perceptual
            perceptual_fn, perceptual_params = perceptual.make_perceptual_loss(config.loss)
        self.perceptual_fn = perceptual_fn  # fn(recon, target, rng, params) -> scalar
        self.perceptual_params = perceptual_params
        self.g_tx = make_optimizer(config.train.learning_rate, config.train)
        # The discriminator's update inside MultiSteps' cond even without accumulation:
        # scheduled freely, XLA puts it inside the autoencoder's backward pass, raising the
        # peak (benchmarks/RESULTS.md, "Figures behind code comments"); its few leaves
        # compile fast anyway.
        self.d_tx = make_optimizer(config.train.disc_learning_rate, config.train,
                                   multisteps_always=True)
        self._eval_fn = None

    # ---------------------------------------------------------------- trainer contract
    def sample_shape(self):
        """(1, X, Y, Z, C) of one training input."""
        return (1, *self.config.data.volume_size, int(self.config.autoencoder.in_channels))

    def step_consts(self):
        return self.perceptual_params

    def describe(self) -> str:
        """The plan table, then one line naming the data source and where it reads from."""
        from ldm_jax import data as data_lib
        from ldm_jax.autoencoder.plan import format_plan
        return format_plan(self.config) + "\n" + data_lib.describe(self.config)

    def train_loader(self, batch_size):
        from ldm_jax import data as data_lib
        return data_lib.make_train_loader(self.config, batch_size=batch_size,
                                          seed=int(self.config.data.seed))

    def eval_batches(self, batch_size):
        """The validation batches, at most `train.num_eval_batches` of them (0: all)."""
        from ldm_jax import data as data_lib
        batches = data_lib.make_eval_batches(self.config, batch_size=batch_size)
        limit = int(self.config.train.get("num_eval_batches", 0) or 0)
        return list(batches)[:limit] if limit else batches

    def quick_run_hint(self, seconds, first_seconds, steps) -> str:
        """What a CPU run costs and the quick run of this config: its smallest volume
        (>= 32 voxels per axis), 1000 steps (docs/training.md, "Quick CPU run"), float32
        compute in place of bfloat16 (no bfloat16 matmul on common CPUs: benchmarks/
        RESULTS.md, section 8), in a workdir of its own (runs/quick_<config name>)."""
        vol = ",".join(str(v) for v in geometry.smallest_volume(
            geometry.total_factor(self.config.autoencoder)))
        config = self.config_path or "CONFIG"
        name = os.path.splitext(os.path.basename(self.config_path))[0] if self.config_path \
            else "run"
        loss = self.config.loss
        disc = (f" (more: from step {int(loss.adv_warmup_steps)} the discriminator trains "
                "too, which slows each step)" if float(loss.adv_weight) > 0 else "")
        return (f"CPU only: the first step (compiling it) took {first_seconds:.0f} s, then "
                f"{seconds:.2f} s per step: about {seconds * steps / 3600:.1f} h for the "
                f"{steps} steps to go{disc}. The quick CPU run (docs/training.md, \"Quick "
                "CPU run\") of this config at its smallest volume:\n"
                f"  python train.py --config {config} --workdir runs/quick_{name} "
                f"--config.data.volume_size='({vol})' --config.train.num_steps=1000"
                + (" --config.autoencoder.dtype=float32"
                   if self.config.autoencoder.dtype == "bfloat16" else ""))

    def fg_threshold(self) -> float:
        """The foreground threshold in output units: b_min + eval.fg_threshold x range."""
        d = self.config.data
        frac = float(self.config.get("eval", {}).get("fg_threshold", 0.1))
        return float(d.b_min) + frac * float(d.b_max - d.b_min)

    def evaluate(self, state, batches, put, image_path):
        """Validation metrics averaged over `batches` (non-finite batch values, e.g. the
        foreground PSNR of a volume without foreground, left out); up to 4 volumes drawn
        as labelled input / reconstruction / |error| rows to `image_path` (process 0).
        Says so when the reconstructions hold far less foreground than the inputs."""
        if self._eval_fn is None:
            self._eval_fn = jax.jit(self.eval_step)
        totals, counts, shown_x, shown_r, names = {}, {}, [], [], []
        sums = {}  # array-valued outputs (e.g. code counts): summed over batches
        for batch in batches:
            out, recon = self._eval_fn(self.eval_variables(state), put({"image": batch["image"]}))
            for k, v in out.items():
                if getattr(v, "ndim", 0):
                    v = np.asarray(jax.device_get(v))
                    sums[k] = sums[k] + v if k in sums else v
                elif math.isfinite(float(v)):
                    totals[k] = totals.get(k, 0.0) + float(v)
                    counts[k] = counts.get(k, 0) + 1
            if len(shown_x) < 4:
                shown_x += list(batch["image"])
                shown_r += list(sharding.to_host(recon))  # all processes take part
                names += list(batch.get("name", [f"volume {len(names) + i}"
                                                 for i in range(len(batch["image"]))]))
        if not counts:
            return {}
        result = {k: totals[k] / counts[k] for k in totals}
        result.update(self.summarize_eval(sums))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(image_path), exist_ok=True)
            d = self.config.data
            visualize.comparison_image(shown_x, shown_r, names,
                                       (float(d.b_min), float(d.b_max)),
                                       threshold=self.fg_threshold()).save(image_path)
            warning = background_warning(result, int(state.step), self.config)
            if warning:
                say(warning)
        return result

    # ---------------------------------------------------------------- initialisation
    def init_state(self, rng, sample_shape=None):
        """Initial state; works under jax.eval_shape. Params do not depend on the volume
        size, so the default init input is the smallest volume the factors allow (>= 32)."""
        if sample_shape is None:
            vol = tuple(min(v, s) for v, s in zip(
                self.config.data.volume_size,
                geometry.smallest_volume(geometry.total_factor(self.config.autoencoder))))
            sample_shape = (1, *vol, int(self.config.autoencoder.in_channels))
        g_rng, d_rng, s_rng, run_rng = jax.random.split(rng, 4)
        x = jnp.zeros(sample_shape, jnp.float32)
        g_params = self.ae.init({"params": g_rng, "sample": s_rng}, x)["params"]
        d_vars = self.disc.init(d_rng, x, train=False)
        d_params = d_vars["params"]
        d_stats = d_vars.get("batch_stats", {})
        return TrainState(
            step=jnp.zeros((), jnp.int32), g_params=g_params, d_params=d_params,
            d_stats=d_stats, g_opt=self.g_tx.init(g_params), d_opt=self.d_tx.init(d_params),
            rng=run_rng, bad_steps=jnp.zeros((), jnp.int32),
            skipped_steps=jnp.zeros((), jnp.int32))

    # ---------------------------------------------------------------- training
    def _disc_apply(self, d_params, d_stats, x):
        variables = {"params": d_params}
        if d_stats:
            variables["batch_stats"] = d_stats
            out, new_vars = self.disc.apply(variables, x, train=True, mutable=["batch_stats"])
            return out, new_vars["batch_stats"]
        return self.disc.apply(variables, x, train=True), d_stats

    def train_step(self, state, batch, perceptual_params=None):
        # `perceptual_params` are the trainer's step constants (see `step_consts`).
        """One micro-step: generator update, then discriminator update after warm-up."""
        loss_cfg = self.config.loss
        rng, noise_rng, sample_rng, perc_rng = jax.random.split(state.rng, 4)
        target = batch["image"].astype(jnp.float32)
        x_in = losses.add_noise(target, noise_rng, loss_cfg)
        adv_w = losses.adv_weight_at(state.step, loss_cfg)
        adversarial_on = adv_w > 0
        adversary = float(loss_cfg.adv_weight) > 0  # static: 0 leaves the GAN out

        def generator_loss(g_params):
            recon, model_loss, model_metrics, model_out = self.model_forward(
                state, g_params, x_in, sample_rng)
            rec = losses.reconstruction_loss(recon, target, loss_cfg)
            total = rec + model_loss
            perc = jnp.zeros((), jnp.float32)
            if self.perceptual_fn is not None and loss_cfg.perceptual_weight > 0:
                perc = self.perceptual_fn(recon, target, perc_rng, perceptual_params)
                total = total + loss_cfg.perceptual_weight * perc

            def adv_term(recon):
                outputs, _ = self._disc_apply(state.d_params, state.d_stats, recon)
                return losses.generator_adv_loss(outputs)

            gen_adv = jnp.zeros((), jnp.float32)
            if adversary:
                gen_adv = jax.lax.cond(adversarial_on, adv_term,
                                       lambda r: jnp.zeros((), jnp.float32), recon)
            total = total + adv_w * gen_adv
            return total, dict(loss=total, recon_loss=rec, **model_metrics,
                               perceptual_loss=perc, gen_adv_loss=gen_adv, recon=recon,
                               model_out=model_out)

        (_, aux), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(state.g_params)
        recon = jax.lax.stop_gradient(aux.pop("recon"))
        model_out = jax.lax.stop_gradient(aux.pop("model_out"))

        def disc_update(_):
            def disc_loss(d_params):
                fake, stats = self._disc_apply(d_params, state.d_stats, recon)
                real, stats = self._disc_apply(d_params, stats, target)
                return losses.discriminator_loss(fake, real), stats

            (d_loss, stats), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
                state.d_params)
            return d_loss, d_grads, stats

        def no_disc_update(_):
            zeros = jax.tree.map(jnp.zeros_like, state.d_params)
            return jnp.zeros((), jnp.float32), zeros, state.d_stats

        g_updates, g_opt = self.g_tx.update(g_grads, state.g_opt, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)
        if adversary:
            d_loss, d_grads, d_stats = jax.lax.cond(adversarial_on, disc_update,
                                                    no_disc_update, None)
            d_updates, d_opt = self.d_tx.update(d_grads, state.d_opt, state.d_params)
            d_params = optax.apply_updates(state.d_params, d_updates)
            # Checking the new params too catches what finite gradients can still cause
            # (a NaN learning rate, an overflowing optimiser state).
            finite = all_finite((aux["loss"], g_grads, d_loss, d_grads, g_params, d_params))
            # Before warm-up the discriminator is frozen: its optimiser must not even count.
            # Its few leaves take a where each: a cond over them (as for the autoencoder's
            # below) keeps one more copy of its params at the step's peak
            # (benchmarks/RESULTS.md, "Figures behind code comments").
            d_params, d_opt, d_stats = _select(
                adversarial_on & finite, (d_params, d_opt, d_stats),
                (state.d_params, state.d_opt, state.d_stats))
        else:  # loss.adv_weight == 0: no discriminator in the program at all
            d_loss = jnp.zeros((), jnp.float32)
            d_params, d_opt, d_stats = state.d_params, state.d_opt, state.d_stats
            finite = all_finite((aux["loss"], g_grads, g_params))
        g_params, g_opt = keep_if(finite, (g_params, g_opt), (state.g_params, state.g_opt))

        new_state = state.replace(
            step=state.step + 1, g_params=g_params, g_opt=g_opt, d_params=d_params,
            d_opt=d_opt, d_stats=d_stats, rng=rng,
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
        step_metrics = dict(aux, disc_loss=d_loss, adv_weight=adv_w,
                            finite=finite.astype(jnp.float32))
        new_state, more = self.model_update(new_state, state, model_out, finite, sample_rng)
        return new_state, dict(step_metrics, **more)

    # The two hooks a stage-1 model kind overrides (`ldm_jax.autoencoder.vq_task`).
    def model_forward(self, state, g_params, x_in, rng):
        """The autoencoder in training: (reconstruction, its own loss term, already
        weighted (here kl_weight x KL), {metric name: value}, what `model_update` needs
        (here None)). Traced inside the generator's gradient."""
        recon, z_mu, z_sigma = self.ae.apply(
            {"params": g_params}, x_in, sample=bool(self.config.loss.sample_posterior),
            rngs={"sample": rng})
        kl = losses.kl_loss(z_mu, z_sigma)
        return recon, self.config.loss.kl_weight * kl, {"kl_loss": kl}, None

    def model_update(self, new_state, old_state, model_out, finite, rng):
        """After the gradient updates: the state's non-gradient model parts and their
        metrics; `finite` says whether the step was kept. The KL model has none."""
        return new_state, {}

    # ---------------------------------------------------------------- evaluation
    def eval_variables(self, state):
        """What `eval_step` takes from the train state (here the autoencoder params)."""
        return state.g_params

    def summarize_eval(self, sums) -> dict:
        """Metrics from the array-valued eval outputs summed over the batches (none here)."""
        return {}

    def eval_step(self, g_params, batch):
        """Validation on mu (no sampling), batch means: L1, KL, PSNR, 3D SSIM, and what a
        blank output cannot pass: foreground Dice and PSNR (target > `fg_threshold`), the
        PSNR of a blank (b_min) and of the best constant volume (`val_psnr_blank`,
        `val_psnr_mean`) and the foreground fractions of input and reconstruction."""
        x = batch["image"].astype(jnp.float32)
        z_mu, z_sigma = self.ae.apply({"params": g_params}, x, method="encode")
        recon = self.ae.apply({"params": g_params}, z_mu, method="decode")
        out = dict(
            val_l1=jnp.mean(jnp.abs(recon - x)),
            val_kl=losses.kl_loss(z_mu, z_sigma),
        )
        out.update(self.image_metrics(recon, x))
        return out, recon

    def image_metrics(self, recon, x):
        """Batch means of PSNR, 3D SSIM and what a blank output cannot pass (see
        `eval_step`); recon and x (B, X, Y, Z, C) float32."""
        data_cfg = self.config.data
        data_range = float(data_cfg.b_max - data_cfg.b_min)
        thr = self.fg_threshold()
        return dict(
            val_psnr=jnp.mean(metrics.psnr(recon, x, data_range=data_range)),
            val_ssim=jnp.mean(metrics.ssim3d(recon, x, data_range=data_range)),
            val_dice=jnp.mean(metrics.dice_score(recon, x, threshold=thr)),
            val_psnr_fg=jnp.nanmean(metrics.foreground_psnr(recon, x, thr, data_range)),
            val_psnr_blank=jnp.mean(metrics.constant_psnr(x, float(data_cfg.b_min),
                                                          data_range)),
            val_psnr_mean=jnp.mean(metrics.constant_psnr(x, None, data_range)),
            val_fg_fraction=jnp.mean(metrics.foreground_fraction(x, thr)),
            val_recon_fg_fraction=jnp.mean(metrics.foreground_fraction(recon, thr)),
        )


# A reconstruction with less than this share of the input's foreground voxels, after the
# first evaluation, is reported: the model outputs background (docs/evaluation.md).
BACKGROUND_SHARE = 0.25


def background_warning(result: dict, step: int, config) -> str | None:
    """A one-line warning when validation reconstructions are (nearly) blank: their
    foreground fraction below BACKGROUND_SHARE of the inputs', from the first evaluation
    on (`train.eval_every_steps`); None otherwise."""
    fg, rec = result.get("val_fg_fraction"), result.get("val_recon_fg_fraction")
    if fg is None or rec is None or fg <= 0 or step < int(config.train.eval_every_steps):
        return None
    if rec >= BACKGROUND_SHARE * fg:
        return None
    return (f"warning: at step {step} the model outputs background: "
            f"{100 * rec:.2f}% of the reconstructed voxels are foreground against "
            f"{100 * fg:.2f}% of the inputs' (val_dice {result.get('val_dice', 0):.3f}, "
            f"val_psnr {result.get('val_psnr', 0):.2f} dB vs {result.get('val_psnr_blank', 0):.2f}"
            " dB for a blank volume); see docs/evaluation.md, \"Stage 1: a model that "
            "outputs background\".")


def _select(pred, new, old):
    """`new` where the scalar `pred` is true, else `old`: a `jnp.where` per leaf."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)
