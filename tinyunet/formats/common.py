"""What every format module shares: the error class, the one line that names a missing extra,
and the atomic write."""
from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path


class FormatError(ValueError):
    """A file is not what it claims to be, or does not fit the model; raised before anything changes."""


class MissingExtraError(ImportError):
    """An optional package a format needs is not installed."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs the '{module}' package: pip install -e \".[{extra}]\" "
                                f"(or pip install tinyunet[{extra}])") from None


@contextlib.contextmanager
def atomic_target(path, who: str):
    """Yield a temporary path beside ``path``; when the block ends well, fsync it and rename it
    over ``path`` (atomic on one file system), else delete it. Readers see the old file or the new."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"{who}: the folder {str(directory)!r} does not exist; create it first")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())             # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomically(path, data: bytes, who: str) -> Path:
    with atomic_target(path, who) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
    return Path(path)
