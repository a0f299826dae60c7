"""`ldm-jax <command> [flags]` (the console script) and `python -m ldm_jax <command>`.

Each command is one module of `ldm_jax.cli` with a `main(argv) -> exit status`;
`ldm-jax <command> --help` prints its flags.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# command -> one line (`ldm-jax --help` lists them in this order).
COMMANDS = {
    "train": "train the stage config.stage names (python train.py does the same)",
    "plan": "shapes per level, latent, parameters and memory of a config",
    "preview": "a PNG of what the model will see (mid-slices, projection)",
    "throughput": "the training loader's volumes per second",
    "extract": "volumes -> latents + latents.json for the diffusion stage",
    "reconstruct": "volumes or point clouds -> reconstructions, with PSNR/SSIM (Chamfer)",
    "decode": "latents -> volumes",
    "export": "a MONAI state dict of a trained autoencoder",
    "sample": "new volumes from a trained latent diffusion model",
    "edit": "given volumes: inpaint a region, SDEdit, likelihood (anomaly) maps",
    "maisi": "MAISI's released CT/MR models from their weight files (maisi generate)",
    "evaluate": "sample quality against real volumes (FD, MS-SSIM, intensities)",
    "voxelize": "point clouds (nm) -> NIfTI volumes",
    "to_points": "volumes -> point clouds (CSV, nm)",
}
PROG = "ldm-jax"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs `argv[1]`'s command with the rest of argv; returns its exit status (2 and one
    `error:` line for a missing or unknown command)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    name = argv[1].replace("-", "_")
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        print(f"error: {argv[1]!r} is not an {PROG} command.{hint} Commands: "
              f"{', '.join(COMMANDS)} ({PROG} --help says what each does).", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ldm_jax.cli.{name}")
    return int(module.main([f"{PROG} {name}", *argv[2:]]) or 0)


def console_main() -> None:
    """The `ldm-jax` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
