"""Matmul FLOPs that XLA's cost analysis misses in while loops, from optimised HLO text.

`compiled.cost_analysis()["flops"]` counts the body of a `while` loop once, whatever its
trip count (`lax.scan`, `lax.map`, `fori_loop`): a program that runs a 128^3 matmul ten
times in a scan reports the FLOPs of one. `loop_flops_correction(compiled.as_text())`
returns what is missing: for every loop with a known trip count n (XLA writes it into
the loop's `backend_config` as `known_trip_count`), (n - 1) x the dot and convolution
FLOPs of its body, nested loops multiplied through. Add it to the cost analysis' figure.

Counted: `dot` (2 x output elements x contracted size) and `convolution` (2 x output
elements x kernel window x input features per group), including inside fusions; not
elementwise work (a few percent of an attention block's FLOPs). A loop without a known
trip count is counted once, as XLA does.
"""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?(?P<name>[\w.\-]+) \(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) "
                    r"(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_ARRAY = re.compile(r"^[a-z]+\d*\[(?P<dims>[\d,]*)\]")
_PARAM = re.compile(r"%?([\w.\-]+): ([a-z]+\d*\[[\d,]*\])")


def _dims(shape: str):
    m = _ARRAY.match(shape.strip())
    if not m:
        return None
    return [int(d) for d in m.group("dims").split(",") if d]


def _attr(attrs: str, key: str):
    m = re.search(key + r"=\{([^}]*)\}", attrs)
    return m.group(1) if m else None


def parse_computations(hlo_text: str) -> tuple[dict[str, list[dict]], str | None]:
    """({computation: [instruction dicts]}, entry computation name) of an HLO module text."""
    comps: dict[str, list[dict]] = {}
    entry = None
    current = None
    shapes: dict[str, str] = {}
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group("name")
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            shapes = {n: s for n, s in _PARAM.findall(line.split("->")[0])}
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        operands = [o.strip().lstrip("%").split(" ")[-1].lstrip("%")
                    for o in m.group("operands").split(",") if o.strip()]
        inst = dict(name=m.group("name"), shape=m.group("shape"), op=m.group("op"),
                    operands=[shapes.get(o, "") for o in operands], attrs=m.group("attrs"))
        shapes[inst["name"]] = inst["shape"]
        comps[current].append(inst)
    return comps, entry


def _dot_flops(inst) -> float:
    out = _dims(inst["shape"])
    lhs = _dims(inst["operands"][0]) if inst["operands"] else None
    contracting = _attr(inst["attrs"], "lhs_contracting_dims")
    if out is None or lhs is None or contracting is None:
        return 0.0
    k = math.prod(lhs[int(i)] for i in contracting.split(",") if i.strip())
    return 2.0 * math.prod(out) * k


def _conv_flops(inst) -> float:
    out = _dims(inst["shape"])
    rhs = _dims(inst["operands"][1]) if len(inst["operands"]) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst["attrs"])
    if out is None or rhs is None or not labels:
        return 0.0
    rhs_labels = labels.group(1)
    window = math.prod(d for d, c in zip(rhs, rhs_labels) if c.isdigit())
    in_features = rhs[rhs_labels.index("i")]
    return 2.0 * math.prod(out) * window * in_features


def _trip_count(attrs: str) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    return int(m.group(1)) if m else 1


def matmul_flops(comps, name, with_trip_counts=True, _memo=None) -> float:
    """Dot + convolution FLOPs of computation `name`, loops x trip count (or x 1)."""
    memo = {} if _memo is None else _memo
    key = (name, with_trip_counts)
    if key in memo:
        return memo[key]
    memo[key] = 0.0  # recursion guard
    total = 0.0
    for inst in comps.get(name, []):
        op, attrs = inst["op"], inst["attrs"]
        if op == "dot":
            total += _dot_flops(inst)
        elif op == "convolution":
            total += _conv_flops(inst)
        if op == "while":
            body = re.search(r"body=%?([\w.\-]+)", attrs)
            n = _trip_count(attrs) if with_trip_counts else 1
            if body:
                total += n * matmul_flops(comps, body.group(1), with_trip_counts, memo)
            continue
        branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        if branches:  # as XLA: the most expensive branch
            total += max((matmul_flops(comps, b.strip().lstrip("%"), with_trip_counts, memo)
                          for b in branches.group(1).split(",")), default=0.0)
            continue
        for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", attrs):
            total += matmul_flops(comps, called, with_trip_counts, memo)
    memo[key] = total
    return total


def loop_flops_correction(hlo_text: str) -> float:
    """Matmul FLOPs XLA's cost analysis leaves out by counting loop bodies once (>= 0)."""
    comps, entry = parse_computations(hlo_text)
    if entry is None:
        return 0.0
    return max(0.0, matmul_flops(comps, entry, True) - matmul_flops(comps, entry, False))
