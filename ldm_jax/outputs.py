"""Writing latents and volumes (.npy / NIfTI) safely, and reading latents back.

Why a module: extract, reconstruct and decode share the same rules. Outputs go to a
directory that is checked up front (created, writable, not the input directory, so no
input file can ever be overwritten); files are written under a temporary name and
renamed, so an interrupted run never leaves a truncated file that a later run would skip
as "already done".
"""

from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np

from ldm_jax.errors import OutputDirError

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


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) then renames tmp_path to `path` (no half-written outputs)."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{uuid.uuid4().hex[:8]}.partial")
    if base.endswith(".nii.gz"):
        tmp += ".nii.gz"  # nibabel picks the compression from the name
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # our own partial file


def save_npy(path: str, arr) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(arr, np.float32))
    atomic_write(path, write)


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
    """float32 NIfTI; (X, Y, Z, 1) is written as 3D, more channels as a 4th axis.

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
    atomic_write(path, lambda tmp: nib.save(img, tmp))


def save(path_stem: str, fmt: str, arr, affine, codes=None) -> str:
    """Writes `path_stem` + suffix of `fmt`; returns the path. `codes`: see `save_nifti`."""
    path = path_stem + SUFFIXES[fmt]
    if fmt == "npy":
        save_npy(path, arr)
    else:
        save_nifti(path, arr, affine, codes)
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
