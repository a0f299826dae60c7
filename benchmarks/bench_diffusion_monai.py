"""MONAI (PyTorch) side of `python -m benchmarks.bench_diffusion --vs-monai`: stage 2, timed.

`python -m benchmarks.bench_diffusion_monai --spec FILE.json` imports torch and MONAI
only, never JAX (the two allocators must not share a process), and prints one JSON line.

What is timed, as MONAI's 3D LDM tutorial (`3d_ldm_tutorial.ipynb`, stage 2) writes it on
precomputed latents:

- training step: noise = randn_like(z); t ~ U{0..T-1} per sample;
  x_t = DDPMScheduler.add_noise(z, noise, t); DiffusionModelUNet(x_t, t);
  MSE(prediction, noise); backward; Adam step (the config's lr / betas / eps, and the
  same global-norm clipping `ldm_jax.optim.make_optimizer` applies, so both sides do the
  same update; the tutorial itself does not clip). No EMA (ours keeps one: ~3 M
  multiply-adds per step).
- sampling: DDIMScheduler.set_timesteps(N), then N times UNet(x, t) -> DDIMScheduler.step
  on one latent, under torch.no_grad().

bfloat16 is `torch.autocast(bfloat16)` around the UNet (the tutorial uses fp16 autocast
with a GradScaler on GPU). Memory: CUDA `max_memory_allocated`; CPU
`benchmarks.common.HostPeak` (peak RSS delta), the method our side uses on CPU.
"""

from __future__ import annotations

import sys

from benchmarks.bench_monai import (
    MonaiUnsupported,
    run_fields,
    spec_main,
    timed_runs,
    torch_device,
    with_torch_threads,
)
from benchmarks.common import HostPeak

SCHEDULERS = ("ddpm", "ddim")  # noise schedules both sides train the same way
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # MONAI DDPM/DDIM prediction types


def _get(cfg, key, default=None):
    return cfg.get(key, default) if cfg is not None else default


def unsupported_reasons(config) -> list[str]:
    """Why the MONAI side cannot run the same stage-2 step as this config ([] when it can).

    `config`: a stage-2 config (ConfigDict or its `to_dict()`).
    """
    unet, sched, loss = config["unet"], config["scheduler"], _get(config, "loss", {})
    reasons = []
    if str(sched["name"]) not in SCHEDULERS:
        reasons.append(f"scheduler.name={sched['name']!r} (the MONAI side mirrors the "
                       "tutorial's DDPM training and DDIM sampling)")
    if str(_get(sched, "prediction_type", "epsilon")) not in PREDICTION_TYPES:
        reasons.append(f"scheduler.prediction_type={sched['prediction_type']!r} (MONAI's "
                       f"schedulers take {list(PREDICTION_TYPES)})")
    if str(_get(sched, "variance_type", "fixed_small")).startswith("learned"):
        reasons.append("scheduler.variance_type learned (the tutorial's UNet predicts the "
                       "noise only)")
    if str(_get(loss, "type", "mse")) != "mse" or float(_get(loss, "min_snr_gamma", 0) or 0):
        reasons.append("loss other than plain MSE (the tutorial's loss)")
    if _get(unet, "with_conditioning", False):
        reasons.append("unet.with_conditioning (the benchmark feeds no contexts)")
    return reasons


def monai_unet_kwargs(unet_cfg) -> dict:
    """Keyword arguments of `monai.networks.nets.DiffusionModelUNet` for the model
    `ldm_jax.models.build_unet(unet_cfg)` builds (MONAI's names; `num_channels` ->
    `channels`; dtype and remat are ours only). JSON-able."""
    def seq(v, cast):
        return [cast(x) for x in v] if isinstance(v, (list, tuple)) else cast(v)

    kw = dict(spatial_dims=3, in_channels=int(unet_cfg["in_channels"]),
              out_channels=int(unet_cfg["out_channels"]),
              num_res_blocks=seq(unet_cfg["num_res_blocks"], int),
              channels=[int(c) for c in unet_cfg["num_channels"]],
              attention_levels=[bool(a) for a in unet_cfg["attention_levels"]],
              norm_num_groups=int(unet_cfg["norm_num_groups"]),
              norm_eps=float(unet_cfg["norm_eps"]),
              resblock_updown=bool(_get(unet_cfg, "resblock_updown", False)),
              num_head_channels=seq(unet_cfg["num_head_channels"], int),
              with_conditioning=bool(_get(unet_cfg, "with_conditioning", False)),
              transformer_num_layers=int(_get(unet_cfg, "transformer_num_layers", 1)),
              cross_attention_dim=_get(unet_cfg, "cross_attention_dim"),
              num_class_embeds=_get(unet_cfg, "num_class_embeds"),
              upcast_attention=bool(_get(unet_cfg, "upcast_attention", False)),
              use_flash_attention=False)
    return kw


def schedule_args(sched_cfg) -> dict:
    """MONAI's keyword arguments of the noise schedule (cosine takes none)."""
    name = str(sched_cfg["schedule"])
    if name == "cosine":
        return {}
    args = dict(beta_start=float(sched_cfg["beta_start"]), beta_end=float(sched_cfg["beta_end"]))
    if name == "sigmoid_beta":
        args["sig_range"] = float(sched_cfg["sig_range"])
    return args


def run(spec: dict) -> dict:
    """Times the MONAI stage-2 step and a DDIM sampling.

    spec: config (a stage-2 config's `to_dict()`, its unet already resolved as ours trains
    it), shape ([X, Y, Z, C] of the UNet input, padded), batch, steps, warmup,
    sample_steps (0: no sampling), dtype ("float32" | "bfloat16"), device ("cuda" | "cpu"
    | "auto") and threads (None: torch's default). Returns a JSON-able dict; times in s.
    Raises MonaiUnsupported when the config is not comparable (`unsupported_reasons`).
    """
    reasons = unsupported_reasons(spec["config"])
    if reasons:
        raise MonaiUnsupported("not comparable: " + "; ".join(reasons))
    return with_torch_threads(spec, _run)


def _run(spec, torch):
    from monai.networks.nets import DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    host = HostPeak()
    host.baseline()  # after the imports: only model, optimiser and steps count
    config = spec["config"]
    dev = torch_device(torch, spec.get("device", "auto"))
    torch.manual_seed(0)
    kwargs = monai_unet_kwargs(config["unet"])
    model = DiffusionModelUNet(**kwargs).to(dev)
    train, sched = config["train"], config["scheduler"]
    opt = torch.optim.Adam(model.parameters(), lr=float(train["learning_rate"]),
                           betas=(float(train["b1"]), float(train["b2"])),
                           eps=float(train["eps"]))
    clip = float(train.get("grad_clip_norm") or 0.0)
    T = int(sched["num_train_timesteps"])
    ddpm = DDPMScheduler(num_train_timesteps=T, schedule=str(sched["schedule"]),
                         **schedule_args(sched))
    dtype = spec.get("dtype", "float32")
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    x, y, z_, c = (int(v) for v in spec["shape"])
    batch = int(spec["batch"])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((batch, c, x, y, z_), generator=gen).to(dev)  # NCDHW latents
    labels = None
    if kwargs["num_class_embeds"]:
        labels = torch.zeros((batch,), dtype=torch.long, device=dev)

    prediction = str(sched.get("prediction_type", "epsilon"))

    def step():
        opt.zero_grad(set_to_none=True)
        noise = torch.randn_like(z)
        t = torch.randint(0, T, (batch,), device=dev).long()
        noisy = ddpm.add_noise(original_samples=z, noise=noise, timesteps=t)
        with torch.autocast(**autocast):
            pred = model(x=noisy, timesteps=t, class_labels=labels)
        target = {"epsilon": noise, "sample": z}.get(prediction) if prediction != \
            "v_prediction" else ddpm.get_velocity(sample=z, noise=noise, timesteps=t)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return float(loss.detach())  # syncs the device

    losses = []
    timed_runs(torch, dev, step, int(spec.get("warmup", 1)), losses)
    host.start()
    times, cpu_times = timed_runs(torch, dev, step, int(spec["steps"]), losses)
    out = dict(run_fields(torch, dev, host, dtype, times, cpu_times, losses),
               params=sum(p.numel() for p in model.parameters()))

    n = int(spec.get("sample_steps") or 0)
    if n > 0:
        ddim = DDIMScheduler(num_train_timesteps=T, schedule=str(sched["schedule"]),
                             clip_sample=bool(sched["clip_sample"]),
                             set_alpha_to_one=bool(sched["set_alpha_to_one"]),
                             steps_offset=int(sched["steps_offset"]),
                             prediction_type=str(sched["prediction_type"]),
                             clip_sample_min=float(sched["clip_sample_min"]),
                             clip_sample_max=float(sched["clip_sample_max"]),
                             **schedule_args(sched))
        ddim.set_timesteps(n, device=dev)
        one = None if labels is None else labels[:1]
        model.eval()

        def sample():
            sample_x = torch.randn((1, c, x, y, z_), generator=gen).to(dev)
            with torch.no_grad(), torch.autocast(**autocast):
                for t in ddim.timesteps:
                    out_t = model(sample_x, timesteps=t.reshape(1).to(dev), class_labels=one)
                    sample_x, _ = ddim.step(out_t.float(), t, sample_x)
            return float(sample_x.float().abs().mean())  # syncs the device

        results = []
        # One untimed sampling first when steps were warmed up, as our side does.
        timed_runs(torch, dev, sample, 1 if int(spec.get("warmup", 1)) > 0 else 0, results)
        s_times, s_cpu = timed_runs(torch, dev, sample, 1, results)
        out.update(sample_steps=n, sample_s=s_times[0], sample_cpu_s=s_cpu[0],
                   sample_finite=all(v == v for v in results))
    return out


def main(argv=None):
    return spec_main(argv, run, "Time MONAI's DiffusionModelUNet training step and DDIM "
                                "sampling (called by `python -m benchmarks.bench_diffusion "
                                "--vs-monai`).")


if __name__ == "__main__":
    sys.exit(main())
