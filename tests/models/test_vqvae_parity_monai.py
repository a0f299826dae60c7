"""Our VQVAE is MONAI 1.6's `VQVAE`, weight for weight (float32): forward, indices, loss,
and the EMA codebook update of one training step.

MONAI models get random weights (torch.manual_seed), `vqvae_from_monai` maps them, and both
run on the same input (NCDHW for torch, (B, X, Y, Z, C) for us). Sizes are tiny (16^3 at
most) for a 2-core CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from ldm_jax.errors import ConversionError  # noqa: E402
from ldm_jax.models.vqvae import VQVAE  # noqa: E402
from ldm_jax.models.vqvae_convert import (  # noqa: E402
    monai_vqvae_kwargs,
    vqvae_from_monai,
    vqvae_to_monai,
)

pytestmark = pytest.mark.tap_conv  # the convolutions CPU runs use, against MONAI's

TOL = 1e-5

CASES = {
    # The original project's 3d_vq_ldm shape: channels (64, 128, 256) scaled by 1/4 for a
    # 2-core CPU, 2 residual layers, 256 codes of 32 dims, MONAI's default (2, 4, 1, 1) rows.
    "original_quarter": (dict(channels=(16, 32, 64), num_res_layers=2,
                              num_res_channels=(16, 32, 64), num_embeddings=256,
                              embedding_dim=32), (16, 16, 16)),
    # Dilation, output_padding, stride-1 levels, PReLU, dropout (off in eval), output_act,
    # kaiming codebook, one int for num_res_channels, an anisotropic volume.
    "prelu_dilated": (dict(channels=(8, 16), num_res_layers=1, num_res_channels=4,
                           downsample_parameters=((2, 3, 1, 1), (1, 3, 2, 2)),
                           upsample_parameters=((1, 3, 2, 2, 0), (2, 3, 1, 1, 1)),
                           num_embeddings=16, embedding_dim=4, embedding_init="kaiming_uniform",
                           act="PRELU", dropout=0.1, output_act="TANH", in_channels=2,
                           out_channels=3), (16, 16, 8)),
    # One level, no residual layers, one shared row, LeakyReLU with kwargs, stride 4.
    "leaky_one_level": (dict(channels=(8,), num_res_layers=0, num_res_channels=(8,),
                             downsample_parameters=(4, 4, 1, 0),
                             upsample_parameters=(4, 4, 1, 0, 0), num_embeddings=8,
                             embedding_dim=3, act=("leakyrelu", {"negative_slope": 0.2})),
                        (16, 16, 8)),
}


def _monai(kwargs, size=(16, 16, 16), seed=0):
    torch.manual_seed(seed)
    m = monai_nets.VQVAE(spatial_dims=3, **{"in_channels": 1, "out_channels": 1, **kwargs})
    vq = m.quantizer.quantizer
    with torch.no_grad():  # PReLU slopes away from 0.25, cluster sizes non-zero
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        vq.ema_cluster_size.uniform_(0.5, 2.0)
        # A codebook drawn like the latents (per-channel mean and std of another batch's),
        # so that many codes are used and the indices test something.
        z = m.encode(_input(kwargs, size, seed=2)).transpose(0, -1).reshape(vq.embedding_dim, -1)
        vq.embedding.weight.copy_(z.mean(1) + z.std(1) * torch.randn_like(vq.embedding.weight))
        vq.ema_w.copy_(vq.embedding.weight)
    return m


def _ours(kwargs):
    return VQVAE(**kwargs)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _input(kwargs, size, seed=1):
    torch.manual_seed(seed)
    return torch.randn(2, kwargs.get("in_channels", 1), *size)


def _ndhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def _jit(fn, *args):
    # XLA's cheap backend optimisation: these tests compile far more than they run.
    return jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})(*args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_vqvae_forward_matches_monai(case):
    kwargs, size = CASES[case]
    tm = _monai(kwargs, size).eval()
    xt = _input(kwargs, size)
    with torch.no_grad():
        zt = tm.encode(xt)
        qt, loss_t, idx_t = tm.quantizer.quantizer(zt)
        rec_t = tm.decode(qt)
    model = _ours(kwargs)
    variables = vqvae_from_monai(tm.state_dict(), model)

    def run(v, x):
        z = model.apply(v, x, method=model.encode)
        q, loss, idx = model.apply(v, z, method=model.quantize)
        rec, loss2 = model.apply(v, x)
        return z, q, loss, idx, rec, loss2

    z, q, loss, idx, rec, loss2 = _jit(run, variables, _ndhwc(xt))
    errs = dict(latent=_rel(z, _ndhwc(zt)), quantized=_rel(q, _ndhwc(qt)),
                loss=_rel(loss, loss_t.numpy()), recon=_rel(rec, _ndhwc(rec_t)))
    print(f"parity vqvae {case}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"; {int(np.unique(idx).size)} codes used")
    np.testing.assert_array_equal(np.asarray(idx), idx_t.numpy())
    assert rec.shape == (2, *size, kwargs.get("out_channels", 1))
    assert float(loss2) == float(loss)
    assert all(e <= TOL for e in errs.values()), errs


@pytest.mark.parametrize("case", ["original_quarter", "leaky_one_level"])
def test_vqvae_ema_update_matches_monai(case):
    kwargs, size = CASES[case]
    tm = _monai(kwargs, size).train()
    model = _ours(kwargs)
    variables = vqvae_from_monai(tm.state_dict(), model)
    xt = _input(kwargs, size)
    with torch.no_grad():
        rec_t, loss_t = tm(xt)
    vq = tm.quantizer.quantizer
    ref = dict(embedding=vq.embedding.weight.numpy(), ema_cluster_size=vq.ema_cluster_size.numpy(),
               ema_w=vq.ema_w.numpy())

    def step(v, x):
        (rec, loss), new = model.apply(v, x, train=True, mutable=["codebook"],
                                       rngs={"dropout": jax.random.key(0)})
        return rec, loss, new["codebook"]["quantizer"]

    rec, loss, book = _jit(step, variables, _ndhwc(xt))
    errs = {k: _rel(book[k], ref[k]) for k in ("embedding", "ema_cluster_size", "ema_w")}
    errs.update(recon=_rel(rec, _ndhwc(rec_t)), loss=_rel(loss, loss_t.numpy()))
    moved = float(np.max(np.abs(np.asarray(book["embedding"])
                                - variables["codebook"]["quantizer"]["embedding"])))
    print(f"ema update {case}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"; largest codebook change {moved:.2e}")
    assert moved > 0
    assert all(e <= TOL for e in errs.values()), errs


def test_vqvae_gradients_straight_through():
    kwargs, size = CASES["leaky_one_level"]
    model = _ours(kwargs)
    x = jnp.asarray(_ndhwc(_input(kwargs, size)))
    v = model.init(jax.random.key(0), x)
    g = jax.grad(lambda p: model.apply({**v, "params": p}, x)[0].sum())(v["params"])
    assert float(jnp.abs(g["encoder"]["blocks_0"]["conv"]["kernel"]).max()) > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_vqvae_converter_round_trip(case):
    kwargs, _ = CASES[case]
    sd = _monai(kwargs).state_dict()
    model = _ours(kwargs)
    back = vqvae_to_monai(vqvae_from_monai(sd, model), model)
    assert list(back) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k].numpy(), sd[k].numpy(), err_msg=k)
    # Our own init goes to MONAI (strict) and MONAI's constructor takes our kwargs.
    fresh = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, model.in_channels)))
    m2 = monai_nets.VQVAE(**monai_vqvae_kwargs(model))
    m2.load_state_dict(vqvae_to_monai(fresh, model), strict=True)


def test_vqvae_from_monai_names_the_problem():
    kwargs, _ = CASES["leaky_one_level"]
    sd = _monai(kwargs).state_dict()
    model = _ours(kwargs)
    missing = {k: v for k, v in sd.items() if k != "quantizer.quantizer.ema_w"}
    with pytest.raises(ConversionError, match=r"quantizer\.quantizer\.ema_w"):
        vqvae_from_monai(missing, model)
    with pytest.raises(ConversionError, match="shape mismatch"):
        vqvae_from_monai(sd, _ours(dict(kwargs, embedding_dim=4)))


@pytest.mark.parametrize("train", [False, True])
def test_ema_quantizer_alone_matches_monai(train):
    # Many vectors against the original's 256 x 32 codebook: most codes receive some.
    from monai.networks.layers.vector_quantizer import EMAQuantizer as MonaiEMAQuantizer

    from ldm_jax.models.vqvae import EMAQuantizer

    torch.manual_seed(0)
    tq = MonaiEMAQuantizer(3, 256, 32, commitment_cost=0.3, decay=0.9, epsilon=1e-4,
                           ddp_sync=False).train(train)
    with torch.no_grad():
        tq.ema_cluster_size.uniform_(0.0, 3.0)
    book = {"embedding": tq.embedding.weight.numpy().copy(),
            "ema_cluster_size": tq.ema_cluster_size.numpy().copy(),
            "ema_w": tq.ema_w.numpy().copy()}
    zt = torch.randn(2, 32, 8, 8, 8)
    with torch.no_grad():
        qt, loss_t, idx_t = tq(zt)
    q = EMAQuantizer(256, 32, commitment_cost=0.3, decay=0.9, epsilon=1e-4)
    (qq, loss, idx), new = q.apply({"codebook": book}, jnp.asarray(_ndhwc(zt)), train,
                                   mutable=["codebook"])
    np.testing.assert_array_equal(np.asarray(idx), idx_t.numpy())
    errs = {"quantized": _rel(qq, _ndhwc(qt)), "loss": _rel(loss, loss_t.numpy())}
    if train:
        ref = {"embedding": tq.embedding.weight, "ema_cluster_size": tq.ema_cluster_size,
               "ema_w": tq.ema_w}
        errs.update({k: _rel(new["codebook"][k], v.numpy()) for k, v in ref.items()})
    print(f"EMAQuantizer train={train}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + f"; {int(np.unique(idx).size)} of 256 codes used")
    assert all(e <= TOL for e in errs.values()), errs


def test_vqvae_bfloat16_runs():
    kwargs, size = CASES["prelu_dilated"]
    model = _ours(dict(kwargs, dtype="bfloat16"))
    x = jnp.asarray(_ndhwc(_input(kwargs, size)))
    v = model.init(jax.random.key(0), x)
    (rec, loss), new = model.apply(v, x, train=True, mutable=["codebook"],
                                   rngs={"dropout": jax.random.key(1)})
    assert rec.dtype == jnp.bfloat16 and loss.dtype == jnp.float32
    assert new["codebook"]["quantizer"]["embedding"].dtype == jnp.float32
    assert bool(jnp.isfinite(rec.astype(jnp.float32)).all())
