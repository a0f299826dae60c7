"""MAISI generation from the user's weight files: load, sample latents, decode (`ldm-jax maisi
generate`).

What MAISI's inference scripts do (NVIDIA-Medtech/NV-Generate-CTMR `scripts/diff_model_infer.py`,
`scripts/utils_infer.py::run_controlnet_conditioned_image_dm`, `scripts/utils.py`), and
what follows it here:
- the networks are built from `configs/config_network_{rflow,ddpm}.json`
  (`RELEASED_NETWORKS`, "@" references resolved) and read from the released files
  (`RELEASED_FILES`) with `ldm_jax.models.maisi.convert`;
- the UNet's extra inputs are spacing (mm), top / bottom body-region one-hot 4-vectors
  (head, chest, abdomen, lower body) each times 100 and rounded to float16 (MAISI's
  `.half()`), and the modality as `class_labels` (1 CT; MR codes 8 and up);
- noise (1, X/4, Y/4, Z/4, 4) is denoised with the preset's scheduler
  (`ldm_jax.schedulers.maisi`); with a ControlNet, its residuals (conditioning_scale
  times) are added to the UNet's skips; the mask is 8 bit planes of the integer label
  volume (`binarize_labels`); classifier-free guidance pairs the modality with class 0;
- the latent divided by the file's scale_factor is decoded by the autoencoder, here split
  along X over the local devices (`spatial_decoder`) and in one pass when the memory
  planner (`ldm_jax.autoencoder.memory`) says it fits, else in gaussian-blended windows
  (`ldm_jax.autoencoder.sliding`), instead of MAISI's fixed 80^3 / 96^3 latent windows
  and a config file per GPU size;
- intensities: CT (modality <= 7) clip to [0, 1] then x2000 - 1000 (HU in [-1000, 1000]);
  MR clip below 0 then x1000; with a mask, voxels labelled 0 are set to that minimum.
Not reproduced: MAISI's mask-generation stage, its mask database search and quality check,
and the tumour-free unconditional mask of guided ControlNet sampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.autoencoder import memory
from ldm_jax.autoencoder.sliding import sliding_apply
from ldm_jax.errors import ConfigError, ConversionError
from ldm_jax.models.maisi import (
    build_autoencoder_maisi,
    build_controlnet_maisi,
    build_unet_maisi,
)
from ldm_jax.models.maisi.convert import (
    autoencoder_maisi_from_monai,
    load_maisi_controlnet,
    load_maisi_unet,
)
from ldm_jax.schedulers import RFlowScheduler
from ldm_jax.schedulers.loop import sample_loop
from ldm_jax.schedulers.maisi import MAISI_SAMPLING, maisi_noise_scheduler

__all__ = ["REGIONS", "RELEASED_FILES", "RELEASED_NETWORKS", "MaisiModels",
           "binarize_labels", "decode", "load_models", "network_definitions",
           "parse_region", "to_intensity", "unet_inputs"]

_AE = {"_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
       "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4,
       "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32,
       "norm_eps": 1e-06, "attention_levels": [False, False, False],
       "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
       "use_checkpointing": False, "use_convtranspose": False, "norm_float16": True,
       "num_splits": 4, "dim_split": 1}
_ENC = {"spatial_dims": 3, "in_channels": 4, "num_channels": [64, 128, 256, 512],
        "attention_levels": [False, False, True, True], "num_head_channels": [0, 0, 32, 32],
        "num_res_blocks": 2, "use_flash_attention": True}
_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
_CN = "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi"
_CN_EMB = {"conditioning_embedding_in_channels": 8,
           "conditioning_embedding_num_channels": [8, 32, 64]}

# NV-Generate-CTMR configs/config_network_rflow.json and config_network_ddpm.json (the
# image networks; "@" references substituted). MAISI's ddpm autoencoder splits its convs
# 8 ways instead of 4: a memory tactic, the same function.
RELEASED_NETWORKS = {
    "rflow": {
        "autoencoder_def": _AE,
        "diffusion_unet_def": {"_target_": _UNET, **_ENC, "out_channels": 4,
                               "include_top_region_index_input": False,
                               "include_bottom_region_index_input": False,
                               "include_spacing_input": True, "num_class_embeds": 128,
                               "resblock_updown": True, "include_fc": True},
        "controlnet_def": {"_target_": _CN, **_ENC, **_CN_EMB, "num_class_embeds": 128,
                           "resblock_updown": True, "include_fc": True},
    },
    "ddpm": {
        "autoencoder_def": dict(_AE, num_splits=8),
        "diffusion_unet_def": {"_target_": _UNET, **_ENC, "out_channels": 4,
                               "include_top_region_index_input": True,
                               "include_bottom_region_index_input": True,
                               "include_spacing_input": True, "include_fc": False,
                               "resblock_updown": False},
        "controlnet_def": {"_target_": _CN, **_ENC, **_CN_EMB, "include_fc": False,
                           "resblock_updown": False},
    },
}

# The weight files MAISI's scripts/download_model_data.py fetches (Hugging Face
# nvidia/NV-Generate-CT, nvidia/NV-Generate-MR, nvidia/NV-Generate-MR-Brain), per preset.
RELEASED_FILES = {
    "rflow-ct": {"autoencoder": "autoencoder_v1.pt", "diffusion_unet": "diff_unet_3d_rflow-ct.pt",
                 "controlnet": "controlnet_3d_rflow-ct.pt"},
    "ddpm-ct": {"autoencoder": "autoencoder_v1.pt", "diffusion_unet": "diff_unet_3d_ddpm-ct.pt",
                "controlnet": "controlnet_3d_ddpm-ct.pt"},
    "rflow-mr": {"autoencoder": "autoencoder_v2.pt", "diffusion_unet": "diff_unet_3d_rflow-mr.pt"},
    "rflow-mr-brain": {"autoencoder": "autoencoder_v1.pt",
                       "diffusion_unet": "diff_unet_3d_rflow-mr-brain_v1.pt"},
}

# MAISI's body-region one-hot order (top_region_index / bottom_region_index).
REGIONS = ("head", "chest", "abdomen", "lower")
_REGION_ALIASES = {"neck": "head", "thorax": "chest", "pelvis": "lower", "legs": "lower"}

_FLAGS = {"autoencoder_def": "--autoencoder", "diffusion_unet_def": "--diffusion_unet",
          "controlnet_def": "--controlnet"}


def network_definitions(network: str) -> dict:
    """The three definitions of "rflow", "ddpm" (MAISI's released networks) or a path to a
    MAISI network JSON (`config_network_*.json`; "@name" references are resolved from its
    top-level keys). Raises ConfigError for an unknown name or an unreadable file."""
    if network in RELEASED_NETWORKS:
        return json.loads(json.dumps(RELEASED_NETWORKS[network]))
    if not os.path.isfile(network):
        raise ConfigError(f"--network={network!r} is neither 'rflow', 'ddpm' (MAISI's released "
                          "networks) nor a network JSON file (configs/config_network_*.json); "
                          "pass one of those.")
    try:
        with open(network) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--network={network}: not a readable JSON file ({e}); pass MAISI's "
                          "configs/config_network_rflow.json or one like it.") from None

    def resolve(v):
        if isinstance(v, str) and v.startswith("@") and v[1:] in raw:
            return raw[v[1:]]
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        if isinstance(v, list):
            return [resolve(x) for x in v]
        return v

    missing = [k for k in ("autoencoder_def", "diffusion_unet_def") if k not in raw]
    if missing:
        raise ConfigError(f"--network={network} has no {', '.join(missing)}; a MAISI network "
                          "JSON (configs/config_network_rflow.json) defines autoencoder_def, "
                          "diffusion_unet_def and controlnet_def.")
    return {k: resolve(raw[k]) for k in ("autoencoder_def", "diffusion_unet_def",
                                         "controlnet_def") if k in raw}


def parse_region(value, flag: str) -> Optional[tuple[float, ...]]:
    """A body-region flag -> MAISI's one-hot 4-vector: a name (head, chest, abdomen, lower;
    neck / thorax / pelvis accepted) or four comma-separated numbers. None stays None.
    Raises ConfigError naming `flag`."""
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    v = _REGION_ALIASES.get(v, v)
    if v in REGIONS:
        return tuple(float(i == REGIONS.index(v)) for i in range(4))
    try:
        out = tuple(float(x) for x in v.split(","))
    except ValueError:
        out = ()
    if len(out) != 4 or not all(math.isfinite(x) for x in out):
        raise ConfigError(f"{flag}={value!r} must be a body region ({', '.join(REGIONS)}) or "
                          "MAISI's one-hot 4-vector like 0,1,0,0 (head, chest, abdomen, lower).")
    return out


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class MaisiModels:
    """The three networks with their params, as loaded by `load_models`."""

    autoencoder: Any
    autoencoder_params: Any
    unet: Any
    unet_params: Any
    scale_factor: float
    controlnet: Any = None
    controlnet_params: Any = None
    files: dict = dataclasses.field(default_factory=dict)  # flag -> absolute path

    @property
    def factor(self) -> int:
        """Output voxels per latent voxel, per axis."""
        return int(self.autoencoder.factor)

    @property
    def unet_multiple(self) -> int:
        """The UNet needs latent sizes divisible by this (2^(levels - 1))."""
        return 2 ** (len(tuple(self.unet.num_channels)) - 1)


def _reason(problem: str) -> str:
    """The converter's message (`ldm_jax.models.state_dict`, `unet_convert`) cut to its first
    clause, the first missing key and what the file's keys look like."""
    text = " ".join(problem.split())
    out = re.split(r"; | \(check ", text)[0].replace(" built with these fields", "")
    missing = re.search(r"\d+ missing, first: ('[^']+')", text)
    if missing:
        out += f"; missing e.g. {missing.group(1)}"
    names = text.split("first names:", 1)[-1] if "first names:" in text else ""
    looks = ("a ControlNet's" if "'controlnet_down_blocks'" in names else
             "a diffusion UNet's" if "'time_embed'" in names else
             "an autoencoder's" if "'decoder'" in names and "'encoder'" in names else None)
    if looks:
        out += f" (its keys are {looks})"
    return out if len(out) <= 300 else out[:297] + "..."


def _refuse(flag: str, path: str, what: str, network: str, problem: str, expected: str):
    return ConfigError(
        f"{flag} {path}: {_reason(problem)}. Expected {what} of the "
        f"{os.path.basename(network)!r} networks{expected}: pass the matching file, or the "
        "--network its weights were made for (rflow, ddpm or a network JSON).")


def load_models(autoencoder: str, diffusion_unet: str, controlnet: Optional[str] = None, *,
                network: str = "rflow", dtype: str = "float32") -> MaisiModels:
    """Builds MAISI's networks from `network` (see `network_definitions`) and reads the
    user's weight files into them: the autoencoder (a bare state dict or `{"unet_state_dict":
    ...}`), the diffusion UNet (`{"unet_state_dict", "scale_factor", ...}`) and optionally
    the ControlNet (`{"controlnet_state_dict", ...}`), as MAISI releases them; MONAI state
    dicts in those layouts are the same thing.

    Raises ConfigError with one line naming the flag, the file, what is wrong and what is
    expected: a missing file, a file of another layout or another network.
    """
    defs = network_definitions(network)
    if controlnet is not None and "controlnet_def" not in defs:
        raise ConfigError(f"--network={network} defines no controlnet_def, but --controlnet "
                          "was given; add MAISI's controlnet_def to the network JSON.")
    try:
        ae = build_autoencoder_maisi(dict(defs["autoencoder_def"], dtype=dtype))
        unet = build_unet_maisi(dict(defs["diffusion_unet_def"], dtype=dtype))
        cn = None if controlnet is None else build_controlnet_maisi(
            dict(defs["controlnet_def"], dtype=dtype))
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"--network={network}: {str(e).splitlines()[0]}") from None
    # the released file the user most likely means, for the messages below
    example = RELEASED_FILES["ddpm-ct" if network == "ddpm" else "rflow-ct"]
    paths = {"--autoencoder": autoencoder, "--diffusion_unet": diffusion_unet}
    if controlnet is not None:
        paths["--controlnet"] = controlnet
    for flag, path in paths.items():
        if not os.path.isfile(os.path.expanduser(path)):
            name = example[flag.lstrip("-")]
            raise ConfigError(f"{flag} {path}: no such file. Expected MAISI's weight file "
                              f"(e.g. {name}); copy it there or pass its path "
                              "(docs/maisi.md lists the files).")
    paths = {k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items()}
    try:
        ae_params = autoencoder_maisi_from_monai(paths["--autoencoder"], ae)
    except ConversionError as e:
        raise _refuse("--autoencoder", autoencoder, "AutoencoderKlMaisi weights (a state dict or "
                      "{'unet_state_dict': ...})", network, str(e),
                      f" (e.g. {example['autoencoder']})") from None
    try:
        unet_params, scale_factor = load_maisi_unet(paths["--diffusion_unet"], unet)
    except ConversionError as e:
        raise _refuse("--diffusion_unet", diffusion_unet, "a MAISI diffusion UNet file "
                      "({'unet_state_dict': ..., 'scale_factor': ...})", network, str(e),
                      f" (e.g. {example['diffusion_unet']})") from None
    cn_params = None
    if controlnet is not None:
        try:
            cn_params = load_maisi_controlnet(paths["--controlnet"], cn)
        except ConversionError as e:
            raise _refuse("--controlnet", controlnet, "a MAISI ControlNet file "
                          "({'controlnet_state_dict': ...})", network, str(e),
                          f" (e.g. {example['controlnet']})") from None
    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ConfigError(f"--diffusion_unet {diffusion_unet}: scale_factor {scale_factor} is "
                          "not a positive number; the file is damaged or not MAISI's.")
    return MaisiModels(ae, ae_params, unet, unet_params, float(scale_factor), cn, cn_params,
                       files=paths)


def binarize_labels(labels: np.ndarray, bits: int = 8) -> np.ndarray:
    """MAISI's `binarize_labels`: integer labels (X, Y, Z) -> (X, Y, Z, bits) float32, channel
    k = bit k of the label (the ControlNet's conditioning_embedding_in_channels = 8)."""
    lab = np.asarray(labels).astype(np.int64)
    return ((lab[..., None] >> np.arange(bits)) & 1).astype(np.float32)


def unet_inputs(unet, spacing: Sequence[float], modality: Optional[int],
                top: Optional[Sequence[float]], bottom: Optional[Sequence[float]]) -> dict:
    """The UNet's extra inputs for one sample as MAISI passes them: spacing and region
    vectors times 100 rounded to float16 (then float32), the modality as class_labels (B=1).
    Only the inputs the UNet was built with. Raises ConfigError for a missing one."""
    def half(v):
        return jnp.asarray(np.asarray(np.asarray(v, np.float64) * 1e2, np.float16)[None],
                           jnp.float32)

    out = {}
    if unet.include_spacing_input:
        out["spacing_tensor"] = half(spacing)
    for field, arg, value, flag in (
            ("include_top_region_index_input", "top_region_index_tensor", top,
             "--top_region_index"),
            ("include_bottom_region_index_input", "bottom_region_index_tensor", bottom,
             "--bottom_region_index")):
        if getattr(unet, field):
            if value is None:
                raise ConfigError(f"{flag} is required: this diffusion UNet is conditioned on "
                                  "the body region; pass e.g. --top_region_index=chest "
                                  "--bottom_region_index=abdomen.")
            out[arg] = half(value)
    if unet.num_class_embeds is not None:
        m = 1 if modality is None else int(modality)
        if not 0 <= m < int(unet.num_class_embeds):
            raise ConfigError(f"--modality={m} must be in [0, {unet.num_class_embeds}) (MAISI's "
                              "class codes: 1 CT, 8 and up MR).")
        out["class_labels"] = jnp.asarray([m], jnp.int32)
    return out


def scheduler_for(preset: str, latent: Sequence[int], steps: Optional[int] = None):
    """(scheduler, state) of MAISI's `preset` (a key of MAISI_SAMPLING) set for a latent of
    spatial `latent` (X, Y, Z) with `steps` (None: the preset's). Raises ConfigError."""
    if preset not in MAISI_SAMPLING:
        raise ConfigError(f"--preset={preset!r} is not one of MAISI's settings "
                          f"({', '.join(MAISI_SAMPLING)}).")
    p = MAISI_SAMPLING[preset]
    n = p.num_inference_steps if steps is None else int(steps)
    if not 1 <= n <= 1000:
        raise ConfigError(f"--num_inference_steps={n} must be in [1, 1000].")
    sched = maisi_noise_scheduler(p.scheduler)
    state = sched.create_state()
    if isinstance(sched, RFlowScheduler):
        return sched, sched.set_timesteps(state, n, input_img_size_numel=math.prod(latent))
    return sched, sched.set_timesteps(state, n)


def sample_latent(models: MaisiModels, key, latent: Sequence[int], sched, state, inputs: dict,
                  condition=None, conditioning_scale: float = 1.0,
                  guidance_scale: float = 0.0) -> np.ndarray:
    """One latent (X, Y, Z, C) float32 from noise N(0, 1) drawn with `key`, denoised with
    (sched, state) by the UNet (and the ControlNet on `condition` (1, 4X, 4Y, 4Z, 8) when
    given), as MAISI's loops; `guidance_scale` > 0: classifier-free guidance against
    class 0 (MAISI's cfg_guidance_scale)."""
    c = int(models.unet.in_channels)
    noise = jax.random.normal(jax.random.fold_in(key, 0), (1, *latent, c), jnp.float32)
    step_key = jax.random.fold_in(key, 1)
    fn = _loop(models.unet, models.controlnet, sched, float(guidance_scale),
               "class_labels" in inputs)
    out = fn(models.unet_params, models.controlnet_params, state, noise, step_key, inputs,
             None if condition is None else jnp.asarray(condition, jnp.float32),
             jnp.float32(conditioning_scale))
    return np.asarray(jax.device_get(out[0]), np.float32)


_LOOPS: dict = {}


def _loop(unet, controlnet, sched, guidance: float, has_class: bool):
    """The jitted denoising loop for these modules (one compilation per shape)."""
    k = (unet, controlnet, sched, guidance, has_class)
    if k in _LOOPS:
        return _LOOPS[k]

    def run(up, cp, state, noise, key, inputs, cond, scale):
        def model_fn(x, t):
            b = x.shape[0]
            kw = dict(inputs)
            cn_kw = {}
            if guidance > 0:  # conditional and class-0 halves, MAISI's order
                x2 = jnp.concatenate([x, x])
                kw = {k: (jnp.concatenate([v, jnp.zeros_like(v)]) if k == "class_labels"
                          else jnp.concatenate([v, v])) for k, v in kw.items()}
                x_in, n = x2, 2 * b
            else:
                x_in, n = x, b
            ts = jnp.full((n,), t, jnp.float32)
            if controlnet is not None:
                c_in = cond if guidance <= 0 else jnp.concatenate([cond, cond])
                if has_class:
                    cn_kw["class_labels"] = kw["class_labels"]
                down, mid = controlnet.apply({"params": cp}, x_in, ts, controlnet_cond=c_in,
                                             conditioning_scale=scale, **cn_kw)
                kw["down_block_additional_residuals"] = down
                kw["mid_block_additional_residual"] = mid
            out = unet.apply({"params": up}, x_in, ts, **kw)
            if guidance > 0:
                cond_out, uncond = out[:b], out[b:]
                out = uncond + guidance * (cond_out - uncond)
            return out

        return sample_loop(sched, state, model_fn, noise, key)

    _LOOPS[k] = jax.jit(run)
    return _LOOPS[k]


def _ae_config(ae):
    """The fields `ldm_jax.autoencoder.memory` reads, for a MAISI autoencoder module."""
    import ml_collections

    return ml_collections.ConfigDict({
        "in_channels": ae.in_channels, "out_channels": ae.out_channels,
        "latent_channels": ae.latent_channels, "num_channels": tuple(ae.num_channels),
        "attention_levels": tuple(ae.attention_levels),
        "with_encoder_nonlocal_attn": ae.with_encoder_nonlocal_attn,
        "with_decoder_nonlocal_attn": ae.with_decoder_nonlocal_attn})


_DECODERS: dict = {}


def _decoder(ae):
    if ae not in _DECODERS:
        _DECODERS[ae] = jax.jit(lambda p, z: ae.apply({"params": p}, z, method="decode"))
    return _DECODERS[ae]


def spatial_devices(latent_x: int, devices=None) -> list:
    """The devices a decode splits its X axis over: the most of `devices` (default
    `jax.local_devices()`) whose count divides the latent's X size `latent_x` (1 device:
    no split)."""
    devices = list(jax.local_devices() if devices is None else devices)
    n = max(k for k in range(1, len(devices) + 1) if int(latent_x) % k == 0)
    return devices[:n]


def spatial_decoder(ae, devices):
    """`jit(fn)(params, z) -> volume` of the autoencoder `ae`'s decode with the latent z
    (B, x, y, z, C) and the output split along X over `devices` (mesh ("data", "spatial") =
    (1, len(devices)); params replicated; x divisible by the device count). XLA's SPMD
    partitioner adds the convolutions' halo exchanges and the GroupNorm all-reduces; the
    upsample is slices and concatenations (`trilinear_upsample2`), so nothing is gathered
    whole. The function equals the one-device decode (tests/cli/test_maisi_sharded_decode.py);
    `fn.lower(...).compile().memory_analysis()` gives the per-device memory
    (benchmarks/maisi_memory.py). One device: `_decoder`'s plain jit."""
    import ml_collections

    from ldm_jax import sharding
    from ldm_jax.models import tap_conv

    devices = list(devices)
    if len(devices) == 1:
        return _decoder(ae)
    key = (ae, tuple(d.id for d in devices))
    if key not in _DECODERS:
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "spatial": len(devices)}),
                                  devices)
        split, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

        def fn(p, z):  # XLA's convolutions: the CPU tap convs would gather X whole
            with tap_conv.for_mesh(mesh):
                return ae.apply({"params": p}, z, method="decode")

        _DECODERS[key] = jax.jit(fn, in_shardings=(repl, split), out_shardings=split)
    return _DECODERS[key]


def decode(models: MaisiModels, latent: np.ndarray, *, window="auto", overlap: float = 0.4,
           memory_budget: Optional[int] = None, devices=None) -> tuple[np.ndarray, str]:
    """The autoencoder's volume (X, Y, Z, out_channels) float32 of `latent` (x, y, z, C) / the
    scale factor (MAISI's ReconModel), and a phrase saying how it was decoded.

    devices: the local devices (default all) over which the latent's X axis is split
    (`spatial_decoder`; the most whose count divides x). window: "auto" (one pass when
    `memory.call_bytes` fits `memory_budget` per device, default
    `memory.default_budget()`, times the devices, else the largest window that fits,
    several per call), "whole", or (X, Y, Z) output voxels (multiples of the factor).
    Windows overlap by `overlap` and are blended with gaussian weights (`sliding_apply`);
    each window is split over the devices too when its x divides."""
    z = np.asarray(latent, np.float32) / np.float32(models.scale_factor)
    f = models.factor
    full = tuple(s * f for s in z.shape[:3])
    devices = spatial_devices(z.shape[0], devices)
    n = len(devices)

    def dec(batch):  # a window (or the volume) split along X when it divides
        d = devices if batch.shape[1] % n == 0 else devices[:1]
        return spatial_decoder(models.autoencoder, d)(models.autoencoder_params,
                                                      jnp.asarray(batch))

    batch, estimate = 1, None
    if isinstance(window, str) and window == "auto":
        budget = memory.default_budget() if memory_budget is None else int(memory_budget)
        # n devices hold 1/n of the whole volume's activations each
        window, batch, estimate = memory.choose_window(_ae_config(models.autoencoder), full,
                                                       "decode", budget * n, (f, f, f))
    elif isinstance(window, str) and window == "whole":
        window = None
    if window is not None:
        window = tuple(min(int(w), s) for w, s in zip(window, full))
        if window == full:
            window = None
    if window is None:
        out = np.asarray(jax.device_get(dec(z[None])[0]), np.float32)
        how = "whole volume in one pass" + (f", X split over {n} devices" if n > 1 else "")
    else:
        (out,) = sliding_apply(dec, z, tuple(w // f for w in window), overlap=overlap,
                               batch_size=batch, scale=[(f, 1)] * 3)
        how = f"windows of {window} output voxels, overlap {overlap:g}, {batch} per call"
    if estimate is not None:
        b = estimate * batch
        how += (f" (about {b / 2**30:.2f} GiB per call)" if b >= 2**30 else
                f" (about {b / 2**20:.0f} MiB per call)")
    return out, how


def to_intensity(volume: np.ndarray, modality: Optional[int], mask=None) -> np.ndarray:
    """MAISI's output intensities: CT (modality None or <= 7) clip [0, 1] -> HU x2000 - 1000;
    MR clip below 0 -> x1000. Voxels where `mask` (X, Y, Z) is 0 are set to the minimum
    (-1000 or 0), as MAISI's crop_img_body_mask."""
    v = np.asarray(volume, np.float32)
    ct = modality is None or int(modality) <= 7
    if ct:
        out, low = np.clip(v, 0.0, 1.0) * 2000.0 - 1000.0, -1000.0
    else:
        out, low = np.clip(v, 0.0, None) * 1000.0, 0.0
    if mask is not None:
        m = np.asarray(mask)
        out = np.where((m == 0).reshape(m.shape[:3] + (1,) * (out.ndim - 3)), low, out)
    return out.astype(np.float32)
