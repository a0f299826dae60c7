"""Writing command outputs safely: complete or absent, each with what produced it.

Why a module: extract, reconstruct, decode, voxelize, to_points, sample and evaluate share
the same rules. Outputs go to a directory that is checked up front (created, writable,
not the input directory, so no input file can ever be overwritten). Each output (a group
of files: NAME.npy and NAME.nii.gz, or NAME.nii.gz, NAME.png ...) is written under
temporary names (hidden `.NAME.<id>.partial.<ext>`, never listed as inputs or outputs),
then one line is appended to OUTPUT/provenance.jsonl -- the command, what produced it
(checkpoint step and model hash, options that change the result), its input (path, size,
modification time), the SHA-256 of each file and the command's summary row -- and only
then are the files renamed into place (`Outputs`).

So a rerun knows each file: complete and made the same way from the same input (reused),
missing (made), or made otherwise or changed since (refused in one line unless
--overwrite). A run killed at any point leaves complete outputs, unreferenced temporary
files and at most one torn last line of provenance.jsonl, which is ignored. Summaries
(latents.json, metrics.json/.csv, manifests, samples.json) are rebuilt from the records
of every complete output in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from typing import Callable, Optional

import numpy as np

from ldm_jax.errors import OutputConflictError, OutputDirError

RECORD = "provenance.jsonl"
LOCK = ".ldm_jax.lock"

SUFFIXES = {"npy": ".npy", "nifti": ".nii.gz"}


def stem(path: str) -> str:
    """File name without .nii.gz / .nii / .npy."""
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".npy"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def output_names(paths) -> list[str]:
    """One output name per input; two inputs with the same name would overwrite each other."""
    names = [stem(p) for p in paths]
    seen = {}
    for p, n in zip(paths, names):
        if n in seen:
            raise OutputDirError(
                f"Two inputs would write the same output name {n!r}: {seen[n]} and {p}. "
                "Rename one of them or run them into different --output directories.")
        seen[n] = p
    return names


def formats(fmt: str) -> list[str]:
    """'npy' | 'nifti' | 'both' -> list of formats."""
    if fmt == "both":
        return ["npy", "nifti"]
    if fmt not in SUFFIXES:
        raise ValueError(f"--format must be 'npy', 'nifti' or 'both'; got {fmt!r}")
    return [fmt]


def prepare_output_dir(output: str, input_paths=()) -> str:
    """Creates `output` if needed and checks it can be written; returns its absolute path.

    Refuses the directory of any input file: outputs named like inputs (NAME.npy from
    NAME.npy) would replace them, and new files there would be picked up as inputs by the
    next run on that directory.
    """
    out = os.path.abspath(os.path.expanduser(str(output)))
    in_dirs = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in input_paths}
    if os.path.realpath(out) in in_dirs:
        raise OutputDirError(
            f"--output {out} is the directory of the input files; outputs could overwrite "
            "inputs. Choose a separate output directory, e.g. --output "
            f"{os.path.join(os.path.dirname(out), os.path.basename(out) + '_out')}.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputDirError(
            f"Cannot create the output directory {out}: {e.strerror or e}. Choose a path you "
            "can write to.") from None
    if not os.path.isdir(out):
        raise OutputDirError(f"--output {out} exists and is not a directory.")
    try:  # os.access is not enough (root, ACLs, read-only mounts): try a real file.
        fd, probe = tempfile.mkstemp(prefix=".ldm_jax_write_test_", dir=out)
        os.close(fd)
        os.remove(probe)  # our own empty probe file
    except OSError as e:
        raise OutputDirError(
            f"Cannot write into the output directory {out}: {e.strerror or e}. Fix its "
            "permissions or choose another --output.") from None
    return out


def _ext(base: str) -> str:
    for ext in (".nii.gz", ".npy", ".nii", ".csv", ".png", ".json", ".jsonl"):
        if base.endswith(ext):
            return ext
    return os.path.splitext(base)[1]


def temporary_name(path: str) -> str:
    """Hidden `.NAME.<id>.partial.<ext>` next to `path`: the extension kept (writers
    pick the format from it), never matched by the input listings (hidden files)."""
    d, base = os.path.split(path)
    ext = _ext(base)
    return os.path.join(d, f".{base[:len(base) - len(ext)]}.{uuid.uuid4().hex[:8]}.partial{ext}")


def _reraise(e: OSError, path: str):
    """`e` as a one-line StorageError for disk full / read-only / no permission."""
    from ldm_jax.storage import reraise
    reraise(e, path, f"writing {os.path.basename(path)}",
            "Outputs already written are complete and kept; free some space or fix the "
            "folder, then run the same command again to complete the rest.")


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) then renames tmp_path to `path` (no half-written outputs).
    Raises StorageError (one line) when the disk is full or the folder not writable."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _reraise(e, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # our own partial file


def write_npy(path: str, arr) -> None:
    """float32 .npy at `path` (directly; `save_npy` writes atomically)."""
    with open(path, "wb") as f:
        np.save(f, np.asarray(arr, np.float32))


def save_npy(path: str, arr) -> None:
    atomic_write(path, lambda tmp: write_npy(tmp, arr))


def qform_holds(affine, tol: float = 1e-4) -> bool:
    """Whether a NIfTI qform can hold the 4x4 `affine` exactly: a rotation, voxel sizes,
    one flip and a shift, but no shear (nibabel's `set_qform` would strip the shear
    silently). `tol` is relative to the largest voxel size."""
    import nibabel as nib

    affine = np.asarray(affine, np.float64)
    header = nib.Nifti1Header()
    try:
        header.set_qform(affine, code=1)
    except Exception:  # singular or otherwise not a qform
        return False
    scale = max(1.0, float(np.linalg.norm(affine[:3, :3], axis=0).max()))
    return bool(np.allclose(header.get_qform(), affine, rtol=0, atol=tol * scale))


def save_nifti(path: str, arr, affine, codes=None) -> None:
    """`write_nifti`, atomically (a temporary name, then renamed)."""
    atomic_write(path, lambda tmp: write_nifti(tmp, arr, affine, codes))


def write_nifti(path: str, arr, affine, codes=None) -> None:
    """float32 NIfTI at `path` (directly); (X, Y, Z, 1) is written as 3D, more channels
    as a 4th axis.

    `codes` are the (sform_code, qform_code) of the volume the output came from
    (`ldm_jax.data.io.nifti_codes`), kept as they were: the sform holds `affine` with the
    source's sform code; the qform holds it with the source's qform code only where a
    qform can represent it exactly (`qform_holds`: no shear), else qform_code 0. If that
    leaves no code at all, the sform takes the qform's code, so `affine` is never lost.
    `codes=None` (a source without a header: .npy, generated samples) writes both as 1
    (scanner), the qform again only where it holds `affine`.
    """
    import nibabel as nib

    arr = np.asarray(arr, np.float32)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    affine = np.asarray(affine, np.float64)
    sform_code, qform_code = (1, 1) if codes is None else (int(codes[0]), int(codes[1]))
    exact = qform_holds(affine)
    if not exact:
        if sform_code == 0:
            sform_code = qform_code
        qform_code = 0
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(np.float32)
    img.set_sform(affine, code=sform_code)
    if exact:
        img.set_qform(affine, code=qform_code)
    else:
        img.set_qform(None, code=0)
    nib.save(img, path)


def write(path: str, fmt: str, arr, affine, codes=None) -> None:
    """`arr` as `fmt` ("npy" | "nifti") at `path`, directly. `codes`: see `write_nifti`."""
    if fmt == "npy":
        write_npy(path, arr)
    else:
        write_nifti(path, arr, affine, codes)


def save(path_stem: str, fmt: str, arr, affine, codes=None) -> str:
    """Writes `path_stem` + suffix of `fmt` atomically; returns the path. `codes`: see
    `write_nifti`."""
    path = path_stem + SUFFIXES[fmt]
    atomic_write(path, lambda tmp: write(tmp, fmt, arr, affine, codes))
    return path


def read_latent(path: str):
    """A latent file -> ((x, y, z, C) float32, affine or None for .npy)."""
    try:
        if str(path).endswith(".npy"):
            arr, affine = np.load(path, allow_pickle=False), None
        else:
            import nibabel as nib
            img = nib.load(str(path))
            arr, affine = np.asarray(img.dataobj, np.float32), img.affine
    except Exception as e:  # any reader failure: name the file, keep the reason
        from ldm_jax.data import BadFileError
        raise BadFileError(f"{path}: cannot read as a latent ({type(e).__name__}: {e}).") from e
    arr = np.asarray(arr, np.float32)
    if arr.ndim == 3:
        arr = arr[..., None]
    return arr, affine


# ----------------------------------------------------------------- outputs with records

def source_of(path: str, **extra) -> dict:
    """What identifies an input file: absolute path, size and modification time (ns),
    plus `extra` (the frame read, a dataset key ...)."""
    p = os.path.abspath(str(path))
    try:
        st = os.stat(p)
        out = {"input": p, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    except OSError:
        out = {"input": p}
    out.update(extra)
    return out


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(obj):
    """`obj` as JSON gives it back (tuples -> lists), so records compare equal."""
    return json.loads(json.dumps(obj))


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(theirs: dict, ours: dict, limit: int = 3) -> str:
    """'checkpoint.step 2 there, 4 here; ...' for the first `limit` differing fields."""
    a, b = _flat(theirs), _flat(ours)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    text = "; ".join(f"{k} {json.dumps(a.get(k))} there, {json.dumps(b.get(k))} here"
                     for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


class Outputs:
    """The outputs of one command in one folder, each recorded with what made it.

    Args:
        out_dir: the output folder (checked by `prepare_output_dir`).
        command: the command's name ("extract", ...).
        made_by: what makes every output of this run the same way: checkpoint (workdir,
            step, model hash) and the options that change the result (JSON values).
        overwrite: replace outputs made otherwise instead of refusing.
        log: where the lines go.

    Use as a context manager (it holds the folder's lock, `ldm_jax.lock`): `plan` sorts
    the wanted outputs into reused and to make (raising OutputConflictError for outputs
    made otherwise, unless `overwrite`), `write` writes one output, `complete` gives the
    records of every complete output made this way (the summaries' rows).
    """

    def __init__(self, out_dir: str, command: str, made_by: dict, *, overwrite=False,
                 log: Callable[[str], None] = print):
        self.dir, self.command = os.path.abspath(out_dir), str(command)
        self.made_by = _plain(dict(made_by, command=self.command))
        self.overwrite, self.log = bool(overwrite), log
        self.path = os.path.join(self.dir, RECORD)
        self.records = self._read()  # name -> [record, ...] oldest first
        self._digests = {}
        self._lock = None

    def __enter__(self):
        from ldm_jax import lock
        self._lock = lock.acquire(self.dir, "output folder", say=self.log, name=LOCK)
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
        return False

    def _read(self) -> dict:
        out = {}
        if not os.path.exists(self.path):
            return out
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a torn last line of a killed run
                    continue
                if isinstance(rec, dict) and "name" in rec and isinstance(rec.get("files"),
                                                                           dict):
                    out.setdefault(str(rec["name"]), []).append(rec)
        return out

    def _digest(self, rel: str) -> Optional[str]:
        path = os.path.join(self.dir, rel)
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256(path)
        return self._digests[key]

    def _matches(self, rec, rel) -> bool:
        """Whether the file `rel` is the one `rec` wrote (its SHA-256; each file is read
        once per run). Records hold no times, so the same outputs give the same
        provenance.jsonl."""
        want = rec["files"].get(rel)
        return want is not None and self._digest(rel) == want

    def _verified(self, rec, files) -> bool:
        return all(self._matches(rec, rel) for rel in files)

    def _origin(self, name, rel):
        """The newest record of `name` whose copy of `rel` is the file there, else None."""
        for rec in reversed(self.records.get(name, [])):
            if self._matches(rec, rel):
                return rec
        return None

    def plan(self, items, what: str = "output(s)") -> tuple[list, list]:
        """(names to make, names reused) for `items`: (name, [file paths relative to the
        folder], source dict) per wanted output; one line names the reused ones (`what`
        they are, e.g. "latent(s)").

        Raises OutputConflictError (one line: how many, made how, what to do) when files
        of these outputs were made otherwise (another model, other options, another
        input) or are not in the record (not written by this command, or changed since),
        and when the folder holds complete outputs made otherwise that this run does not
        replace; unless `overwrite`.
        """
        make, reused, conflicts, seen = [], [], [], set()
        for name, files, source in items:
            seen.add(name)
            source = _plain(source)
            present = [rel for rel in files if os.path.exists(os.path.join(self.dir, rel))]
            if not present:
                make.append(name)
                continue
            done = next((r for r in reversed(self.records.get(name, []))
                         if r.get("made_by") == self.made_by and r.get("source") == source
                         and self._verified(r, files)), None)
            if done is not None:
                reused.append(name)
                continue
            bad = None
            for rel in present:
                origin = self._origin(name, rel)
                if origin is None or origin.get("made_by") != self.made_by or \
                        origin.get("source") != source:
                    bad = (name, rel, origin, source)
                    break
            if bad is None:  # only our own files of an interrupted write: make it again
                make.append(name)
            else:
                conflicts.append(bad)
        others = [n for n, rec in self._complete_otherwise().items() if n not in seen]
        if (conflicts or others) and not self.overwrite:
            raise OutputConflictError(self._conflict_text(conflicts, others))
        if conflicts:
            self.log(f"--overwrite: replacing {len(conflicts)} output(s) in {self.dir} made "
                     "otherwise.")
            make += [c[0] for c in conflicts]
        if others:
            self.log(f"note: {len(others)} output(s) in {self.dir} made otherwise and not "
                     f"among this run's inputs stay as they are (e.g. {others[0]}); the "
                     "summary leaves them out.")
        order = {name: i for i, (name, _, _) in enumerate(items)}
        if reused:
            self.log(f"Reusing {len(reused)} complete {what} made the same way "
                     f"({', '.join(reused[:5])}{', ...' if len(reused) > 5 else ''}); making "
                     f"the {len(make)} missing.")
        return sorted(make, key=order.get), reused

    def _complete_otherwise(self) -> dict:
        """name -> record of complete outputs in the folder made otherwise."""
        out = {}
        for name, recs in self.records.items():
            rec = recs[-1]
            if rec.get("made_by") != self.made_by and self._verified(rec, rec["files"]):
                out[name] = rec
        return out

    def _conflict_text(self, conflicts, others) -> str:
        fix = ("use a new --output, or pass --overwrite to replace them (nothing else in the "
               "folder is touched)")
        known = [(name, rec, source) for name, _, rec, source in conflicts if rec is not None]
        known += [(name, self._complete_otherwise()[name], None) for name in others]
        if known:
            name, rec, source = known[0]
            if source is not None and rec.get("made_by") == self.made_by:
                how, diff = ("from other inputs (or other versions of them)",
                             differences(rec.get("source", {}), source))
            else:
                how, diff = ("by another model or with other options",
                             differences(rec.get("made_by", {}), self.made_by))
            return (f"{self.dir} holds {len(known)} output(s) made {how} than this run's "
                    f"(e.g. {name}: {diff}); a run does not mix them with its own. Rerun "
                    f"with what made them, {fix}.")
        name, rel, _, _ = conflicts[0]
        return (f"{self.dir} holds {len(conflicts)} file(s) that ldm-jax {self.command} did "
                f"not record in {RECORD}, or that changed since (e.g. {rel}); they are not "
                f"taken as outputs of this run: {fix}.")

    def write(self, name: str, files: dict, source: dict, row=None) -> None:
        """Writes one output: `files` {path relative to the folder: write(tmp_path)},
        each to a temporary name, then its record (with `row`, the summary's data), then
        renames them into place. Raises StorageError (one line) when the disk is full or
        the folder cannot be written."""
        tmps = {}
        try:
            for rel, writer in files.items():
                path = os.path.join(self.dir, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmps[rel] = temporary_name(path)
                writer(tmps[rel])
            rec = {"name": name, "made_by": self.made_by, "source": _plain(source),
                   "files": {rel: sha256(tmp) for rel, tmp in tmps.items()},
                   "row": _plain(row)}
            self._append(rec)
            for rel, tmp in tmps.items():
                os.replace(tmp, os.path.join(self.dir, rel))
            self.records.setdefault(name, []).append(rec)
        except OSError as e:
            _reraise(e, os.path.join(self.dir, next(iter(files))))
        finally:
            for tmp in tmps.values():
                if os.path.exists(tmp):
                    os.remove(tmp)  # our own partial file

    def _append(self, rec) -> None:
        line = json.dumps(rec, allow_nan=False) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn line of a killed run: keep it apart
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())

    def complete(self) -> dict:
        """name -> record of every complete output in the folder made this way (sorted
        by name): what the summaries list."""
        out = {}
        for name in sorted(self.records):
            rec = next((r for r in reversed(self.records[name])
                        if r.get("made_by") == self.made_by and self._verified(r, r["files"])),
                       None)
            if rec is not None:
                out[name] = rec
        return out

