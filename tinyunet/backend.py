"""NumPy or CuPy, picked by the arrays themselves.

This is the only module in tinyunet that imports CuPy. Everything else asks it:

    xp = get_array_module(x)        # numpy for a numpy.ndarray, cupy for a cupy.ndarray
    y = xp.maximum(x, 0)            # one code path for both

and moves arrays with ``to_device(a, "cpu" | "gpu")``. Asking for the GPU where there is
none raises :class:`DeviceError`, which says why (CuPy missing, no CUDA device, or a first
kernel that cannot run) and how to fix it. For the GPU's memory: ``release_gpu_memory()``
gives CuPy's cached blocks back after a prediction, ``GpuMemoryPeak`` watches the pool's peak
for the benchmarks. Tested in tests/test_backend.py and tests/test_gpu_bench.py.
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


# The answer of the GPU check, per CuPy module (keyed by the module itself: a test may swap in a
# fake one): launching a kernel costs a compilation the first time, and synchronize() asks on
# every call.
_GPU_CHECKS: dict = {}


def _probe_kernel(cupy) -> str | None:
    """None when one tiny elementwise kernel runs on the device and gives the right answer.

    Counting devices is not enough: CuPy compiles its kernels with NVRTC and needs the CUDA
    runtime libraries, which may be missing where the driver answers. This allocates, compiles,
    launches and reads back, as the first real step would.
    """
    try:
        got = int((cupy.arange(3, dtype=cupy.int32) * 2 + 1).sum())
    except Exception as error:
        return f"a first CUDA kernel failed: {type(error).__name__}: {error}"
    if got != 9:
        return f"a first CUDA kernel returned {got} instead of 9"
    return None


def _why_no_gpu() -> str | None:
    """None when the GPU can be used, else a sentence saying why not and what to do."""
    if _cupy is None:
        return ("CuPy is not installed (" + str(_CUPY_IMPORT_ERROR) + "). "
                "Install it with: pip install -e \".[gpu]\" (cupy-cuda12x needs an NVIDIA "
                "driver for CUDA 12), or run on the CPU with device='cpu'.")
    key = _cupy
    if key not in _GPU_CHECKS:
        try:
            reason = None if _cupy.cuda.is_available() else "cupy.cuda.is_available() is False"
        except Exception as error:  # the driver library itself may be missing
            reason = f"{type(error).__name__}: {error}"
        if reason is None:
            reason = _probe_kernel(_cupy)
            if reason is not None:
                _GPU_CHECKS[key] = (
                    "CuPy sees a CUDA device but cannot run on it (" + reason + "). The CUDA "
                    "libraries CuPy loads (NVRTC, the runtime) may be missing: pip install -e \".[gpu]\" "
                    "brings them as wheels; or run on the CPU with device='cpu'.")
                return _GPU_CHECKS[key]
        _GPU_CHECKS[key] = None if reason is None else (
            "CuPy is installed but no CUDA device can be used (" + reason + "). "
            "Check `nvidia-smi` and the NVIDIA driver, or run on the CPU with device='cpu'.")
    return _GPU_CHECKS[key]


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


def release_gpu_memory() -> int:
    """Give the blocks CuPy's memory pool holds but no array uses back to the driver; returns
    the bytes freed (0 without a GPU).

    CuPy keeps every freed block for reuse. After a prediction (whole images, sizes training
    never uses) those blocks only raise the next step's peak and fragment the pool, so the
    prediction paths call this once they have copied their result to the host. Not after every
    training step: there the same sizes come back and reusing blocks is the point of the pool.
    """
    if _cupy is None or not gpu_available():
        return 0
    pool = _cupy.get_default_memory_pool()
    held = pool.total_bytes()
    pool.free_all_blocks()
    _cupy.get_default_pinned_memory_pool().free_all_blocks()
    return held - pool.total_bytes()


def gpu_name() -> str | None:
    """The current CUDA device's name (None without a GPU)."""
    if not gpu_available():
        return None
    name = _cupy.cuda.runtime.getDeviceProperties(_cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


class GpuMemoryPeak:
    """The peak bytes of CuPy's default memory pool while it is on: in use by arrays
    (``peak_used``, PyTorch's max_memory_allocated) and held, in use plus cached (``peak_held``,
    PyTorch's max_memory_reserved).

    The pool keeps no peak of its own, and its bytes at the end of a run say nothing of the
    moment in between when the most was needed; so every allocation goes through ``_malloc``,
    which asks the pool and notes the highest values. A Python call per allocation: turn it off
    (``stop()``, or leave the ``with`` block) before timing anything.

        with GpuMemoryPeak() as peak:
            step()
        print(peak.peak_used, peak.peak_held)
    """

    def __init__(self):
        require_gpu()
        self._pool = _cupy.get_default_memory_pool()
        self.peak_used = self._pool.used_bytes()
        self.peak_held = self._pool.total_bytes()
        _cupy.cuda.set_allocator(self._malloc)

    def _malloc(self, size: int):
        memory = self._pool.malloc(size)
        self.peak_used = max(self.peak_used, self._pool.used_bytes())
        self.peak_held = max(self.peak_held, self._pool.total_bytes())
        return memory

    def stop(self) -> "GpuMemoryPeak":
        """Back to the pool's own allocator; the peaks stay readable."""
        _cupy.cuda.set_allocator(self._pool.malloc)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
