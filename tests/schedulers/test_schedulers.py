"""Schedulers: MONAI 1.6 parity (betas, timesteps, noising, 20-step chains), jit, config errors.

MONAI draws step noise with torch.randn(shape, generator=g); each MONAI step here gets a
freshly seeded generator and our step gets the same draw as `noise=`, so whole chains
are compared, stochastic parts included. Arrays are (B, X, Y, Z, C) here and moved to
MONAI's (B, C, X, Y, Z). Tolerance: 1e-6, absolute below magnitude 1 and relative above
(`err`): torch's CPU sqrt is not correctly rounded (1 ulp off for ~20% of float32 inputs,
XLA's is exact), so chains cannot agree bitwise and their 1-ulp step differences add up
over 20 non-contracting steps on N(0, 1) samples (|x| up to ~4, where 1 ulp = 4.8e-7).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.errors import ConfigError
from ldm_jax.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    RFlowScheduler,
    build_scheduler,
    sample_loop,
    timestep_transform,
)

torch = pytest.importorskip("torch")
msched = pytest.importorskip("monai.networks.schedulers")
from monai.networks.schedulers.rectified_flow import timestep_transform as m_transform  # noqa: E402

SHAPE = (2, 4, 4, 4, 3)  # (B, X, Y, Z, C)
TOL = 1e-6
T = 1000
SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def sched_args(schedule):
    """Schedule arguments as MONAI takes them (cosine takes none)."""
    if schedule == "cosine":
        return {}
    args = {"beta_start": 0.0015, "beta_end": 0.0195}
    if schedule == "sigmoid_beta":
        args["sig_range"] = 5.0
    return args


def to_t(x):  # (B, X, Y, Z, C) -> torch (B, C, X, Y, Z)
    return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1).copy())


def from_t(x):
    return np.moveaxis(x.numpy(), 1, -1)


def seeded_noise(seed, shape_cf):
    """The draw MONAI makes with torch.Generator().manual_seed(seed), and that generator."""
    noise = torch.randn(shape_cf, generator=torch.Generator().manual_seed(seed))
    return noise, torch.Generator().manual_seed(seed)


def err(a, b):
    """max |a - b| / max(1, |b|): absolute error for |b| <= 1, relative above."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))


# ------------------------------------------------------------------------------ betas
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_arrays_match_monai(schedule):
    ours = DDPMScheduler(schedule=schedule, **sched_args(schedule)).create_state()
    ref = msched.DDPMScheduler(T, schedule=schedule, **sched_args(schedule))
    for name in ("betas", "alphas", "alphas_cumprod"):
        a = getattr(ours, name)
        assert a.dtype == jnp.float32 and a.shape == (T,)
        assert err(a, getattr(ref, name)) <= TOL, name
    # The agreement is ulp-level, much tighter than the tolerance (cosine: torch's
    # vectorised cos is off by an ulp at some points, 2 ulp of acp after the cumprod).
    assert err(ours.alphas_cumprod, ref.alphas_cumprod) <= (3e-7 if schedule == "cosine" else 1e-7)


# ------------------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("n", (10, 50, 1000))
def test_set_timesteps_match_monai(n):
    ours = DDPMScheduler()
    ref = msched.DDPMScheduler(T)
    ref.set_timesteps(n)
    ts = ours.set_timesteps(ours.create_state(), n).timesteps
    assert ts.dtype == jnp.int32 and np.array_equal(ts, ref.timesteps.numpy())
    for offset in (0, 1):
        ours = DDIMScheduler(steps_offset=offset, set_alpha_to_one=False)
        ref = msched.DDIMScheduler(T, steps_offset=offset, set_alpha_to_one=False)
        ref.set_timesteps(n)
        st = ours.set_timesteps(ours.create_state(), n)
        assert st.num_inference_steps == n
        assert np.array_equal(st.timesteps, ref.timesteps.numpy())


def test_set_timesteps_all_step_counts_match_torch_rounding():
    """Every n in [1, 1000] (float64 linspace would round 336 schedules differently)."""
    sched = DDIMScheduler(num_train_timesteps=T)
    st = sched.create_state()
    for n in range(1, T + 1):
        ref = torch.linspace(T - 1, 0, n).round().long().numpy()
        assert np.array_equal(sched.set_timesteps(st, n).timesteps, ref), n


def test_ddim_create_state_matches_monai_default_timesteps():
    ref = msched.DDIMScheduler(T, steps_offset=3)
    assert np.array_equal(DDIMScheduler(steps_offset=3).create_state().timesteps, ref.timesteps)


# ------------------------------------------------------------------------------ noising
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_and_velocity_match_monai(schedule):
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    t = np.array([0, 999], np.int32) if schedule == "cosine" else np.array([17, 640], np.int32)
    ours = DDPMScheduler(schedule=schedule, **sched_args(schedule))
    st = ours.create_state()
    ref = msched.DDPMScheduler(T, schedule=schedule, **sched_args(schedule))
    tt = torch.from_numpy(t.astype(np.int64))
    noisy = ours.add_noise(st, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    vel = ours.get_velocity(st, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert err(noisy, from_t(ref.add_noise(to_t(x0), to_t(noise), tt))) <= TOL
    assert err(vel, from_t(ref.get_velocity(to_t(x0), to_t(noise), tt))) <= TOL
    # per-sample timesteps really are per sample
    assert err(noisy[0], ours.add_noise(st, x0[:1], noise[:1], t[0])[0]) == 0.0


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_training_target(prediction_type):
    rng = np.random.default_rng(1)
    x0, noise = (jnp.asarray(a) for a in rng.standard_normal((2, *SHAPE)).astype(np.float32))
    t = jnp.array([3, 500])
    sched = DDPMScheduler(prediction_type=prediction_type)
    st = sched.create_state()
    target = sched.training_target(st, x0, noise, t)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": sched.get_velocity(st, x0, noise, t)}[prediction_type]
    assert err(target, expected) == 0.0
    rf = RFlowScheduler()
    assert err(rf.training_target(rf.create_state(), x0, noise, t), x0 - noise) == 0.0


def test_training_timesteps_uniform_integers():
    for sched in (DDPMScheduler(num_train_timesteps=50), DDIMScheduler(num_train_timesteps=50)):
        t = sched.sample_timesteps(jax.random.key(0), jnp.zeros((4000, 1, 1, 1, 1)))
        assert t.dtype == jnp.int32 and t.shape == (4000,)
        assert int(t.min()) == 0 and int(t.max()) == 49
        assert abs(float(t.mean()) - 24.5) < 1.0


# ------------------------------------------------------------------------------ step chains
def model_outputs(n, c, extra, rng):
    """n model outputs (B, X, Y, Z, c [+ c variance channels]) as a network might give."""
    outs = []
    for _ in range(n):
        out = rng.standard_normal((*SHAPE[:-1], c)).astype(np.float32)
        if extra == "learned":
            out = np.concatenate([out, rng.uniform(1e-4, 2e-2, out.shape).astype(np.float32)], -1)
        elif extra == "learned_range":
            out = np.concatenate([out, rng.uniform(-1, 1, out.shape).astype(np.float32)], -1)
        outs.append(out)
    return outs


def with_monai_arrays(st, ref, schedule):
    """For "cosine", our state with MONAI's own arrays. torch's vectorised cos is an ulp off
    at some points; betas = 1 - acp_t/acp_{t-1} turns that into ~3e-7 absolute (1e-4
    relative) at small betas, and sqrt(beta_t) * noise into ~8e-6 in one step. That is
    the schedule's float32 rounding, checked by test_schedule_arrays_match_monai; the
    step tests compare the step itself."""
    if schedule != "cosine":
        return st
    return st.replace(**{k: jnp.asarray(getattr(ref, k).numpy())
                         for k in ("betas", "alphas", "alphas_cumprod")})


CHAIN_TOL = 5e-6


def run_chains(ours, st, ref, timesteps, outs, x_start, seed0=0, ref_kw=None, our_kw=None):
    """20 consecutive steps from the same start and noise, ours and MONAI's.

    Returns (step, x0, chain) errors (`err`), maxima over the steps:
      step: our step applied to MONAI's previous sample (each step's own error);
      x0: the predicted x0 of that step times sqrt(acp_t) -- x0 = (x_t - sqrt(1-acp_t)
          eps) / sqrt(acp_t) magnifies its numerator's ulp differences by 1/sqrt(acp_t)
          (84 at t=999 of the tutorial schedule), in MONAI as here;
      chain: our free-running chain against MONAI's; step errors of 1-2 ulp (torch's CPU
          sqrt is not correctly rounded, XLA's is) add up over the 20 steps.
    """
    step = jax.jit(lambda st, out, t, x, z: ours.step(st, out, t, x, noise=z, **(our_kw or {})))
    x_ours, x_ref = jnp.asarray(x_start), to_t(x_start)
    e_step = e_x0 = e_chain = 0.0
    for i, (t, out) in enumerate(zip(timesteps, outs)):
        noise, gen = seeded_noise(seed0 + i, x_ref.shape)
        args = (jnp.asarray(out), jnp.int32(t))
        z = jnp.asarray(from_t(noise))
        x_forced, x0_ours = step(st, *args, jnp.asarray(from_t(x_ref)), z)
        x_ours, _ = step(st, *args, x_ours, z)
        x_ref, x0_ref = ref.step(to_t(out), int(t), x_ref, generator=gen, **(ref_kw or {}))
        e_step = max(e_step, err(x_forced, from_t(x_ref)))
        e_x0 = max(e_x0, err(x0_ours, from_t(x0_ref)) * float(st.alphas_cumprod[t]) ** 0.5)
        e_chain = max(e_chain, err(x_ours, from_t(x_ref)))
    return e_step, e_x0, e_chain


def check_chain(errors):
    e_step, e_x0, e_chain = errors
    assert e_step <= TOL and e_x0 <= TOL and e_chain <= CHAIN_TOL, errors


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_chain_matches_monai_fewer_steps(schedule, variance_type):
    """n=50 < T: MONAI's t-1 rule, reproduced with monai_prev_timestep=True; the last 20 steps."""
    kw = dict(schedule=schedule, variance_type=variance_type, **sched_args(schedule))
    ours = DDPMScheduler(monai_prev_timestep=True, **kw)
    ref = msched.DDPMScheduler(T, **kw)
    ref.set_timesteps(50)
    st = with_monai_arrays(ours.set_timesteps(ours.create_state(), 50), ref, schedule)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    outs = model_outputs(20, SHAPE[-1], variance_type, rng)
    check_chain(run_chains(ours, st, ref, np.asarray(st.timesteps)[-20:], outs, x))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
def test_ddpm_default_equals_monai_when_all_steps(variance_type, prediction_type):
    """n == T: the default (skip-correct) rule gives MONAI's numbers; last 20 steps (to t=0)
    without clipping, first 20 (from T-1) clipping to a custom range."""
    kw = dict(schedule="scaled_linear_beta", variance_type=variance_type,
              prediction_type=prediction_type, **sched_args("scaled_linear_beta"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    outs = model_outputs(20, SHAPE[-1], variance_type, rng)
    for clip, ts in ((False, slice(-20, None)), (True, slice(0, 20))):
        clip_kw = dict(clip_sample=clip, clip_sample_min=-0.5, clip_sample_max=2.0)
        ours = DDPMScheduler(**kw, **clip_kw)
        st = ours.create_state()
        ref = msched.DDPMScheduler(T, **kw, **clip_kw)
        check_chain(run_chains(ours, st, ref, np.asarray(st.timesteps)[ts], outs, x))


def test_ddpm_skip_lands_on_the_right_noise_level():
    """Oracle model, n=4: the step from t=666 must leave x_prev ~ N(sqrt(acp) x0, 1 - acp)
    at the NEXT scheduled timestep (333); MONAI's t-1 rule stays at the level of 665."""
    x0 = jnp.full((20000, 1, 1, 1, 1), 0.7)
    key_x, key_step = jax.random.split(jax.random.key(0))
    eps = jax.random.normal(key_x, x0.shape)
    stds = {}
    for monai_rule in (False, True):
        sched = DDPMScheduler(clip_sample=False, monai_prev_timestep=monai_rule)
        st = sched.set_timesteps(sched.create_state(), 4)
        t, t_next = int(st.timesteps[1]), int(st.timesteps[2])
        x_t = sched.add_noise(st, x0, eps, t)
        x_prev, _ = sched.sampling_step(st, eps, 1, x_t, key_step)  # oracle: the true noise
        acp = float(st.alphas_cumprod[t - 1 if monai_rule else t_next])
        resid = x_prev - acp**0.5 * x0
        stds[monai_rule] = float(resid.std())
        assert abs(stds[monai_rule] - (1 - acp) ** 0.5) < 0.01, (monai_rule, stds)
        assert abs(float(resid.mean())) < 0.02
    assert stds[True] - stds[False] > 0.1  # the two rules really differ
    # without prev_timestep, step goes to t - T // n
    a = sched.step(st, eps, 500, x_t, key_step)  # sched: the MONAI-rule one; compare default
    default = DDPMScheduler(clip_sample=False)
    st = default.set_timesteps(default.create_state(), 4)
    b = default.step(st, eps, 500, x_t, key_step)
    c = default.step(st, eps, 500, x_t, key_step, prev_timestep=250)
    assert err(b[0], c[0]) == 0.0 and err(a[0], b[0]) > 0.1


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_chain_matches_monai(schedule):
    """n=50, 20 steps, every prediction type, eta 0 and 0.5 (noise fed), then the last 20
    steps (through prev < 0) with set_alpha_to_one=False, steps_offset=1, custom clip."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    outs = model_outputs(20, SHAPE[-1], None, rng)
    cases = [(dict(prediction_type=p), eta, slice(0, 20))
             for p in PREDICTIONS for eta in (0.0, 0.5)]
    cases.append((dict(set_alpha_to_one=False, steps_offset=1, clip_sample_min=-0.3,
                       clip_sample_max=0.8), 1.0, slice(-20, None)))
    for extra, eta, ts in cases:
        kw = dict(schedule=schedule, **sched_args(schedule), **extra)
        ours = DDIMScheduler(**kw)
        ref = msched.DDIMScheduler(T, **kw)
        ref.set_timesteps(50)
        st = with_monai_arrays(ours.set_timesteps(ours.create_state(), 50), ref, schedule)
        check_chain(run_chains(ours, st, ref, np.asarray(st.timesteps)[ts], outs, x,
                               ref_kw={"eta": eta}, our_kw={"eta": eta}))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_reversed_step_matches_monai(prediction_type):
    """DDIM inversion, 20 steps up from t=0 (n=50): each step from MONAI's previous sample
    (x0 error scaled as in `run_chains`; for "sample" the step error times sqrt(1-acp_t),
    since eps = (x_t - sqrt(acp_t) x0) / sqrt(1 - acp_t) magnifies by 26 at t=0), and the
    free-running chain."""
    kw = dict(schedule="scaled_linear_beta", prediction_type=prediction_type, clip_sample=False,
              **sched_args("scaled_linear_beta"))
    ours = DDIMScheduler(**kw)
    st = ours.set_timesteps(ours.create_state(), 50)
    ref = msched.DDIMScheduler(T, **kw)
    ref.set_timesteps(50)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    outs = model_outputs(20, SHAPE[-1], None, rng)
    rev = jax.jit(ours.reversed_step)
    x_ours, x_ref, e_step, e_x0, e_chain = jnp.asarray(x), to_t(x), 0.0, 0.0, 0.0
    for t, out in zip(np.asarray(st.timesteps)[::-1][:20], outs):
        forced, x0_ours = rev(st, jnp.asarray(out), jnp.int32(t), jnp.asarray(from_t(x_ref)))
        x_ours, _ = rev(st, jnp.asarray(out), jnp.int32(t), x_ours)
        x_ref, x0_ref = ref.reversed_step(to_t(out), int(t), x_ref)
        acp = float(st.alphas_cumprod[t])
        scale = (1 - acp) ** 0.5 if prediction_type == "sample" else 1.0
        e_step = max(e_step, err(forced, from_t(x_ref)) * scale)
        e_x0 = max(e_x0, err(x0_ours, from_t(x0_ref)) * acp**0.5)
        e_chain = max(e_chain, err(x_ours, from_t(x_ref)))
    check_chain((e_step, e_x0, e_chain))


# ------------------------------------------------------------------------------ rflow
RFLOW_CASES = [
    dict(use_discrete_timesteps=True),
    dict(use_discrete_timesteps=False),
    dict(use_discrete_timesteps=True, use_timestep_transform=True, base_img_size_numel=8**3),
    dict(use_discrete_timesteps=False, use_timestep_transform=True, base_img_size_numel=2**3),
    dict(use_discrete_timesteps=False, steps_offset=3),
]


@pytest.mark.parametrize("kw", RFLOW_CASES)
def test_rflow_timesteps_and_chain_match_monai(kw):
    numel = 4 * 4 * 4
    ours = RFlowScheduler(monai_truncate_next_timestep=True, **kw)
    ref = msched.RFlowScheduler(T, **kw)
    for n in (10, 50, 1000):
        ref.set_timesteps(n, input_img_size_numel=numel)
        st = ours.set_timesteps(ours.create_state(), n, input_img_size_numel=numel)
        assert np.array_equal(np.asarray(st.timesteps), ref.timesteps.numpy().astype(np.float32))
    ref.set_timesteps(30, input_img_size_numel=numel)
    st = ours.set_timesteps_for(ours.create_state(), 30, SHAPE)
    ts = ref.timesteps
    nexts = torch.cat((ts[1:], torch.tensor([0], dtype=ts.dtype)))
    rng = np.random.default_rng(6)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    step = jax.jit(ours.sampling_step)
    x_ours, x_ref, worst = jnp.asarray(x), to_t(x), 0.0
    for i in range(20):
        out = rng.standard_normal(SHAPE).astype(np.float32)
        x_ref, x0_ref = ref.step(to_t(out), ts[i], x_ref, nexts[i])
        x_ours, x0_ours = step(st, jnp.asarray(out), i, x_ours)
        worst = max(worst, err(x_ours, from_t(x_ref)), err(x0_ours, from_t(x0_ref)))
    assert worst <= TOL
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    t = ours.sample_timesteps(jax.random.key(0), x0)
    m = ref.add_noise(to_t(x0), to_t(noise), torch.from_numpy(np.array(t)))
    assert err(ours.add_noise(st, jnp.asarray(x0), jnp.asarray(noise), t), from_t(m)) <= TOL


def test_rflow_default_steps_telescope_monai_truncation_does_not():
    """Continuous timesteps: exact next timesteps make the Euler steps sum to t_0/T = 1."""
    kw = dict(use_discrete_timesteps=False, use_timestep_transform=True, base_img_size_numel=8)
    ones = jnp.ones((1, 2, 2, 2, 1))
    dts = {}
    for trunc in (False, True):
        sched = RFlowScheduler(monai_truncate_next_timestep=trunc, **kw)
        total = sample_loop(sched, sched.create_state(), lambda x, t: jnp.ones_like(x),
                            jnp.zeros_like(ones), num_inference_steps=7)
        dts[trunc] = float(total.mean())  # v = 1: the sample is the sum of the steps
    assert abs(dts[False] - 1.0) < 1e-6
    assert dts[True] > 1.0 + 1e-3


def test_rflow_timestep_transform_and_sampling_match_monai():
    t = np.linspace(0, T, 17).astype(np.float32)
    for numel, base, dim in ((64**3, 32**3, 3), (96 * 96 * 64, 32**3, 3), (64**2, 32**2, 2)):
        ref = m_transform(torch.from_numpy(t), torch.tensor(numel), base, 1.0, T, dim).numpy()
        assert err(timestep_transform(jnp.asarray(t), numel, base, 1.0, T, dim), ref) <= 1e-4
        assert err(timestep_transform(jnp.asarray(t), numel, base, 1.0, T, dim) / T, ref / T) <= TOL
    x = jnp.zeros((20000, 2, 2, 2, 1))
    sched = RFlowScheduler(sample_method="logit-normal", loc=0.5, scale=1.5,
                           use_discrete_timesteps=False)
    t = sched.sample_timesteps(jax.random.key(1), x)
    logit = np.log(np.asarray(t) / (T - np.asarray(t)))
    assert t.dtype == jnp.float32 and 0 < float(t.min()) and float(t.max()) < T
    assert abs(logit.mean() - 0.5) < 0.05 and abs(logit.std() - 1.5) < 0.05
    t = RFlowScheduler().sample_timesteps(jax.random.key(2), x)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == T - 1
    big = RFlowScheduler(use_timestep_transform=True, base_img_size_numel=1)
    t0 = RFlowScheduler(use_discrete_timesteps=True).sample_timesteps(jax.random.key(3), x)
    t1 = big.sample_timesteps(jax.random.key(3), x)
    assert err(t1, timestep_transform(t0.astype(jnp.float32), 8, 1, 1.0, T, 3)) == 0.0


# ------------------------------------------------------------------------------ jit & loops
def toy_model(x, t):
    return jnp.tanh(x) * (t.astype(jnp.float32) / T) + 0.1 * x


def test_jitted_ddim_loop_equals_python_loop():
    """One jitted fori_loop of 50 DDIM steps == a Python loop over the same (jitted) steps."""
    sched = DDIMScheduler(schedule="scaled_linear_beta", clip_sample=False,
                          **sched_args("scaled_linear_beta"))
    st = sched.set_timesteps(sched.create_state(), 50)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    looped = jax.jit(lambda s, x: sample_loop(sched, s, toy_model, x))(st, x_T)
    step, model = jax.jit(sched.step), jax.jit(toy_model)
    x = x_T
    for t in st.timesteps:
        x, _ = step(st, model(x, t), t, x)
    assert err(looped, x) <= TOL
    assert err(looped, x_T) > 0.1  # it did something
    # with eta > 0 the loop draws from the key, deterministically
    a = sample_loop(sched, st, toy_model, x_T, jax.random.key(1), 10, eta=1.0)
    b = sample_loop(sched, st, toy_model, x_T, jax.random.key(1), 10, eta=1.0)
    c = sample_loop(sched, st, toy_model, x_T, jax.random.key(2), 10, eta=1.0)
    assert err(a, b) == 0.0 and err(a, c) > 1e-3


def test_ddpm_loop_under_jit_matches_python_loop_with_keys():
    """DDPM (n=10) loop under jit == Python loop stepping to the next scheduled timestep
    with the same key splits."""
    sched = DDPMScheduler(clip_sample=False)
    st = sched.set_timesteps(sched.create_state(), 10)
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    loop = jax.jit(lambda s, x, k: sample_loop(sched, s, toy_model, x, k))
    looped = loop(st, x_T, jax.random.key(7))
    step = jax.jit(lambda st, out, t, x, k, prev: sched.step(st, out, t, x, k, prev_timestep=prev))
    model = jax.jit(toy_model)
    x, k = x_T, jax.random.key(7)
    ts = list(st.timesteps) + [jnp.int32(-1)]
    for t, prev in zip(ts[:-1], ts[1:]):
        k, sub = jax.random.split(k)
        x, _ = step(st, model(x, t), t, x, sub, prev)
    assert err(looped, x) <= TOL
    assert err(looped, x_T) > 0.1
    with pytest.raises(ValueError, match="PRNG key"):
        sample_loop(sched, st, toy_model, x_T)


@pytest.mark.parametrize("which", ("ddpm", "ddim", "rflow"))
def test_traced_timesteps_equal_concrete(which):
    sched = build_scheduler(name=which)
    st = sched.set_timesteps(sched.create_state(), 20)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    out = jax.random.normal(jax.random.key(1), SHAPE)
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    kw = {"noise": noise} if which == "ddpm" else {}
    jstep = jax.jit(lambda t, x: sched.step(st, out, t, x, **kw))
    for t in (int(st.timesteps[0]), int(st.timesteps[-1]), 0):
        a = jstep(jnp.asarray(t), x)
        b = sched.step(st, out, t, x, **kw)
        assert err(a[0], b[0]) <= TOL and err(a[1], b[1]) <= TOL
    ts = jnp.asarray([1, 500])
    noisy = jax.jit(sched.add_noise)(st, x, noise, ts)
    assert err(noisy, sched.add_noise(st, x, noise, [1, 500])) <= TOL


# ------------------------------------------------------------------------------ config
FULL = dict(name="ddpm", num_train_timesteps=1000, schedule="scaled_linear_beta",
            beta_start=0.0015, beta_end=0.0195, sig_range=6.0, prediction_type="epsilon",
            variance_type="fixed_small", clip_sample=False, clip_sample_min=-1.0,
            clip_sample_max=1.0, set_alpha_to_one=True, steps_offset=0,
            use_timestep_transform=False, sample_method="uniform",
            use_discrete_timesteps=True, base_img_size_numel=32 * 32 * 32)


def test_build_scheduler_from_config_and_kwargs():
    cfg = ml_collections.ConfigDict(FULL)
    s = build_scheduler(cfg)
    assert isinstance(s, DDPMScheduler) and s.schedule == "scaled_linear_beta" and not s.clip_sample
    cfg.name = "ddim"
    s = build_scheduler(cfg)
    assert isinstance(s, DDIMScheduler) and s.beta_end == 0.0195
    cfg.name, cfg.prediction_type = "rflow", "v_prediction"
    s = build_scheduler(cfg, use_discrete_timesteps=False)
    assert isinstance(s, RFlowScheduler) and not s.use_discrete_timesteps
    s = build_scheduler(name="ddim", schedule="cosine", beta_start=None)  # None: the default
    assert isinstance(s, DDIMScheduler) and s.schedule == "cosine"
    assert hash(s) == hash(build_scheduler(name="ddim", schedule="cosine"))


@pytest.mark.parametrize("change, message", [
    (dict(name="pndm"), r"scheduler.name='pndm' is not known"),
    (dict(schedule="quadratic"), r"scheduler.schedule='quadratic' is not known"),
    (dict(prediction_type="x0"), r"scheduler.prediction_type='x0' is not known"),
    (dict(beta_start=0.02, beta_end=0.01), r"0 < beta_start < beta_end < 1"),
    (dict(beta_end=0.0015), r"0 < beta_start < beta_end < 1"),
    (dict(variance_type="learned_log"), r"scheduler.variance_type='learned_log' is not known"),
    (dict(clip_sample=True, clip_sample_min=1.0), r"clip_sample_min=1.0 must be below"),
    (dict(name="ddim", steps_offset=1000), r"scheduler.steps_offset must be an int in \[0, 999\]"),
    (dict(num_train_timesteps=0), r"scheduler.num_train_timesteps must be an int >= 1"),
    (dict(clip_sample=1), r"scheduler.clip_sample must be True or False"),
    (dict(schedule="sigmoid_beta", sig_range=0.0), r"scheduler.sig_range must be a number > 0"),
    (dict(beta_start="1e-4"), r"scheduler.beta_start must be a number, got '1e-4'"),
    (dict(name="rflow", prediction_type="v_prediction", scale=-1.0),
     r"scheduler.scale must be a number > 0"),
    (dict(name="rflow"), r"prediction_type='epsilon' is not possible with rflow"),
    (dict(name="rflow", prediction_type="v_prediction", sample_method="normal"),
     r"scheduler.sample_method='normal' is not known"),
    (dict(name="rflow", prediction_type="v_prediction", base_img_size_numel=0),
     r"scheduler.base_img_size_numel must be an int >= 1"),
    (dict(beta_schedule="linear"), r"unknown field\(s\) \['beta_schedule'\]"),
])
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_scheduler(ml_collections.ConfigDict({**FULL, **change}))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ("ddpm", "ddim", "rflow"))
def test_inference_steps_beyond_training_steps(which):
    sched = build_scheduler(name=which, num_train_timesteps=100)
    with pytest.raises(ConfigError, match=r"num_inference_steps must be an int in \[1, "
                                          r"num_train_timesteps=100\], got 101"):
        sched.set_timesteps(sched.create_state(), 101)
    with pytest.raises(ConfigError, match="got 0"):
        sched.set_timesteps(sched.create_state(), 0)
