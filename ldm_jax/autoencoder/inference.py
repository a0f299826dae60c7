"""A trained autoencoder from its checkpoint alone, with volume-level encode and decode.

`load_autoencoder(workdir, step="best")` is the entry point for the diffusion stage and
for the extract / reconstruct / decode commands. The model is rebuilt from the config
saved IN the checkpoint (so its factors and strides are the ones it was trained with,
whatever a config file says now), and only the autoencoder params are read.

The checkpoint's `autoencoder.kind` picks the class (`AUTOENCODERS`), and every caller
uses the same interface: `encode(x) -> (z_mu, z_sigma)`, `decode(z) -> x`,
`encode_fn(params, x)` (pure, for jitted stage-2 steps), `latent_shape()`, the volume
methods. "kl" is `Autoencoder`; "vqvae" is `VQAutoencoder`, whose latents are the
continuous pre-quantisation encoder outputs (sigma 0) and whose decode quantises them to
the nearest entry of the checkpoint's EMA codebook first (the original project's
3d_vq_ldm).

`encode_volume` / `decode_volume` take one volume of any size: sizes that are not a
multiple of the total factor are padded at the end (and cropped back after decoding).
By default (`window="auto"`) a volume goes through in one pass when that fits the memory
budget, else in the largest windows that fit, several per call
(`ldm_jax.autoencoder.memory`), blended by `ldm_jax.autoencoder.sliding`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import checkpoint as ckpt
from ldm_jax import config as config_lib
from ldm_jax.autoencoder import geometry, memory
from ldm_jax.autoencoder.sliding import sliding_apply, tiles
from ldm_jax.errors import ChannelMismatchError, ConfigError

AUTO = "auto"  # window / windows per call chosen by memory

# Data fields that change what a file looks like after preprocessing: a --config that
# disagrees with the checkpoint on these would feed the model different intensities/grids.
PREPROCESS_FIELDS = ("spacing", "voxel_resize", "a_min", "a_max", "b_min", "b_max", "clip",
                     "invert", "frame", "nan_to_num")
# Autoencoder fields that do not change the function the params compute.
_NON_MODEL_FIELDS = ("remat",)


# ----------------------------------------------------------------------------------------
# Config helpers.


def _plain(value):
    """JSON round trip: tuples -> lists, ConfigDict -> dict (so saved and given compare)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value))


def model_config_hash(config) -> str:
    """Short sha256 of the autoencoder section (minus remat): equal hash, same function."""
    ae = {k: v for k, v in _plain(config["autoencoder"]).items() if k not in _NON_MODEL_FIELDS}
    blob = json.dumps(ae, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_differences(saved, given) -> list[str]:
    """'section.field: checkpoint X vs --config Y' for model and preprocessing fields."""
    saved, given = _plain(saved), _plain(given)
    out = []
    s_ae, g_ae = saved.get("autoencoder", {}), given.get("autoencoder", {})
    for k in sorted(set(s_ae) | set(g_ae)):
        if k not in _NON_MODEL_FIELDS and s_ae.get(k) != g_ae.get(k):
            out.append(f"autoencoder.{k}: checkpoint {s_ae.get(k)!r} vs --config {g_ae.get(k)!r}")
    s_d, g_d = saved.get("data", {}), given.get("data", {})
    for k in PREPROCESS_FIELDS:
        if s_d.get(k) != g_d.get(k):
            out.append(f"data.{k}: checkpoint {s_d.get(k)!r} vs --config {g_d.get(k)!r}")
    return out


def parse_window(window, factor):
    """None/'whole'/0 -> None (whole volume); 'auto' -> AUTO (by memory); int or 3 ints ->
    a window checked against the total factor (every window must map onto whole latent
    voxels). Raises ConfigError."""
    if window is None or (isinstance(window, str) and window.strip().lower() == "whole"):
        return None
    if isinstance(window, str) and window.strip().lower() == AUTO:
        return AUTO
    if isinstance(window, str):
        window = [int(v) for v in window.replace("x", ",").split(",") if v.strip()]
    if isinstance(window, (int, np.integer)):
        if int(window) == 0:
            return None
        window = (int(window),) * 3
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1:
        raise ConfigError(f"window must be 'auto', 'training', 'whole' or 3 positive sizes "
                          f"(X, Y, Z); got {window!r}")
    bad = [a for a in range(3) if window[a] % factor[a]]
    if bad:
        fixed = tuple(max(w // f, 1) * f for w, f in zip(window, factor))
        raise ConfigError(
            f"window {window} is not a multiple of the model's total factor {tuple(factor)} on "
            f"axes {bad}; windows must cover whole latent voxels. Try {fixed}.")
    return window


# ----------------------------------------------------------------------------------------
# Geometry.


def latent_affine(affine, factor) -> np.ndarray:
    """Affine of the latent grid: voxel sizes times the factor, and the origin moved to the
    centre of the first f-voxel block (latent voxel i covers input voxels i*f .. i*f+f-1)."""
    f = np.asarray(factor, np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(f)
    m[:3, 3] = (f - 1) / 2.0
    return np.asarray(affine, np.float64) @ m


def volume_affine(lat_affine, factor) -> np.ndarray:
    """Inverse of `latent_affine`: the full-resolution grid a latent decodes to."""
    f = np.asarray(factor, np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(1.0 / f)
    m[:3, 3] = -(f - 1) / (2.0 * f)
    return np.asarray(lat_affine, np.float64) @ m


def denormalize(vol, data_cfg) -> np.ndarray:
    """Model intensities back to the file's: undoes data.invert, then the b_min..b_max ->
    a_min..a_max window (values the window clipped stay clipped)."""
    d = data_cfg
    out = np.asarray(vol, np.float32)
    if d.get("invert", False):
        out = np.float32(d.b_max + d.b_min) - out
    scale = (float(d.a_max) - float(d.a_min)) / (float(d.b_max) - float(d.b_min))
    return ((out - np.float32(d.b_min)) * np.float32(scale) + np.float32(d.a_min)).astype(
        np.float32)


def pad_to_multiple(vol: np.ndarray, factor, value: float) -> np.ndarray:
    """Pads the END of each spatial axis up to a multiple of `factor` with `value`."""
    pads = [(0, -s % f) for s, f in zip(vol.shape[:3], factor)]
    if not any(p for _, p in pads):
        return vol
    return np.pad(vol, pads + [(0, 0)] * (vol.ndim - 3), constant_values=value)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one volume is encoded: padding and whole-volume vs sliding windows."""

    shape: tuple  # (X, Y, Z) as given
    padded: tuple  # up to a multiple of the total factor
    latent: tuple  # latent (X, Y, Z)
    window: Optional[tuple]  # None: one whole-volume pass
    num_windows: int
    batch: int = 1  # windows per call
    estimate: Optional[int] = None  # bytes per call, when chosen by memory

    @property
    def was_padded(self) -> bool:
        return self.padded != self.shape

    def describe(self) -> str:
        parts = []
        if self.was_padded:
            parts.append(f"padded {self.shape} -> {self.padded} at the end (not a multiple of "
                         f"the total factor; cropped back after decoding)")
        if self.window is None:
            parts.append("whole volume in one pass")
        else:
            parts.append(f"{self.num_windows} sliding windows of {self.window}, "
                         f"{self.batch} per call")
        if self.estimate is not None:
            parts.append(f"about {self.estimate / 2**30:.2f} GiB per call")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------
# The loaded model.


@functools.lru_cache(maxsize=32)
def _jitted_method(model, method):
    """One compiled function per (model, method): flax modules are hashable by their
    fields, so every Autoencoder of the same architecture shares compilations."""
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


@jax.jit
def _sample(z_mu, z_sigma, key):
    return z_mu + z_sigma * jax.random.normal(key, z_mu.shape, jnp.float32)


@dataclasses.dataclass
class Autoencoder:
    """A trained autoencoder: flax `model`, its `params`, the checkpoint's `config`.

    `encode(x) -> (z_mu, z_sigma)` and `decode(z) -> x` are jitted and take batches
    (B, X, Y, Z, C) whose sizes are multiples of `factor`; `encode_volume` and
    `decode_volume` take one volume of any size (padding, sliding windows, blending).
    This class is the KL autoencoder's (`autoencoder.kind = "kl"`); subclasses for other
    kinds override the class methods `build_model`, `model_factor`, `read_extra`,
    `expected_variables` and the instance methods `encode_fn`, `encode`, `decode`,
    `latent_shape`, `_latent_channels`, `_call_bytes` (the memory estimate
    `_choose_window` searches with).
    """

    model: Any
    params: Any
    config: ml_collections.ConfigDict
    step: int
    workdir: str
    window: Any = AUTO  # default window (input voxels); None = whole volume; AUTO = by memory
    overlap: float = 0.5
    windows_per_batch: Optional[int] = None  # None: as many as fit `memory_budget`
    memory_budget: Optional[int] = None  # bytes per call; None: memory.default_budget()

    kind = "kl"

    def __post_init__(self):
        self.factor = tuple(self.model_factor(self.config))
        self.in_channels = int(self.config.autoencoder.in_channels)
        self.latent_channels = self._latent_channels()
        self.config_hash = model_config_hash(self.config)
        d = self.config.data
        self.background = float(d.b_max if d.get("invert", False) else d.b_min)
        self._encode = _jitted_method(self.model, "encode")
        self._decode = _jitted_method(self.model, "decode")
        if self.memory_budget is None:
            self.memory_budget = memory.default_budget()

    # -- what a kind defines ---------------------------------------------------------------

    @staticmethod
    def build_model(ae_cfg):
        """The flax model of a checkpoint's `autoencoder` section (no remat)."""
        from ldm_jax.models import build_autoencoder
        return build_autoencoder(ae_cfg, remat="none")

    @staticmethod
    def model_factor(config) -> tuple:
        """Per-axis total factor of a checkpoint's config (validates its factors)."""
        return tuple(geometry.total_factor(config.autoencoder))

    @staticmethod
    def read_extra(workdir, step) -> dict:
        """Checkpoint state entries beside `g_params` that inference needs (none)."""
        return {}

    @staticmethod
    def expected_variables(model, config) -> dict:
        """Shapes of what `load_autoencoder` reads: {"params": ...} (plus `read_extra`'s)."""
        shape = (1, *(max(f, 1) for f in geometry.total_factor(config.autoencoder)),
                 int(config.autoencoder.in_channels))
        return {"params": jax.eval_shape(lambda: model.init(
            {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(0)},
            jnp.zeros(shape, jnp.float32))["params"])}

    def _latent_channels(self) -> int:
        return int(self.config.autoencoder.latent_channels)

    def latent_shape(self) -> tuple:
        """(x, y, z, C) latent of one training volume (the checkpoint's data.volume_size)."""
        return tuple(geometry.latent_shape(self.config))

    def encode_fn(self, params, x):
        """Pure (jit-traceable) `encode` with the given `params` (the `params` attribute's
        tree): x -> (z_mu, z_sigma). Stage 2 encodes on the fly with it inside its step."""
        return self.model.apply({"params": params}, x, method="encode")

    def _call_bytes(self, window, op) -> int:
        return memory.call_bytes(self.config.autoencoder, window, op)

    def _choose_window(self, padded, op):
        return memory.choose_window(self.config.autoencoder, padded, op, self.memory_budget,
                                    self.factor, estimate=self._call_bytes)

    # -- batches ---------------------------------------------------------------------------

    def encode(self, x):
        """(B, X, Y, Z, in_channels) -> (z_mu, z_sigma), each (B, X/fx, Y/fy, Z/fz, C)."""
        return self._encode(self.params, x)

    def decode(self, z):
        """(B, x, y, z, latent_channels) -> (B, x*fx, y*fy, z*fz, out_channels)."""
        return self._decode(self.params, z)

    def sample(self, z_mu, z_sigma, key):
        """z_mu + z_sigma * eps, eps ~ N(0, 1) drawn from `key`."""
        return _sample(z_mu, z_sigma, key)

    # -- volumes ---------------------------------------------------------------------------

    def layout(self, shape, window="default", op: str = "encode",
               windows_per_batch: Optional[int] = None) -> Layout:
        """Padding and tiling of a volume of spatial `shape` (input voxels) for `op`
        ("encode" or "decode", which needs more memory): with window AUTO, the whole
        volume when one call fits `memory_budget`, else the largest window that fits; as
        many windows per call as fit, unless `windows_per_batch` says otherwise."""
        shape = tuple(int(s) for s in shape[:3])
        window = self._window(window)
        padded = tuple(s + (-s % f) for s, f in zip(shape, self.factor))
        latent = tuple(p // f for p, f in zip(padded, self.factor))
        batch = windows_per_batch or self.windows_per_batch
        estimate = None
        if isinstance(window, str) and window == AUTO:
            window, fit, estimate = self._choose_window(padded, op)
            batch = batch or fit
        if window is None or all(p <= w for p, w in zip(padded, window)):
            return Layout(shape, padded, latent, None, 1, 1, estimate)
        window = tuple(min(w, p) for w, p in zip(window, padded))
        n = len(tiles(padded, window, self.overlap, self.factor))
        if not batch:  # a given window: as many per call as fit the budget
            estimate = self._call_bytes(window, op)
            batch = self.memory_budget // estimate
        batch = max(1, min(int(batch), n))
        batch = -(-n // -(-n // batch))  # the same number of calls, least filler windows
        return Layout(shape, padded, latent, window, n, batch,
                      None if estimate is None else estimate * batch)

    def encode_volume(self, volume, *, sample: bool = False, key=None, window="default",
                      overlap: Optional[float] = None, windows_per_batch: Optional[int] = None,
                      return_sigma: bool = False):
        """One volume (X, Y, Z, C) (or (X, Y, Z) for one channel) -> latent (x, y, z, C).

        mu by default; `sample=True` draws mu + sigma * eps with `key` (a jax PRNG key).
        With `return_sigma` returns (latent, sigma). Numpy float32 out.
        """
        vol = self._as_volume(volume, self.in_channels, "volume", "in_channels")
        lay = self.layout(vol.shape, window, "encode", windows_per_batch)
        vol = pad_to_multiple(vol, self.factor, self.background)
        if lay.window is None:
            mu, sigma = self.encode(vol[None])
            mu, sigma = mu[0], sigma[0]
        else:
            mu, sigma = sliding_apply(
                self.encode, vol, lay.window, overlap=self._overlap(overlap),
                batch_size=lay.batch, scale=[(1, f) for f in self.factor])
        z = mu
        if sample:
            if key is None:
                raise ValueError("encode_volume(sample=True) needs key=jax.random.PRNGKey(seed)")
            z = self.sample(jnp.asarray(mu), jnp.asarray(sigma), key)
        z = np.asarray(jax.device_get(z), np.float32)
        if return_sigma:
            return z, np.asarray(jax.device_get(sigma), np.float32)
        return z

    def decode_volume(self, latent, *, shape: Optional[Sequence[int]] = None, window="default",
                      overlap: Optional[float] = None, windows_per_batch: Optional[int] = None):
        """One latent (x, y, z, C) -> volume (X, Y, Z, out_channels), cropped to `shape`
        (the input's (X, Y, Z) before padding) when given. Numpy float32 out."""
        z = self._as_volume(latent, self.latent_channels, "latent", "latent_channels")
        lay = self.layout([s * f for s, f in zip(z.shape[:3], self.factor)], window, "decode",
                          windows_per_batch)
        if lay.window is None:
            out = np.asarray(jax.device_get(self.decode(z[None])[0]), np.float32)
        else:
            (out,) = sliding_apply(
                self.decode, z, tuple(w // f for w, f in zip(lay.window, self.factor)),
                overlap=self._overlap(overlap), batch_size=lay.batch,
                scale=[(f, 1) for f in self.factor])
        if shape is not None:
            full = out.shape[:3]
            shape = tuple(int(s) for s in shape[:3])
            if any(s > n for s, n in zip(shape, full)):
                raise ValueError(f"cannot crop the decoded volume {full} to the larger {shape}")
            out = out[:shape[0], :shape[1], :shape[2]]
        return out

    def describe_window(self) -> str:
        """'auto (memory budget 4.2 GiB per call)', 'whole volume' or the window."""
        if isinstance(self.window, str) and self.window == AUTO:
            return f"auto (memory budget {self.memory_budget / 2**30:.1f} GiB per call)"
        return "whole volume" if self.window is None else str(self.window)

    # -- helpers ---------------------------------------------------------------------------

    def _window(self, window):
        if isinstance(window, str) and window == "default":
            return self.window
        if isinstance(window, str) and window == "training":
            window = tuple(int(v) for v in self.config.data.volume_size)
        return parse_window(window, self.factor)

    def _overlap(self, overlap):
        overlap = self.overlap if overlap is None else float(overlap)
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1); got {overlap}")
        return overlap

    @staticmethod
    def _as_volume(x, channels, what, field):
        x = np.asarray(jax.device_get(x), np.float32)
        if x.ndim == 3 and channels == 1:
            x = x[..., None]
        if x.ndim != 4:
            raise ChannelMismatchError(
                f"{what} must be (X, Y, Z, C) channels-last (one {what} without a batch axis); "
                f"got shape {x.shape}")
        if x.shape[-1] != channels:
            raise ChannelMismatchError(
                f"{what} has {x.shape[-1]} channel(s) (last axis of shape {x.shape}) but the "
                f"model's {field} is {channels}. Use volumes with {channels} channel(s) "
                f"(channels-last), or the checkpoint trained for them.")
        return x


@functools.lru_cache(maxsize=32)
def _vq_functions(model):
    """(encode, jitted encode, jitted decode) of a VQ-VAE, made once per architecture:
    encode (params, x) -> (continuous z float32, zeros); decode ({"params", "codebook"},
    z) -> volume through the quantiser (nearest codebook vector, `VQVAE.decode_latents`)."""

    def encode(params, x):
        z = model.apply({"params": params}, x, method="encode").astype(jnp.float32)
        return z, jnp.zeros_like(z)

    def decode(variables, z):
        return model.apply(variables, z, method="decode_latents")

    return encode, jax.jit(encode), jax.jit(decode)


@dataclasses.dataclass
class VQAutoencoder(Autoencoder):
    """A trained VQ-VAE (`autoencoder.kind = "vqvae"`, `ldm_jax.models.vqvae.VQVAE`) with
    the KL autoencoder's interface, as the original project's 3d_vq_ldm uses it:

    - `encode(x) -> (z, zeros)`: z the continuous pre-quantisation encoder output
      (embedding_dim channels), sigma 0 (so a "sampled" latent is z itself);
    - `decode(z)`: each latent vector replaced by its nearest vector of `codebook` (the
      EMA codebook saved with the params), then decoded; no codebook update.

    `codebook` is the quantizer's {"quantizer": {"embedding", "ema_cluster_size",
    "ema_w"}} collection from the checkpoint.
    """

    codebook: Any = None
    kind = "vqvae"

    def __post_init__(self):
        super().__post_init__()
        self._encode_pure, self._encode, self._decode = _vq_functions(self.model)

    @staticmethod
    def build_model(ae_cfg):
        from ldm_jax.models.vqvae import build_vqvae
        return build_vqvae(ae_cfg)

    @staticmethod
    def model_factor(config) -> tuple:
        from ldm_jax.autoencoder.vq_config import total
        from ldm_jax.models.vqvae import build_vqvae
        return tuple(total(build_vqvae(config.autoencoder)))

    @staticmethod
    def read_extra(workdir, step) -> dict:
        _, _, codebook = ckpt.open_step(workdir, int(step), item="codebook",
                                        stage="autoencoder")
        return {"codebook": codebook}

    @staticmethod
    def expected_variables(model, config) -> dict:
        from ldm_jax.autoencoder.vq_config import total
        shape = (1, *geometry.smallest_volume(total(model), 1),
                 int(config.autoencoder.in_channels))
        out = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                                jnp.zeros(shape, jnp.float32)))
        return {"params": out["params"], "codebook": out["codebook"]}

    def _latent_channels(self) -> int:
        return int(self.model.embedding_dim)

    def latent_shape(self) -> tuple:
        from ldm_jax.models.vqvae import vqvae_shapes
        levels, _ = vqvae_shapes(self.model, tuple(self.config.data.volume_size))
        return (*levels[-1], self.latent_channels)

    def encode_fn(self, params, x):
        return self._encode_pure(params, x)

    def decode(self, z):
        """(B, x, y, z, embedding_dim) continuous latents -> (B, X, Y, Z, out_channels),
        quantised to the nearest codebook vectors first."""
        return self._decode({"params": self.params, "codebook": self.codebook}, z)

    def _call_bytes(self, window, op) -> int:
        from ldm_jax.autoencoder.vq_config import vq_call_bytes
        return vq_call_bytes(self.model, window, op)


@dataclasses.dataclass
class MaisiAutoencoder(Autoencoder):
    """A fine-tuned MAISI autoencoder (`autoencoder.kind = "maisi"`, MONAI's
    AutoencoderKlMaisi): the KL interface and geometry unchanged (its factors are the
    section's, 2 per level), only the model class differs."""

    kind = "maisi"

    @staticmethod
    def build_model(ae_cfg):
        from ldm_jax.models.maisi.finetune import build_autoencoder_from_config
        return build_autoencoder_from_config(ae_cfg)


# The stage-1 model switch (`autoencoder.kind`, ldm_jax.autoencoder.config.KINDS) for
# inference: the class that loads and runs a checkpoint of each kind.
AUTOENCODERS = {"kl": Autoencoder, "vqvae": VQAutoencoder, "maisi": MaisiAutoencoder}


# ----------------------------------------------------------------------------------------
# Loading.


def _flat_shapes(variables) -> dict:
    """{key path: shape} of {"params": ..., other collections}; params' paths unprefixed."""
    return {("" if name == "params" else f"[{name!r}]") + jax.tree_util.keystr(k): v.shape
            for name, tree in variables.items()
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_params(expected, params, workdir, step):
    """Clear error when the saved variables (`params`: {"params": ..., ...}) do not fit
    the `expected` shapes of the model the saved config builds."""
    flat_e, flat_s = _flat_shapes(expected), _flat_shapes(params)
    diffs = [f"{k}: saved {flat_s.get(k)} vs model {flat_e.get(k)}"
             for k in sorted(set(flat_e) | set(flat_s)) if flat_e.get(k) != flat_s.get(k)]
    if diffs:
        raise ConfigError(
            f"The autoencoder params at step {step} in {workdir} do not match the model built "
            f"from the config saved with them ({len(diffs)} difference(s), first: "
            f"{'; '.join(diffs[:5])}). The checkpoint was written by an incompatible version.")


def load_autoencoder(workdir, step="best", *, dtype: Optional[str] = None, config=None,
                     window=AUTO, overlap: float = 0.5,
                     windows_per_batch: Optional[int] = None,
                     memory_budget: Optional[float] = None) -> Autoencoder:
    """Rebuilds the autoencoder of `<workdir>/checkpoints` at `step` ('best' | 'latest' | N):
    an `Autoencoder`, or the subclass of the checkpoint's autoencoder.kind (`AUTOENCODERS`;
    a VQ-VAE is a `VQAutoencoder`, which also reads the saved EMA codebook).

    Only the config saved in the checkpoint is used; if `config` (a ConfigDict or a path
    to a configs/*.py) is given it must agree on every model and preprocessing field, or
    a ConfigError lists the fields that differ. `dtype` overrides the compute dtype
    ('float32' is often faster on CPU than the trained 'bfloat16'). `window` is the
    default sliding window in input voxels: 'auto' (the whole volume when one call fits
    `memory_budget` bytes, else the largest window that does; see
    `ldm_jax.autoencoder.memory`), 'training' (the training patch, data.volume_size),
    'whole' (never slide) or (X, Y, Z). `windows_per_batch` None: as many windows per call
    as fit the budget. `memory_budget` None: `memory.default_budget()`.
    """
    workdir = os.path.abspath(os.path.expanduser(str(workdir)))
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        what = "does not exist" if not os.path.exists(workdir) else "has no 'checkpoints' folder"
        raise ckpt.CheckpointNotFoundError(
            f"Workdir {workdir} {what}. Pass the --workdir a training run wrote (python "
            "train.py --workdir ...); it holds checkpoints/<step>/.")
    # A damaged step is skipped for 'latest'/'best' (one line) and refused by number.
    step, saved, params = ckpt.open_step(workdir, step, item="g_params", stage="autoencoder")
    from ldm_jax.autoencoder.config import kind_of
    kind = kind_of(saved)
    if kind not in AUTOENCODERS:
        raise ConfigError(
            f"The checkpoint at step {step} in {workdir} is a {kind!r} autoencoder "
            f"(autoencoder.kind); extract, reconstruct, decode and stage 2 read "
            f"{', '.join(map(repr, AUTOENCODERS))} ones.")
    cls = AUTOENCODERS[kind]
    if config is not None:
        if isinstance(config, (str, os.PathLike)):
            config = config_lib.load_config(config)
        diffs = config_differences(saved, config)
        if diffs:
            raise ConfigError(
                f"--config disagrees with the config saved in the checkpoint (step {step} "
                f"of {workdir}) on {len(diffs)} field(s):\n"
                + "\n".join(f"  - {d}" for d in diffs)
                + "\nThe checkpoint's own config is always used; drop --config, or pass "
                "the config this run was trained with.")
    cfg = ml_collections.ConfigDict(saved)
    ae_cfg = ml_collections.ConfigDict(saved["autoencoder"])
    if dtype is not None:
        ae_cfg.dtype = str(dtype)
    factor = cls.model_factor(cfg)  # validates the factors
    model = cls.build_model(ae_cfg)
    extra = cls.read_extra(workdir, step)
    _check_params(cls.expected_variables(model, cfg), {"params": params, **extra}, workdir,
                  step)
    if isinstance(window, str) and window == "training":
        window = tuple(int(v) for v in cfg.data.volume_size)
    return cls(model=model, params=params, config=cfg, step=int(step), workdir=workdir,
               window=parse_window(window, factor), overlap=float(overlap),
               windows_per_batch=int(windows_per_batch) if windows_per_batch else None,
               memory_budget=None if memory_budget is None else int(memory_budget), **extra)
