"""MONAI <-> ldm-jax conversion both ways, state dicts as people save them, and the export CLI.

Round trips are exact (transposes only); the forward direction's numerics are covered by
tests/models/test_parity_monai.py, the way back's here (MONAI strict-loads `to_monai` output of
our own random params and computes what our model computes).
"""

import json
import os
import pickle
import re
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from ldm_jax.cli import export as export_cli  # noqa: E402
from ldm_jax.errors import ConfigError  # noqa: E402
from ldm_jax.models import build_autoencoder, build_discriminator  # noqa: E402
from ldm_jax.models.convert import (  # noqa: E402
    ConversionError,
    discriminator_from_monai,
    discriminator_to_monai,
    from_monai,
    monai_autoencoder_kwargs,
    monai_discriminator_kwargs,
    monai_incompatibilities,
    to_monai,
)
from ldm_jax.models.state_dict import load_state_dict  # noqa: E402
from tests.tiny import tiny_config, train_tiny  # noqa: E402

TOL = 1e-5
BASE = dict(in_channels=1, out_channels=1, latent_channels=3, norm_num_groups=4, norm_eps=1e-6,
            initial_downsample_factor=1, downsample_factors=None, use_conv_downsample=True,
            upsample_head="nearest_conv", strided_kernel=None, dtype="float32", remat="none")
CASES = {
    "attn_mid": dict(num_channels=(8, 16), num_res_blocks=1, attention_levels=(False, True),
                     with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True,
                     use_convtranspose=False),
    "deconv_no_mid": dict(num_channels=(8, 16), num_res_blocks=(2, 1),
                          attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                          with_decoder_nonlocal_attn=False, use_convtranspose=True),
    "all": dict(num_channels=(8, 8, 16), num_res_blocks=1, attention_levels=(True, False, True),
                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=True,
                use_convtranspose=True, in_channels=2, out_channels=3),
}
DISC = dict(in_channels=1, out_channels=1, num_layers_d=2, num_channels=8, kernel_size=4,
            dtype="float32")


def _cfg(case):
    return dict(BASE, **CASES[case])


def _monai_ae(cfg, seed=0):
    torch.manual_seed(seed)
    m = monai_nets.AutoencoderKL(**monai_autoencoder_kwargs(cfg))
    with torch.no_grad():  # non-trivial norm affines and biases
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _monai_disc(norm, seed=0):
    torch.manual_seed(seed)
    m = monai_nets.PatchDiscriminator(**monai_discriminator_kwargs(dict(DISC, norm=norm)))
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def _assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _random_like(shapes, seed):
    """numpy N(0, 0.2) arrays in the shapes of an eval_shape tree (no eager init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_autoencoder_round_trip_is_exact(case):
    cfg = _cfg(case)
    sd = _monai_ae(cfg).state_dict()
    back = to_monai(from_monai(sd, cfg), cfg)
    _assert_same_state_dict(sd, back)
    fresh = monai_nets.AutoencoderKL(**monai_autoencoder_kwargs(cfg))
    fresh.load_state_dict(back, strict=True)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_discriminator_round_trip_is_exact(norm):
    cfg = dict(DISC, norm=norm)
    sd = _monai_disc(norm).state_dict()
    variables = discriminator_from_monai(sd, cfg)
    assert set(variables) == ({"params", "batch_stats"} if norm == "batch" else {"params"})
    _assert_same_state_dict(sd, discriminator_to_monai(variables, cfg))
    if norm == "instance":  # bare params are enough without running statistics
        _assert_same_state_dict(sd, discriminator_to_monai(variables["params"], cfg))


def test_converted_params_do_not_follow_later_in_place_updates():
    """BatchNorm running statistics change in place in torch; the converted copy must not."""
    model = _monai_disc("batch")
    variables = discriminator_from_monai(model.state_dict(), dict(DISC, norm="batch"))
    before = jax.tree_util.tree_map(np.array, variables)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    after = jax.tree_util.tree_leaves(variables)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before), after))


def test_monai_computes_what_our_autoencoder_computes():
    """Our own random params -> to_monai -> MONAI strict load: same encode and decode."""
    cfg = dict(_cfg("attn_mid"), use_convtranspose=True, in_channels=2, out_channels=3)
    model = build_autoencoder(cfg)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 8, 2)).astype(np.float32)
    params = _random_like(jax.eval_shape(lambda x: model.init(
        {"params": jax.random.key(0), "sample": jax.random.key(1)}, x, sample=False), x[:1])
        ["params"], 2)
    tm = monai_nets.AutoencoderKL(**monai_autoencoder_kwargs(cfg)).eval()
    tm.load_state_dict(to_monai(params, cfg), strict=True)
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
        mu_t, sigma_t = tm.encode(xt)
        rec_t = tm.decode(mu_t)

    def run(params, x):
        v = {"params": params}
        mu, sigma = model.apply(v, x, method=model.encode)
        return mu, sigma, model.apply(v, mu, method=model.decode)

    mu, sigma, rec = jax.jit(run)(params, x)
    for ours, theirs in ((mu, mu_t), (sigma, sigma_t), (rec, rec_t)):
        assert _rel(ours, theirs.numpy().transpose(0, 2, 3, 4, 1)) <= TOL
    assert rec.shape == (2, 16, 16, 8, 3)


def test_monai_computes_what_our_discriminator_computes():
    cfg = dict(DISC, norm="batch")
    model = build_discriminator(cfg)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    variables = _random_like(jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                                                 train=False), x), 3)
    variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
    tm = monai_nets.PatchDiscriminator(**monai_discriminator_kwargs(cfg)).eval()
    tm.load_state_dict(discriminator_to_monai(variables, cfg), strict=True)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()))
    out = model.apply(variables, x, train=False)
    assert len(out) == len(ref) == 4
    for o, r in zip(out, ref):
        assert _rel(o, r.numpy().transpose(0, 2, 3, 4, 1)) <= TOL


def test_to_monai_errors():
    cfg = _cfg("attn_mid")
    params = from_monai(_monai_ae(cfg).state_dict(), cfg)
    with pytest.raises(ConversionError, match=r"shape mismatch at /decoder/conv_in/kernel: "
                       r"\(3, 3, 3, 3, 16\) in the params"):
        to_monai(params, dict(cfg, latent_channels=4))
    with pytest.raises(ConversionError, match="/decoder/level_1/attn_0 is missing from the params"):
        to_monai(params, dict(cfg, attention_levels=(True, True)))
    stem = dict(cfg, initial_downsample_factor=2, upsample_head="subpixel",
                downsample_factors=(4,))
    problems = monai_incompatibilities(stem)
    assert len(problems) == 2
    with pytest.raises(ConfigError, match=r"to_monai needs a MONAI-compatible autoencoder "
                       r"config: initial_downsample_factor must be 1 \(got \(2, 2, 2\).*"
                       r"downsample_factors must all be 2"):
        to_monai(params, stem)


# -- state dicts as people save them ---------------------------------------------------------

def _old_generative_names(sd):
    """MONAI 1.6 names -> MONAI GenerativeModels' (the inverse of load_old_state_dict)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.attn\.to_([qkv])\.", r".to_\1.", k)
        k = k.replace(".attn.out_proj.", ".proj_attn.")
        k = k.replace(".postconv.conv.", ".conv.conv.")
        out[k] = v
    return out


def _forms(sd, tmp_path):
    p = lambda prefix: {prefix + k: v for k, v in sd.items()}  # noqa: E731
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": p("module."),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    old = _old_generative_names(sd)
    assert len(set(old) - set(sd)) > 10  # the renaming did something
    return {
        "module.": p("module."),
        "_orig_mod.": p("_orig_mod."),
        "module._orig_mod.": p("module._orig_mod."),
        "model.": p("model."),
        "nested state_dict with module.": {"state_dict": p("module."), "epoch": 7},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}},
        "autoencoder + discriminator": {"autoencoder": sd,
                                        "discriminator": _monai_disc("batch").state_dict()},
        "model preferred over ema": {"model": sd, "ema": {k: v + 1 for k, v in sd.items()}},
        "model. preferred over ema.": {"state_dict": dict(
            p("model."), **{"ema." + k: v + 1 for k, v in sd.items()})},
        ".pt path (str)": str(path),
        ".pt path (Path)": path,
        "nn.Module": None,  # filled by the caller
        "numpy values": {k: v.numpy() for k, v in sd.items()},
        "GenerativeModels names": old,
        "GenerativeModels names under module.": {"module." + k: v for k, v in old.items()},
    }


def test_wrapped_autoencoder_state_dicts_give_the_same_params(tmp_path):
    cfg = _cfg("attn_mid")  # attention in the encoder, decoder and both mid blocks
    tm = _monai_ae(cfg)
    sd = tm.state_dict()
    plain = from_monai(sd, cfg)
    forms = _forms(sd, tmp_path)
    forms["nn.Module"] = tm
    for name, form in forms.items():
        try:
            _assert_same_tree(from_monai(form, cfg), plain)
        except (AssertionError, ConversionError) as e:
            raise AssertionError(f"{name}: {e}") from e


def test_wrapped_discriminator_state_dicts(tmp_path):
    cfg = dict(DISC, norm="batch")
    sd = _monai_disc("batch").state_dict()
    plain = discriminator_from_monai(sd, cfg)
    path = tmp_path / "d.pth"
    torch.save({"discriminator": {"module." + k: v for k, v in sd.items()},
                "autoencoder": _monai_ae(_cfg("attn_mid")).state_dict()}, path)
    for form in ({"_orig_mod." + k: v for k, v in sd.items()}, path):
        _assert_same_tree(discriminator_from_monai(form, cfg), plain)
    no_counter = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    _assert_same_tree(discriminator_from_monai(no_counter, cfg), plain)


def test_unrelated_keys_name_the_prefix_and_the_unknown_keys():
    w = torch.zeros(3, 3)
    junk = {f"backbone.layer{i}.weight": w for i in range(4)}
    with pytest.raises(ConversionError) as e:
        from_monai(junk, _cfg("attn_mid"))
    msg = str(e.value)
    assert "0 of " in msg and "common prefix 'backbone.'" in msg
    assert "4 unknown, first: 'backbone.layer0.weight', 'backbone.layer1.weight'" in msg
    assert "missing, first: 'encoder.blocks.0.conv.weight'" in msg
    assert "\n" not in msg


def test_other_config_lists_the_keys_that_differ():
    sd = {"module." + k: v for k, v in _monai_ae(_cfg("attn_mid")).state_dict().items()}
    with pytest.raises(ConversionError) as e:
        from_monai(sd, dict(_cfg("attn_mid"), attention_levels=(False, False)))
    msg = str(e.value)
    assert "after removing the prefix 'module.'" in msg
    assert "unknown, first: 'module.encoder.blocks.4.norm.weight'" in msg
    assert "attention_levels" in msg  # the hint


def test_state_dict_loader_edge_cases(tmp_path):
    sd = {"a.weight": np.zeros(2), "b.weight": np.ones(2)}
    assert list(load_state_dict({"x": sd}, ["b.weight", "a.weight"])) == ["b.weight", "a.weight"]
    with pytest.raises(ConversionError, match=r"several state dicts .*\['one'\], \['two'\]"):
        load_state_dict({"one": sd, "two": sd}, ["a.weight", "b.weight"])
    two = {"student.a.weight": np.zeros(2), "teacher.a.weight": np.ones(2)}
    with pytest.raises(ConversionError, match=r"keys under 'student.' and under 'teacher.'"):
        load_state_dict(two, ["a.weight"])
    with pytest.raises(ConversionError, match="found no state dict"):
        load_state_dict({"epoch": 3}, ["a.weight"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt", ["a.weight"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not a checkpoint torch.load can read"):
        load_state_dict(bad, ["a.weight"])
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {k: torch.zeros(2) for k in sd}, "obj": _Unsafe()}, unsafe)
    with pytest.raises(ConversionError, match=r"weights_only=True\) refused .*Unsupported "
                       r"global: GLOBAL tests.models.test_convert._Unsafe\)"):
        load_state_dict(unsafe, ["a.weight"])
    # torch 2.13 words a blocked module's function differently: the same refusal.
    blocked = tmp_path / "blocked.pt"
    torch.save({"state_dict": {k: torch.zeros(2) for k in sd}, "hook": os.system}, blocked)
    with pytest.raises(ConversionError, match=r"refused .*: it holds objects other than "
                       r"tensors .*unsupported GLOBAL posix.system"):
        load_state_dict(blocked, ["a.weight"])
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump({k: torch.zeros(2) for k in sd}, f)
    with pytest.raises(ConversionError, match=r"refused .*: it is a plain pickle .*"
                       r"Unsupported operand"):
        load_state_dict(plain, ["a.weight"])


class _Unsafe:  # not on torch's weights_only allow-list
    pass


# -- the export command ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("run"))


def test_export_cli_writes_what_monai_loads(workdir, tmp_path, capsys):
    import ldm_jax
    out, disc = tmp_path / "out" / "model.pt", tmp_path / "out" / "disc.pt"
    argv = ["prog", f"--workdir={workdir}", f"--output={out}", f"--discriminator={disc}",
            "--step=latest"]
    assert export_cli.main(argv) == 0
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["class"] == "monai.networks.nets.AutoencoderKL" and meta["source"]["step"] == 2
    assert meta["kwargs"]["channels"] == [8, 16] and meta["kwargs"]["latent_channels"] == 2
    tm = monai_nets.AutoencoderKL(**meta["kwargs"]).eval()
    tm.load_state_dict(torch.load(out, weights_only=True), strict=True)

    ae = ldm_jax.load_autoencoder(workdir, "latest")
    x = np.random.default_rng(0).uniform(size=(1, 16, 16, 8, 1)).astype(np.float32)
    mu, _ = ae.encode(x)
    with torch.no_grad():
        mu_t, _ = tm.encode(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()))
        rec_t = tm.decode(mu_t)
    assert _rel(mu, mu_t.numpy().transpose(0, 2, 3, 4, 1)) <= TOL
    assert _rel(ae.decode(mu), rec_t.numpy().transpose(0, 2, 3, 4, 1)) <= TOL

    dmeta = json.loads((tmp_path / "out" / "disc.json").read_text())
    td = monai_nets.PatchDiscriminator(**dmeta["kwargs"])
    dsd = torch.load(disc, weights_only=True)
    td.load_state_dict(dsd, strict=True)
    assert float(dsd["0.adn.N.running_var"].sub(1).abs().max()) > 0  # trained statistics

    assert export_cli.main(argv) == 2  # exists, no --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export_cli.main(argv + ["--overwrite"]) == 0


def test_export_without_torch_is_one_line(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert export_cli.main(["prog", f"--workdir={workdir}",
                            f"--output={tmp_path / 'm.pt'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs torch: pip install torch" in err
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "m.pt")


def test_export_refuses_a_model_monai_cannot_hold(tmp_path, capsys):
    """A strided stem with the subpixel head: saved from init (no training needed)."""
    from ldm_jax import checkpoint as ckpt
    from ldm_jax import sharding
    from ldm_jax.autoencoder.config import prepare_config
    from ldm_jax.autoencoder.task import AutoencoderTask
    from ldm_jax.trainer.loop import init_train_state
    config = tiny_config()
    config.autoencoder.initial_downsample_factor = 2
    config.autoencoder.upsample_head = "subpixel"
    config = prepare_config(config)
    state, _ = init_train_state(AutoencoderTask(config), sharding.make_mesh(config.mesh))
    manager = ckpt.make_manager(str(tmp_path / "run"))
    ckpt.save(manager, 1, state, config)
    manager.close()
    assert export_cli.main(["prog", f"--workdir={tmp_path / 'run'}",
                            f"--output={tmp_path / 'm.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "is not MONAI-compatible" in err
    assert "initial_downsample_factor must be 1 (got (2, 2, 2)" in err
    assert not os.path.exists(tmp_path / "m.pt")
