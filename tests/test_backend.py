"""The backend picks NumPy or CuPy by the arrays, and refuses the GPU with a reason and a fix."""
import numpy as np
import pytest

from tinyunet import backend
from tinyunet.backend import DeviceError
from tinyunet.layers import Conv2d


def test_numpy_arrays_get_numpy():
    assert backend.get_array_module(np.zeros(2), 3.0, None) is np
    assert backend.device_of(np.zeros(1)) == "cpu"
    a = np.arange(3.0)
    assert backend.to_device(a, "cpu") is a


def test_asking_for_the_gpu_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_CUPY_IMPORT_ERROR", "ModuleNotFoundError: No module named 'cupy'")
    assert not backend.gpu_available()
    with pytest.raises(DeviceError, match=r"CuPy is not installed.*pip install -e \"\.\[gpu\]\""):
        backend.to_device(np.zeros(2), "gpu")
    with pytest.raises(DeviceError, match="device='cpu'"):
        Conv2d(1, 2, 3).to("gpu")


def test_asking_for_the_gpu_without_a_device_says_so(monkeypatch):
    class FakeCuda:
        @staticmethod
        def is_available():
            return False

    class FakeCupy:
        cuda = FakeCuda
        ndarray = type("ndarray", (), {})

    monkeypatch.setattr(backend, "_cupy", FakeCupy)
    with pytest.raises(DeviceError, match="no CUDA device.*nvidia-smi"):
        backend.require_gpu()


def fake_cupy_module(kernel_error=None, available=True):
    """A stand-in CuPy whose device answers, and whose first kernel works (NumPy does the
    arithmetic) or fails with ``kernel_error``; counts the kernels it was asked to run."""
    import types
    cupy = types.ModuleType("fake_cupy")
    cupy.ndarray = type("ndarray", (), {})
    cupy.int32 = np.int32
    cupy.launched = 0
    cupy.cuda = types.SimpleNamespace(is_available=lambda: available)

    def arange(*args, **kwargs):
        cupy.launched += 1
        if kernel_error is not None:
            raise kernel_error
        return np.arange(*args, **kwargs)
    cupy.arange = arange
    return cupy


def test_the_gpu_check_runs_a_kernel_not_only_counts_devices(monkeypatch):
    """A device that answers is not enough: CuPy also needs NVRTC and the CUDA runtime to run
    its first kernel. The check runs one, once per CuPy module, and says what failed."""
    broken = fake_cupy_module(RuntimeError("CuPy failed to load libnvrtc.so.12"))
    monkeypatch.setattr(backend, "_cupy", broken)
    assert not backend.gpu_available()
    with pytest.raises(DeviceError, match=r"cannot run on it \(a first CUDA kernel failed: RuntimeError: "
                                          r"CuPy failed to load libnvrtc.so.12\).*pip install -e"):
        backend.require_gpu()
    working = fake_cupy_module()
    monkeypatch.setattr(backend, "_cupy", working)
    assert backend.gpu_available() and backend.gpu_available()
    assert working.launched == 1, "the check's answer is kept: synchronize() asks on every call"
    monkeypatch.setattr(backend, "_cupy", fake_cupy_module(available=False))
    with pytest.raises(DeviceError, match="no CUDA device"):
        backend.require_gpu()


def test_release_gpu_memory_frees_the_cached_blocks(monkeypatch):
    cupy = fake_cupy_module()
    pools = {"device": {"held": 700, "used": 200}, "pinned": {"freed": False}}

    class Pool:
        def total_bytes(self):
            return pools["device"]["held"]

        def free_all_blocks(self):
            pools["device"]["held"] = pools["device"]["used"]

    class PinnedPool:
        def free_all_blocks(self):
            pools["pinned"]["freed"] = True
    cupy.get_default_memory_pool = Pool
    cupy.get_default_pinned_memory_pool = PinnedPool
    monkeypatch.setattr(backend, "_cupy", cupy)
    assert backend.release_gpu_memory() == 500 and pools["pinned"]["freed"]
    monkeypatch.setattr(backend, "_cupy", None)
    assert backend.release_gpu_memory() == 0


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        backend.to_device(np.zeros(1), "tpu")


@pytest.mark.gpu
def test_layer_moves_to_the_gpu_and_back():
    import cupy
    layer = Conv2d(2, 3, 3, seed=0).to("gpu")
    assert isinstance(layer.params["weight"], cupy.ndarray) and layer.device == "gpu"
    x = cupy.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32))
    y = layer.forward(x)
    reference = Conv2d(2, 3, 3, seed=0).forward(cupy.asnumpy(x))
    np.testing.assert_allclose(cupy.asnumpy(y), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(DeviceError, match="input is on the CPU but the parameters are on the GPU"):
        layer.forward(cupy.asnumpy(x))
    assert layer.to("cpu").device == "cpu"


def test_import_sets_the_malloc_threshold_unless_told_not_to():
    """tinyunet keeps large freed blocks in glibc's heap (tinyunet/__init__.py); the user's own
    malloc settings or TINYUNET_NO_MALLOPT=1 turn that off."""
    import os
    import platform
    import subprocess
    import sys
    code = "import tinyunet; print(tinyunet.MALLOPT_APPLIED)"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TINYUNET_NO_MALLOPT", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}

    def applied(**extra):
        done = subprocess.run([sys.executable, "-c", code], env={**clean, **extra}, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert applied() == str(glibc)
    assert applied(TINYUNET_NO_MALLOPT="1") == "False"
    assert applied(MALLOC_MMAP_THRESHOLD_="65536") == "False"
    assert applied(MALLOC_TRIM_THRESHOLD_="65536") == "False"


def test_import_shortens_openblas_spin_unless_numpy_came_first_or_the_user_chose():
    """tinyunet asks OpenBLAS's threads to stop polling soon after a product (tinyunet/__init__.py);
    OpenBLAS reads the setting when NumPy loads it, so it is made only before NumPy's import,
    and never over the user's own value."""
    import os
    import subprocess
    import sys
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    def run(code, **extra):
        done = subprocess.run([sys.executable, "-c", code + "; import os; print(tinyunet.OPENBLAS_SPIN_SHORTENED, "
                               "os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"],
                              env={**clean, **extra}, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert run("import tinyunet") == "True 18"
    assert run("import tinyunet", OPENBLAS_THREAD_TIMEOUT="26") == "False 26"
    assert run("import numpy, tinyunet") == "False None"
