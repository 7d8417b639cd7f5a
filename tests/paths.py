"""Run a test on each implementation of the layers that have two: the NumPy expressions (the
reference, which also serves CuPy) and the Numba CPU kernels of kernels/cpu_layers.py.

The Numba kernels serve only arrays of PARALLEL_MIN_SIZE elements and up (131,072), which no
gradient check reaches; ``layer_path("numba")`` lowers that bar to one element, so the same
small inputs take the kernels, and ``layer_path("numpy")`` forces the NumPy expressions.
A test that must be sure which path ran asserts ``cpu_layers.serves(x) == (path == "numba")``.
"""
from __future__ import annotations

import contextlib

import pytest

from tinyunet import kernels
from tinyunet.kernels import cpu_layers

PATHS = ["numpy", "numba"]


@contextlib.contextmanager
def layer_path(name: str):
    """Inside the block, every layer with two implementations takes ``name``'s."""
    if name == "numpy":
        with kernels.using("reference"):
            yield
        return
    if cpu_layers.njit is None:
        pytest.skip("Numba is not installed")
    if kernels.forced() == "reference":
        pytest.skip("TINYUNET_KERNELS=reference forces the NumPy paths")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1)
        yield
