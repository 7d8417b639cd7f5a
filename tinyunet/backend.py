"""NumPy or CuPy, picked by the arrays themselves.

This is the only module in tinyunet that imports CuPy. Everything else asks it:

    xp = get_array_module(x)        # numpy for a numpy.ndarray, cupy for a cupy.ndarray
    y = xp.maximum(x, 0)            # one code path for both

and moves arrays with ``to_device(a, "cpu" | "gpu")``. Asking for the GPU where there is
none raises :class:`DeviceError`, which says why (CuPy missing, or no CUDA device) and how
to fix it. Tested in tests/test_backend.py.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra: pip install -e ".[gpu]"
    import cupy as _cupy
except Exception as _error:  # ImportError, or a broken CUDA install raising at import
    _cupy = None
    _CUPY_IMPORT_ERROR = f"{type(_error).__name__}: {_error}"
else:
    _CUPY_IMPORT_ERROR = None

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The GPU was asked for but cannot be used, or arrays live on different devices."""


def _why_no_gpu() -> str | None:
    """None when the GPU can be used, else a sentence saying why not and what to do."""
    if _cupy is None:
        return ("CuPy is not installed (" + str(_CUPY_IMPORT_ERROR) + "). "
                "Install it with: pip install -e \".[gpu]\" (cupy-cuda12x needs an NVIDIA "
                "driver for CUDA 12), or run on the CPU with device='cpu'.")
    try:
        if _cupy.cuda.is_available():
            return None
        reason = "cupy.cuda.is_available() is False"
    except Exception as error:  # the driver library itself may be missing
        reason = f"{type(error).__name__}: {error}"
    return ("CuPy is installed but no CUDA device can be used (" + reason + "). "
            "Check `nvidia-smi` and the NVIDIA driver, or run on the CPU with device='cpu'.")


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device answers."""
    return _why_no_gpu() is None


def require_gpu() -> None:
    """Raise DeviceError, naming the reason and the fix, unless the GPU can be used."""
    reason = _why_no_gpu()
    if reason is not None:
        raise DeviceError("the GPU was requested but cannot be used: " + reason)


def is_gpu_array(a) -> bool:
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def is_array(a) -> bool:
    return isinstance(a, np.ndarray) or is_gpu_array(a)


def get_array_module(*arrays):
    """numpy, or cupy when any of ``arrays`` is a cupy.ndarray (non-arrays are ignored)."""
    if _cupy is not None and any(isinstance(a, _cupy.ndarray) for a in arrays):
        return _cupy
    return np


def device_of(a) -> str:
    """'gpu' for a cupy.ndarray, else 'cpu'."""
    return "gpu" if is_gpu_array(a) else "cpu"


def check_device_name(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    return device


def to_numpy(a):
    """A numpy.ndarray holding ``a`` (copied off the GPU when it is a cupy.ndarray)."""
    if is_gpu_array(a):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, device: str):
    """``a`` as an array on ``device`` ('cpu' or 'gpu'); no copy when it is already there."""
    check_device_name(device)
    if device == "cpu":
        return to_numpy(a)
    require_gpu()
    return _cupy.asarray(a)


def synchronize(a=None) -> None:
    """Wait for queued GPU work (for honest timings); does nothing for NumPy."""
    if _cupy is not None and (a is None or is_gpu_array(a)) and gpu_available():
        _cupy.cuda.get_current_stream().synchronize()


def random_uniform(rng: np.random.Generator, shape, dtype, like):
    """Uniform [0, 1) values of ``dtype`` on the device of ``like``, drawn from ``rng``.

    One NumPy generator holds all the state (so a checkpoint saves it and resume is exact);
    on the GPU it only seeds a CuPy generator, so the values never cross the bus.
    """
    if is_gpu_array(like):
        seed = int(rng.integers(2**63))
        return _cupy.random.default_rng(seed).random(shape, dtype=dtype)
    return rng.random(shape, dtype=dtype)
