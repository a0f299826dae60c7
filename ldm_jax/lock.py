"""One writer per folder: a lock file naming its holder's host and process id.

`hold(folder)` creates `<folder>/LOCK_NAME` and keeps an exclusive `flock` on it while the
run lasts; the operating system releases that lock when the process ends, however it
ends (Ctrl-C, SIGKILL, a crash), so a lock left behind by a dead process on this host is
recognised and taken over, with a line saying so. A live holder is refused in one line
naming its host, process id and start time. A lock written on another host cannot be
checked from here (its process may be alive there): it is refused, and the message says
which file to remove once that run is over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from typing import Callable, Optional

from ldm_jax.errors import StorageError, WorkdirInUseError

LOCK_NAME = "train.lock"


def _holder_text(info: dict) -> str:
    started = info.get("started")
    return (f"process {info.get('pid', '?')} on host {info.get('host', '?')}"
            + (f" (started {started})" if started else ""))


def _read(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class Lock:
    """A held lock (`hold`); `release()` removes the file and ends the hold."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)  # our own lock file, while we still hold it
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def acquire(folder: str, what: str = "workdir", say: Callable[[str], None] = print,
            name: str = LOCK_NAME) -> Lock:
    """Takes `<folder>/<name>` for this process; returns the Lock (release it when done).

    Raises:
        WorkdirInUseError: a live process holds it (named with host, pid and start), or a
            lock of another host is present.
        StorageError: the lock file cannot be created (read-only, no permission, disk full).
    """
    path = os.path.join(os.path.abspath(folder), name)
    host = socket.gethostname()
    for _ in range(20):  # retried only when a releasing holder removes the file meanwhile
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            from ldm_jax.storage import reraise
            reraise(e, path, f"creating the lock file of the {what}",
                    f"Use a {what} you can write to.")
        locked = True
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this system: the process id decides
            locked = None
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                locked = False
            else:  # a file system without flock (ENOLCK, EOPNOTSUPP): the pid decides
                locked = None
        info = _read(fd)
        if locked is False:
            os.close(fd)
            time.sleep(0.05)
            info = info or _read_path(path)
            raise WorkdirInUseError(
                f"{folder} is in use by {_holder_text(info or {})}: one run writes a {what} "
                f"at a time. Wait for that run to end (or stop it), or use another {what}.")
        if locked and os.path.exists(path) and os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)  # the previous holder removed the file as we opened it: again
            continue
        if info:
            same_host = info.get("host") == host
            if locked is None and same_host and _alive(info.get("pid", -1)) and \
                    int(info.get("pid", -1)) != os.getpid():
                os.close(fd)
                raise WorkdirInUseError(
                    f"{folder} is in use by {_holder_text(info)}: one run writes a {what} "
                    f"at a time. Wait for that run to end (or stop it), or use another "
                    f"{what}.")
            if not same_host:
                os.close(fd)
                raise WorkdirInUseError(
                    f"{folder} is locked by {_holder_text(info)} ({path}); this host cannot "
                    f"tell whether that process still runs. If that run is over, remove "
                    f"{path} and run again; else wait for it, or use another {what}.")
            say(f"note: took over {path} from {_holder_text(info)}, which is no longer "
                "running (it ended without releasing its lock).")
        record = {"host": host, "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join(sys.argv)[:500]}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            from ldm_jax.storage import reraise
            reraise(e, path, f"writing the lock file of the {what}",
                    f"Use a {what} you can write to.")
        return Lock(path, fd)
    raise StorageError(f"could not take the lock {path}: it keeps being replaced; is "
                       f"another run starting on {folder}?")


def _read_path(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def hold(folder: str, what: str = "workdir", say: Callable[[str], None] = print,
         name: str = LOCK_NAME):
    """`acquire` for the block, released after it."""
    lock = acquire(folder, what, say, name)
    try:
        yield lock
    finally:
        lock.release()
