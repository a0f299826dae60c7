"""The stage-2 plan: the UNet's level shapes, attention tokens, parameters and scheduler.

Printed by the trainer at start and by `ldm-jax plan --config configs/diffusion/X.py`.
"""

from __future__ import annotations

import math


def unet_param_count(unet_cfg, padded_shape, channels: int) -> int:
    """Parameters of the UNet (shape-only init, nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models import build_unet

    unet = build_unet(unet_cfg)
    x = jax.ShapeDtypeStruct((1, *padded_shape, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    k = unet_cfg.get("num_class_embeds")
    labels = jax.ShapeDtypeStruct((1,), jnp.int32) if k else None
    shapes = jax.eval_shape(lambda x, t, c: unet.init(jax.random.PRNGKey(0), x, t,
                                                      class_labels=c), x, t, labels)
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"])))


def format_unet_plan(config, latent_shape, padded_shape, extra: str = "",
                     condition_channels: int = 0) -> str:
    """Text table of the UNet on latents `latent_shape` (x, y, z, C) padded to
    `padded_shape` (x, y, z), with `condition_channels` more input channels (an aligned
    condition concatenated to the input). Raises ConfigError for an invalid UNet
    section."""
    from ldm_jax.models import validate_unet

    u = config.unet
    validate_unet(u, latent_shape=tuple(padded_shape))
    ch = tuple(u.num_channels)
    att = tuple(u.attention_levels)
    heads = u.num_head_channels
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(ch)
    c = int(latent_shape[-1])
    lines = [f"diffusion UNet on latents {'x'.join(map(str, latent_shape[:3]))} x {c}"
             + ("" if tuple(padded_shape) == tuple(latent_shape[:3]) else
                f" (padded symmetrically to {'x'.join(map(str, padded_shape))})")
             + (f" + {condition_channels} condition channel(s)" if condition_channels else "")
             + f", dtype {u.get('dtype', 'float32')}"]
    lines.append("  level  shape          channels  attention")
    for i, (n_c, a) in enumerate(zip(ch, att)):
        shape = tuple(s // 2 ** i for s in padded_shape)
        tokens = math.prod(shape)
        what = (f"yes: {n_c // heads[i] if heads[i] else 1} head(s), {tokens:,} tokens" if a
                else "no")
        lines.append(f"  {i:<5}  {'x'.join(map(str, shape)):<13}  {n_c:>8}  {what}")
    mid = tuple(s // 2 ** (len(ch) - 1) for s in padded_shape)
    lines.append(f"  mid    {'x'.join(map(str, mid)):<13}  {ch[-1]:>8}  yes (always), "
                 f"{math.prod(mid):,} tokens")
    s = config.scheduler
    lines.append(f"scheduler: {s.name}, {s.num_train_timesteps} steps, "
                 + (f"{s.schedule} {s.beta_start}->{s.beta_end}, " if s.name != "rflow" else "")
                 + "prediction " + (s.get("prediction_type", "epsilon") if s.name != "rflow"
                                    else "velocity (x0 - noise)"))
    try:
        n = unet_param_count(u, padded_shape, c + int(condition_channels))
        lines.append(f"parameters: diffusion UNet {n:,} ({n * 4 / 2**20:.1f} MiB float32)")
    except ImportError as e:
        lines.append(f"parameters: unavailable ({e})")
    if extra:
        lines.append(extra)
    return "\n".join(lines)
