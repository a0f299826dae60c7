"""Stage 2 with a cross-attention context read from `conditioning.context_dir`: training
(condition dropout to the zeros null context), validation, guidance, sampling, and the
user errors. One short training run serves every test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.cli import sample as sample_cli
from ldm_jax.cli.train import make_task
from ldm_jax.data import DataError
from ldm_jax.errors import ConfigError
from tests.diffusion.test_diffusion import tiny_diffusion_config

DIM, S = 4, 3  # cross_attention_dim, context length


def context_config(ae_workdir, latents_dir, context_dir):
    """One level (the fastest to compile): the context enters the middle block's
    cross-attention (the down/up blocks' is in test_unet_parity_monai)."""
    c = tiny_diffusion_config(ae_workdir, latents_dir)
    c.unet.with_conditioning = True
    c.unet.cross_attention_dim = DIM
    c.conditioning.context_dir = context_dir
    return c


def _names(latents_dir):
    with open(os.path.join(latents_dir, "latents.json")) as f:
        return sorted(json.load(f)["files"])


@pytest.fixture(scope="module")
def context_dir(latents_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("contexts")
    rng = np.random.default_rng(0)
    for name in _names(latents_dir):
        np.save(out / f"{name}.npy", rng.normal(size=(S, DIM)).astype(np.float32))
    return str(out)


@pytest.fixture(scope="module")
def ctx_run(ae_workdir, latents_dir, context_dir, tmp_path_factory):
    """(workdir, task) of 4 steps (eval and a sample sheet at 2 and 4). No condition
    dropout here, so the tests can reuse the task's compiled step, evaluation and sampler
    as the conditional model; `_loss_with_dropout` compiles a step with dropout 1."""
    from ldm_jax.trainer import loop as trainer
    wd = str(tmp_path_factory.mktemp("ldm_ctx"))
    c = context_config(ae_workdir, latents_dir, context_dir)
    c.train.learning_rate = 1e-2  # so 4 steps move the zero-initialised proj_out
    c.conditioning.drop_prob = 0.0
    c.eval.sampling_steps = 1  # one DDIM step: guidance is then exactly affine
    task = make_task(c)
    trainer.train(task, wd, progress=False)
    return wd, task


def _loss(task, params, batch):
    """The trainer's compiled step's loss for `batch` from a fresh state with `params`
    (always the same noise and timesteps)."""
    from ldm_jax import sharding
    from ldm_jax.trainer import loop as trainer
    mesh = sharding.make_mesh(task.config.mesh)
    step = trainer.compile_train_step(task, mesh, trainer.abstract_train_state(task, mesh))
    state = trainer.init_train_state(task, mesh)[0].replace(
        params=sharding.put_replicated(params, mesh))  # as the trainer's: no recompiling
    return float(step(state, trainer.put_batch(batch, mesh), None)[1]["loss"])


def test_condition_dropout_gives_the_null_context(ctx_run):
    _, task = ctx_run
    rng = np.random.default_rng(3)
    batch = {"context": rng.normal(size=(64, S, DIM)).astype(np.float32),
             "class_label": np.arange(64) % 3}
    key = jax.random.PRNGKey(0)
    try:
        task.num_classes = 3  # as if class-conditional too: one mask drops both
        for p, dropped in ((0.0, 0), (1.0, 64), (0.5, None)):
            task.config.conditioning.drop_prob = p
            labels, ctx = (np.asarray(a) for a in task.conditions(batch, key, 64))
            zero = (ctx == 0).all(axis=(1, 2))
            kept = (ctx == batch["context"]).all(axis=(1, 2))
            assert (zero | kept).all() and (zero == (labels == 3)).all()
            assert (labels[~zero] == batch["class_label"][~zero]).all()
            if dropped is not None:
                assert zero.sum() == dropped
            else:
                assert 10 < zero.sum() < 54
    finally:
        task.num_classes, task.config.conditioning.drop_prob = 0, 0.0


def test_training_with_contexts_depends_on_them(ctx_run):
    wd, task = ctx_run
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len([r for r in rows if "loss" in r]) == 4
    assert [np.isfinite(r["val_loss"]) for r in rows if "val_loss" in r] == [True, True]
    assert os.path.exists(os.path.join(wd, "images", "step_4.png"))
    assert task.train_contexts.shape == (len(task.train_latents), S, DIM)
    assert task.val_contexts.shape == (len(task.val_latents), S, DIM)

    params = task._pipeline.params  # the EMA params of step 4 (the last evaluation)
    z = np.stack(task.train_latents[:2])
    ctx = task.train_contexts[:2]
    a = {"latent": z, "context": ctx}
    b = {"latent": z, "context": ctx[::-1] * 3.0}
    zero = {"latent": z, "context": np.zeros_like(ctx)}
    # Same params, noise and timesteps: the context changes the training loss ...
    cond_a = _loss(task, params, a)
    cond_zero = _loss(task, params, zero)
    assert abs(cond_a - _loss(task, params, b)) > 1e-6
    assert abs(cond_a - cond_zero) > 1e-6
    # ... and the validation loss, which is conditional.
    val = np.stack(task.val_latents)
    assert abs(task.eval_loss(params, val, task.val_contexts)
               - task.eval_loss(params, val, np.zeros_like(task.val_contexts))) > 1e-6


def test_guidance_one_equals_the_conditional_model(ctx_run):
    from ldm_jax.diffusion.sampling import make_sampler, sampler_for
    from ldm_jax.schedulers import sample_loop
    _, task = ctx_run
    pipe = task._pipeline  # the evaluation's: EMA params of step 4, its 1-step sampler
    steps = int(task.config.eval.sampling_steps)
    assert steps == 1
    sched = sampler_for(pipe.config.scheduler, "ddim")
    shape = (*pipe.padded_shape, pipe.latent_shape[-1])
    ctx = jnp.asarray(np.random.default_rng(1).normal(size=(1, S, DIM)), jnp.float32)
    key = jax.random.PRNGKey(3)
    k0, k1 = jax.random.split(key)
    x_t = jax.random.normal(k0, (1, *shape))
    state = sched.set_timesteps(sched.create_state(), steps)

    @jax.jit
    def plain(context):
        return sample_loop(sched, state, lambda x, t: pipe.unet.apply(
            {"params": pipe.params}, x, jnp.broadcast_to(t, (1,)), context=context),
            x_t, k1, eta=0.0)

    cond, uncond = np.asarray(plain(ctx)), np.asarray(plain(jnp.zeros_like(ctx)))
    assert np.abs(cond - uncond).max() > 1e-5  # the trained model uses its context
    guided1 = pipe._samplers[(None, steps, 1.0, 0.0)]  # make_sampler(guidance_scale=1)
    np.testing.assert_allclose(np.asarray(guided1(pipe.params, key, None, ctx, n=1)), cond,
                               rtol=1e-5, atol=1e-5)
    # Guidance 3 mixes the model's outputs with the null context's as uncond + 3 (cond -
    # uncond); one deterministic DDIM step is affine in that output, so the samples mix so.
    guided3 = make_sampler(pipe.unet, sched, shape=shape, steps=steps, guidance_scale=3.0)
    np.testing.assert_allclose(np.asarray(guided3(pipe.params, key, None, ctx, n=1)),
                               uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    # Pipeline: no context = the null context (zeros).
    np.testing.assert_array_equal(pipe.sample_latents(1, key, steps=steps),
                                  pipe.sample_latents(1, key, steps=steps,
                                                      context=np.zeros((1, DIM))))


def test_sample_cli_with_context(ctx_run, tmp_path, capsys):
    wd, _ = ctx_run
    rng = np.random.default_rng(2)
    one = tmp_path / "one.npy"
    np.save(one, rng.normal(size=(S, DIM)).astype(np.float32))
    per = tmp_path / "per.npy"
    np.save(per, rng.normal(size=(2, S, DIM)).astype(np.float32))
    base = ["x", f"--workdir={wd}", "--num_samples=2", "--num_inference_steps=2", "--batch_size=2",
            "--format=npy", "--noprogress", "--step=latest", "--guidance_scale=2"]
    for name, ctx in (("one", one), ("per", per)):
        out = str(tmp_path / f"s_{name}")
        assert sample_cli.main(base + [f"--output={out}", f"--context={ctx}"]) == 0
        rec = json.load(open(os.path.join(out, "samples.json")))
        assert rec["context"] == str(ctx) and rec["guidance_scale"] == 2.0
        assert rec["context_shape"] == list(np.load(ctx).shape)
        for n in rec["files"]:
            assert os.path.exists(os.path.join(out, n + ".npy"))
    capsys.readouterr()
    out = str(tmp_path / "s_null")
    assert sample_cli.main(base + [f"--output={out}"]) == 0
    assert "without --context it samples with the null context (zeros)" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "samples.json")))["context"] is None
    lat = lambda d: np.load(os.path.join(tmp_path, d, "latents", "sample_0000.npy"))
    assert np.abs(lat("s_one") - lat("s_null")).max() > 0
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((S, DIM + 1), np.float32))
    assert sample_cli.main(base + [f"--output={tmp_path / 's_bad'}", f"--context={bad}"]) == 2
    err = capsys.readouterr().err
    assert "--context has shape (3, 5); this model takes (S, 4) or (4,) for every sample, " \
           "or (2, S, 4) one per sample" in err


def test_context_for_a_model_without_cross_attention():
    from ldm_jax.diffusion.pipeline import Pipeline
    c = tiny_diffusion_config("unused")
    c.latents.scale_factor, c.latents.latent_shape = 1.0, (8, 8, 4, 2)
    with pytest.raises(ConfigError, match=r"--context given, but this model has no "
                                          r"cross-attention \(unet.with_conditioning=False\)"):
        Pipeline(c, None, None, None).sample_latents(1, jax.random.PRNGKey(0), steps=2,
                                                     context=np.zeros((1, DIM)))


def test_context_config_errors():
    from ldm_jax.diffusion.config import prepare_config
    c = tiny_diffusion_config("runs/ae", "latents/")
    c.unet.with_conditioning, c.unet.cross_attention_dim = True, DIM
    with pytest.raises(ConfigError, match=r"^unet.with_conditioning=True needs conditioning."
                                          r"context_dir .*--config.conditioning.context_dir="):
        prepare_config(c)
    c = tiny_diffusion_config("runs/ae", "latents/")
    c.conditioning.context_dir = "ctx/"
    with pytest.raises(ConfigError, match=r"^conditioning.context_dir='ctx/' is set but unet."
                                          r"with_conditioning=False"):
        prepare_config(c)
    c = context_config("runs/ae", None, "ctx/")
    with pytest.raises(ConfigError, match=r"^conditioning.context_dir='ctx/' needs latents.dir"):
        prepare_config(c)
    # Class labels, like contexts, are matched to extracted latents.
    c = tiny_diffusion_config("runs/ae", None)
    c.conditioning.num_classes, c.conditioning.labels_csv = 2, "labels.csv"
    with pytest.raises(ConfigError, match=r"^conditioning.labels_csv='labels.csv' needs "
                                          r"latents.dir"):
        prepare_config(c)
    c.latents.dir = "latents/"
    prepare_config(c)
    # The suggested fixes are accepted.
    prepare_config(context_config("runs/ae", "latents/", "ctx/"))
    c = tiny_diffusion_config("runs/ae", "latents/")
    c.conditioning.context_dir = ""
    prepare_config(c)


def test_context_data_errors(ae_workdir, latents_dir, context_dir, tmp_path):
    from ldm_jax.data.latents import read_contexts
    names = _names(latents_dir)
    with pytest.raises(DataError, match=r"conditioning.context_dir='.*nowhere' is not a "
                                        r"folder; give a folder with one NAME.npy per latent"):
        make_task(context_config(ae_workdir, latents_dir, str(tmp_path / "nowhere")))
    np.testing.assert_array_equal(read_contexts(context_dir, names, DIM)[0],
                                  np.load(os.path.join(context_dir, names[0] + ".npy")))
    d = tmp_path / "ctx"
    d.mkdir()
    for n in names[1:]:
        np.save(d / f"{n}.npy", np.zeros((S, DIM), np.float32))
    with pytest.raises(DataError, match=rf"has no context for 1 latent\(s\), e.g. "
                                        rf"\['{names[0]}.npy'\]"):
        read_contexts(str(d), names, DIM)
    np.save(d / f"{names[0]}.npy", np.zeros((DIM,), np.float32))  # (D,): S = 1
    with pytest.raises(DataError, match=r"have 2 different lengths S \[1, 3\]; give every "
                                        r"NAME.npy the same S"):
        read_contexts(str(d), names, DIM)
    np.save(d / f"{names[0]}.npy", np.zeros((S, DIM + 2), np.float32))
    with pytest.raises(DataError, match=rf"{names[0]}.npy has shape \(3, 6\); contexts must be "
                                        r"\(S, 4\) or \(4,\) \(unet.cross_attention_dim=4\)"):
        read_contexts(str(d), names, DIM)
    for n in names:
        np.save(d / f"{n}.npy", np.ones((DIM,), np.float32))
    assert read_contexts(str(d), names, DIM).shape == (len(names), 1, DIM)
