"""MAISI's autoencoder at its released size: compile-only per-device peak memory of the
decode, split along X over 1, 2, 4, 8 simulated CPU devices, and its CPU time against
MONAI's class at a small size, in one run.

    nice -n 10 python -m benchmarks.maisi_memory --json benchmarks/maisi_memory.json

Memory: `ldm_jax.diffusion.maisi.spatial_decoder` (what `ldm-jax maisi generate` runs:
the latent (1, X/4, Y/4, Z/4, 4) and the output split along X over a ("data", "spatial")
= (1, n) mesh, params replicated) is lowered from abstract shapes and compiled without
allocating; XLA's memory analysis of the compiled program gives argument + output - alias
+ temp bytes per device (`benchmarks.common.memory_analysis`). Devices are simulated
(`--xla_force_host_platform_device_count`), so the numbers are XLA:CPU's buffer plan, not
a GPU's measured peak. Network: NV-Generate-CTMR's `config_network_rflow.json`
`autoencoder_def` (`ldm_jax.diffusion.maisi.RELEASED_NETWORKS`), `--dtype` compute.

Time: one decode of a `--time-latent` cube (4 channels) by our jitted decode (compile
excluded) and by MONAI's `AutoencoderKlMaisi.decode_stage_2_outputs` with the released
constructor arguments (num_splits 4 on dim 1) and the same weights, float32 (norm_float16
off on both: MONAI's fails on a CPU without autocast),
median of `--repeats`, process CPU seconds and wall seconds, on the same machine in the
same process. Prints one line per measurement and writes them all to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.common import memory_analysis, set_device_count

SIZES = ((256, 256, 128), (512, 512, 512), (512, 512, 768))  # output voxels (X, Y, Z)


def _parse_sizes(text):
    return tuple(tuple(int(v) for v in s.split(",")) for s in text.split())


def decode_memory(ae, params_shapes, size, n, dtype):
    """(per-device peak bytes, XLA raw analysis, compile seconds) of the decode of a
    latent for output `size` split over the first `n` devices."""
    import jax

    from ldm_jax.diffusion.maisi import spatial_decoder

    f = ae.factor
    z = jax.ShapeDtypeStruct((1, *(s // f for s in size), int(ae.latent_channels)),
                             jax.numpy.float32)
    from ldm_jax.models import tap_conv

    fn = spatial_decoder(ae, jax.devices()[:n])
    t0 = time.perf_counter()
    with tap_conv.disabled():  # XLA's convolutions on every device count (a GPU's)
        compiled = fn.lower(params_shapes, z).compile()
    seconds = time.perf_counter() - t0
    peak, raw = memory_analysis(compiled)
    return peak, raw, seconds


def cpu_time(ae, latent, repeats):
    """{ours/monai: {cpu_s, wall_s}, max_abs_diff}: one decode of a latent cube of side
    `latent` by our jitted decode and by MONAI's class with the same random weights."""
    import jax
    import numpy as np
    import torch
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        AutoencoderKlMaisi as MonaiAE,
    )

    from ldm_jax.diffusion.maisi import RELEASED_NETWORKS, _decoder
    from ldm_jax.models.maisi.convert import autoencoder_maisi_to_monai

    # norm_float16 off on both sides: MONAI's half-precision norm output meets float32
    # conv biases on a CPU without autocast ("Input type (c10::Half) and bias type (float)").
    definition = {k: v for k, v in RELEASED_NETWORKS["rflow"]["autoencoder_def"].items()
                  if k != "_target_"}
    definition["norm_float16"] = False
    ae = ae.clone(norm_float16=False)
    x = np.zeros((1, 4 * ae.factor, 4 * ae.factor, 4 * ae.factor, 1), np.float32)
    params = ae.init({"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)},
                     x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape)
                          .astype(np.float32), params)
    monai = MonaiAE(**definition)
    monai.load_state_dict(autoencoder_maisi_to_monai(params, ae), strict=True)
    monai.eval()
    z = rng.standard_normal((1, latent, latent, latent, 4)).astype(np.float32)
    zt = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3)))
    fn = _decoder(ae)
    ours_out = np.asarray(fn(params, z))  # compiles

    def timed(call):
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            out = call()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        return out, {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}

    _, ours = timed(lambda: jax.block_until_ready(fn(params, z)))
    with torch.no_grad():
        ref, theirs = timed(lambda: monai.decode_stage_2_outputs(zt))
    ref = ref.numpy().transpose(0, 2, 3, 4, 1)
    return {"latent": [latent] * 3, "output": [latent * ae.factor] * 3, "ours": ours,
            "monai": theirs, "max_abs_diff": float(np.abs(ref - ours_out).max()),
            "torch_threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=" ".join(",".join(map(str, s)) for s in SIZES),
                   help="output sizes X,Y,Z separated by spaces")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--time-latent", type=int, default=16,
                   help="latent cube side of the CPU-time comparison (0: skip it; MONAI's "
                        "4 convolution splits fail on a side of 8, 16 works)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--fast-codegen", action="store_true",
                   help="compile machine code at -O0 (memory only: do not time with it)")
    args = p.parse_args(argv)
    counts = [int(v) for v in args.devices.split(",")]
    set_device_count(os.environ, max(counts))
    # LLVM at -O0: the machine code is slower, the buffer plan (what is measured) the same.
    if args.fast_codegen and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from ldm_jax.diffusion.maisi import RELEASED_NETWORKS
    from ldm_jax.models.maisi import build_autoencoder_maisi

    ae = build_autoencoder_maisi(dict(RELEASED_NETWORKS["rflow"]["autoencoder_def"],
                                      dtype=args.dtype))
    x = jax.ShapeDtypeStruct((1, 4, 4, 4, 1), jax.numpy.float32)
    params = jax.eval_shape(lambda x: ae.init(
        {"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(0)}, x), x)["params"]
    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    result = {"machine": _machine(), "dtype": args.dtype, "params": n_params,
              "network": "config_network_rflow.json autoencoder_def", "memory": [],
              "command": "python -m benchmarks.maisi_memory " + " ".join(sys.argv[1:])}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    print(f"MAISI autoencoder, {n_params:,} params, {args.dtype}; {result['machine']}",
          flush=True)
    if args.time_latent:
        t = cpu_time(build_autoencoder_maisi(dict(
            RELEASED_NETWORKS["rflow"]["autoencoder_def"], dtype="float32")),
            args.time_latent, args.repeats)
        result["time"] = t
        print(f"decode latent {args.time_latent}^3 -> {t['output'][0]}^3: ours "
              f"{t['ours']['cpu_s']:.2f} CPU-s ({t['ours']['wall_s']:.2f} s wall), MONAI "
              f"{t['monai']['cpu_s']:.2f} CPU-s ({t['monai']['wall_s']:.2f} s wall): ratio "
              f"{t['ours']['cpu_s'] / t['monai']['cpu_s']:.2f} (CPU), max |diff| "
              f"{t['max_abs_diff']:.2e}", flush=True)
        save()
    for size in _parse_sizes(args.sizes):
        for n in counts:
            peak, raw, sec = decode_memory(ae, params, size, n, args.dtype)
            row = {"output": list(size), "devices": n, "peak_bytes": peak, "xla": raw,
                   "compile_s": round(sec, 1)}
            result["memory"].append(row)
            print(f"{'x'.join(map(str, size))} on {n} device(s): {peak / 2**30:.2f} GiB per "
                  f"device (temp {raw.get('temp', 0) / 2**30:.2f} GiB), compiled in {sec:.0f} s",
                  flush=True)
            save()
    return 0


def _machine() -> str:
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, no GPU (simulated CPU devices)"


if __name__ == "__main__":
    sys.exit(main())
