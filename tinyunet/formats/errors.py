"""What every format module shares: its error class, and the one line that names a missing extra."""
from __future__ import annotations

import importlib


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
