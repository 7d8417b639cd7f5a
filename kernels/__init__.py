"""im2col/col2im, dispatched by the array's type: tinyunet.kernels.

    from tinyunet import kernels
    cols = kernels.im2col(x, kernel=(3, 3), padding=((1, 1), (1, 1)), stride=(1, 1))
    dx   = kernels.col2im(dcols, x.shape, (3, 3), ((1, 1), (1, 1)), (1, 1))

Implementations, one signature each (see reference.py for the column layout)::

    reference  array slicing, NumPy and CuPy: the oracle          kernels/reference.py
    cpu        Numba @njit(parallel=True), NumPy arrays           kernels/cpu.py
    cuda       Numba CUDA kernels, CuPy arrays                    kernels/cuda.py

Automatic dispatch: a NumPy array goes to ``cpu`` (to ``reference`` where Numba does not
import), a CuPy array to ``cuda`` (to ``reference`` where Numba's CUDA target cannot be used:
then a KernelFallbackWarning says so once, with the reason; kernels.available() has it too).

Forcing one, for benchmarks or to step through the simplest version while learning:

    TINYUNET_KERNELS=reference python ...      environment variable, read at import
    kernels.use("reference")                   from code; kernels.use(None) restores dispatch
    with kernels.using("cpu"): ...             for one block

A forced implementation that cannot take the array raises a TypeError that says so (the
Numba CPU kernels cannot read GPU memory, the CUDA kernels cannot read host memory).
Every implementation takes ``out=``, a C-contiguous buffer of the result's shape and dtype,
so that a caller can reuse one buffer instead of paying for fresh pages on every call.
Tests: tests/test_kernels.py (dispatch and agreement), tests/test_kernels_cuda.py.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings

from tinyunet.backend import is_gpu_array

from . import reference
from .geometry import check_out, cols_shape, normalize

IMPLEMENTATIONS = ("reference", "cpu", "cuda")
ENVIRONMENT_VARIABLE = "TINYUNET_KERNELS"
_forced: str | None = None
_modules: dict = {"reference": reference}
_import_errors: dict = {}


def _load(name: str):
    """The module of implementation ``name``, imported on first use; None if it cannot be."""
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as error:  # Numba missing, or its CUDA target missing
            _import_errors[name] = f"{type(error).__name__}: {error}"
    return _modules.get(name)


def available() -> dict:
    """{name: None if it can be imported here, else the reason it cannot}."""
    return {name: (None if _load(name) is not None else _import_errors[name]) for name in IMPLEMENTATIONS}


def use(name: str | None) -> None:
    """Force one implementation for every call (None: dispatch by the array's type)."""
    global _forced
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}: expected one of {IMPLEMENTATIONS} "
                         f"or None (set by {ENVIRONMENT_VARIABLE} or kernels.use)")
    if name is not None and _load(name) is None:
        raise ValueError(f"kernel implementation {name!r} cannot be used here: {_import_errors[name]}")
    _forced = name


def forced() -> str | None:
    """The forced implementation's name, or None under automatic dispatch."""
    return _forced


@contextlib.contextmanager
def using(name: str | None):
    """``with kernels.using("reference"): ...`` forces ``name`` inside the block only."""
    previous = _forced
    use(name)
    try:
        yield
    finally:
        use(previous)


class KernelFallbackWarning(RuntimeWarning):
    """GPU arrays are served by the slower reference kernels: the CUDA ones cannot be used."""


_warned_fallback = False


def _gpu_fallback():
    """reference, for GPU arrays when the CUDA kernels cannot load; says so once, with why."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"tinyunet.kernels: CuPy arrays go to the reference kernels (array slicing, "
                      f"several times slower), because the CUDA kernels cannot be used: "
                      f"{_import_errors.get('cuda')}", KernelFallbackWarning, stacklevel=3)
    return reference


def implementation_for(array):
    """The module that serves ``array``: the forced one, or the best for its type."""
    if _forced is not None:
        return _modules[_forced]
    if is_gpu_array(array):
        return _load("cuda") or _gpu_fallback()
    return _load("cpu") or reference


def im2col(x, kernel, padding, stride, out=None):
    """x: (N, C, H, W) -> cols: (N, C*kh*kw, OH*OW). See reference.py for the layout."""
    return implementation_for(x).im2col(x, kernel, padding, stride, out=out)


def col2im(cols, x_shape, kernel, padding, stride, out=None):
    """cols: (N, C*kh*kw, OH*OW) -> (N, C, H, W), summing overlapping windows."""
    return implementation_for(cols).col2im(cols, x_shape, kernel, padding, stride, out=out)


if os.environ.get(ENVIRONMENT_VARIABLE):
    use(os.environ[ENVIRONMENT_VARIABLE])

__all__ = ["KernelFallbackWarning", "im2col", "col2im", "use", "using", "forced", "available", "implementation_for",
           "normalize", "cols_shape", "check_out", "IMPLEMENTATIONS", "ENVIRONMENT_VARIABLE"]
