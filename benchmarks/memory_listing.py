"""The largest buffers live at the peak of a compiled XLA program, and the op that made each.

    compiled, rows = compile_with_listing(jax.jit(f).lower(*args), top=10)
    print(format_buffers(rows))

Why: XLA's memory analysis (`compiled.memory_analysis()`) gives one total; to cut memory
one needs to know *what* is live when the total peaks. On CPU JAX exposes no buffer
assignment through its API (`CompiledMemoryStats.serialized_buffer_assignment_proto` is
empty), so this compiles once more with XLA's dump switched on for that compile only
(`compiler_options={"xla_dump_to": DIR, "xla_dump_hlo_as_text": True}`) and reads two of
the files XLA writes:

- `*after_optimizations-live-range.txt` (`HloLiveRange`): the heap simulator's schedule
  and, under "Live ranges at N (peak)", every value live at the peak with its size;
- `*after_optimizations.txt`: the optimised HLO, which names each value's instruction,
  its shape, its JAX op (`metadata.op_name`, e.g. `jit(step)/jvp(AutoencoderKL)/decoder/
  level_0/attn_0/dot_general`) and the Python line that traced it (`stack_frame_id`).

The parsers are pure functions of those texts (tested on a small program). The sizes are
the heap simulator's: parameters and outputs included, fragmentation not (so the listed
total can be a little below `argument + output - alias + temp`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from dataclasses import asdict, dataclass

LIVE_RANGE_SUFFIX = "after_optimizations-live-range.txt"
HLO_SUFFIX = "after_optimizations.txt"

_PEAK_HEADER = re.compile(r"^\s*Live ranges at (\d+) \(peak\):\s*$")
_PEAK_ROW = re.compile(r"^\s*(\S+?)(\{[\d,]*\})?: (\d+) bytes")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<opcode>[\w\-]+)\((?P<rest>.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')


@dataclass(frozen=True)
class Buffer:
    """One value live at the peak: `bytes` of `shape`, made by HLO `instruction` (`opcode`)."""

    value: str  # HLO value, e.g. "add_multiply_fusion" or "fusion.3{1}" (tuple element)
    bytes: int
    instruction: str
    opcode: str  # "fusion", "convolution", "parameter", ...
    shape: str  # e.g. "f32[1,24,24,16,64]{4,3,2,1,0}" (of the element, for a tuple element)
    op_name: str  # JAX's name scope of the op ("" when XLA made it, e.g. a copy)
    source: str  # "file.py:line" of the traced Python call ("" when unknown)

    def as_dict(self):
        return asdict(self)


def dump_options(directory: str) -> dict:
    """`compiler_options` that make XLA dump the optimised HLO and its live ranges to `directory`."""
    return {"xla_dump_to": str(directory), "xla_dump_hlo_as_text": True}


def peak_values(live_range_text: str) -> tuple[int, list[tuple[str, int]]]:
    """(schedule position of the peak, [(value, bytes)]) from an HloLiveRange dump.

    Raises ValueError when the text has no "Live ranges at N (peak)" section.
    """
    lines = live_range_text.splitlines()
    for i, line in enumerate(lines):
        m = _PEAK_HEADER.match(line)
        if m:
            break
    else:
        raise ValueError("no 'Live ranges at N (peak)' section in the live-range dump")
    values = []
    for line in lines[i + 1:]:
        row = _PEAK_ROW.match(line)
        if not row:
            break
        index = row.group(2) or "{}"
        name = row.group(1) + ("" if index == "{}" else index)
        values.append((name, int(row.group(3))))
    return int(m.group(1)), values


def _stack_frames(hlo_text: str) -> dict[int, str]:
    """stack_frame_id -> "file.py:line" from the FileNames/FileLocations/StackFrames tables."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo_text.splitlines():
        s = line.strip()
        if s.startswith(("%", "ENTRY")):  # the computations follow the tables
            break
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = tables.setdefault(s, {})
        elif section is not None and s.split(" ", 1)[0].isdigit():
            key, val = s.split(" ", 1)
            section[int(key)] = val
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    locations = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        if f and ln:
            locations[k] = f"{os.path.basename(files.get(int(f.group(1)), '?'))}:{ln.group(1)}"
    frames = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        if loc and int(loc.group(1)) in locations:
            frames[k] = locations[int(loc.group(1))]
    return frames


def instructions(hlo_text: str) -> dict[str, dict]:
    """HLO instruction name -> {shape, opcode, op_name, source} from an optimised HLO module."""
    frames = _stack_frames(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        rest = m.group("rest")
        op = _OP_NAME.search(rest)
        source = ""
        frame = _FRAME_ID.search(rest)
        if frame:
            source = frames.get(int(frame.group(1)), "")
        else:
            src = _SOURCE.search(rest)
            if src:
                source = f"{os.path.basename(src.group(1))}:{src.group(2)}"
        out[m.group("name")] = dict(shape=m.group("shape"), opcode=m.group("opcode"),
                                    op_name=op.group(1) if op else "", source=source)
    return out


def element_shape(shape: str, value: str) -> str:
    """The shape of `value` ("name{i,j}" = element j of element i of a tuple) within `shape`."""
    index = value[value.index("{") + 1:-1] if "{" in value else ""
    for i in (int(k) for k in index.split(",") if k.strip()):
        if not shape.startswith("("):
            return shape
        parts, depth, start = [], 0, 1
        for pos, ch in enumerate(shape):
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
                parts.append(shape[start:pos].strip())
                start = pos + 1
        shape = parts[i] if i < len(parts) else shape
    return shape


def largest_live_buffers(live_range_text: str, hlo_text: str, top: int = 10) -> list[Buffer]:
    """The `top` largest values live at the peak, largest first, with the op that made each."""
    _, values = peak_values(live_range_text)
    info = instructions(hlo_text)
    rows = []
    for value, size in values:
        inst = value.split("{")[0]
        i = info.get(inst, {})
        rows.append(Buffer(value=value, bytes=size, instruction=inst,
                           opcode=i.get("opcode", "?"),
                           shape=element_shape(i.get("shape", "?"), value),
                           op_name=i.get("op_name", ""), source=i.get("source", "")))
    rows.sort(key=lambda b: -b.bytes)
    return rows[:top] if top else rows


def read_dump(directory: str) -> tuple[str, str]:
    """(live-range text, optimised HLO text) of the module in an XLA dump directory.

    With several modules (a process that compiled more than one program into the same
    directory), the one with the largest peak. Raises FileNotFoundError when none is there.
    """
    best = None
    for lr_path in glob.glob(os.path.join(directory, f"*{LIVE_RANGE_SUFFIX}")):
        hlo_path = lr_path[: -len(LIVE_RANGE_SUFFIX)] + HLO_SUFFIX
        if not os.path.exists(hlo_path):
            continue
        with open(lr_path) as f:
            lr = f.read()
        try:
            total = sum(b for _, b in peak_values(lr)[1])
        except ValueError:
            continue
        if best is None or total > best[0]:
            with open(hlo_path) as f:
                best = (total, lr, f.read())
    if best is None:
        raise FileNotFoundError(f"no '*{LIVE_RANGE_SUFFIX}' with a peak section in {directory}")
    return best[1], best[2]


@contextlib.contextmanager
def _no_persistent_cache():
    """The persistent compilation cache off inside: its key ignores the dump options, so a
    program cached by an earlier compile would come back from it with nothing dumped.
    JAX reads `jax_enable_compilation_cache` once per process; the (private) reset makes
    it read the flag again, here and after."""
    import jax
    from jax._src import compilation_cache  # no public switch once the cache is in use

    was = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def compile_with_listing(lowered, top: int = 10, compiler_options: dict | None = None):
    """Compile a `jax.stages.Lowered` with XLA's dump on; (compiled, top buffers at the peak).

    The dump goes to a temporary directory removed afterwards (on CPU it also holds LLVM
    IR and object files: tens of MB for a large step).
    """
    with tempfile.TemporaryDirectory(prefix="xla_dump_") as d, _no_persistent_cache():
        compiled = lowered.compile(compiler_options={**(compiler_options or {}),
                                                     **dump_options(d)})
        live, hlo = read_dump(d)
    return compiled, largest_live_buffers(live, hlo, top)


def format_buffers(rows, title: str = "") -> str:
    """Markdown table of `Buffer`s (or their dicts): MB (1e6 bytes), shape, op, JAX op, source."""
    lines = [title] if title else []
    lines += ["| # | MB | shape | HLO op | JAX op | source |", "|---|---|---|---|---|---|"]
    for i, b in enumerate(rows, 1):
        b = b.as_dict() if isinstance(b, Buffer) else b
        shape = b["shape"].split("{")[0]
        lines.append(f"| {i} | {b['bytes'] / 1e6:,.1f} | {shape} | {b['instruction']} "
                     f"({b['opcode']}) | {_short_op(b['op_name'])} | {b['source']} |")
    return "\n".join(lines)


def _short_op(op_name: str, keep: int = 90) -> str:
    return op_name if len(op_name) <= keep else "..." + op_name[-(keep - 3):]
