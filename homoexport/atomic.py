"""Atomic file and directory writes: outputs appear whole or not at all.

Every command that writes a model, a report or a checkpoint goes through here, so that a crash or a
validation failure never leaves a half-written artifact where a user (or a resume) would pick it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from homoexport.errors import OutputError, OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file in ``path``'s directory, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be as readable as any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same directory and a rename."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_array(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` in NumPy's ``.npy`` format, atomically."""
    return _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def ensure_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after minutes of work, if an output cannot be created at ``path``.

    Creates the parent directories and a probe file beside ``path``; raises :class:`OutputError`
    (exit code 5) naming the path and the operating system's reason.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".homoexport-probe.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputError(f"cannot write {path}: {reason} ({err.filename or path.parent})") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove staging directories of ``final`` left by processes that died (kill -9, power loss).

    Staging names carry the writer's pid (``.NAME.PID.RANDOM.partial``); one whose pid is alive is
    never touched, and neither is one of an older, pid-less name.
    """
    removed = []
    for stale in final.parent.glob(f".{final.name}.*.partial"):
        pid = stale.name[len(final.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling directory to fill; rename it to ``final`` only if the block succeeds.

    On any exception the staging directory is removed and ``final`` is left as it was, so callers can
    validate inside the block and simply raise to leave nothing half-written behind.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(f"output directory already exists: {final} (pass --overwrite to replace it)")
    ensure_writable(final)
    remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the renamed output should be readable by others
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
