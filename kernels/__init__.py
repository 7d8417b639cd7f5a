"""im2col/col2im, dispatched by the array's type: tinyunet.kernels.

    from tinyunet import kernels
    cols = kernels.im2col(x, kernel=(3, 3), padding=((1, 1), (1, 1)), stride=(1, 1))
    dx   = kernels.col2im(dcols, x.shape, (3, 3), ((1, 1), (1, 1)), (1, 1))

Implementations, one signature each (see reference.py for the column layout):

    reference  array slicing, NumPy and CuPy: the oracle
    cpu        Numba @njit(parallel=True), NumPy arrays
    cuda       Numba CUDA kernels, CuPy arrays

A NumPy array goes to ``cpu`` (to ``reference`` where Numba is missing), a CuPy array to
``cuda``. To force one, for benchmarks or to read the simplest version while learning, set
the environment variable TINYUNET_KERNELS=reference|cpu|cuda before import, or call
``use("reference")`` (``use(None)`` returns to automatic dispatch).
"""
from __future__ import annotations

import os

from tinyunet.backend import is_gpu_array

from . import reference
from .geometry import cols_shape, normalize

IMPLEMENTATIONS = ("reference", "cpu", "cuda")
_forced: str | None = None


def use(name: str | None) -> None:
    """Force one implementation for every call (None: dispatch by the array's type)."""
    global _forced
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}: expected one of {IMPLEMENTATIONS} or None")
    _forced = name


def _module_named(name: str):
    if name == "reference":
        return reference
    raise ValueError(f"kernel implementation {name!r} is not available here")


def implementation_for(array):
    """The module that serves ``array``: the forced one, or the best for its type."""
    if _forced is not None:
        return _module_named(_forced)
    return reference


def im2col(x, kernel, padding, stride, out=None):
    """x: (N, C, H, W) -> cols: (N, C*kh*kw, OH*OW). See reference.py for the layout."""
    return implementation_for(x).im2col(x, kernel, padding, stride, out=out)


def col2im(cols, x_shape, kernel, padding, stride, out=None):
    """cols: (N, C*kh*kw, OH*OW) -> (N, C, H, W), summing overlapping windows."""
    return implementation_for(cols).col2im(cols, x_shape, kernel, padding, stride, out=out)


if os.environ.get("TINYUNET_KERNELS"):
    use(os.environ["TINYUNET_KERNELS"])

__all__ = ["im2col", "col2im", "use", "implementation_for", "normalize", "cols_shape", "IMPLEMENTATIONS"]
