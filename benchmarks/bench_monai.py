"""MONAI (PyTorch) side of `python -m benchmarks.bench --vs-monai`: the same stage-1 step, timed.

Why a separate module and process: the comparison must run both frameworks on the same
machine without either allocator seeing the other's memory (JAX preallocates most of a GPU;
peak counters cannot be reset across frameworks). `python -m benchmarks.bench_monai --spec
FILE.json` imports torch and MONAI only, never JAX, and prints one JSON line.

The step mirrors `ldm_jax.autoencoder.task.AutoencoderTask.train_step` as MONAI's 3D LDM tutorial writes it:
AutoencoderKL forward (sampled latent) -> reconstruction loss + kl_weight * KL +
adv_weight * least-squares generator loss on PatchDiscriminator(recon) -> backward ->
Adam (with the same global-norm clipping); then the discriminator on detached fake and
real -> backward -> Adam. Mixed precision is `torch.autocast(bfloat16)` when the config
computes in bfloat16.

Memory: on CUDA `torch.cuda.max_memory_allocated()` (fresh process: models, optimiser
states, gradients and activations). On CPU `benchmarks.common.HostPeak`: resident-set
high-water mark during the timed steps minus the resident set before the models were built
(Linux /proc; glibc's free lists are trimmed first) -- the same method the JAX side uses on
CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.common import HOST_METHOD, HostPeak, limit_threads
from ldm_jax.autoencoder.geometry import initial_factor, level_factors

# Fields of config.loss the MONAI step implements; anything else makes the comparison unfair.
SUPPORTED_RECON = ("l1", "mse", "weighted")


class MonaiUnsupported(ValueError):
    """The config uses something MONAI's AutoencoderKL cannot express; message says what."""


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def unsupported_reasons(config) -> list[str]:
    """Why MONAI cannot build the same model and step as this config ([] when it can)."""
    ae, loss = _get(config, "autoencoder"), _get(config, "loss")
    reasons = []
    if initial_factor(ae) != (1, 1, 1):
        reasons.append(f"initial_downsample_factor={_get(ae, 'initial_downsample_factor')!r} "
                       "(MONAI's first conv is not strided; only 1 is comparable)")
    bad = [f for f in level_factors(ae) if f != (2, 2, 2)]
    if bad:
        reasons.append(f"downsample_factors={tuple(_get(ae, 'downsample_factors'))!r} (MONAI "
                       "downsamples by 2 between levels; only 2 everywhere is comparable)")
    if not _get(ae, "use_conv_downsample", True):
        reasons.append("use_conv_downsample=False (MONAI always downsamples with a conv)")
    kernel = _get(ae, "strided_kernel")
    if kernel is not None and int(kernel) != 3:
        reasons.append(f"strided_kernel={kernel} (MONAI's downsample conv has kernel 3)")
    recon = _get(loss, "recon", "l1")
    if recon not in SUPPORTED_RECON:
        reasons.append(f"loss.recon={recon!r} (the MONAI side implements "
                       f"{', '.join(SUPPORTED_RECON)})")
    if float(_get(loss, "perceptual_weight", 0.0) or 0.0) > 0:
        reasons.append("loss.perceptual_weight > 0 (LPIPS weights differ between the sides)")
    if _get(loss, "noise") is not None:
        reasons.append(f"loss.noise={_get(loss, 'noise')!r} (input corruption not mirrored)")
    return reasons


def monai_kwargs(config) -> tuple[dict, dict]:
    """(AutoencoderKL kwargs, PatchDiscriminator kwargs) for MONAI, or MonaiUnsupported.

    With initial factor 1 and factors 2 our model is MONAI's, weight for weight
    (ldm_jax.convert); the parameter counts printed by the bench check it.
    """
    reasons = unsupported_reasons(config)
    if reasons:
        raise MonaiUnsupported(
            "MONAI cannot build this configuration: " + "; ".join(reasons) + ". Use --vs-monai "
            "with a config such as configs/monai_3d_ldm.py.")
    ae, disc = config["autoencoder"], config["discriminator"]
    nrb = _get(ae, "num_res_blocks", 1)
    ae_kwargs = dict(
        spatial_dims=3,
        in_channels=int(_get(ae, "in_channels")),
        out_channels=int(_get(ae, "out_channels")),
        channels=tuple(int(c) for c in _get(ae, "num_channels")),
        latent_channels=int(_get(ae, "latent_channels")),
        num_res_blocks=tuple(int(b) for b in nrb) if isinstance(nrb, (list, tuple)) else int(nrb),
        norm_num_groups=int(_get(ae, "norm_num_groups")),
        norm_eps=float(_get(ae, "norm_eps")),
        attention_levels=tuple(bool(a) for a in _get(ae, "attention_levels")),
        with_encoder_nonlocal_attn=bool(_get(ae, "with_encoder_nonlocal_attn", True)),
        with_decoder_nonlocal_attn=bool(_get(ae, "with_decoder_nonlocal_attn", True)),
        use_convtranspose=bool(_get(ae, "use_convtranspose", False)),
        include_fc=True,
        use_flash_attention=False,
    )
    last_k = _get(disc, "last_conv_kernel_size")
    disc_kwargs = dict(
        spatial_dims=3,
        channels=int(_get(disc, "num_channels")),
        in_channels=int(_get(disc, "in_channels")),
        out_channels=int(_get(disc, "out_channels")),
        num_layers_d=int(_get(disc, "num_layers_d")),
        kernel_size=int(_get(disc, "kernel_size")),
        norm={"batch": "BATCH", "instance": "INSTANCE"}[_get(disc, "norm", "batch")],
        padding=int(_get(disc, "padding", 1) or 1),
        last_conv_kernel_size=None if last_k is None else int(last_k),
    )
    return ae_kwargs, disc_kwargs


# ----------------------------------------------------------------------------------------
# The PyTorch step.


def _recon_loss(torch, recon, target, loss_cfg):
    kind = _get(loss_cfg, "recon", "l1")
    if kind == "mse":
        return torch.mean((recon - target) ** 2)
    if kind == "weighted":
        w = torch.where(target > float(_get(loss_cfg, "fg_threshold")),
                        float(_get(loss_cfg, "fg_weight")), 1.0)
        return torch.sum(w * torch.abs(recon - target)) / torch.sum(w)
    return torch.mean(torch.abs(recon - target))


def run(spec: dict) -> dict:
    """Times `spec["steps"]` MONAI training steps; spec holds config (dict), volume, batch,
    steps, warmup, dtype, device ("cuda" | "cpu" | "auto") and threads (None: torch's)."""
    return with_torch_threads(spec, _run)


def with_torch_threads(spec, fn):
    """fn(spec, torch) under torch.set_num_threads(spec["threads"]) (restored after)."""
    import torch
    threads_before = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        return fn(spec, torch)
    finally:
        torch.set_num_threads(threads_before)


def torch_device(torch, name="auto"):
    """torch.device for "cuda" | "cpu" | "auto"; on CUDA with cudnn.benchmark on and the
    peak-memory counters reset."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    return dev


def timed_runs(torch, dev, fn, n, results):
    """(wall seconds, process CPU seconds) of n calls of fn, the device synchronised after
    each; fn's results are appended to `results`."""
    times, cpu_times = [], []
    for _ in range(int(n)):
        t0, c0 = time.perf_counter(), time.process_time()
        results.append(fn())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def run_fields(torch, dev, host, dtype, times, cpu_times, losses) -> dict:
    """The fields every MONAI row has: framework, device, threads, dtype, step times
    (median wall and CPU s), whether the losses were finite, and peak memory (CUDA
    max_memory_allocated, else `host.peak_delta()`) with its method."""
    out = dict(
        framework=f"monai {__import__('monai').__version__} / torch {torch.__version__}",
        device=(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
        backend=dev.type,
        threads=torch.get_num_threads(),
        dtype=dtype,
        step_s=statistics.median(times) if times else None,
        step_times=times,
        step_cpu_s=statistics.median(cpu_times) if cpu_times else None,
        loss_finite=all(v == v and abs(v) != float("inf") for v in losses),
    )
    if dev.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        out["memory_method"] = "torch.cuda.max_memory_allocated (fresh process)"
    else:
        out["peak_memory_bytes"] = host.peak_delta()
        out["memory_method"] = HOST_METHOD
    return out


def _run(spec, torch):
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    host = HostPeak()
    host.baseline()  # after the imports: only models, optimisers and steps count
    config = spec["config"]
    ae_kwargs, disc_kwargs = monai_kwargs(config)
    dev = torch_device(torch, spec.get("device", "auto"))
    torch.manual_seed(0)
    ae = AutoencoderKL(**ae_kwargs).to(dev)
    disc = PatchDiscriminator(**disc_kwargs).to(dev)
    train, loss_cfg = config["train"], config["loss"]
    betas = (float(train["b1"]), float(train["b2"]))
    opt_g = torch.optim.Adam(ae.parameters(), lr=float(train["learning_rate"]), betas=betas,
                             eps=float(train["eps"]))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(train["disc_learning_rate"]),
                             betas=betas, eps=float(train["eps"]))
    clip = float(train.get("grad_clip_norm") or 0.0)
    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    kl_w, adv_w = float(loss_cfg["kl_weight"]), float(loss_cfg["adv_weight"])
    dtype = spec.get("dtype", "float32")
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    gen = torch.Generator().manual_seed(0)
    shape = (int(spec["batch"]), int(ae_kwargs["in_channels"]), *spec["volume"])
    images = torch.rand(shape, generator=gen).to(dev)  # NCDHW: (B, C, X, Y, Z)

    def step():
        opt_g.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            recon, z_mu, z_sigma = ae(images)
            logits_fake = disc(recon.contiguous().float())[-1]
        recon, z_mu, z_sigma = recon.float(), z_mu.float(), z_sigma.float()
        rec = _recon_loss(torch, recon, images, loss_cfg)
        kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1,
                             dim=[1, 2, 3, 4])
        kl = torch.sum(kl) / kl.shape[0]
        gen_adv = adv_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
        loss_g = rec + kl_w * kl + adv_w * gen_adv
        loss_g.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ae.parameters(), clip)
        opt_g.step()

        opt_d.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            fake = disc(recon.contiguous().detach())[-1]
            real = disc(images.contiguous().detach())[-1]
        loss_d = 0.5 * (adv_loss(fake.float(), target_is_real=False, for_discriminator=True)
                        + adv_loss(real.float(), target_is_real=True, for_discriminator=True))
        (adv_w * loss_d).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(disc.parameters(), clip)
        opt_d.step()
        return float(loss_g.detach()) + float(loss_d.detach())  # syncs the device

    losses = []
    timed_runs(torch, dev, step, int(spec.get("warmup", 1)), losses)
    host.start()
    times, cpu_times = timed_runs(torch, dev, step, int(spec["steps"]), losses)
    return dict(run_fields(torch, dev, host, dtype, times, cpu_times, losses),
                params=sum(p.numel() for p in ae.parameters()),
                disc_params=sum(p.numel() for p in disc.parameters()))


def main(argv=None):
    return spec_main(argv, run, "Time MONAI's AutoencoderKL + PatchDiscriminator training "
                                "step (called by `python -m benchmarks.bench --vs-monai`).")


def spec_main(argv, run_fn, description):
    """The command line of a MONAI side: `--spec FILE.json` -> pin threads -> run_fn(spec)
    -> one `BENCH_MONAI_JSON {...}` line ({"error": ...} for MonaiUnsupported or a missing
    torch / monai). Returns 0."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", required=True, help="JSON file written by the bench")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    limit_threads(spec.get("threads"))  # whole process, before torch starts its pools
    try:
        result = run_fn(spec)
    except MonaiUnsupported as e:
        result = {"error": str(e)}
    except ImportError as e:
        result = {"error": f"MONAI side needs torch and monai (requirements-dev.txt): {e}"}
    print("BENCH_MONAI_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
