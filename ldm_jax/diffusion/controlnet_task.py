"""Training a ControlNet on a frozen stage-2 UNet, as a trainer task.

Reference: MONAI's ControlNet tutorial (tutorials generation/controlnet): the ControlNet
starts as a copy of the trained UNet's encoder (`controlnet.load_state_dict(
unet.state_dict(), strict=False)`: `controlnet_from_unet`), the UNet is frozen, and the
loss is stage 2's diffusion loss of UNet(x_t, t, + the down/mid residuals of
ControlNet(x_t, t, condition)) (Zhang & Agrawala 2023). Everything else is stage 2's
(`DiffusionTask`): latents, scale factor, optimiser, EMA, checkpoints, resume,
evaluation. The train state holds the ControlNet's params and their EMA; the UNet's
params (the UNet run's EMA weights) are a step constant, so they cannot change.

The run adopts `unet`, `scheduler`, `conditioning` and the autoencoder and scale fields of
`latents` from the UNet's run (`controlnet.unet_workdir` at `controlnet.unet_step`, which
is resolved to a number): its own checkpoints name everything `load_pipeline` needs.

The condition of each training volume (`controlnet.condition.kind`):
- "foreground_mask": computed inside the step from the volume (after its random crop and
  flips), 1 where it is above `threshold`; it needs the volume, so latents are encoded on
  the fly: extracted latents (`latents.dir`) carry no volume and are refused.
- "inpainting": computed inside the step too: the volume with a random box set to 0, and
  the box (C + 1 channels; `box_fraction` the range of its side per axis); validation
  blanks the centre half of each axis. `ldm_jax.diffusion.editing.inpaint` builds the
  same condition from the volume and its mask.
- "files": `controlnet.condition.dir` holds NAME.nii.gz / NAME.nii / NAME.npy per
  extracted latent NAME (matched by name, as contexts are); it needs `latents.dir`: on
  the fly the stage-1 pipeline crops and flips at random, so a file would not stay
  aligned with its volume.
Either is resampled to the condition grid (`ldm_jax.diffusion.condition`) and zero-padded
as the latents are.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import condition as cond_lib
from ldm_jax.diffusion.task import DiffusionTask, TrainState
from ldm_jax.errors import ConfigError, DataError

# Sections a ControlNet run takes from its UNet's run (they define the frozen model).
ADOPTED = ("unet", "scheduler", "conditioning")
ADOPTED_LATENTS = ("autoencoder_workdir", "autoencoder_config", "autoencoder_step",
                   "scale_factor", "latent_shape")


def adopt_unet_run(config, saved: dict) -> None:
    """Copies the frozen UNet's sections from its run's saved config into `config` (in
    place), its compute dtype included (the ControlNet computes as the UNet it copies);
    `train.remat`, when set, still overrides unet.remat (`prepare_config`'s rule)."""
    import ml_collections

    for name in ADOPTED:
        if name in saved:
            config[name] = ml_collections.ConfigDict(saved[name])
    for k in ADOPTED_LATENTS:
        if k in saved.get("latents", {}):
            config.latents[k] = saved["latents"][k]
    # Encode on the fly as the UNet saw its latents: on sampled z a ControlNet on a UNet
    # of mean latents starts at ~3x the loss (benchmarks/EDITING.md, inpainting).
    config.latents.encode = unet_encoding(saved.get("latents", {}))


def unet_encoding(saved_latents: dict) -> str:
    """"sample" or "mu": how the latents a stage-2 run trained on were encoded (its
    `latents.encode` on the fly; an extracted folder's `latents.json` encoding, else
    `ldm-jax extract`'s default, the mean)."""
    folder = saved_latents.get("dir")
    if not folder:
        return str(saved_latents.get("encode", "sample"))
    try:
        import json
        with open(os.path.join(str(folder), "latents.json")) as f:
            return str(json.load(f)["encoding"]["mode"])
    except (OSError, ValueError, KeyError, TypeError):
        return "mu"


class ControlNetTask(DiffusionTask):
    """A ControlNet on a frozen stage-2 UNet for `ldm_jax.trainer.train` (see the module
    docstring). Raises (at construction) CheckpointNotFoundError for a missing UNet run,
    ConfigError for a UNet run that is itself a ControlNet run or a condition grid the
    volumes cannot be resampled to, DataError for missing or bad condition files."""

    resume_fixed = DiffusionTask.resume_fixed + ("controlnet",)
    # latents.encode: adopted from the UNet's run (`adopt_unet_run`), so a run begun on
    # another encoding resumes with its UNet's; the state does not depend on it.
    resume_free = DiffusionTask.resume_free + ("controlnet.unet_workdir", "latents.encode")

    def __init__(self, config, autoencoder="load"):
        from ldm_jax import checkpoint as ckpt
        from ldm_jax.models.controlnet import build_controlnet

        cn = config.controlnet
        workdir = os.path.abspath(os.path.expanduser(str(cn.unet_workdir)))
        step, saved, unet_params = ckpt.open_step(workdir, cn.get("unet_step", "best"),
                                                  item="ema_params", stage="diffusion",
                                                  best_metric="val_loss")
        if (saved.get("controlnet") or {}).get("unet_workdir"):
            raise ConfigError(
                f"controlnet.unet_workdir={cn.unet_workdir!r} is itself a ControlNet run; give "
                "the stage-2 run it was trained on: --config.controlnet.unet_workdir="
                f"{saved['controlnet']['unet_workdir']}")
        adopt_unet_run(config, saved)
        if config.train.get("remat") is not None:
            config.unet.remat = config.train.remat
        cn.unet_step = type(cn.get("unet_step") or "")(int(step))  # keeps str/int type
        self.unet_params = unet_params
        self.kind = str(cn.condition.get("kind", "foreground_mask"))
        self.val_conditions = self.train_conditions = None
        super().__init__(config, autoencoder)
        self.controlnet = build_controlnet(cn, config.unet)
        self.scale = float(cn.get("conditioning_scale", 1.0))
        f = self.controlnet.condition_factor
        self.cond_grid = tuple(s * f for s in self.latent_shape[:3])
        self.cond_pad = tuple((lo * f, hi * f) for lo, hi in self.pad)
        self.cond_channels = int(self.controlnet.conditioning_embedding_in_channels)
        self.volume_grid = tuple(int(s) for s in self.ae.config.data.volume_size)
        if any(not (v % c == 0 or c % v == 0) for v, c in zip(self.volume_grid,
                                                               self.cond_grid)):
            raise ConfigError(
                f"the ControlNet's condition grid {self.cond_grid} (latent x {f}) and the "
                f"volumes' {self.volume_grid} are not integer multiples; choose "
                "controlnet.conditioning_embedding_num_channels with length k so that 2^(k-1) "
                "divides or is divided by the autoencoder's factor")
        if self.kind == "foreground_mask" and self.cond_channels != 1:
            raise ConfigError("controlnet.condition.kind='foreground_mask' makes 1-channel "
                              "conditions; set --config.controlnet."
                              "conditioning_embedding_in_channels=1")
        c_in = int(self.ae.in_channels) + 1
        if self.kind == "inpainting" and self.cond_channels != c_in:
            raise ConfigError(f"controlnet.condition.kind='inpainting' makes {c_in}-channel "
                              "conditions (the volume's channels and the mask); set "
                              f"--config.controlnet.conditioning_embedding_in_channels={c_in}")
        if self.kind == "files":
            self._read_conditions()

    # ------------------------------------------------------------------ conditions
    def _read_conditions(self):
        d = str(self.config.controlnet.condition.dir)
        if not os.path.isdir(d):
            raise DataError(f"controlnet.condition.dir={d!r} is not a folder; give a folder "
                            "with NAME.nii.gz or NAME.npy per latent NAME in latents.dir")
        files = cond_lib.condition_files(d, names=self.names,
                                         flag="controlnet.condition.dir", error=DataError)
        conds = cond_lib.load_conditions(files, volume_grid=self.volume_grid,
                                         condition_grid=self.cond_grid,
                                         channels=self.cond_channels,
                                         flag="controlnet.condition.dir", error=DataError)
        n_val = len(self.names) - len(self.train_latents)  # DiffusionTask's split
        self.train_conditions, self.val_conditions = (
            (conds[n_val:], conds[:n_val]) if n_val else (conds, conds[:1]))

    def mask_condition(self, images):
        """(B, X, Y, Z, C) volumes -> (B, *condition grid, 1) float32: the foreground mask
        at `controlnet.condition.threshold`, resampled (block mean / repeat). Traceable."""
        m = cond_lib.foreground_mask(images, float(self.config.controlnet.condition.threshold))
        return cond_lib.resample(m, self.cond_grid)

    def inpainting_condition(self, images, masks):
        """(B, X, Y, Z, C) volumes and (B, X, Y, Z, 1) holes -> (B, *condition grid, C + 1)
        float32: the volume blanked in the hole and the hole (`condition.
        inpainting_condition`), resampled. Traceable."""
        return cond_lib.resample(cond_lib.inpainting_condition(images, masks), self.cond_grid)

    def _condition_of(self, batch, rng):
        """The padded condition (B, X', Y', Z', C) float32 of a training batch (`rng`
        draws the inpainting kind's boxes)."""
        if "condition" in batch:
            c = batch["condition"].astype(jnp.float32)
        elif self.kind == "inpainting":
            images = batch["image"].astype(jnp.float32)
            lo, hi = self.config.controlnet.condition.get("box_fraction", (0.25, 0.75))
            holes = cond_lib.random_boxes(rng, images.shape[0], images.shape[1:4], lo, hi)
            c = self.inpainting_condition(images, holes)
        else:
            c = self.mask_condition(batch["image"].astype(jnp.float32))
        return jnp.pad(c, ((0, 0), *self.cond_pad, (0, 0)))

    def _val_condition(self, images):
        """The condition of validation volumes (B, X, Y, Z, C) numpy: the mask, or for the
        inpainting kind the volume with its centre box (half of each axis) blanked."""
        if self.kind == "inpainting":
            hole = np.broadcast_to(cond_lib.centre_box(images.shape[1:4]),
                                   (*images.shape[:4], 1))
            return np.asarray(self.inpainting_condition(images, hole))
        return np.asarray(self.mask_condition(images))

    def _val_latents(self):
        """Validation latents as stage 2's, with their conditions (`val_conditions`)."""
        if self.val_latents is None:
            from ldm_jax import data as data_lib
            batches = data_lib.make_eval_batches(self.ae.config, batch_size=1)
            limit = int(self.config.train.get("num_eval_batches", 0) or 0) or len(batches)
            zs, cs = [], []
            for i, b in enumerate(batches):
                if i >= min(limit, batches.num_volumes):
                    break
                zs.append(self._encode_np(b["image"], None)[0])
                cs.append(self._val_condition(np.asarray(b["image"], np.float32))[0])
            self.val_latents, self.val_conditions = zs, np.stack(cs)
        return self.val_latents

    # ------------------------------------------------------------------ trainer contract
    def step_consts(self):
        return (self.ae.params if self.on_the_fly else None, self.unet_params)

    def train_loader(self, batch_size):
        if self.on_the_fly:
            return super().train_loader(batch_size)
        from ldm_jax.data.latents import make_latent_loader
        return make_latent_loader(self.train_latents, self.labels, self.train_contexts,
                                  batch_size=batch_size, seed=int(self.config.train.seed),
                                  conditions=self.train_conditions)

    def eval_batches(self, batch_size):
        (batch,) = super().eval_batches(batch_size)
        batch["condition"] = np.asarray(self.val_conditions, np.float32)
        return [batch]

    def describe(self) -> str:
        cn = self.config.controlnet
        if self.kind == "foreground_mask":
            what = f"foreground > {cn.condition.threshold} of each volume"
        elif self.kind == "inpainting":
            what = ("each volume with a random box blanked (side per axis "
                    f"{tuple(cn.condition.get('box_fraction', (0.25, 0.75)))} of it), and the box")
        else:
            what = f"files in {cn.condition.dir}"
        return (super().describe() + f"\nControlNet on the frozen UNet of {cn.unet_workdir} "
                f"(step {cn.unet_step}, EMA weights): condition {self.cond_grid} x "
                f"{self.cond_channels} (latent x {self.controlnet.condition_factor}), {what}")

    # ------------------------------------------------------------------ state and step
    def init_state(self, rng):
        from ldm_jax.models.controlnet import controlnet_from_unet

        p_rng, run_rng = jax.random.split(rng)
        params = self.controlnet.init(p_rng, **self.controlnet.dummy_inputs())["params"]
        params = controlnet_from_unet(params, self.unet_params)  # MONAI's initialisation
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, ema_params=params,
                          opt=self.tx.init(params), rng=run_rng, bad_steps=zero,
                          skipped_steps=zero)

    def _cn_loss(self, cn_params, unet_params, z, noise, t, labels, context, cond):
        def residuals(x_t, tt):
            return self.controlnet.apply({"params": cn_params}, x_t, tt, cond, self.scale,
                                         context=context, class_labels=labels)
        return self._loss(unet_params, z, noise, t, labels, context, controlnet=residuals)

    def train_step(self, state, batch, consts=None):
        ae_params, unet_params = consts
        rng, k_enc, k_noise, k_t, k_drop = jax.random.split(state.rng, 5)
        z = self._latents_of(batch, ae_params, k_enc)
        noise = jax.random.normal(k_noise, z.shape, jnp.float32)
        t = self.scheduler.sample_timesteps(k_t, z)
        labels, context = self.conditions(batch, k_drop, z.shape[0])
        # Gradients of the ControlNet's params only: the UNet's are a constant.
        cond = self._condition_of(batch, jax.random.fold_in(k_noise, 1))
        loss, grads = jax.value_and_grad(self._cn_loss)(
            state.params, unet_params, z, noise, t, labels, context, cond)
        return self._apply_update(state, rng, loss, grads)

    # ------------------------------------------------------------------ evaluation
    def eval_loss(self, params, latents, contexts=None, conditions=None):
        """Mean denoising loss of the steered UNet (ControlNet `params`) on `latents`
        (N, x, y, z, C, unscaled) with their `conditions` (N, *condition grid, C), over
        the fixed timesteps with fixed noise (as `DiffusionTask.eval_loss`)."""
        if conditions is None:
            raise ValueError("a ControlNet's eval_loss needs the conditions")
        if self._eval_fn is None:
            def fn(params, unet_params, z, context, cond):
                z = jnp.pad(z * self.scale_factor, ((0, 0), *self.pad, (0, 0)))
                cond = jnp.pad(cond, ((0, 0), *self.cond_pad, (0, 0)))
                noise = jax.random.normal(jax.random.PRNGKey(0), z.shape, jnp.float32)
                labels = (jnp.full((z.shape[0],), self.num_classes, jnp.int32)
                          if self.num_classes else None)
                losses = jax.lax.map(
                    lambda t: self._cn_loss(params, unet_params, z, noise,
                                            jnp.full((z.shape[0],), t), labels, context, cond),
                    jnp.asarray(self.eval_timesteps(), jnp.int32))
                return jnp.mean(losses)
            self._eval_fn = jax.jit(fn)
        ctx = None if contexts is None else jnp.asarray(contexts, jnp.float32)
        return float(self._eval_fn(params, self.unet_params, jnp.asarray(latents, jnp.float32),
                                   ctx, jnp.asarray(conditions, jnp.float32)))

    def pipeline(self, cn_params):
        """A `Pipeline` of the frozen UNet steered by the ControlNet `cn_params`."""
        from ldm_jax.diffusion.pipeline import Pipeline
        if self._pipeline is None:
            self._pipeline = Pipeline(self.config, self.unet, self.unet_params, self.ae)
        self._pipeline.attach_controlnet(self.controlnet, cn_params)
        return self._pipeline

    def evaluate(self, state, batches, put, image_path):
        """val_loss (EMA params, each validation latent with its condition) and a sheet of
        `eval.num_samples` samples drawn with the first validation conditions (fixed seed),
        each beside its condition."""
        contexts = (np.concatenate([b["context"] for b in batches]) if self.with_context
                    else None)
        conds = np.concatenate([b["condition"] for b in batches])
        val = self.eval_loss(state.ema_params, np.concatenate([b["latent"] for b in batches]),
                             contexts, conds)
        n = int(self.config.eval.get("num_samples", 2))
        if n > 0 and jax.process_index() == 0:
            from ldm_jax.diffusion.pipeline import save_sheet
            steps = int(self.config.eval.get("sampling_steps", 25))
            rows = np.arange(n) % len(conds)
            pipe = self.pipeline(jax.device_get(state.ema_params))
            vols = pipe.sample(n, jax.random.PRNGKey(int(self.config.eval.get("seed", 0))),
                               steps=steps, condition=conds[rows],
                               context=None if contexts is None else contexts[rows])
            shown = [cond_lib.resample(conds[r], self.volume_grid) for r in rows]
            os.makedirs(os.path.dirname(image_path), exist_ok=True)
            save_sheet([v for pair in zip(shown, vols) for v in pair], image_path,
                       self.ae.config.data,
                       names=[x for i in range(n) for x in (f"condition {i}", f"sample {i}")],
                       title=f"step {int(state.step)}: {n} samples beside their conditions "
                             f"(EMA weights, {steps} steps, fixed seed)")
        return {"val_loss": val}
