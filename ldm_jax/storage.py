"""Disk full, read-only, not a directory: one line for each, naming the path and the free
space or the permission.

Writers (checkpoints, metrics, command outputs) pass their OS failures through
`storage_error`, which recognises them in any exception (an `OSError`, or orbax's and
tensorstore's errors, which carry the errno in their text: `[os_error_code='28']`) and
says what happened where; other failures stay as they are (they are bugs, not storage).
"""

from __future__ import annotations

import errno as errno_lib
import os
import re
import shutil
from typing import Optional

from ldm_jax.errors import StorageError

# errno -> what it means for a writer, in the words of the message.
_KINDS = {
    errno_lib.ENOSPC: "no space left on the device",
    errno_lib.EDQUOT: "the disk quota is exceeded",
    errno_lib.EFBIG: "the file is larger than this system allows",
    errno_lib.EROFS: "the file system is read-only",
    errno_lib.EACCES: "permission denied",
    errno_lib.EPERM: "operation not permitted",
    errno_lib.ENOTDIR: "a file is where a folder should be",
    errno_lib.EISDIR: "a folder is where a file should be",
}
_TEXTS = (("No space left on device", errno_lib.ENOSPC), ("Disk quota exceeded",
          errno_lib.EDQUOT), ("Read-only file system", errno_lib.EROFS),
          ("Permission denied", errno_lib.EACCES), ("Not a directory", errno_lib.ENOTDIR))
_FULL = (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EFBIG)


def errno_of(exc: BaseException) -> Optional[int]:
    """The storage errno behind `exc` (its own, or one of its causes'), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "errno", None)
        if isinstance(code, int) and code in _KINDS:
            return code
        text = str(exc)
        for pattern in (r"os_error_code='?(\d+)", r"\[Errno (\d+)\]"):
            found = re.search(pattern, text)
            if found and int(found.group(1)) in _KINDS:
                return int(found.group(1))
        for words, code in _TEXTS:
            if words in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def existing_parent(path: str) -> str:
    """`path` or its nearest existing ancestor."""
    p = os.path.abspath(str(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def free_bytes(path: str) -> Optional[int]:
    """Bytes free for this user on the file system of `path` (or of its nearest existing
    ancestor); None when the system cannot say."""
    try:
        return int(shutil.disk_usage(existing_parent(path)).free)
    except OSError:
        return None


def size_text(n: Optional[float]) -> str:
    """1536 -> '1.5 KiB'; None -> 'an unknown amount'."""
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def _blocker(path: str) -> Optional[str]:
    """The file that stands where a folder of `path` should be, if any."""
    p = os.path.abspath(str(path))
    parts = []
    while os.path.dirname(p) != p:
        parts.append(p)
        p = os.path.dirname(p)
    for q in reversed(parts):
        if os.path.exists(q) and not os.path.isdir(q):
            return q
        if not os.path.exists(q):
            return None
    return None


def describe(code: int, path: str, doing: str) -> str:
    """One line: what failed (`doing`, e.g. "writing the checkpoint of step 4"), where,
    why, and the free space or the permission."""
    path = os.path.abspath(str(path))
    where = existing_parent(path)
    if code in _FULL:
        return (f"{_KINDS[code]} while {doing} ({path}): {size_text(free_bytes(where))} free "
                f"in {where}")
    if code == errno_lib.EROFS:
        return f"{_KINDS[code]} while {doing}: {where} cannot be written"
    if code in (errno_lib.EACCES, errno_lib.EPERM):
        try:
            st = os.stat(where)
            perm = f"{where} has mode {oct(st.st_mode & 0o777)}, owner uid {st.st_uid}"
        except OSError:
            perm = f"{where} cannot be read"
        return (f"{_KINDS[code]} while {doing}: {perm}, and this process runs as uid "
                f"{os.getuid() if hasattr(os, 'getuid') else '?'}")
    if code in (errno_lib.ENOTDIR, errno_lib.EEXIST):
        blocker = _blocker(path) or path
        return f"{_KINDS[errno_lib.ENOTDIR]} while {doing}: {blocker} is a file, not a folder"
    return f"{_KINDS.get(code, os.strerror(code))} while {doing} ({path})"


def storage_error(exc: BaseException, path: str, doing: str, fix: str
                  ) -> Optional[StorageError]:
    """A StorageError for `exc` when a storage problem caused it (see `errno_of`), with
    `fix` (what to do, a sentence) appended; None for any other failure."""
    code = errno_of(exc)
    if code is None:
        return None
    return StorageError(f"{describe(code, path, doing)}. {fix}")


def reraise(exc: BaseException, path: str, doing: str, fix: str):
    """Inside an `except` block: raises `exc` as a one-line StorageError when a storage
    problem caused it (`storage_error`), else `exc` itself unchanged."""
    err = storage_error(exc, path, doing, fix)
    if err is None:
        raise exc
    raise err from None


def check_dir(path: str, flag: str) -> str:
    """The absolute `path`, after checking that it is a folder or can become one (no file
    in its place or above it). Raises StorageError naming the file in the way."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    blocker = _blocker(p)
    if blocker is not None:
        raise StorageError(f"{flag} {p}: {blocker} is a file, not a folder. Pass a folder "
                           f"({flag} is created when it does not exist).")
    return p
