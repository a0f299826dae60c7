"""MAISI's released scheduler settings against MONAI's schedulers built from the same
definitions, called as MAISI's scripts call them (numel as a torch tensor, next_t from
the float16 timestep list). Latent shapes are MAISI's; only the timestep transform sees
them, so the stepped tensors stay tiny."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import ConfigError
from ldm_jax.schedulers import RFlowScheduler
from ldm_jax.schedulers.maisi import (
    MAISI_NOISE_SCHEDULERS,
    MAISI_SAMPLING,
    maisi_noise_scheduler,
    maisi_sampling,
)

torch = pytest.importorskip("torch")
msched = pytest.importorskip("monai.networks.schedulers")
m_transform = pytest.importorskip("monai.networks.schedulers.rectified_flow").timestep_transform

SMALL = (1, 3, 2, 2, 4)  # (B, X, Y, Z, C) stepped here; timesteps from the preset's latent
T = 1000


def monai_scheduler(kind):
    d = dict(MAISI_NOISE_SCHEDULERS[kind])
    cls = {"rflow": msched.RFlowScheduler, "ddpm": msched.DDPMScheduler}[d.pop("name")]
    return cls(**d)


def to_t(x):
    return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def from_t(x):
    return np.moveaxis(x.numpy(), 1, -1)


def same_timesteps(st, ref):
    ours = np.asarray(st.timesteps)
    return np.array_equal(ours, ref.timesteps.numpy().astype(ours.dtype))


def err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


RFLOW_PRESETS = [k for k, p in MAISI_SAMPLING.items() if p.scheduler == "rflow"]


@pytest.mark.parametrize("preset", RFLOW_PRESETS)
def test_rflow_presets_timesteps_and_steps_match_monai(preset):
    p = MAISI_SAMPLING[preset]
    ours, st = maisi_sampling(preset)
    ref = monai_scheduler("rflow")
    latent = p.latent_spatial_shape
    ref.set_timesteps(p.num_inference_steps, input_img_size_numel=torch.prod(torch.tensor(latent)))
    assert same_timesteps(st, ref)
    assert st.timesteps.dtype == jnp.float32 and st.num_inference_steps == 30
    # every Euler step of the 30, MAISI's loop: next_t appended 0, random velocities
    ts = ref.timesteps
    nexts = torch.cat((ts[1:], torch.tensor([0], dtype=ts.dtype)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SMALL).astype(np.float32)
    step = jax.jit(ours.sampling_step)
    x_ours, x_ref, worst = jnp.asarray(x), to_t(x), 0.0
    for i in range(len(ts)):
        v = rng.standard_normal(SMALL).astype(np.float32)
        x_ref, x0_ref = ref.step(to_t(v), ts[i], x_ref, nexts[i])
        x_ours, x0_ours = step(st, jnp.asarray(v), i, x_ours)
        worst = max(worst, err(x_ours, from_t(x_ref)), err(x0_ours, from_t(x0_ref)))
    assert worst <= 1e-6


def test_rflow_timesteps_match_monai_at_other_sizes_and_counts():
    """float32_transform (the presets) equals MONAI given a tensor numel, as MAISI's scripts
    give it; the float64 default equals MONAI given an int. (192, 192, 192) at 50 steps and
    (512, 512, 256) at 1000 are sizes where the two round one timestep differently."""
    ours = maisi_noise_scheduler("rflow")
    f64 = maisi_noise_scheduler("rflow", monai_exact=False)
    ref = monai_scheduler("rflow")
    assert isinstance(ours, RFlowScheduler) and ours.float32_transform and not f64.float32_transform
    differ = 0
    for size in ((192, 192, 192), (512, 512, 256), (256, 256, 128), (512, 512, 512),
                 (160, 224, 96), (64, 64, 32)):
        latent = tuple(s // 4 for s in size)
        for n in (10, 30, 50, 1000):
            ref.set_timesteps(n, input_img_size_numel=torch.prod(torch.tensor(latent)))
            _, st = maisi_sampling("rflow-ct", output_size=size, num_inference_steps=n)
            assert same_timesteps(st, ref)
            differ += not np.array_equal(
                np.asarray(f64.set_timesteps(st, n, int(np.prod(latent))).timesteps),
                np.asarray(st.timesteps))
            ref.set_timesteps(n, input_img_size_numel=int(np.prod(latent)))
            st = f64.set_timesteps(st, n, int(np.prod(latent)))
            assert same_timesteps(st, ref)
    assert differ >= 2


def test_rflow_training_timesteps_and_add_noise_match_monai():
    """Uniform draws: our transformed timesteps are MONAI's transform (float32, tensor numel,
    as in its sample_timesteps) of the same draws; distributions agree; add_noise equal."""
    ours = maisi_noise_scheduler("rflow")
    plain = RFlowScheduler(use_discrete_timesteps=False)  # the same draws, untransformed
    latent = jax.ShapeDtypeStruct((4000, 64, 64, 64, 4), jnp.float32)  # only .shape is read
    key = jax.random.key(3)
    t, u = ours.sample_timesteps(key, latent), plain.sample_timesteps(key, latent)
    numel = torch.prod(torch.tensor((64, 64, 64)))
    ref_t = m_transform(torch.from_numpy(np.array(u)), numel, 32**3, 1.0, T, 3).numpy()
    assert t.dtype == jnp.float32 and err(np.asarray(t) / T, ref_t / T) <= 1e-6
    torch.manual_seed(0)  # MONAI draws from torch's global generator
    m_latent = torch.zeros(1, 4, 64, 64, 64).expand(40000, -1, -1, -1, -1)  # a view, no memory
    m_t = np.sort(monai_scheduler("rflow").sample_timesteps(m_latent).numpy())
    big = jax.ShapeDtypeStruct((40000, 64, 64, 64, 4), jnp.float32)
    ours_t = np.sort(np.asarray(ours.sample_timesteps(jax.random.key(4), big)))
    grid = np.union1d(ours_t, m_t)
    cdf_ours, cdf_ref = (np.searchsorted(a, grid, "right") for a in (ours_t, m_t))
    ks = np.max(np.abs(cdf_ours - cdf_ref))
    assert ks / 40000 < 0.02  # two-sample Kolmogorov-Smirnov D; p < 1e-6 above 0.02
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 4, *SMALL[1:])).astype(np.float32)
    state = ours.create_state()
    m = monai_scheduler("rflow").add_noise(to_t(x0), to_t(noise), torch.from_numpy(np.array(t[:4])))
    assert err(ours.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), t[:4]), from_t(m)) <= 1e-6


def test_ddpm_v1_settings_match_monai():
    """v1 (and the mask generator, same definition): 1000 steps; first and last 10 steps
    with MONAI's generator noise given to ours."""
    ours, st = maisi_sampling("ddpm-ct")
    ref = monai_scheduler("ddpm")
    ref.set_timesteps(1000)
    assert np.array_equal(np.asarray(st.timesteps), ref.timesteps.numpy())
    assert np.allclose(np.asarray(st.betas), ref.betas.numpy(), rtol=1e-6, atol=0)
    assert ours.prediction_type == ref.prediction_type == "epsilon" and not ours.clip_sample
    rng = np.random.default_rng(2)
    step = jax.jit(lambda st, v, t, x, z: ours.step(st, v, t, x, noise=z))
    worst = 0.0
    for idx in (range(10), range(990, 1000)):
        x = rng.standard_normal(SMALL).astype(np.float32)
        x_ours, x_ref = jnp.asarray(x), to_t(x)
        for i in idx:
            t = int(st.timesteps[i])
            v = rng.standard_normal(SMALL).astype(np.float32)
            z = torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(i))
            x_ref, _ = ref.step(to_t(v), t, x_ref, generator=torch.Generator().manual_seed(i))
            x_ours, _ = step(st, jnp.asarray(v), jnp.int32(t), x_ours, jnp.asarray(from_t(z)))
            worst = max(worst, err(x_ours, from_t(x_ref)))
    assert worst <= 1e-6


def test_refusals():
    with pytest.raises(ConfigError, match="preset 'rflow' is not known"):
        maisi_sampling("rflow")
    with pytest.raises(ConfigError, match="multiples of 4"):
        maisi_sampling("rflow-ct", output_size=(256, 256, 130))
    with pytest.raises(ConfigError, match="noise scheduler 'v2' is not known"):
        maisi_noise_scheduler("v2")


@pytest.mark.parametrize("discrete", (False, True))
def test_float32_transform_matches_monai_tensor_numel_on_a_grid(discrete):
    kw = {"use_discrete_timesteps": discrete, "use_timestep_transform": True}
    ours, ref = RFlowScheduler(float32_transform=True, **kw), msched.RFlowScheduler(T, **kw)
    st = ours.create_state()
    grid = [(a, b, c) for a in (8, 24, 40, 72, 128) for b in (16, 48, 128) for c in (12, 32, 96)]
    for latent in grid:
        ref.set_timesteps(30, input_img_size_numel=torch.prod(torch.tensor(latent)))
        st = ours.set_timesteps(st, 30, int(np.prod(latent)))
        assert same_timesteps(st, ref), latent
