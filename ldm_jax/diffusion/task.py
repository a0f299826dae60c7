"""Stage 2 as a trainer task: a diffusion UNet on the frozen autoencoder's latents.

Latents come from an extracted folder (`latents.dir`, checked against the autoencoder's
model hash) or are encoded on the fly inside the jitted step from the stage-1 data
pipeline (the autoencoder's own data config) with the frozen autoencoder, whose params
are the step's constants. Default encoding: a sampled z = mu + sigma * eps, as MONAI's
3D LDM tutorial does (`encode_stage_2_inputs`), because the decoder was trained on
sampled latents; `latents.encode = "mu"` uses the mean.

The scale factor (1/std of the training latents over all channels, LDM convention,
Rombach et al. 2022 sec. 4.3.2) is computed once over `latents.scale_num_volumes`
volumes, never from a single batch, written into `config.latents.scale_factor` (so every
checkpoint's config carries it) and applied as `z * scale_factor` before noising; samples
are divided by it before decoding (`ldm_jax.diffusion.pipeline`). Latents whose spatial
shape the UNet cannot take are zero-padded symmetrically (MONAI's `ldm_latent_shape`) and
samples are cropped back.

Loss: MSE (or L1) between the UNet output and the scheduler's training target (noise,
velocity or x0; rectified flow: x0 - noise), optionally min-SNR-gamma weighted (Hang et
al. 2023), averaged over the batch. An exponential moving average of the params
(`train.ema_decay`, warmed up as min(decay, (1+n)/(10+n)) after n updates) is kept;
evaluation, "best" and sampling use it. With
`conditioning.num_classes = K > 0` the UNet gets K + 1 class embeddings; label K means
"no class" and replaces a label with probability `conditioning.drop_prob` (classifier-free
guidance, Ho & Salimans 2022). With `unet.with_conditioning` the UNet cross-attends to a
context (S, cross_attention_dim) per latent read from `conditioning.context_dir`; a dropped
row gets the null context, zeros (diffusers' and MONAI's tutorials use the embedding of an
empty prompt; without a text encoder zeros is ours). Label and context are dropped
together, so the dropped rows train the one unconditional model guidance mixes with.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.diffusion.latent_space import load_frozen_autoencoder, pad_widths
from ldm_jax.errors import ConfigError
from ldm_jax.optim import all_finite, keep_if, make_optimizer

log = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt: Any
    rng: jax.Array
    bad_steps: jax.Array
    skipped_steps: jax.Array


def min_snr_weights(alphas_cumprod, t, gamma: float, prediction_type: str):
    """min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v) or plain (x0); (B,) float32.
    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"."""
    ac = alphas_cumprod[t]
    snr = ac / (1.0 - ac)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


class DiffusionTask:
    """Stage 2 for `ldm_jax.trainer.train` (see the module docstring).

    Raises (at construction) ConfigError / CheckpointNotFoundError when the autoencoder
    workdir is missing or untrained (the message names the stage-1 command), DataError
    for unusable latents.
    """

    best_metric = "val_loss"
    config_path = None  # the config file, for hints (set by ldm_jax.cli.train.make_task)
    params_key = "ema_params"
    progress_keys = {"loss": "loss"}
    loss_metric = "loss"  # watched by the trainer for absurd values
    # What a resumed run must keep (trainer.resume_changes): the UNet and scheduler (the
    # state's shapes, what the UNet predicts), the latents it learns (which autoencoder
    # and step, where they come from, how they are encoded, their shape) and the
    # conditioning (the class embeddings, the contexts). Remat and the compute dtype do
    # not change the state. latents.scale_factor is not fixed: it is recomputed when unset.
    resume_fixed = ("unet", "scheduler", "latents.autoencoder_workdir",
                    "latents.autoencoder_step", "latents.dir", "latents.encode",
                    "latents.latent_shape", "conditioning", "data.volume_size",
                    "data.b_min", "data.b_max")
    resume_free = ("unet.remat", "unet.dtype", "unet.init_from")

    def __init__(self, config, autoencoder="load"):
        """`autoencoder`: "load" (from config.latents), an `Autoencoder`, or None for a
        shapes-only task (benchmarks: latents.latent_shape and scale 1, no data)."""
        from ldm_jax.diffusion import aligned as aligned_lib
        from ldm_jax.diffusion.voxel_space import VoxelSpace, is_voxel_space
        from ldm_jax.models import unet_padded_shape
        from ldm_jax.schedulers import build_scheduler

        self.config = config
        lat = config.latents
        self.voxel_space = is_voxel_space(config)
        if isinstance(autoencoder, str) and autoencoder == "load":
            autoencoder = (VoxelSpace(config) if self.voxel_space
                           else load_frozen_autoencoder(config))
        self.ae = autoencoder
        if autoencoder is None:
            self._init_shapes_only(config)
            return
        # 'best' must not drift between runs (the field keeps its str/int type).
        lat.autoencoder_step = type(lat.get("autoencoder_step") or "")(int(self.ae.step))
        self.on_the_fly = not lat.get("dir")
        self.sample_z = str(lat.get("encode", "sample")) == "sample"
        self.num_classes = int(config.get("conditioning", {}).get("num_classes", 0) or 0)
        self.with_context = bool(config.unet.get("with_conditioning", False))
        self.names, self.train_latents, self.val_latents, self.labels = [], None, None, None
        self.train_contexts = self.val_contexts = None
        if self.on_the_fly:
            self.latent_shape = tuple(self.ae.latent_shape())
        else:
            self._read_folder()
            self.latent_shape = tuple(self.train_latents[0].shape)
        c = self.latent_shape[-1]
        if int(config.unet.in_channels) != c:
            raise ConfigError(
                f"unet.in_channels={config.unet.in_channels} but the autoencoder's latents have "
                f"{c} channels; set --config.unet.in_channels={c} --config.unet.out_channels="
                f"{c * (2 if str(config.scheduler.get('variance_type', '')).startswith('learned') else 1)}")
        lat.latent_shape = list(self.latent_shape)
        self.padded_shape = tuple(unet_padded_shape(self.latent_shape[:3], config.unet))
        self.pad = pad_widths(self.latent_shape[:3], self.padded_shape)
        if self.padded_shape != self.latent_shape[:3]:
            log.warning("Latents %s are padded symmetrically to %s for the UNet (MONAI's "
                        "ldm_latent_shape); samples are cropped back.",
                        "x".join(map(str, self.latent_shape[:3])),
                        "x".join(map(str, self.padded_shape)))
        self.aligned = aligned_lib.kind_of(config)
        self.volume_grid = tuple(int(s) for s in self.ae.config.data.volume_size)
        self.val_aligned = self.train_aligned = None
        aligned_dir = str((config.get("conditioning") or {}).get("aligned_dir") or "")
        if aligned_dir and self.aligned is None:
            raise ConfigError(
                f"conditioning.aligned_dir={aligned_dir!r} gives condition files, but the "
                "model is not conditioned on them; set --config.conditioning.aligned="
                "projection or coarse (the kind of the files)")
        if self.aligned is not None:
            from ldm_jax.config import raise_problems
            if not self.on_the_fly:  # the volumes the latents were extracted from
                self.volume_grid = tuple(int(s) * int(f) for s, f in
                                         zip(self.latent_shape[:3], self.ae.factor))
            raise_problems(aligned_lib.aligned_problems(config, self.volume_grid))
            if self.on_the_fly and aligned_dir:
                raise ConfigError(
                    f"conditioning.aligned_dir={aligned_dir!r} pairs condition files with "
                    "extracted latents, but this run encodes its volumes on the fly (and "
                    "computes each condition from its volume); extract the volumes with "
                    "ldm-jax extract and set --config.latents.dir, or drop "
                    "--config.conditioning.aligned_dir")
            if not self.on_the_fly and not aligned_dir:
                raise ConfigError(
                    f"conditioning.aligned={self.aligned!r} computes each condition from its "
                    "training volume, which extracted latents (latents.dir) do not carry; "
                    "train on the fly (--config.latents.dir='') or give one condition file "
                    "per latent: --config.conditioning.aligned_dir=DIR")
            if aligned_dir:
                self._read_aligned_files(aligned_dir)
        self.unet = aligned_lib.build_unet_for(config, self.volume_grid, self.latent_shape,
                                               int(self.ae.in_channels))
        self.scheduler = build_scheduler(config.scheduler)
        self.sched_state = self.scheduler.create_state()
        self.tx = make_optimizer(config.train.learning_rate, config.train)
        if self.voxel_space and lat.get("scale_factor") is None:
            lat.scale_factor = 1.0  # volumes are mapped to [-1, 1] (voxel_space)
        file_scale = self._read_init(config.unet)
        if lat.get("scale_factor") is None and file_scale is not None:
            lat.scale_factor = file_scale  # the latents the file's UNet was trained on
        if lat.get("scale_factor") is None:
            lat.scale_factor = self._compute_scale_factor()
        self.scale_factor = float(lat.scale_factor)
        self._eval_fn = self._pipeline = None

    def _read_init(self, unet_cfg):
        """`unet.init_from` (MAISI's UNet only): its params into `self.init_params` (None
        without it) and its file's scale_factor (or None). Raises ConfigError (one line)."""
        self.init_params = None
        path = unet_cfg.get("init_from")
        if not path:
            return None
        if unet_cfg.get("kind", "monai") != "maisi":
            raise ConfigError(f"unet.init_from={path} needs unet.kind='maisi' (MAISI's "
                              "diffusion UNet files; docs/maisi.md, \"Fine-tuning\")")
        from ldm_jax.models.maisi.init_from import load_init
        self.init_params, scale = load_init(path, self.unet, "unet.init_from")
        return scale

    def _init_shapes_only(self, config):
        from ldm_jax.models import build_unet, unet_padded_shape
        from ldm_jax.schedulers import build_scheduler
        if not config.latents.get("latent_shape"):
            raise ConfigError("a shapes-only diffusion task needs latents.latent_shape")
        self.on_the_fly, self.sample_z, self.num_classes = False, False, int(
            config.get("conditioning", {}).get("num_classes", 0) or 0)
        self.aligned, self.voxel_space = None, False
        self.with_context = bool(config.unet.get("with_conditioning", False))
        self.latent_shape = tuple(config.latents.latent_shape)
        self.padded_shape = tuple(unet_padded_shape(self.latent_shape[:3], config.unet))
        self.pad = pad_widths(self.latent_shape[:3], self.padded_shape)
        self.unet = build_unet(config.unet)
        self.scheduler = build_scheduler(config.scheduler)
        self.sched_state = self.scheduler.create_state()
        self.tx = make_optimizer(config.train.learning_rate, config.train)
        self.init_params = None
        self.scale_factor = float(config.latents.get("scale_factor") or 1.0)
        self._eval_fn = self._pipeline = None

    # ------------------------------------------------------------------ data
    def _read_folder(self):
        from ldm_jax.data.latents import read_contexts, read_labels, read_latent_folder
        names, latents, _ = read_latent_folder(self.config.latents.dir, self.ae.config_hash)
        labels = contexts = None
        if self.num_classes:
            labels = read_labels(self.config.conditioning.labels_csv, names, self.num_classes)
        if self.with_context:
            contexts = read_contexts(self.config.conditioning.context_dir, names,
                                     int(self.config.unet.cross_attention_dim))
        n_val = 0 if len(latents) < 2 else max(1, int(round(
            len(latents) * float(self.config.latents.get("val_fraction", 0.1)))))
        self.names = names

        def split(items):  # (train, val): the first n_val validate (the only one: both)
            return (items[n_val:], items[:n_val]) if n_val else (items, items[:1])

        self.train_latents, self.val_latents = split(latents)
        if labels is not None:
            self.labels, self.val_labels = split(labels)
        if contexts is not None:
            self.train_contexts, self.val_contexts = split(contexts)

    def _read_aligned_files(self, folder):
        """The paired condition of each latent NAME: FOLDER/NAME.png|.tif|.npy|.nii.gz
        (`ldm_jax.diffusion.condition.condition_files`), each as `--condition` takes it
        (`aligned.condition_from_array`); split as the latents. Raises DataError naming
        the missing files or the file of a wrong shape."""
        from ldm_jax.diffusion import aligned as aligned_lib
        from ldm_jax.diffusion import condition as cond_lib
        from ldm_jax.errors import DataError

        flag = "conditioning.aligned_dir"
        if not os.path.isdir(os.path.expanduser(folder)):
            raise DataError(f"{flag}={folder!r} is not a folder; give a folder with one "
                            "condition file per latent, named as the latent (NAME.png, .tif, "
                            ".npy or .nii.gz)")
        files = cond_lib.condition_files(folder, names=self.names, flag=flag, error=DataError)
        cfg, channels = self.config.conditioning, int(self.ae.in_channels)
        conds = []
        for f in files:
            c = aligned_lib.condition_from_array(cond_lib.read_condition(f, flag, DataError), cfg,
                                                 self.volume_grid, channels)
            if (c is None or c.shape[-1] != aligned_lib.condition_channels(cfg, channels)
                    or not np.isfinite(c).all()):
                raise DataError(
                    f"{flag}: {f} is not a condition of its latent's volume: this model "
                    f"({aligned_lib.describe(cfg, self.volume_grid)}) takes "
                    f"{aligned_lib.accepted_shapes(cfg, self.volume_grid)} with {channels} "
                    "channel(s), finite")
            conds.append(c)
        conds = np.stack(conds).astype(np.float32)
        n_val = len(self.names) - len(self.train_latents)  # _read_folder's split
        self.train_aligned, self.val_aligned = (
            (conds[n_val:], conds[:n_val]) if n_val else (conds, conds[:1]))

    def _encode_np(self, x, key):
        mu, sigma = self.ae.encode(jnp.asarray(x))
        if self.sample_z and key is not None:
            return np.asarray(mu + sigma * jax.random.normal(key, mu.shape, mu.dtype))
        return np.asarray(mu)

    def _compute_scale_factor(self) -> float:
        """1 / std over all values of up to `latents.scale_num_volumes` training latents."""
        n = int(self.config.latents.get("scale_num_volumes", 16))
        if not self.on_the_fly:
            zs = np.stack(self.train_latents[:n])
        else:
            from ldm_jax import data as data_lib
            zs = []
            it = iter(data_lib.make_train_loader(self.ae.config, batch_size=1,
                                                 seed=int(self.config.train.seed),
                                                 process_index=0, process_count=1))
            try:
                for i in range(n):
                    zs.append(self._encode_np(next(it)["image"], jax.random.PRNGKey(i)))
            finally:
                it.close()
            zs = np.concatenate(zs)
        std = float(np.std(zs.astype(np.float64)))
        if not std > 0:
            raise ConfigError("the training latents are constant (std 0): no scale factor; "
                              "check the autoencoder and its data.")
        log.info("scale_factor = 1/std = %.6g over %d latent(s)", 1.0 / std, len(zs))
        return 1.0 / std

    def _val_latents(self):
        """Host validation latents (N, x, y, z, C), unscaled; computed once."""
        if self.val_latents is None:
            from ldm_jax import data as data_lib
            batches = data_lib.make_eval_batches(self.ae.config, batch_size=1)
            limit = int(self.config.train.get("num_eval_batches", 0) or 0) or len(batches)
            zs, cs = [], []
            for i, b in enumerate(batches):
                if i >= min(limit, batches.num_volumes):
                    break
                zs.append(self._encode_np(b["image"], None)[0])
                if self.aligned is not None:
                    cs.append(self.raw_condition(np.asarray(b["image"], np.float32))[0])
            self.val_latents = zs
            self.val_aligned = np.stack(cs) if cs else None
        return self.val_latents

    # ------------------------------------------------------------------ trainer contract
    def sample_shape(self):
        return (1, *self.padded_shape, self.latent_shape[-1])

    def step_consts(self):
        return self.ae.params if self.on_the_fly else None

    def train_loader(self, batch_size):
        if self.on_the_fly:
            from ldm_jax import data as data_lib
            return data_lib.make_train_loader(self.ae.config, batch_size=batch_size,
                                              seed=int(self.config.train.seed))
        from ldm_jax.data.latents import make_latent_loader
        return make_latent_loader(self.train_latents, self.labels, self.train_contexts,
                                  batch_size=batch_size, seed=int(self.config.train.seed),
                                  conditions=self.train_aligned)

    def eval_batches(self, batch_size):
        batch = {"latent": np.stack(self._val_latents())}
        if self.val_contexts is not None:
            batch["context"] = self.val_contexts
        if self.val_aligned is not None:
            batch["aligned"] = self.val_aligned
        return [batch]

    def describe(self) -> str:
        from ldm_jax.diffusion.plan import format_unet_plan
        if self.on_the_fly:
            source = (f"encoded on the fly ({'sampled z' if self.sample_z else 'mu'}) from "
                      f"{self.ae.config.data.source} data by the autoencoder at step "
                      f"{self.ae.step} of {self.ae.workdir}")
        else:
            source = (f"{len(self.train_latents)} train / {len(self.val_latents)} val from "
                      f"{self.config.latents.dir}")
        if self.val_contexts is not None:
            source += (f"; contexts {'x'.join(map(str, self.val_contexts.shape[1:]))} (S x D) "
                       f"from {self.config.conditioning.context_dir}")
        if self.voxel_space:
            source = (f"voxel space (no autoencoder): {self.ae.config.data.source} volumes "
                      f"{'x'.join(map(str, self.volume_grid))} mapped to [-1, 1]")
        if self.aligned is not None:
            from ldm_jax.diffusion import aligned as aligned_lib
            source += (f"; conditioned ({aligned_lib.mode_of(self.config)}) on the "
                       + aligned_lib.describe(self.config.conditioning, self.volume_grid))
            if self.train_aligned is not None:
                source += (f", read from the paired files in "
                           f"{self.config.conditioning.aligned_dir} (used as read: no noise)")
        extra = f"scale_factor {self.scale_factor:.6g}; latents: {source}"
        if self.config.unet.get("init_from"):  # MAISI's UNet from a weight file
            extra += f"; UNet weights from {self.config.unet.init_from}"
        return format_unet_plan(self.config, self.latent_shape, self.padded_shape, extra=extra,
                                condition_channels=self._condition_channels())

    def _condition_channels(self) -> int:
        """Input channels an aligned condition adds to the UNet (concat mode), else 0."""
        from ldm_jax.diffusion import aligned as aligned_lib
        if self.aligned is None or aligned_lib.mode_of(self.config) != "concat":
            return 0
        return aligned_lib.lifted_channels(self.config.conditioning, self.volume_grid,
                                           self.latent_shape[:3], int(self.ae.in_channels))

    def quick_run_hint(self, seconds, first_seconds, steps):
        return (f"CPU only: the first step (compiling it) took {first_seconds:.0f} s, then "
                f"{seconds:.2f} s per step: about {seconds * steps / 3600:.1f} h for {steps} "
                "steps.")

    # ------------------------------------------------------------------ state and step
    def init_state(self, rng):
        p_rng, run_rng = jax.random.split(rng)
        x = jnp.zeros(self.sample_shape(), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
        # The params do not depend on the context length S.
        context = self.null_context(1) if self.with_context else None
        aligned = None
        if self.aligned is not None:
            from ldm_jax.diffusion.aligned import condition_channels, condition_grid
            cfg = self.config.conditioning
            grid = condition_grid(cfg, self.volume_grid)
            aligned = self.model_condition(
                jnp.zeros((1, *grid, condition_channels(cfg, self.ae.in_channels))))
        params = self.unet.init(p_rng, *self.unet_inputs(x, aligned), t, context=context,
                                class_labels=labels, **self.unet_kwargs(aligned))["params"]
        if getattr(self, "init_params", None) is not None:  # unet.init_from
            from ldm_jax.models.maisi.finetune import replace_params
            params = replace_params(params, self.init_params, "unet.init_from")
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, ema_params=params,
                          opt=self.tx.init(params), rng=run_rng, bad_steps=zero,
                          skipped_steps=zero)

    def _latents_of(self, batch, ae_params, key):
        """Scaled, padded latents (B, *padded, C) float32 of a batch."""
        if "latent" in batch:
            z = batch["latent"].astype(jnp.float32)
        else:
            mu, sigma = self.ae.encode_fn(ae_params, batch["image"].astype(jnp.float32))
            z = mu + sigma * jax.random.normal(key, mu.shape, mu.dtype) if self.sample_z else mu
            z = jax.lax.stop_gradient(z.astype(jnp.float32))
        z = z * self.scale_factor
        return jnp.pad(z, ((0, 0), *self.pad, (0, 0)))

    def null_context(self, batch: int, length: int = 1):
        """The null ("no condition") context: zeros (batch, length, cross_attention_dim)."""
        return jnp.zeros((batch, length, int(self.config.unet.cross_attention_dim)),
                         jnp.float32)

    # ------------------------------------------------------------------ aligned conditions
    def write_val_conditions(self, conditions, folder):
        """Once per workdir: the validation volumes' conditions as `--condition` files,
        val_NNNN.npy (a projection as its 2D image (n1, n2), else (X', Y', Z', C)) and,
        for projections, val_NNNN.png (8-bit, min-max); files already there are kept."""
        from ldm_jax.diffusion.aligned import pooled_input
        os.makedirs(folder, exist_ok=True)
        for i, c in enumerate(np.asarray(conditions, np.float32)):
            path = os.path.join(folder, f"val_{i:04d}.npy")
            if os.path.exists(path):
                continue
            if self.aligned == "projection":
                img = pooled_input(c[None], self.config.conditioning)[0]
                img = img[..., 0] if img.shape[-1] == 1 else img
                np.save(path + ".tmp.npy", img)
                if img.ndim == 2:
                    from PIL import Image
                    lo, hi = float(img.min()), float(img.max())
                    u8 = np.round(255 * (img - lo) / max(hi - lo, 1e-12)).astype(np.uint8)
                    Image.fromarray(u8).save(path[:-4] + ".png")
            else:
                np.save(path + ".tmp.npy", c)
            os.replace(path + ".tmp.npy", path)

    def raw_condition(self, images, key=None):
        """Volumes (B, X, Y, Z, C) in data units -> their aligned condition (B, X', Y',
        Z', C) (`ldm_jax.diffusion.aligned.compute_condition`; noise drawn with `key`)."""
        from ldm_jax.diffusion.aligned import compute_condition
        return compute_condition(images, self.config.conditioning, key)

    def model_condition(self, c):
        """A raw condition (B, X', Y', Z', C) -> what the UNet takes: lifted and padded to
        its input grid (concat) or the 2D image (pooled). Traceable."""
        from ldm_jax.diffusion import aligned as aligned_lib
        if aligned_lib.mode_of(self.config) == "pooled":
            return aligned_lib.pooled_input(c, self.config.conditioning)
        return aligned_lib.lift(c, self.config.conditioning, self.latent_shape[:3], self.pad)

    def unet_inputs(self, x, aligned):
        """The UNet's positional input: (x,) or (x ++ the lifted condition,) (concat)."""
        if aligned is None or aligned.ndim != x.ndim:
            return (x,)
        return (jnp.concatenate([x, aligned.astype(x.dtype)], axis=-1),)

    def unet_kwargs(self, aligned):
        """{"condition": the 2D image} for the pooled-embedding UNet, else {}."""
        return {"condition": aligned} if aligned is not None and aligned.ndim == 4 else {}

    def _loss(self, params, z, noise, t, labels, context=None, controlnet=None, aligned=None):
        """The denoising loss of the UNet `params`; `controlnet`: None or `fn(x_t, t) ->
        (down residuals, mid residual)` added to the UNet's (MONAI's ControlNet);
        `aligned`: None or the model condition (`model_condition`)."""
        x_t = self.scheduler.add_noise(self.sched_state, z, noise, t)
        target = self.scheduler.training_target(self.sched_state, z, noise, t)
        extra = self.unet_kwargs(aligned)
        if controlnet is not None:
            down, mid = controlnet(x_t, t)
            extra.update(down_block_additional_residuals=down,
                         mid_block_additional_residual=mid)
        pred = self.unet.apply({"params": params}, *self.unet_inputs(x_t, aligned), t,
                               context=context, class_labels=labels, **extra)
        pred = pred[..., :target.shape[-1]].astype(jnp.float32)  # learned variances: mean part
        err = jnp.square(pred - target) if self.config.loss.get("type", "mse") == "mse" \
            else jnp.abs(pred - target)
        per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))
        gamma = float(self.config.loss.get("min_snr_gamma", 0) or 0)
        if gamma > 0 and hasattr(self.sched_state, "alphas_cumprod"):
            per_sample = per_sample * min_snr_weights(
                self.sched_state.alphas_cumprod, t, gamma, self.scheduler.prediction_type)
        return jnp.mean(per_sample)

    def conditions(self, batch, key, batch_size: int):
        """(class_labels (B,) or None, context (B, S, D) or None) of a training batch after
        condition dropout: with probability conditioning.drop_prob a row gets the "no
        class" label and the null context (zeros), both together (one mask)."""
        drop = jax.random.uniform(key, (batch_size,)) < float(
            self.config.get("conditioning", {}).get("drop_prob", 0.0))
        labels = context = None
        if self.num_classes:
            labels = jnp.where(drop, self.num_classes, batch["class_label"].astype(jnp.int32))
        if self.with_context:
            context = jnp.where(drop[:, None, None], 0.0, batch["context"].astype(jnp.float32))
        return labels, context

    def train_step(self, state, batch, ae_params=None):
        rng, k_enc, k_noise, k_t, k_drop = jax.random.split(state.rng, 5)
        z = self._latents_of(batch, ae_params, k_enc)
        noise = jax.random.normal(k_noise, z.shape, jnp.float32)
        t = self.scheduler.sample_timesteps(k_t, z)
        labels, context = self.conditions(batch, k_drop, z.shape[0])
        aligned = None
        if self.aligned is not None:
            # The same rows as labels/contexts are dropped (one uniform draw from k_drop).
            drop = jax.random.uniform(k_drop, (z.shape[0],)) < float(
                self.config.conditioning.get("drop_prob", 0.0))
            if "condition" in batch:  # a paired file (conditioning.aligned_dir)
                c = batch["condition"].astype(jnp.float32)
            else:
                c = self.raw_condition(batch["image"].astype(jnp.float32),
                                       jax.random.fold_in(k_drop, 1))
            aligned = self.model_condition(jnp.where(drop[:, None, None, None, None], 0.0, c))
        loss, grads = jax.value_and_grad(self._loss)(state.params, z, noise, t, labels,
                                                     context, None, aligned)
        return self._apply_update(state, rng, loss, grads)

    def _apply_update(self, state, rng, loss, grads):
        """The optimiser step, the EMA and the non-finite guard: (new state, metrics)."""
        updates, opt = self.tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA warm-up (as diffusers' EMAModel): decay min(d, (1+n)/(10+n)) after n updates,
        # so the average is not dominated by the initial weights for ~1/(1-d) steps.
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(float(self.config.train.get("ema_decay", 0.0)),
                            (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        finite = all_finite((loss, grads, params))
        params, ema, opt = keep_if(finite, (params, ema, opt),
                                   (state.params, state.ema_params, state.opt))
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt=opt, rng=rng,
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
        return new_state, dict(loss=loss, finite=finite.astype(jnp.float32))

    # ------------------------------------------------------------------ evaluation
    def eval_timesteps(self):
        """The fixed timesteps of the validation loss (comparable across evaluations)."""
        k = int(self.config.eval.get("num_timesteps", 10))
        T = int(self.config.scheduler.num_train_timesteps)
        return np.round(np.linspace(0, T - 1, k)).astype(np.int32)

    def eval_loss(self, params, latents, contexts=None, aligned=None):
        """Mean denoising loss of `latents` (N, x, y, z, C, unscaled) over the fixed
        timesteps, with fixed noise (PRNGKey(0)): a curve comparable across steps. Class
        models: unconditional (the "no class" label); context models: conditional on
        `contexts` (N, S, D); aligned-condition models: conditional on `aligned` (N, X',
        Y', Z', C), the raw conditions."""
        if self.with_context and contexts is None:
            raise ValueError("this UNet cross-attends: eval_loss needs the contexts")
        if self.aligned is not None and aligned is None:
            raise ValueError("this UNet is conditioned on aligned images: eval_loss needs them")
        if self._eval_fn is None:
            def fn(params, z, context, c):
                c = None if c is None else self.model_condition(c)
                z = jnp.pad(z * self.scale_factor, ((0, 0), *self.pad, (0, 0)))
                noise = jax.random.normal(jax.random.PRNGKey(0), z.shape, jnp.float32)
                labels = (jnp.full((z.shape[0],), self.num_classes, jnp.int32)
                          if self.num_classes else None)
                # One UNet in the program, looped over the timesteps (unrolling them made
                # the compile ~num_timesteps times larger).
                losses = jax.lax.map(
                    lambda t: self._loss(params, z, noise, jnp.full((z.shape[0],), t), labels,
                                         context, None, c),
                    jnp.asarray(self.eval_timesteps(), jnp.int32))
                return jnp.mean(losses)
            self._eval_fn = jax.jit(fn)
        ctx = None if contexts is None else jnp.asarray(contexts, jnp.float32)
        c = None if aligned is None else jnp.asarray(aligned, jnp.float32)
        return float(self._eval_fn(params, jnp.asarray(latents, jnp.float32), ctx, c))

    def evaluate(self, state, batches, put, image_path):
        """val_loss (EMA params) and a sheet of `eval.num_samples` decoded samples drawn
        with a fixed seed (process 0 writes `image_path`); context models sample with the
        first validation contexts (repeated when there are fewer)."""
        contexts = (np.concatenate([b["context"] for b in batches]) if self.with_context
                    else None)
        aligned = (np.concatenate([b["aligned"] for b in batches]) if self.aligned is not None
                   else None)
        val = self.eval_loss(state.ema_params, np.concatenate([b["latent"] for b in batches]),
                             contexts, aligned)
        n = int(self.config.eval.get("num_samples", 2))
        if aligned is not None and jax.process_index() == 0:
            self.write_val_conditions(aligned, os.path.join(
                os.path.dirname(os.path.dirname(image_path)), "conditions"))
        if n > 0 and jax.process_index() == 0:
            from ldm_jax.diffusion.pipeline import Pipeline
            if self._pipeline is None:
                self._pipeline = Pipeline(self.config, self.unet, None, self.ae)
            pipe = self._pipeline
            pipe.params = jax.device_get(state.ema_params)
            rows = np.arange(n)
            vols = pipe.sample(n, jax.random.PRNGKey(int(self.config.eval.get("seed", 0))),
                               steps=int(self.config.eval.get("sampling_steps", 25)),
                               context=None if contexts is None
                               else contexts[rows % len(contexts)],
                               condition=None if aligned is None
                               else aligned[rows % len(aligned)])
            from ldm_jax.diffusion.pipeline import save_sheet
            os.makedirs(os.path.dirname(image_path), exist_ok=True)
            names = None
            if aligned is not None:
                vols, names = pipe.sheet_with_conditions(vols, aligned[rows % len(aligned)])
            save_sheet(vols, image_path, self.ae.config.data, names=names,
                       title=f"step {int(state.step)}: {n} samples (EMA weights, "
                             f"{int(self.config.eval.get('sampling_steps', 25))} steps, fixed seed)")
        return {"val_loss": val}
