"""benchmarks.hlo_flops: the loop iterations XLA's cost analysis leaves out."""

import jax
import jax.numpy as jnp

from benchmarks.hlo_flops import loop_flops_correction, matmul_flops, parse_computations
from ldm_jax.models.chunked_attention import chunked_attention


def _compiled(fn, *shapes):
    return jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile()


def test_nested_scans_are_counted_trip_count_times():
    def f(x):
        def outer(c, _):
            return jax.lax.scan(lambda d, _: (d @ x, None), c, None, length=3)[0], None
        return jax.lax.scan(outer, x, None, length=4)[0]

    c = _compiled(f, (64, 64))
    one = 2 * 64 ** 3
    assert c.cost_analysis()["flops"] < 2 * one  # XLA: the body once
    assert loop_flops_correction(c.as_text()) == 11 * one
    comps, entry = parse_computations(c.as_text())
    assert matmul_flops(comps, entry, True) == 12 * one


def test_loop_free_programs_need_no_correction():
    c = _compiled(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")),
        (1, 8, 8, 8, 4), (3, 3, 3, 4, 6))
    assert loop_flops_correction(c.as_text()) == 0.0
    comps, entry = parse_computations(c.as_text())
    assert matmul_flops(comps, entry) == 2 * 8 ** 3 * 6 * 27 * 4  # window x in-features


def test_chunked_attention_costs_what_plain_attention_costs():
    t, d = 512, 16

    def chunked(q, k, v):
        return chunked_attention(q, k, v, query_chunk=128, key_chunk=64)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v)

    shape = (1, t, 1, d)
    flops = {}
    for name, fn in (("chunked", chunked), ("plain", plain)):
        c = _compiled(fn, shape, shape, shape)
        flops[name] = c.cost_analysis()["flops"] + loop_flops_correction(c.as_text())
    assert abs(flops["chunked"] / flops["plain"] - 1) < 0.1  # 2 matmuls of 2 T^2 D each
    assert flops["chunked"] >= 2 * 2 * t * t * d
