"""Which point-spread carries depth? (benchmarks/CONDITIONING.md, "Choosing the cue").

For each point-spread setting, trains the supervised regressor of
`benchmarks.condition_regression` (about E[volume | image]) on the config's training
volumes and scores it, back-projection (scale fitted for Dice on training volumes) and
the truth on the first held-out volumes: foreground Dice and depth error (voxels) with
`ldm_jax.metrics.conditioning`. A cue worth training a generative model on is one where
the regressor's depth error falls well below back-projection's.

    python -m benchmarks.cue_probe --steps 600 \\
        --cue "middle=" \\
        --cue "below=focal_plane=-10,astigmatism=3,depth_of_focus=3,psf_sigma=0.7"

Each --cue is NAME=FIELD=VALUE,... overriding `conditioning.projection` of --config
(configs/diffusion/projection.py); an empty list keeps the config's own. Prints one JSON
line per cue (and writes them to --output when given).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def parse_cue(spec: str) -> tuple[str, dict]:
    """'NAME=f=v,g=w' -> (NAME, {f: v, g: w}); numbers become floats. Raises SystemExit."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"--cue {spec!r}: expected NAME=FIELD=VALUE,... (or NAME= for the "
                         "config's own point-spread)")
    fields = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise SystemExit(f"--cue {spec!r}: {item!r} is not FIELD=VALUE")
        try:
            fields[k] = float(v)
        except ValueError:
            fields[k] = v
    return name, fields


def probe(config, fields: dict, steps: int, num: int = 8, fit_volumes: int = 32,
          seed: int = 0, threshold: float = 0.1) -> dict:
    """{row: {dice, depth_vox, covered}} for "back-projection", "regression" and "truth"
    under `config` with `fields` set in conditioning.projection (mean over `num` held-out
    volumes; depth error over the true columns the prediction covers)."""
    from benchmarks import conditioning as bench
    from benchmarks.condition_regression import train_regressor
    from ldm_jax.metrics import conditioning as cm

    config.conditioning.projection.update(fields)
    cond = config.conditioning
    vols, _ = bench.held_out_volumes(config, num)
    conds = bench._conditions(vols, cond, None)
    train = bench.training_volumes(config, fit_volumes, seed + 2)
    scale = cm.fit_back_projection_scale(bench._conditions(train, cond, None), train, 2,
                                         objective="dice", threshold=threshold)
    preds = {"back-projection": cm.back_projection(conds, 2, vols.shape[3], scale)}
    if steps > 0:
        predict = train_regressor(config, cond, steps, seed=seed, log=lambda *a: None)
        preds["regression"] = predict(conds)
    preds["truth"] = vols
    return {name: {"dice": float(np.mean(cm.dice(p, vols, threshold))),
                   "depth_vox": float(np.nanmean(cm.depth_error(p, vols, 2, threshold))),
                   "covered": float(np.mean(cm.depth_coverage(p, vols, 2, threshold)))}
            for name, p in preds.items()}


def main(argv=None):
    from ldm_jax.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/diffusion/projection.py")
    p.add_argument("--cue", action="append", required=True, help="NAME=FIELD=VALUE,...")
    p.add_argument("--steps", type=int, default=600, help="regressor steps (0: none)")
    p.add_argument("--num", type=int, default=8, help="held-out volumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="also write the JSON lines here")
    a = p.parse_args(argv)
    lines = []
    for spec in a.cue:
        name, fields = parse_cue(spec)
        t = time.time()
        res = probe(load_config(a.config), fields, a.steps, a.num, seed=a.seed)
        line = json.dumps({"cue": name, "fields": fields, "steps": a.steps,
                           "seconds": round(time.time() - t), **res})
        print(line, flush=True)
        lines.append(line)
    if a.output:
        with open(a.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
