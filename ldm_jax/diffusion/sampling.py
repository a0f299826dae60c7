"""Jitted sampling: Gaussian noise -> denoised latents in one `jax.lax.fori_loop`.

Classifier-free guidance (Ho & Salimans 2022): the conditional and the unconditional
("no class" label, null context = zeros) outputs come from one UNet call on a doubled
batch and are mixed as uncond + g * (cond - uncond); g = 1 calls the conditional model
alone.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ldm_jax.errors import ConfigError

SAMPLERS = ("ddim", "ddpm", "rflow")


def sampler_for(sched_cfg, name: Optional[str]):
    """The scheduler to sample with: the training one's noise schedule under `name`
    ("ddim" | "ddpm" | "rflow"; None: DDIM for DDPM/DDIM-trained models, else rflow).

    Raises:
        ConfigError: an unknown name, or a sampler the model was not trained for
            (rectified flow and DDPM/DDIM predict different targets).
    """
    from ldm_jax.schedulers import build_scheduler

    trained = str(sched_cfg.name)
    if name is None:
        name = "rflow" if trained == "rflow" else "ddim"
    if name not in SAMPLERS:
        raise ConfigError(f"--scheduler={name!r} is not known; use one of {list(SAMPLERS)}.")
    if (name == "rflow") != (trained == "rflow"):
        ok = "rflow" if trained == "rflow" else "ddim or ddpm"
        raise ConfigError(f"this model was trained with the {trained} scheduler; sample with "
                          f"--scheduler {ok}.")
    return build_scheduler(sched_cfg, name=name)


def make_sampler(unet, scheduler, *, shape, steps: int, guidance_scale: float = 1.0,
                 null_label: Optional[int] = None, eta: float = 0.0, controlnet=None,
                 aligned=None):
    """A jitted `fn(params, key, class_labels=None, context=None, cn_params=None,
    condition=None, conditioning_scale=1.0, *, n) -> latents (n, *shape)` (float32, still
    scaled and padded), for `shape` = (X, Y, Z, C) the UNet's input; `n` is static;
    `context` (n, S, cross_attention_dim) for a cross-attention UNet; with `controlnet`
    (a `ControlNet` module) its params and condition (n, X', Y', Z', C_cond) steer every
    UNet call (`bind_controlnet`). With `aligned` (a traceable `fn(raw condition) -> the
    UNet's condition`: lifted (B, X, Y, Z, C') to concatenate, or a 2D image (B, X, Y, C)
    for the pooled-embedding model) `fn(..., aligned=(n, X', Y', Z', C))` takes the raw
    aligned conditions; the null condition of guidance is zeros.

    Args:
        unet: the flax DiffusionModelUNet. scheduler: a DDPM/DDIM/RFlow scheduler.
        steps: number of inference steps (1..num_train_timesteps).
        guidance_scale: classifier-free guidance weight; != 1 needs a conditional model
            (`null_label`, or a UNet with cross-attention, whose null context is zeros).
        null_label: the "no class" label of a class-conditional model.
        eta: DDIM's stochasticity (0 = deterministic).

    Raises:
        ConfigError: steps out of range, guidance for an unconditional model.
    """
    from ldm_jax.schedulers import sample_loop

    state = scheduler.set_timesteps_for(scheduler.create_state(), int(steps), (1, *shape))
    g = check_guidance(unet, guidance_scale, null_label, aligned is not None)
    kwargs = {"eta": float(eta)} if type(scheduler).__name__ == "DDIMScheduler" else {}

    def run(params, key, class_labels=None, context=None, cn_params=None, condition=None,
            conditioning_scale=1.0, aligned_condition=None, *, n):
        k0, k1 = jax.random.split(key)
        x = jax.random.normal(k0, (n, *shape), jnp.float32)
        model_fn = guided_model_fn(unet, params, g, null_label, class_labels, context,
                                   bind_controlnet(controlnet, cn_params, condition,
                                                   conditioning_scale),
                                   aligned_condition, aligned)
        return sample_loop(scheduler, state, model_fn, x, k1, **kwargs)

    return jax.jit(run, static_argnames=("n",))


def check_guidance(unet, guidance_scale: float, null_label: Optional[int],
                   aligned: bool = False) -> float:
    """`guidance_scale` as a float; ConfigError when != 1 for an unconditional model."""
    g = float(guidance_scale)
    if g != 1.0 and null_label is None and not aligned and not getattr(
            unet, "with_conditioning", False):
        raise ConfigError("--guidance_scale needs a conditional model (trained with "
                          "conditioning.num_classes > 0 or conditioning.context_dir); use "
                          "--guidance_scale 1.")
    return g


def guided_model_fn(unet, params, g: float, null_label, class_labels=None, context=None,
                    controlnet=None, aligned=None, to_model=None):
    """`model_fn(x (B, X, Y, Z, C), t scalar) -> (B, X, Y, Z, C)`: the UNet with
    classifier-free guidance g (one call on a doubled batch when g != 1 and there is a
    condition). `controlnet`: None or `fn(x, tt, class_labels=, context=) -> (down
    residuals, mid residual)` (a ControlNet with its params and condition bound; it gets
    the doubled batch under guidance, so it tiles its condition to x's batch). `aligned`:
    None or the raw aligned conditions (B, X', Y', Z', C), made the UNet's by `to_model`
    (`make_sampler`'s `aligned`); guidance's null condition is zeros."""

    def call(x, tt, aligned=None, **cond):
        extra = {}
        if controlnet is not None:
            down, mid = controlnet(x, tt, **cond)
            extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if aligned is not None:
            a = to_model(aligned)
            if a.ndim == x.ndim:  # concat (MONAI's DiffusionInferer mode="concat")
                x = jnp.concatenate([x, a.astype(x.dtype)], axis=-1)
            else:  # the pooled-embedding model's 2D image
                extra["condition"] = a
        return unet.apply({"params": params}, x, tt, **cond, **extra)

    def model_fn(x, t):
        cond = dict(class_labels=class_labels, context=context, aligned=aligned)
        tt = jnp.broadcast_to(t, (x.shape[0],))
        if g == 1.0 or (class_labels is None and context is None and aligned is None):
            return call(x, tt, **cond)
        null = dict(class_labels=None if class_labels is None
                    else jnp.full_like(class_labels, null_label),
                    context=None if context is None else jnp.zeros_like(context),
                    aligned=None if aligned is None else jnp.zeros_like(aligned))
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null)
        out = call(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), **both)
        cond_out, uncond = jnp.split(out, 2)
        return uncond + g * (cond_out - uncond)

    return model_fn


def sample_batch(fn, params, key, index: int, size: int, *,
                 class_label: Optional[int] = None, context=None, controlnet=None):
    """Batch `index` of `size` latents (size, *shape) float32 (scaled, padded) from a
    `make_sampler` function: drawn from fold_in(key, index), so a batch does not depend on
    the batches before it (a rerun can make only the missing ones). `context`: None or
    (size, S, D). `controlnet`: None or {"cn_params", "condition" (size, X', Y', Z', C),
    "conditioning_scale"} for a sampler made with a ControlNet."""
    labels = None if class_label is None else jnp.full((size,), int(class_label), jnp.int32)
    ctx = None if context is None else jnp.asarray(context, jnp.float32)
    return fn(params, jax.random.fold_in(key, int(index)), labels, ctx, **(controlnet or {}),
              n=int(size))


def slice_rows(args, i: int, b: int):
    """`sample_batch`'s `controlnet` dict for rows i..i+b: every per-sample array (the
    ControlNet's and the aligned condition) sliced, the rest kept."""
    if args is None:
        return None
    return {k: v[i:i + b] if k in ("condition", "aligned_condition") else v
            for k, v in args.items()}


def sample_latents(fn, params, key, *, n: int, class_label: Optional[int] = None,
                   context=None, batch_size: int = 8, on_batch=None, controlnet=None):
    """`n` latents (n, *shape) float32 (scaled, padded) from a `make_sampler` function, in
    batches of `batch_size`; batch i is drawn from fold_in(key, i) (`sample_batch`), so
    the same seed gives the same samples. `context`: None or (n, S, D), row i for sample
    i; `controlnet`: as `sample_batch`'s with the condition (n, ...), row i for sample i.
    `on_batch(done)` is called after each batch (progress). Raises ConfigError for
    n < 1 or batch_size < 1."""
    if int(n) < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}.")
    if int(batch_size) < 1:
        raise ConfigError(f"the batch size must be >= 1, got {batch_size}.")
    out = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        cn = slice_rows(controlnet, i, b)
        out.append(sample_batch(fn, params, key, i // batch_size, b, class_label=class_label,
                                context=None if context is None else context[i:i + b],
                                controlnet=cn))
        if on_batch is not None:
            on_batch(i + b)
    return jnp.concatenate(out)


def bind_controlnet(controlnet, cn_params, condition, conditioning_scale=1.0):
    """None when `controlnet` is None, else `fn(x, tt, class_labels=, context=) -> (down
    residuals, mid residual)` for `guided_model_fn`: the ControlNet module with its params
    and its condition (B, X', Y', Z', C_cond) bound; the condition is tiled to x's batch
    (the doubled batch of classifier-free guidance)."""
    if controlnet is None:
        return None

    def fn(x, tt, class_labels=None, context=None):
        c = condition
        if c.shape[0] != x.shape[0]:
            c = jnp.concatenate([c] * (x.shape[0] // c.shape[0]))
        return controlnet.apply({"params": cn_params}, x, tt, c, conditioning_scale,
                                context=context, class_labels=class_labels)

    return fn
