r"""Write a trained autoencoder (and its discriminator) as MONAI state dicts.

  ldm-jax export --workdir runs/x --output model.pt [--step best|latest|N] \
      [--discriminator disc.pt] [--overwrite]

model.pt is `torch.save` of a state dict that `monai.networks.nets.AutoencoderKL` loads with
`load_state_dict(strict=True)`; model.json beside it holds the constructor arguments:

  kw = json.load(open("model.json"))["kwargs"]
  net = monai.networks.nets.AutoencoderKL(**kw)
  net.load_state_dict(torch.load("model.pt", weights_only=True))

plus the checkpoint it came from and the preprocessing the model expects (intensity window,
spacing). MONAI takes NCDHW tensors; ldm-jax's (B, X, Y, Z, C) axes X, Y, Z are MONAI's
D, H, W. Only MONAI-compatible models export (stem 1, level factors 2, conv downsampling);
PyTorch is needed for this command only.
"""

from __future__ import annotations

import os
import sys

from ldm_jax.errors import ConfigError

MONAI_AE = "monai.networks.nets.AutoencoderKL"
MONAI_DISC = "monai.networks.nets.PatchDiscriminator"


def _need_torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("ldm-jax export writes PyTorch files and needs torch: "
                          "pip install torch (nothing else in ldm-jax needs it)") from None
    return torch


def json_path(output: str) -> str:
    """model.pt -> model.json (the constructor-arguments file beside a state dict)."""
    return os.path.splitext(output)[0] + ".json"


def _targets(outputs, overwrite):
    paths = []
    for out in outputs:
        out = os.path.abspath(os.path.expanduser(out))
        if out.endswith(".json"):
            raise ConfigError(f"--output/--discriminator {out} ends in .json, the name of the "
                              "arguments file written beside it; use a .pt name")
        paths += [out, json_path(out)]
    if len(set(paths)) != len(paths):
        raise ConfigError("--output and --discriminator must name different files (with "
                          "different stems: each gets a .json beside it)")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} exists; pass --overwrite to replace it, or choose "
                          "another --output")
    return paths


def _save(torch, path, state_dict, meta):
    from ldm_jax import outputs as vf
    from ldm_jax.cli.extract import dumps

    os.makedirs(os.path.dirname(path), exist_ok=True)
    vf.atomic_write(path, lambda tmp: torch.save(state_dict, tmp))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(dumps(meta) + "\n")
    vf.atomic_write(json_path(path), write)


def export(workdir, output, *, step="best", discriminator=None, config=None,
           overwrite=False, log=print) -> dict:
    """Writes `output` (+ .json) and optionally `discriminator` (+ .json); returns
    {"autoencoder": path, "discriminator": path or None, "step": int}.

    Raises ConfigError (torch missing, a model MONAI cannot express, outputs that exist
    without `overwrite`) and the checkpoint errors of `load_autoencoder`.
    """
    torch = _need_torch()
    from ldm_jax import checkpoint as ckpt
    from ldm_jax.autoencoder.inference import PREPROCESS_FIELDS, load_autoencoder
    from ldm_jax.models.convert import (
        discriminator_to_monai,
        monai_autoencoder_kwargs,
        monai_discriminator_kwargs,
        monai_incompatibilities,
        to_monai,
    )

    paths = _targets([output] + ([discriminator] if discriminator else []), overwrite)
    ae = load_autoencoder(workdir, step, config=config, window="whole")
    ae_cfg = ae.config.autoencoder
    problems = monai_incompatibilities(ae_cfg)
    if problems:
        raise ConfigError(
            f"the autoencoder at step {ae.step} of {ae.workdir} is not MONAI-compatible, so "
            f"MONAI's AutoencoderKL cannot hold it: {'; '.join(problems)}. Only models "
            "trained with MONAI's layout export (e.g. configs/monai_3d_ldm.py)")
    source = {"workdir": ae.workdir, "step": ae.step, "config_hash": ae.config_hash}
    meta = {
        "class": MONAI_AE, "kwargs": monai_autoencoder_kwargs(ae_cfg),
        "state_dict": os.path.basename(paths[0]), "source": source,
        "input_layout": "NCDHW; MONAI's D, H, W are ldm-jax's X, Y, Z (the file's axis order)",
        "preprocessing": {k: ae.config.data.get(k) for k in PREPROCESS_FIELDS},
    }
    _save(torch, paths[0], to_monai(ae.params, ae_cfg), meta)
    log(f"Wrote {paths[0]} and {paths[1]} (MONAI AutoencoderKL, step {ae.step} of "
        f"{ae.workdir}).")
    result = {"autoencoder": paths[0], "discriminator": None, "step": ae.step}
    if discriminator:
        d_cfg = ae.config.discriminator
        manager = ckpt.make_manager(ae.workdir, read_only=True,  # damaged steps unlisted
                                    skip_steps=ckpt.find_damaged(ae.workdir))
        try:
            variables = {"params": ckpt.restore_state_item(manager, ae.step, "d_params")}
            if d_cfg.get("norm", "batch") == "batch":
                variables["batch_stats"] = ckpt.restore_state_item(manager, ae.step, "d_stats")
        finally:
            manager.close()
        meta = {"class": MONAI_DISC, "kwargs": monai_discriminator_kwargs(d_cfg),
                "state_dict": os.path.basename(paths[2]), "source": source,
                "input_layout": meta["input_layout"]}
        _save(torch, paths[2], discriminator_to_monai(variables, d_cfg), meta)
        log(f"Wrote {paths[2]} and {paths[3]} (MONAI PatchDiscriminator).")
        result["discriminator"] = paths[2]
    return result


def _define(fv):
    from absl import flags

    from ldm_jax import cli
    cli.define_checkpoint_flags(fv)
    cli.define_output_flag(fv, "The autoencoder's state dict (.pt); its constructor "
                        "arguments go to the .json beside it.")
    flags.DEFINE_string("discriminator", None, "Also write the discriminator's state dict "
                        "(.pt, with its .json).", flag_values=fv)
    cli.define_overwrite_flag(fv, "Replace files that exist.")


def _body(fv):
    export(fv.workdir, fv.output, step=fv.step, discriminator=fv.discriminator,
           config=fv.config, overwrite=fv.overwrite)


def main(argv=None) -> int:
    from ldm_jax import cli
    return cli.run("ldm-jax export", __doc__, _define, _body, argv,
                   required=("workdir", "output"))


if __name__ == "__main__":
    sys.exit(main())
