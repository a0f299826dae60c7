"""benchmarks.memory_listing: the buffers live at a compiled program's peak, and who made them."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import memory_listing as ml

LIVE_RANGE = """HloLiveRange (max 5):
  InstructionSequence:
    0:p
    1:big
  BufferLiveRange:
    p{}:0-5
  Live ranges at 3 (peak):
    big{}: 4000000 bytes (cumulative: 4000000 bytes)
    tup{1}: 1000 bytes (cumulative: 4001000 bytes)
    p{}: 200 bytes (cumulative: 4001200 bytes)
  Stack trace breakdown for peak usage: 4 001 200 bytes
"""

HLO = """HloModule m, is_scheduled=true

FileNames
1 "/src/ldm_jax/models/layers.py"

FunctionNames
1 "attention"

FileLocations
1 {file_name_id=1 function_name_id=1 line=178 end_line=178 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}


ENTRY %main (p: f32[10,5]) -> f32[1000,1000] {
  %p = f32[10,5]{1,0} parameter(0)
  %tup = (f32[2], f32[250]{0}) fusion(%p), kind=kLoop, calls=%c
  ROOT %big = f32[1000,1000]{1,0} fusion(%p), kind=kLoop, calls=%c2, metadata={op_name="jit(f)/jvp(Model)/attn/dot_general" stack_frame_id=1}
}
"""


def test_parsers_name_size_shape_op_and_source():
    index, values = ml.peak_values(LIVE_RANGE)
    assert index == 3
    assert values == [("big", 4_000_000), ("tup{1}", 1000), ("p", 200)]
    rows = ml.largest_live_buffers(LIVE_RANGE, HLO, top=2)
    assert [r.value for r in rows] == ["big", "tup{1}"]
    big = rows[0]
    assert big.opcode == "fusion" and big.shape.startswith("f32[1000,1000]")
    assert big.op_name == "jit(f)/jvp(Model)/attn/dot_general"
    assert big.source == "layers.py:178"
    assert rows[1].instruction == "tup" and rows[1].op_name == ""
    assert rows[1].shape == "f32[250]{0}"  # element 1 of the tuple
    assert ml.element_shape("(s32[], (f32[2]{0}, u8[3]))", "w{1,1}") == "u8[3]"
    table = ml.format_buffers(rows)
    assert "| 1 | 4.0 | f32[1000,1000] | big (fusion) |" in table
    with pytest.raises(ValueError, match="peak"):
        ml.peak_values("HloLiveRange (max 1):\n")


def test_compiled_attention_gradient_shows_its_score_matrix(tmp_path):
    """Plain softmax attention's gradient keeps a (T, T) float32 matrix: it must top the list."""
    t, d = 384, 8

    def loss(x):
        s = jnp.einsum("td,sd->ts", x, x)
        return jnp.sum(jax.nn.softmax(s, axis=-1) @ x)

    lowered = jax.jit(jax.grad(loss)).lower(jax.ShapeDtypeStruct((t, d), jnp.float32))
    compiled, rows = ml.compile_with_listing(lowered, top=4)
    assert len(rows) >= 2
    assert rows[0].bytes == t * t * 4 and rows[0].shape.startswith(f"f32[{t},{t}]")
    assert all(r.bytes >= s.bytes for r, s in zip(rows, rows[1:]))
    assert any("jvp" in r.op_name or "transpose" in r.op_name for r in rows)
    assert any(r.source.startswith("test_memory_listing.py:") for r in rows)
    # The heap simulator's peak set fits in what the memory analysis reports.
    m = compiled.memory_analysis()
    assert sum(r.bytes for r in rows) <= m.temp_size_in_bytes + m.argument_size_in_bytes


def test_read_dump_says_when_there_is_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="live-range"):
        ml.read_dump(str(tmp_path))
