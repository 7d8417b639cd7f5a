"""Writing files so that nothing already written is lost.

``atomic_write(path, write)`` calls ``write(stream)`` on a temporary file in the same folder,
flushes it to disk (fsync), then renames it over ``path`` (os.replace is atomic within one
file system). A crash or an error midway leaves the previous file whole and no temporary
behind. Every file tinyunet writes goes through here. Proof: tests/test_files.py.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable, suffix: str = ".tmp") -> Path:
    """Write ``path`` through ``write(binary stream)``, all or nothing; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())      # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
