"""Memory of one encode / decode call, and the window and batch of windows that fit a budget.

Why: the autoencoder is convolutional, so any window that is a multiple of the total
factor gives a valid latent; the training patch is not a limit. What bounds a window is
memory: activations grow with its voxels; so does attention (`layers.attention` holds the
T x T logits only while they fit one block; above that it is chunked). Encoding a
97x113x61 volume in 32^3 windows with overlap 0.5 (126 windows) does about 5x the
convolution work of one whole-volume pass, so inference uses the whole volume whenever
it fits the budget, else the largest window that fits, with as many windows per call as
fit.

The estimate (`call_bytes`) counts, per call: ACTIVATION_COPIES copies of the largest
activation (float32: GroupNorm works in float32 whatever the compute dtype) plus the
largest attention site (`attention_bytes`: q, k, v and the output, plus three float32
score arrays -- logits, their exponentials and the probabilities -- of T x T, or of one
chunk's block when the attention is chunked).
tests/autoencoder/test_inference_memory.py checks it against XLA's own memory analysis: never below
it, and within a small factor.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

from ldm_jax.autoencoder import geometry
from ldm_jax.models import layers

ACTIVATION_COPIES = 6  # live float32 copies of the largest activation at the peak
DEFAULT_HOST_FRACTION = 0.25  # of the host memory available now (CPU)
DEFAULT_DEVICE_FRACTION = 0.5  # of the accelerator memory not in use
_GIB = 1 << 30


def _levels(ae, window) -> list[tuple[int, int]]:
    """(voxels, channels) at each level for an input `window` (X, Y, Z)."""
    cum = geometry.initial_factor(ae)
    factors = geometry.level_factors(ae)
    out = []
    for i, c in enumerate(ae.num_channels):
        if i > 0:
            cum = tuple(a * b for a, b in zip(cum, factors[i - 1]))
        out.append((math.prod(w // f for w, f in zip(window, cum)), int(c)))
    return out


def call_bytes(ae, window: Sequence[int], op: str, batch: int = 1) -> int:
    """Estimated peak bytes of one `op` call ("encode" or "decode") on `batch` windows of
    `window` input voxels (X, Y, Z; multiples of the total factor) for the autoencoder
    config `ae` (config.autoencoder). A decode call takes the window's latent."""
    if op not in ("encode", "decode"):
        raise ValueError(f"op must be 'encode' or 'decode'; got {op!r}")
    window = tuple(int(w) for w in window)
    voxels = math.prod(window)
    levels = _levels(ae, window)
    io_channels = int(ae.in_channels if op == "encode" else ae.out_channels)
    elements = [voxels * io_channels] + [v * c for v, c in levels]
    if op == "decode":  # each upsample puts level i's channels on level i-1's grid
        elements += [levels[i - 1][0] * levels[i][1] for i in range(1, len(levels))]
    init = geometry.initial_factor(ae)
    if op == "decode" and init != (1, 1, 1):
        head = ae.get("upsample_head", "nearest_conv")
        # nearest_conv convolves level 0's channels at full resolution.
        elements.append(voxels * int(ae.num_channels[0]) if head == "nearest_conv"
                        else voxels * io_channels)
    sites = [levels[i] for i, a in enumerate(ae.attention_levels) if a]
    if ae.get(f"with_{'encoder' if op == 'encode' else 'decoder'}_nonlocal_attn", True):
        sites.append(levels[-1])
    attention = max((attention_bytes(t, c) for t, c in sites), default=0)
    return int(batch) * (ACTIVATION_COPIES * max(elements) * 4 + attention)


def attention_bytes(tokens: int, channels: int) -> int:
    """Bytes of one attention layer over `tokens` voxels of `channels` (float32): q, k, v
    and the output, plus the scores as `layers.attention` holds them -- the whole T x T
    logits, their exponentials and the probabilities when queries and keys fit one block
    of `layers.default_chunks()`, else one query block x key block of each (the chunked
    attention: memory linear in T)."""
    qc, kc = layers.default_chunks()
    scores = tokens * tokens if tokens <= qc and tokens <= kc else qc * kc
    return 3 * scores * 4 + 4 * tokens * channels * 4


def _host_available() -> Optional[int]:
    """Bytes of host memory available now (Linux MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """Bytes one inference call may use: half the accelerator memory not in use, or on a
    CPU a quarter of the host memory available now (2 GiB when unknown)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(DEFAULT_DEVICE_FRACTION * (limit - stats.get("bytes_in_use", 0)))
    avail = _host_available()
    return int(DEFAULT_HOST_FRACTION * avail) if avail else 2 * _GIB


def choose_window(ae, padded: Sequence[int], op: str, budget: int,
                  factor: Sequence[int], estimate: Optional[Callable] = None
                  ) -> tuple[Optional[tuple], int, int]:
    """(window or None for the whole volume, windows per call, estimated bytes per window)
    for a volume of `padded` input voxels (multiples of `factor`) under `budget` bytes.

    The whole volume when it fits; else the largest window that fits, found by shrinking
    the longest side a factor step at a time (windows stay near cubic). When not
    even one factor step per axis fits, that smallest window is used anyway.
    `estimate(window, op) -> bytes` is the model's memory estimate: None is `call_bytes`
    for the KL autoencoder config `ae`; another kind passes its own (the VQ-VAE's
    `vq_config.vq_call_bytes`), and `ae` is then unused.
    """
    if estimate is None:
        def estimate(window, op):
            return call_bytes(ae, window, op)
    padded = tuple(int(p) for p in padded)
    whole = estimate(padded, op)
    if whole <= budget:
        return None, 1, whole
    window = list(padded)
    while estimate(window, op) > budget:
        shrinkable = [a for a in range(3) if window[a] > factor[a]]
        if not shrinkable:
            break
        a = max(shrinkable, key=lambda i: window[i])
        window[a] -= factor[a]
    per_window = estimate(window, op)
    return tuple(window), max(1, int(budget // per_window)), per_window
