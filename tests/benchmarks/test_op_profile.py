"""benchmarks.op_profile: the trace of a real tiny step is split into categories that add up,
with every op found in the compiled module; nesting (a while's body) is not counted twice."""

from benchmarks import bench, op_profile
from tests.tiny import tiny_config


def test_tiny_step_split_adds_up_and_names_real_ops():
    row, s = op_profile.profile(bench.bench_config(tiny_config(), batch=1), steps=2, warmup=1,
                                top=10)
    cats = {r["category"]: r["ms"] for r in s["categories"]}
    assert set(cats) == set(op_profile.CATEGORIES) | {"outside ops"}
    assert s["module"] == "jit_train_step" and s["steps_traced"] == 2
    assert abs(sum(cats.values()) - s["step_ms"]) < 1e-6 * s["step_ms"]
    assert abs(sum(cats[c] for c in op_profile.CATEGORIES) - s["ops_ms"]) < 1e-6 * s["ops_ms"]
    assert s["ops_ms"] > 0 and min(cats[c] for c in op_profile.CATEGORIES) >= 0
    # The convolutions run: as XLA convolutions or as the tap convolutions' dots.
    assert cats["convolution"] + cats["dot"] > 0
    assert len(s["top"]) == 10 and all(t["opcode"] != "?" for t in s["top"])
    assert all(t["category"] != "other" for t in s["top"])


def test_nested_events_count_their_own_time_once():
    def ev(name, ts, dur, run="1", tid=1):
        return dict(ph="X", pid=1, tid=tid, ts=ts, dur=dur, name=name,
                    args=dict(hlo_module="m", hlo_op=name, run_id=run))
    events = [ev("while.1", 0, 10), ev("dot.1", 1, 3), ev("dot.2", 5, 4), ev("copy.1", 12, 2),
              ev("dot.1", 0, 7, run="2", tid=2),
              dict(ph="X", pid=1, tid=1, ts=20, dur=5, name="other module",
                   args=dict(hlo_module="n", hlo_op="x"))]
    got = {(n, r): t for n, t, r in op_profile.op_self_times(events, "m")}
    assert got == {("while.1", "1"): 3, ("dot.1", "1"): 3, ("dot.2", "1"): 4,
                   ("copy.1", "1"): 2, ("dot.1", "2"): 7}


def test_fusions_are_categorised_by_what_they_contain():
    hlo = """HloModule m

%fused_conv (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4] parameter(0)
  %p1 = f32[4] parameter(1)
  ROOT %c = f32[4] convolution(%p0, %p1), dim_labels=b0f_0io->b0f
}

%fused_layout (p0: f32[4]) -> f32[4] {
  %p0 = f32[4] parameter(0)
  ROOT %t = f32[4] transpose(%p0), dimensions={0}
}

%fused_ew (p0: f32[4]) -> f32[4] {
  %p0 = f32[4] parameter(0)
  ROOT %e = f32[4] exponential(%p0)
}

ENTRY %main (a: f32[4], b: f32[4]) -> f32[4] {
  %a = f32[4] parameter(0)
  %b = f32[4] parameter(1)
  %f1 = f32[4] fusion(%a, %b), kind=kOutput, calls=%fused_conv
  %f2 = f32[4] fusion(%f1), kind=kLoop, calls=%fused_layout
  %f3 = f32[4] fusion(%f2), kind=kLoop, calls=%fused_ew
  ROOT %d = f32[4] dynamic-slice(%f3, %a), dynamic_slice_sizes={4}
}
"""
    cats = {k: v[0] for k, v in op_profile.categorize(hlo).items()}
    assert (cats["f1"], cats["f2"], cats["f3"], cats["d"]) == (
        "convolution", "copy/layout", "elementwise", "dynamic-slice")
    assert op_profile.module_name(hlo) == "m"
