"""A trained latent diffusion model with its autoencoder: noise -> latents -> volumes.

    import jax, ldm_jax
    pipe = ldm_jax.load_pipeline("runs/ldm")          # EMA weights of the best step
    vols = pipe.sample(4, jax.random.PRNGKey(0), steps=50)   # (4, X, Y, Z, C) float32
    pipe.autoencoder                                   # the stage-1 model it decodes with

Sampled latents are cropped back to the autoencoder's latent shape, divided by the
run's `latents.scale_factor` (never multiplied into the decoded image: the pitfall of
MONAI GenerativeModels #212) and decoded by the autoencoder from its own checkpoint.
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections
import numpy as np

from ldm_jax.errors import ConfigError


class Pipeline:
    """UNet params + scheduler config + frozen autoencoder (see the module docstring).

    Attributes: config (the stage-2 run's), unet, params, autoencoder, scale_factor,
    latent_shape (x, y, z, C) and padded_shape (x, y, z), step, context_dim (the
    cross-attention context's channels; None: the UNet has no cross-attention).
    """

    def __init__(self, config, unet, params, autoencoder, step: int = 0):
        from ldm_jax.diffusion.latent_space import pad_widths
        from ldm_jax.models import unet_padded_shape

        self.config, self.unet, self.params, self.step = config, unet, params, int(step)
        self.autoencoder = autoencoder
        self.scale_factor = float(config.latents.scale_factor)
        self.latent_shape = tuple(config.latents.get("latent_shape") or
                                  autoencoder.latent_shape())
        self.padded_shape = tuple(unet_padded_shape(self.latent_shape[:3], config.unet))
        self.pad = pad_widths(self.latent_shape[:3], self.padded_shape)
        k = int(config.get("conditioning", {}).get("num_classes", 0) or 0)
        self.num_classes = k
        self.null_label = k if k else None
        self.context_dim = (int(config.unet.cross_attention_dim)
                            if config.unet.get("with_conditioning") else None)
        self._samplers = {}  # (sampler, steps, guidance, eta) -> jitted loop
        from ldm_jax.diffusion.aligned import kind_of
        self.aligned = kind_of(config)  # "projection" | "coarse" | None
        self.volume_grid = (None if autoencoder is None else  # shapes-only pipelines
                            tuple(int(s) for s in autoencoder.config.data.volume_size))
        if autoencoder is not None and config.latents.get("dir"):
            # extracted latents: the volumes they were extracted from (DiffusionTask's)
            self.volume_grid = tuple(int(s) * int(f) for s, f in
                                     zip(self.latent_shape[:3], autoencoder.factor))
        self.controlnet = self.controlnet_params = None
        self.unet_checkpoint = None  # a ControlNet run's: {"workdir", "step"} of its UNet

    def attach_controlnet(self, controlnet, params) -> None:
        """Steer the UNet with a `ldm_jax.models.controlnet.ControlNet` (e.g. a MONAI one
        through `controlnet_from_monai`) in `sample*`, `inpaint` and `sdedit` (keyword
        `condition`, then required). Raises ConfigError when it does not take this
        model's latent channels."""
        if int(controlnet.in_channels) != int(self.latent_shape[-1]):
            raise ConfigError(f"the ControlNet takes {controlnet.in_channels}-channel latents; "
                              f"this model's have {self.latent_shape[-1]}")
        self.controlnet, self.controlnet_params = controlnet, params
        self._samplers = {}  # every loop is traced again with the ControlNet in it

    def condition_grid(self) -> tuple:
        """(X', Y', Z') of the attached ControlNet's condition: the latent shape times its
        condition_factor (unpadded). Raises ConfigError when none is attached."""
        if self.controlnet is None:
            raise ConfigError("this model takes no condition (it was trained without "
                              "conditioning.aligned and has no ControlNet; models that take "
                              "one: docs/conditioning.md, docs/editing.md); drop --condition.")
        f = self.controlnet.condition_factor
        return tuple(int(s) * f for s in self.latent_shape[:3])

    # ------------------------------------------------------------------ aligned conditions
    def aligned_grid(self) -> tuple:
        """(X', Y', Z') of an aligned-condition model's condition (1 on a projection's
        axis)."""
        from ldm_jax.diffusion.aligned import condition_grid
        return condition_grid(self.config.conditioning, self.volume_grid)

    def aligned_for(self, n: int, condition) -> np.ndarray:
        """An aligned condition as the model's (n, X', Y', Z', C) float32. Takes one for
        all samples or one per sample: on the condition grid, a projection as a 2D image
        (n1, n2[, C]) (min-max normalised here when the model's are), or a volume on the
        volume grid (its condition is computed, noise-free). Raises ConfigError (one line:
        the shapes it takes) for anything else or non-finite values."""
        from ldm_jax.diffusion import aligned as aligned_lib

        cfg, c_in = self.config.conditioning, int(self.autoencoder.in_channels)
        vg = self.volume_grid
        c = np.asarray(condition, np.float32)

        def one(a):
            return aligned_lib.condition_from_array(a, cfg, vg, c_in)

        out = one(c)
        out = None if out is None else np.broadcast_to(out[None], (int(n), *out.shape))
        if out is None and c.ndim >= 3 and c.shape[0] == int(n):
            rows = [one(a) for a in c]
            out = None if any(r is None for r in rows) else np.stack(rows)
        if out is None or out.shape[-1] != aligned_lib.condition_channels(cfg, c_in):
            raise ConfigError(
                f"the condition has shape {tuple(c.shape)}; this model "
                f"({aligned_lib.describe(cfg, vg)}) takes "
                f"{aligned_lib.accepted_shapes(cfg, vg)} with {c_in} "
                "channel(s)" + (f", one for every sample or {n} stacked (one per sample)."
                                if int(n) > 1 else " (a folder gives one per sample)."))
        if not np.isfinite(out).all():
            raise ConfigError("the condition holds NaN or Inf values; a condition must be "
                              "finite.")
        return np.ascontiguousarray(out, np.float32)

    def aligned_to_model(self, c):
        from ldm_jax.diffusion import aligned as aligned_lib
        if aligned_lib.mode_of(self.config) == "pooled":
            return aligned_lib.pooled_input(c, self.config.conditioning)
        return aligned_lib.lift(c, self.config.conditioning, self.latent_shape[:3], self.pad)

    def sheet_with_conditions(self, volumes, conditions):
        """(volumes for a sheet, names): per sample its condition on the volume grid (a
        projection repeated along its axis), the sample, and the sample's own condition
        (noise-free) the same way, for `save_sheet`."""
        from ldm_jax.diffusion import aligned as aligned_lib
        from ldm_jax.diffusion.condition import resample

        vols, names = [], []
        if self.aligned == "inpainting":  # the blanked input, the sample, the sample pasted
            for i, (v, c) in enumerate(zip(volumes, conditions)):
                v, c = np.asarray(v, np.float32), np.asarray(c, np.float32)
                known = c[..., :-1]
                vols += [known, v, np.where(c[..., -1:] != 0, v[..., :known.shape[-1]], known)]
                names += [f"input {i} (hole blanked)", f"sample {i}", f"sample {i} in the hole"]
            return vols, names
        for i, (v, c) in enumerate(zip(volumes, conditions)):
            own = aligned_lib.compute_condition(np.asarray(v, np.float32)[None],
                                                self.config.conditioning)[0]
            vols += [resample(np.asarray(c), self.volume_grid), np.asarray(v),
                     resample(own, self.volume_grid)]
            names += [f"condition {i}", f"sample {i}", f"sample {i}'s own"]
        return vols, names

    def read_conditions(self, path, *, count=None, names=None):
        """(conditions (n, *condition_grid(), C_cond) float32, files) for `count` samples
        or the inputs `names` from `--condition` `path` (a file for all, or a folder:
        `ldm_jax.diffusion.condition.condition_files`), NIfTI or .npy on the volume grid
        or the condition grid. Raises ConfigError (one line: what was expected) for a model
        without a ControlNet, a missing file, another shape or channel count."""
        from ldm_jax.diffusion import condition as cond_lib

        if self.aligned is not None:
            files = cond_lib.condition_files(path, count=count, names=names)
            cache = {}
            for f in files:
                if f not in cache:
                    arr = cond_lib.read_condition(f)  # its errors name the flag and file
                    try:
                        cache[f] = self.aligned_for(1, arr)[0]
                    except ConfigError as e:
                        raise ConfigError(f"--condition {f}: {e}") from None
            return np.stack([cache[f] for f in files]), files
        grid = self.condition_grid()
        files = cond_lib.condition_files(path, count=count, names=names)
        arr = cond_lib.load_conditions(
            files, volume_grid=self.autoencoder.config.data.volume_size, condition_grid=grid,
            channels=int(self.controlnet.conditioning_embedding_in_channels))
        return arr, files

    def controlnet_args(self, n: int, condition, conditioning_scale: float = 1.0):
        """None without a ControlNet, else {"cn_params", "condition" (n, X', Y', Z', C)
        padded as the latents, "conditioning_scale"} for the jitted loops. Raises
        ConfigError for a condition without a ControlNet, a ControlNet without a
        condition, or a condition `condition_for` refuses."""
        import jax.numpy as jnp

        if self.aligned is not None:
            if condition is None:
                from ldm_jax.diffusion.aligned import describe
                raise ConfigError(
                    "this model is conditioned on "
                    f"{describe(self.config.conditioning, self.volume_grid)}: pass "
                    "--condition FILE|DIR (a 2D image, NIfTI or .npy; the training run's "
                    "WORKDIR/conditions/ holds ready ones of held-out volumes; "
                    "docs/conditioning.md).")
            return {"aligned_condition": jnp.asarray(self.aligned_for(int(n), condition))}
        if self.controlnet is None:
            if condition is not None:
                raise ConfigError("a condition was given, but no ControlNet is attached to the "
                                  "pipeline (Pipeline.attach_controlnet; or sample a "
                                  "ControlNet run's workdir); drop the condition.")
            return None
        if condition is None:
            raise ConfigError("this model is steered by a ControlNet: give its condition "
                              f"(--condition FILE|DIR, {self.condition_grid()} or the volume "
                              "grid, NIfTI or .npy).")
        return {"cn_params": self.controlnet_params,
                "condition": jnp.asarray(self.condition_for(int(n), condition)),
                "conditioning_scale": jnp.float32(conditioning_scale)}

    def condition_for(self, n: int, condition) -> np.ndarray:
        """The ControlNet's condition as (n, X', Y', Z', C) float32, (X', Y', Z') the
        padded latent shape times the ControlNet's condition_factor; one of the unpadded
        size (latent x factor) is zero-padded as the latents are. Takes (X', Y', Z'[, C])
        for every volume or (n, X', Y', Z', C). Raises ConfigError for another shape."""
        cn = self.controlnet
        f, cin = cn.condition_factor, int(cn.conditioning_embedding_in_channels)
        c = np.asarray(condition, np.float32)
        if c.ndim == 3:
            c = c[..., None]
        if c.ndim == 4:
            c = np.broadcast_to(c[None], (n, *c.shape))
        small = tuple(s * f for s in self.latent_shape[:3])
        big = tuple(s * f for s in self.padded_shape)
        if c.ndim != 5 or c.shape[0] != n or c.shape[-1] != cin or c.shape[1:4] not in (
                small, big):
            raise ConfigError(f"the condition has shape {tuple(np.shape(condition))}; the "
                              f"ControlNet takes {small} (or padded {big}) with {cin} "
                              "channel(s), one for every volume or one per volume")
        if c.shape[1:4] == small and small != big:
            c = np.pad(c, ((0, 0), *((lo * f, hi * f) for lo, hi in self.pad), (0, 0)))
        return c

    def check_request(self, steps: int, scheduler: Optional[str] = None,
                      class_label: Optional[int] = None) -> Optional[int]:
        """Checks a sampling request before any work (the sample CLI calls it before it
        creates --output); returns the class label to sample with (the "no class" label
        for a conditional model asked for none).

        Raises ConfigError for steps outside [1, num_train_timesteps], a class label outside
        [0, num_classes) or given to an unconditional model, or a sampler the model was not
        trained for.
        """
        from ldm_jax.diffusion.sampling import sampler_for

        T = int(self.config.scheduler.num_train_timesteps)
        if not 1 <= int(steps) <= T:
            raise ConfigError(f"--num_inference_steps={steps} must be in [1, {T}] (the model "
                              f"was trained on {T} timesteps).")
        sampler_for(self.config.scheduler, scheduler)
        if class_label is not None:
            if not self.num_classes:
                raise ConfigError("--class_label given, but this model is unconditional "
                                  "(conditioning.num_classes = 0); drop --class_label.")
            if not 0 <= int(class_label) < self.num_classes:
                raise ConfigError(f"--class_label={class_label} is outside [0, "
                                  f"{self.num_classes}) (the model's classes).")
            return class_label
        return self.null_label if self.num_classes else None

    def sample_latents(self, n: int, rng, *, steps: int = 50, scheduler: Optional[str] = None,
                       eta: float = 0.0, guidance_scale: float = 1.0,
                       class_label: Optional[int] = None, context=None, batch_size: int = 8,
                       on_batch=None, condition=None, conditioning_scale: float = 1.0):
        """`n` unscaled latents (n, x, y, z, C) float32 numpy: what the autoencoder decodes.

        `context` (cross-attention models): (S, D) or (D,) for every sample, or (n, S, D)
        one per sample, D = unet.cross_attention_dim; None samples such a model with the
        null context (zeros: unconditional). Guidance mixes it with the null context.
        `condition` (a pipeline with a ControlNet, then required): (X', Y', Z'[, C]) for
        every sample or (n, X', Y', Z', C), on the condition grid (`condition_for`);
        `conditioning_scale` multiplies the ControlNet's residuals (MONAI's).

        Raises ConfigError for n < 1, steps outside [1, num_train_timesteps], a class label
        outside [0, num_classes) or given to an unconditional model, a context given to a
        model without cross-attention or of the wrong shape, guidance for an unconditional
        model, or a sampler the model was not trained for.
        """
        from ldm_jax.diffusion.latent_space import crop
        from ldm_jax.diffusion.sampling import sample_latents

        class_label = self.check_request(steps, scheduler, class_label)
        context = self.contexts_for(int(n), context)
        cn = self.controlnet_args(int(n), condition, conditioning_scale)
        z = sample_latents(self._sampler(steps, scheduler, guidance_scale, eta), self.params,
                           rng, n=int(n), class_label=class_label, context=context,
                           batch_size=batch_size, on_batch=on_batch, controlnet=cn)
        return np.asarray(crop(z, self.pad)) / self.scale_factor

    def _sampler(self, steps, scheduler, guidance_scale, eta):
        """The jitted sampling loop for these settings (made once)."""
        from ldm_jax.diffusion.sampling import make_sampler, sampler_for

        key = (scheduler, int(steps), float(guidance_scale), float(eta))
        if key not in self._samplers:
            self._samplers[key] = make_sampler(
                self.unet, sampler_for(self.config.scheduler, scheduler),
                shape=(*self.padded_shape, self.latent_shape[-1]), steps=int(steps),
                guidance_scale=guidance_scale, null_label=self.null_label, eta=eta,
                controlnet=self.controlnet,
                aligned=None if self.aligned is None else self.aligned_to_model)
        return self._samplers[key]

    def sample_batch(self, rng, index: int, size: int, *, steps: int = 50,
                     scheduler: Optional[str] = None, eta: float = 0.0,
                     guidance_scale: float = 1.0, class_label: Optional[int] = None,
                     context=None, condition=None,
                     conditioning_scale: float = 1.0) -> np.ndarray:
        """Batch `index` (of `size` samples) of what `sample_latents(..., batch_size=size)`
        draws: unscaled latents (size, x, y, z, C) float32, the same values whichever
        other batches are drawn. `context`, `condition`: as `sample_latents`'s, for these
        `size` samples. Raises ConfigError as `sample_latents`."""
        from ldm_jax.diffusion.latent_space import crop
        from ldm_jax.diffusion.sampling import sample_batch

        class_label = self.check_request(steps, scheduler, class_label)
        context = self.contexts_for(int(size), context)
        cn = self.controlnet_args(int(size), condition, conditioning_scale)
        z = sample_batch(self._sampler(steps, scheduler, guidance_scale, eta), self.params,
                         rng, index, size, class_label=class_label, context=context,
                         controlnet=cn)
        return np.asarray(crop(z, self.pad)) / self.scale_factor

    def contexts_for(self, n: int, context=None) -> Optional[np.ndarray]:
        """`context` as (n, S, D) float32 for `n` samples (None for a model without
        cross-attention; zeros (n, 1, D), the null context, when `context` is None).
        Raises ConfigError for a context the model cannot take."""
        if self.context_dim is None:
            if context is not None:
                raise ConfigError("--context given, but this model has no cross-attention "
                                  "(unet.with_conditioning=False); drop --context.")
            return None
        d = self.context_dim
        if context is None:
            return np.zeros((n, 1, d), np.float32)
        c = np.asarray(context, np.float32)
        c = c[None] if c.ndim == 1 else c
        if c.ndim == 2:
            c = np.broadcast_to(c, (n, *c.shape))
        if c.ndim != 3 or c.shape[-1] != d or c.shape[0] != n:
            raise ConfigError(
                f"--context has shape {tuple(np.shape(context))}; this model takes (S, {d}) "
                f"or ({d},) for every sample, or ({n}, S, {d}) one per sample "
                f"(unet.cross_attention_dim={d}, --num_samples={n}).")
        return c

    def decode(self, latents) -> np.ndarray:
        """Unscaled latents (n, x, y, z, C) -> volumes (n, X, Y, Z, C_out) float32."""
        return np.stack([np.asarray(self.autoencoder.decode_volume(np.asarray(z)))
                         for z in latents])

    def inpaint(self, volumes, masks, rng, **kwargs):
        """Fill the masked regions of `volumes` (B, X, Y, Z, C), keep the rest exactly:
        (volumes, unscaled latents); see `ldm_jax.diffusion.editing.inpaint`."""
        from ldm_jax.diffusion import editing
        return editing.inpaint(self, volumes, masks, rng, **kwargs)

    def sdedit(self, volumes, rng, strength: float = 0.5, **kwargs):
        """Image-to-image at `strength` in [0, 1]: (volumes, unscaled latents); see
        `ldm_jax.diffusion.editing.sdedit`."""
        from ldm_jax.diffusion import editing
        return editing.sdedit(self, volumes, rng, strength=strength, **kwargs)

    def sample(self, n: int, rng, **kwargs) -> np.ndarray:
        """`n` decoded volumes (n, X, Y, Z, C) float32 in the data's intensity range
        (`sample_latents` keywords)."""
        return self.decode(self.sample_latents(n, rng, **kwargs))


def load_pipeline(workdir, step="best", *, use_ema: bool = True,
                  dtype: Optional[str] = None,
                  autoencoder_workdir: Optional[str] = None,
                  unet_workdir: Optional[str] = None) -> Pipeline:
    """The stage-2 run in `workdir` at `step` ('best' | 'latest' | N) with its autoencoder.

    `autoencoder_workdir`: where the stage-1 run is now, when it moved since training
    (default: the run's `latents.autoencoder_workdir`); the step the stage-2 run used
    (`latents.autoencoder_step`) is read from it, and its latent channels must be the
    UNet's. A ControlNet run (`controlnet.unet_workdir` set) comes with its ControlNet
    attached (its EMA weights unless `use_ema=False`) on the frozen UNet it was trained
    on (that run's EMA weights at `controlnet.unet_step`, from `unet_workdir` when that
    run moved).

    Raises CheckpointNotFoundError (no such workdir/step, or the autoencoder it names is
    gone), DamagedCheckpointError (the step asked for by number, or every step, is
    damaged; 'latest'/'best' skip damaged steps with one line) and ConfigError (the
    workdir is a stage-1 run, or the autoencoder is another model).
    """
    from ldm_jax import checkpoint as ckpt
    from ldm_jax.diffusion.aligned import build_unet_for
    from ldm_jax.diffusion.latent_space import load_frozen_autoencoder
    from ldm_jax.diffusion.voxel_space import VoxelSpace, is_voxel_space

    workdir = os.path.abspath(os.path.expanduser(str(workdir)))
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        raise ckpt.CheckpointNotFoundError(
            f"{workdir} holds no checkpoints; train stage 2 first: python train.py --config "
            f"configs/diffusion/balanced.py --workdir {workdir}")
    # A damaged step is skipped for 'latest'/'best' (one line) and refused by number.
    step, saved, params = ckpt.open_step(workdir, step, item="ema_params" if use_ema
                                         else "params", stage="diffusion",
                                         best_metric="val_loss")
    cfg = ml_collections.ConfigDict(saved)
    cn_params = unet_source = None
    if (cfg.get("controlnet") or {}).get("unet_workdir"):
        cn_params = params
        unet_source = os.path.abspath(os.path.expanduser(str(
            unet_workdir or cfg.controlnet.unet_workdir)))
        try:
            unet_step, _, params = ckpt.open_step(
                unet_source, int(cfg.controlnet.unet_step), item="ema_params",
                stage="diffusion", best_metric="val_loss")
        except ckpt.CheckpointNotFoundError as e:
            raise ckpt.CheckpointNotFoundError(
                f"{workdir} is a ControlNet run on the UNet of {unet_source} (step "
                f"{cfg.controlnet.unet_step}), which is not readable: {e} If that run moved, "
                "pass its new folder (--unet_workdir DIR).") from None
        unet_source = {"workdir": unet_source, "step": int(unet_step)}
    if autoencoder_workdir is not None:
        cfg.latents.autoencoder_workdir = os.path.abspath(os.path.expanduser(
            str(autoencoder_workdir)))
    if dtype is not None:
        cfg.unet.dtype = str(dtype)
    ae = VoxelSpace(cfg) if is_voxel_space(cfg) else load_frozen_autoencoder(cfg)
    trained = cfg.latents.get("latent_shape")
    if trained and int(trained[-1]) != int(ae.latent_channels):
        from ldm_jax import options
        fix = options.setting("latents.autoencoder_workdir", "DIR")
        raise ConfigError(
            f"The autoencoder at {ae.workdir} (step {ae.step}) makes {ae.latent_channels}-"
            f"channel latents, but this diffusion model was trained on {trained[-1]}-channel "
            "ones" + (f": point {fix} at the stage-1 run it was trained with." if fix else
                      "; use the stage-1 run it was trained with."))
    unet = build_unet_for(cfg, ae.config.data.volume_size,
                          trained or ae.latent_shape(), int(ae.in_channels))
    pipe = Pipeline(cfg, unet, params, ae, step=step)
    if cn_params is not None:
        from ldm_jax.models.controlnet import build_controlnet
        pipe.attach_controlnet(build_controlnet(cfg.controlnet, cfg.unet), cn_params)
        pipe.unet_checkpoint = unet_source
    return pipe


def save_sheet(volumes, path: str, data_cfg, names=None, title=None) -> None:
    """A labelled PNG contact sheet: one row per volume (XY, XZ, YZ mid-slices and the XY
    maximum intensity projection), grey levels over data.b_min..b_max."""
    from ldm_jax import visualize

    lo, hi = sorted((float(data_cfg.b_min), float(data_cfg.b_max)))
    names = names or [f"sample {i}" for i in range(len(volumes))]
    visualize.samples_image([np.asarray(v) for v in volumes], names, (lo, hi),
                            title=title).save(path)
