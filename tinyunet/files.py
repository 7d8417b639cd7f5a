"""Writing files so that nothing already written is lost.

``atomic_write(path, write)`` calls ``write(stream)`` on a temporary file in the same folder,
flushes it to disk (fsync), renames it over ``path`` (os.replace is atomic within one file
system) and fsyncs the folder, so the rename itself survives a power cut. A crash or an error
midway leaves the previous file whole. Every file tinyunet writes goes through here.

The temporary file is named ``.<name>.<pid>.<random><suffix>`` and created as a plain
``open(path, "w")`` would create it: mode 0666 less the umask (a new file), or the mode the
file already has (a replaced file); not mkstemp's 0600. A process killed mid-write (kill -9,
a power cut) cannot remove its temporary file; the next write of the same name removes every
one whose process is gone. Proof: tests/test_files.py.
"""
from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path
from typing import Callable

STALE_SECONDS = 3600      # a temporary file without a readable process id is stale after this


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path, suffix: str = ".tmp") -> list[Path]:
    """Delete the temporary files that earlier, killed writes of ``path`` left behind
    (``.<name>.<pid>.<random><suffix>`` of a process no longer running); returns them."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)]
    except OSError:
        return removed
    for candidate in candidates:
        middle = candidate.name[len(prefix):-len(suffix)].split(".")[0]
        try:
            stale = not _process_alive(int(middle))
        except ValueError:             # an older name without a process id: judge by its age
            try:
                stale = time.time() - candidate.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass
    return removed


def _fsync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):     # POSIX: makes the rename durable
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write(path, write: Callable, suffix: str = ".tmp", create_folder: bool = True) -> Path:
    """Write ``path`` through ``write(binary stream)``, all or nothing; returns the path.

    create_folder False: a missing folder is a FileNotFoundError naming it.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if create_folder:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"the folder {str(folder)!r} does not exist; create it first")
    remove_stale_temporaries(path, suffix)
    temporary = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    # O_EXCL: never follow or reuse a file someone else put there. Mode 0o666: the kernel
    # applies the umask, as it does for open(path, "w").
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            os.fchmod(handle, stat.S_IMODE(path.stat().st_mode))    # a replaced file keeps its mode
        except FileNotFoundError:
            pass
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())      # the bytes are on disk before the name points at them
        os.replace(temporary, path)        # readers see the old file or the new one
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return path
