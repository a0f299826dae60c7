"""PyTorch state dicts as people save them, reduced to the plain dict a converter expects.

Checkpoints come wrapped: DataParallel/DDP prefix every key with `module.`, `torch.compile`
with `_orig_mod.`, Lightning-style modules with `model.` (or any attribute name); training
scripts nest the state dict inside `{"state_dict": ...}`, `{"model": ...}`,
`{"model_state_dict": ...}`, `{"autoencoder": ...}`, next to optimiser states; older code
names some layers differently. `load_state_dict` finds the mapping and the key prefix that
fit the keys the model needs, applies a model-specific `rename` for old names, and checks
that exactly those keys remain. Values are returned as stored (torch tensors or numpy
arrays); the converters (`ldm_jax.convert`, the UNet's) transpose them into Flax params.

numpy-only at import; torch is imported only to read a file.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

from ldm_jax.errors import ConversionError

# Sub-dict names tried first when several nested state dicts fit equally well (a training
# checkpoint with both the model and an EMA copy picks the model; pass the EMA's sub-dict
# yourself to get it).
PREFERRED_NAMES = ("state_dict", "model_state_dict", "model", "autoencoder", "vae",
                   "discriminator", "unet", "net", "network", "generator", "module")
_MAX_DEPTH = 4
_SHOW = 5  # keys listed in an error


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def _as_mapping(obj):
    """A torch nn.Module (anything with a state_dict() method) -> its state dict."""
    if not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict", None)):
        return obj.state_dict()
    return obj


def _state_dicts(obj, path=(), depth=0) -> Iterator[tuple[tuple, Mapping]]:
    """(path, mapping) for every mapping of str keys to arrays inside `obj` (itself first)."""
    obj = _as_mapping(obj)
    if not isinstance(obj, Mapping):
        return
    if any(isinstance(k, str) and _is_array(v) for k, v in obj.items()):
        yield path, obj
    if depth < _MAX_DEPTH:
        for k, v in obj.items():
            v = _as_mapping(v)
            if isinstance(v, Mapping):
                yield from _state_dicts(v, (*path, k), depth + 1)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with one-line errors.

    Raises FileNotFoundError when the file does not exist, ConversionError when torch is
    missing or the file is not a checkpoint torch can read safely.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch (pip install torch), or pass "
                              "the state dict as a dict of numpy arrays") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _refusal_detail(str(e))
        if detail is not None and detail.startswith("Unsupported operand"):
            with open(path, "rb") as f:  # a pickle starts with its protocol (0x80 N)
                if f.read(1) != b"\x80":
                    detail = None  # not a pickle at all: bytes the unpickler cannot parse
        if detail is None:
            raise ConversionError(f"{path} is not a checkpoint torch.load can read "
                                  f"({_first_line(e)})") from None
        what = ("it is a plain pickle (pickle.dump, not torch.save), which the safe loader "
                "does not read" if detail.startswith("Unsupported operand") else
                "it holds objects other than tensors and plain containers")
        raise ConversionError(
            f"torch.load(weights_only=True) refused {path}: {what} ({detail}). If you "
            "trust the file, load it with "
            "torch.load(path, weights_only=False) and pass the loaded object instead of the "
            "path") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConversionError(f"{path} is not a checkpoint torch.load can read "
                              f"({_first_line(e)})") from None


def _refusal_detail(text: str) -> str | None:
    """What torch.load(weights_only=True) refused, from its message ("Unsupported global:
    GLOBAL m.C", "Trying to load unsupported GLOBAL posix.system whose module posix is
    blocked", "Unsupported operand 149"), or None when the message is not a refusal of
    the file's objects (a damaged file)."""
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    for pattern in (r"WeightsUnpickler error:\s*(Unsupported global:.*?)(?: was not an "
                    r"allowed global|\n\n|$)",
                    r"(Trying to load unsupported GLOBAL .*?)(?:\.?\n|$)",
                    r"WeightsUnpickler error:\s*(\S.*?)(?:\n\n|\n|$)"):
        found = re.search(pattern, text, re.S)
        if found and found.group(1).strip():
            return " ".join(found.group(1).split())
    return "an object the safe loader does not take"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _forms(key: str, rename) -> set[str]:
    return {key, rename(key)} if rename else {key}


def _name_rank(name) -> int:
    return PREFERRED_NAMES.index(name) if name in PREFERRED_NAMES else len(PREFERRED_NAMES)


def _fit(sd: Mapping, expected: set[str], rename) -> tuple[int, str, str | None]:
    """(number of expected keys found, prefix, rival) for the key prefix that fits most keys.

    A prefix is whatever precedes an expected key at a '.' boundary, so wrappers of any
    name and depth (`module._orig_mod.`) are found without a list of known ones. Equal
    fits go to no prefix, then a last segment in PREFERRED_NAMES (`model.` before `ema.`),
    then the shorter; `rival` is another prefix that fits as well and ranks the same.
    """
    hits: dict[str, set[str]] = collections.defaultdict(set)
    for key in sd:
        if not isinstance(key, str):
            continue
        for form in _forms(key, rename):
            parts = form.split(".")
            for i in range(len(parts)):
                tail = ".".join(parts[i:])
                if tail in expected:
                    hits[form[:len(form) - len(tail)]].add(tail)
    if not hits:
        return 0, "", None

    def rank(p):
        return (len(hits[p]), -_name_rank(p[:-1].rsplit(".", 1)[-1]) if p else 1)

    ranked = sorted(hits, key=lambda p: (*rank(p), -len(p)), reverse=True)
    rival = ranked[1] if len(ranked) > 1 and rank(ranked[1]) == rank(ranked[0]) else None
    return len(hits[ranked[0]]), ranked[0], rival


def _choose(scored: list, what: str):
    """The best-fitting (count, prefix, rival, path, sd); ties go to PREFERRED_NAMES, then
    the shallowest."""
    best = max(s[0] for s in scored)
    top = [s for s in scored if s[0] == best]

    def rank(s):
        return _name_rank(s[3][-1] if s[3] else None), len(s[3])

    top.sort(key=rank)
    if len(top) > 1 and rank(top[0]) == rank(top[1]):
        raise ConversionError(
            f"several state dicts in the checkpoint fit {what} equally well "
            f"({', '.join(_where(s[3]) for s in top[:_SHOW])}); pass the one you want "
            "(e.g. checkpoint['ema']) instead of the whole checkpoint")
    count, prefix, rival, path, sd = top[0]
    if rival is not None:
        raise ConversionError(
            f"keys under {prefix!r} and under {rival!r} in the state dict at {_where(path)} "
            f"fit {what} equally well; pass the ones you want, e.g. "
            f"{{k[len({prefix!r}):]: v for k, v in sd.items() if k.startswith({prefix!r})}}")
    return top[0]


def _where(path: tuple) -> str:
    return "the top level" if not path else "".join(f"[{k!r}]" for k in path)


def describe_keys(keys: Iterable) -> str:
    """'N keys, common prefix P, first names a (12), b (3)': what a key set looks like."""
    keys = [k for k in keys if isinstance(k, str)]
    if not keys:
        return "no string keys"
    common = os.path.commonprefix(keys)
    common = common[:common.rfind(".") + 1]
    heads = collections.Counter(k[len(common):].split(".")[0] for k in keys).most_common(_SHOW)
    text = (f"{len(keys)} keys, common prefix {common!r}; first names after it: " if common
            else f"{len(keys)} keys, no common prefix; first names: ")
    return text + ", ".join(f"{h!r} ({n})" for h, n in heads)


def _rename_keys(sd: dict, expected: set[str], rename) -> dict:
    """Applies `rename` to keys that are not expected when the new name is expected."""
    out = {}
    for key, value in sd.items():
        if key not in expected:
            new = rename(key)
            if new != key and new in expected and new not in sd and new not in out:
                key = new
        out[key] = value
    return out


def load_state_dict(obj_or_path: Any, expected_keys: Iterable[str],
                    rename: Callable[[str], str] | None = None, *, what: str = "the model",
                    hint: str = "") -> dict:
    """The state dict in `obj_or_path`, keyed exactly by `expected_keys`.

    Args:
      obj_or_path: a state dict (str -> torch tensor / numpy array), a torch nn.Module,
        a training checkpoint with the state dict nested inside (at any depth up to 4,
        under any name: `state_dict`, `model`, ...), or a path to a `.pt`/`.pth` file
        (read with `torch.load(..., map_location="cpu", weights_only=True)`).
      expected_keys: the keys the model needs (e.g. MONAI's `model.state_dict()` keys,
        without `num_batches_tracked`).
      rename: maps an old key name to the current one (e.g. MONAI GenerativeModels'
        attention names); applied after the prefix is removed, only to keys that are not
        expected and whose new name is.
      what, hint: words for error messages ("MONAI AutoencoderKL"; which settings to check).

    Returns:
      {key: value as stored} with exactly `expected_keys`, in their order. The nested
      mapping chosen is the one whose keys fit most expected keys (ties: PREFERRED_NAMES,
      then the shallowest); its keys lose the prefix that fits most (`module.`,
      `_orig_mod.`, `model.`, nested combinations, any name; ties: no prefix, then
      PREFERRED_NAMES, so `model.` wins over `ema.`); keys outside that prefix are
      dropped (other sub-modules), and so are BatchNorm `num_batches_tracked` counters
      that are not expected.

    Raises:
      ConversionError: no mapping of names to arrays in the object; several mappings or
        prefixes fit equally;
        or keys are missing / unknown, with what the keys look like (count, common
        prefix, first names), the first unknown and the first missing keys.
      FileNotFoundError: a path that does not exist.
    """
    expected_list = list(expected_keys)
    expected = set(expected_list)
    obj = read_checkpoint(obj_or_path) if isinstance(obj_or_path, (str, os.PathLike)) \
        else obj_or_path
    candidates = list(_state_dicts(obj))
    if not candidates:
        raise ConversionError(
            f"found no state dict (a mapping of names to tensors or arrays) for {what} in "
            f"the given {type(obj).__name__}; pass model.state_dict(), a dict holding it, or "
            "the path of a file torch.save wrote")
    scored = [(*_fit(sd, expected, rename), path, sd) for path, sd in candidates]
    if max(s[0] for s in scored) > 0:
        _, prefix, _, path, sd = _choose(scored, what)
    else:  # nothing fits: describe the largest mapping found
        prefix, (path, sd) = "", max(candidates, key=lambda c: len(c[1]))
    original = {}
    for key in sd:
        if isinstance(key, str) and key.startswith(prefix):
            original[key[len(prefix):]] = key
    stripped = {k: sd[original[k]] for k in original}
    if rename:
        renamed = _rename_keys(stripped, expected, rename)
        back = dict(zip(renamed, stripped))  # dict order is kept through the rename
        original = {new: original[old] for new, old in back.items()}
        stripped = renamed
    stripped = {k: v for k, v in stripped.items()
                if k in expected or not k.endswith("num_batches_tracked")}
    missing = [k for k in expected_list if k not in stripped]
    unknown = [original[k] for k in stripped if k not in expected]
    if missing or unknown:
        where = "" if not path else f" at {_where(path)}"
        removed = f" after removing the prefix {prefix!r}" if prefix else ""
        parts = [f"the state dict{where} does not fit {what}: {len(expected) - len(missing)} "
                 f"of {len(expected)} expected keys found{removed}; it has "
                 f"{describe_keys(sd.keys())}"]
        if unknown:
            parts.append(f"{len(unknown)} unknown, first: "
                         + ", ".join(repr(k) for k in unknown[:_SHOW]))
        if missing:
            parts.append(f"{len(missing)} missing, first: "
                         + ", ".join(repr(k) for k in missing[:_SHOW]))
        raise ConversionError("; ".join(parts) + (f". {hint}" if hint else ""))
    return {k: stripped[k] for k in expected_list}
