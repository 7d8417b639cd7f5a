"""The Numba CUDA im2col/col2im (kernels/cuda.py) against the reference.

Two ways to run, and the file skips cleanly where neither applies:

* the CUDA simulator, on any machine, tiny inputs (one Python thread per CUDA thread)::

      NUMBA_ENABLE_CUDASIM=1 .venv/bin/pytest tests/test_kernels_cuda.py

  The kernels then get Numba device arrays (cuda.to_device) and NumPy arrays;
* a real GPU: the same tests on Numba device arrays, plus the @pytest.mark.gpu tests below on
  CuPy arrays at realistic sizes (skipped by tests/conftest.py where no GPU answers).

Proves: im2col equals the reference exactly, col2im equals it within float rounding (it adds
in the reference's order, so in practice exactly); col2im is deterministic; out= is honoured.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyunet import kernels
from tinyunet.backend import gpu_available
from tinyunet.kernels import reference
from tinyunet.kernels.geometry import cols_shape

cuda_kernels = pytest.importorskip(
    "tinyunet.kernels.cuda", exc_type=ImportError,
    reason="Numba's CUDA target is not usable here: no GPU, and NUMBA_ENABLE_CUDASIM is not enabled")
from numba import cuda  # noqa: E402  (only once the kernels could be imported)

SIMULATOR = cuda_kernels.SIMULATOR


@st.composite
def tiny_geometries(draw):
    """Small enough for the simulator: at most 2*2*3*3*5*5 = 900 simulated threads. Kernel
    sides, paddings and strides drawn per axis."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = st.integers(0, 2)
    if draw(st.booleans()):
        ph, pw = draw(pads), draw(pads)
        padding = ((ph, ph), (pw, pw))
    else:
        padding = ((draw(pads), draw(pads)), (draw(pads), draw(pads)))
    (pt, pb), (pl, pr) = padding
    h = draw(st.integers(max(1, kh - pt - pb), 5))
    w = draw(st.integers(max(1, kw - pl - pr), 5))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w)
    return dict(shape=shape, kernel=(kh, kw), padding=padding,
                stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),     # per axis: (2, 1) too
                dtype=draw(st.sampled_from([np.float32, np.float64])), seed=draw(st.integers(0, 2**32 - 1)))


def draw_arrays(g):
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal(g["shape"]).astype(g["dtype"])
    y = rng.standard_normal(cols_shape(g["shape"], g["kernel"], g["padding"], g["stride"])).astype(g["dtype"])
    return x, y


def args(g):
    return g["kernel"], g["padding"], g["stride"]


@given(tiny_geometries())
def test_cuda_im2col_equals_reference(g):
    x, _ = draw_arrays(g)
    got = cuda_kernels.im2col(cuda.to_device(x), *args(g))
    np.testing.assert_array_equal(got.copy_to_host(), reference.im2col(x, *args(g)))


@given(tiny_geometries())
def test_cuda_col2im_equals_reference(g):
    x, y = draw_arrays(g)
    got = cuda_kernels.col2im(cuda.to_device(y), x.shape, *args(g))
    np.testing.assert_allclose(got.copy_to_host(), reference.col2im(y, x.shape, *args(g)),
                               rtol=0, atol=20 * np.finfo(g["dtype"]).eps)


@pytest.mark.parametrize("kernel, padding, stride", [((3, 2), ((1, 0), (0, 1)), (2, 1)), ((2, 3), 1, (1, 2))])
def test_cuda_with_non_square_strides_equals_reference(kernel, padding, stride):
    """Written down as well as drawn: a row stride read from the column one passes every
    square stride."""
    g = dict(shape=(1, 2, 5, 4), kernel=kernel, padding=padding, stride=stride, dtype=np.float64, seed=5)
    x, y = draw_arrays(g)
    got = cuda_kernels.im2col(cuda.to_device(x), *args(g))
    np.testing.assert_array_equal(got.copy_to_host(), reference.im2col(x, *args(g)))
    back = cuda_kernels.col2im(cuda.to_device(y), x.shape, *args(g))
    np.testing.assert_allclose(back.copy_to_host(), reference.col2im(y, x.shape, *args(g)), rtol=0, atol=1e-14)


def test_cuda_hand_computed_example_and_out_buffer():
    """3x3 image, 2x2 kernel: the reference's hand-computed columns, written into out=."""
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    out = cuda.to_device(np.full((1, 4, 4), np.nan, dtype=np.float32))
    assert cuda_kernels.im2col(cuda.to_device(x), 2, 0, 1, out=out) is out
    np.testing.assert_array_equal(out.copy_to_host()[0], [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    counts = cuda_kernels.col2im(cuda.to_device(np.ones((1, 4, 4), np.float32)), x.shape, 2, 0, 1)
    np.testing.assert_array_equal(counts.copy_to_host()[0, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_cuda_refuses_a_wrong_out_buffer():
    x = cuda.to_device(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        cuda_kernels.im2col(x, 2, 0, 1, out=cuda.to_device(np.zeros((1, 4, 5), np.float32)))


@pytest.mark.skipif(SIMULATOR, reason="the simulator accepts host arrays on purpose")
def test_cuda_refuses_host_arrays():
    with pytest.raises(TypeError, match="GPU arrays"):
        cuda_kernels.im2col(np.zeros((1, 1, 3, 3), np.float32), 2, 0, 1)


# -- index arithmetic: 32 bits where every index fits ------------------------------------------

def test_index_type_at_the_2_31_boundary():
    assert cuda_kernels.index_type(2 ** 31 - 1) is np.uint32
    assert cuda_kernels.index_type(2 ** 31) is np.uint64
    assert cuda_kernels.index_type(5, 2 ** 31 - 1, 7) is np.uint32
    assert cuda_kernels.index_type(5, 2 ** 31) is np.uint64


@pytest.mark.parametrize("channels, index", [(64, np.uint64), (56, np.uint32)])
def test_im2col_picks_64_bit_indices_when_only_the_columns_pass_2_31(monkeypatch, channels, index):
    """A 3x3 im2col of (1, C, 2048, 2048): x has C * 2**22 elements (below 2**31 for both C),
    the columns 9 times as many, which pass 2**31 for C = 64 (2.4e9) but not for C = 56 (2.1e9).
    Nothing is allocated: x is a zero-stride view and the launch is intercepted."""
    x = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(1, channels, 2048, 2048),
                                        strides=(0, 0, 0, 0))
    launched = {}
    monkeypatch.setattr(cuda_kernels, "_contiguous", lambda a, name: a)
    monkeypatch.setattr(cuda_kernels, "_empty_like_input", lambda a, shape, dtype: None)
    monkeypatch.setattr(cuda_kernels, "_device_view", lambda a, name: a)
    monkeypatch.setattr(cuda_kernels, "_launch", lambda kernel, size, *rest: launched.update(kernel=kernel, size=size))
    cuda_kernels.im2col(x, 3, 1, 1)
    assert launched["size"] == 9 * channels * 2048 * 2048
    assert launched["kernel"] is cuda_kernels._KERNELS[index][0]


@pytest.mark.parametrize("index", [np.uint32, np.uint64])
@pytest.mark.parametrize("kernel, padding, stride", [(3, 1, 1), (3, ((2, 0), (1, 2)), 2), (2, 0, 2)])
def test_both_index_builds_equal_the_reference(monkeypatch, index, kernel, padding, stride):
    monkeypatch.setattr(cuda_kernels, "index_type", lambda *sizes: index)
    x = np.random.default_rng(5).standard_normal((2, 2, 5, 6)).astype(np.float32)
    cols = cuda_kernels.im2col(cuda.to_device(x), kernel, padding, stride).copy_to_host()
    np.testing.assert_array_equal(cols, reference.im2col(x, kernel, padding, stride))
    back = cuda_kernels.col2im(cuda.to_device(cols), x.shape, kernel, padding, stride).copy_to_host()
    np.testing.assert_allclose(back, reference.col2im(cols, x.shape, kernel, padding, stride), rtol=0, atol=1e-6)


PTX_CHECK = """
import re, sys
import numpy as np
from numba import cuda, types
from tinyunet.kernels import cuda as ck     # TINYUNET_CUDA_COMPILE_ONLY=1: no GPU needed
try:
    cuda.compile_ptx(lambda a: None, (types.float32[::1],), cc=(9, 0))
except Exception as error:
    print("NO-NVVM", type(error).__name__, str(error)[:200]); sys.exit(0)
a4, a3, i64 = types.float32[:, :, :, ::1], types.float32[:, :, ::1], types.int64
for name, kernel, signature in (("im2col", ck._KERNELS[np.uint32][0], (a4, a3) + (i64,) * 8),
                                ("col2im", ck._KERNELS[np.uint32][1], (a3, a4) + (i64,) * 8 + (types.float32,))):
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
    print(name, sorted(set(re.findall(r"^\\s*((?:div|rem)\\.[a-z0-9]+)", ptx, re.M))))
"""


def test_the_32_bit_build_compiles_to_32_bit_divisions():
    """Compiled to PTX (needs NVVM: a CUDA toolkit, or the numba-cuda[cu12] wheels; no GPU):
    every division and remainder of the 32-bit build is a 32-bit one, as intended."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "TINYUNET_CUDA_COMPILE_ONLY": "1"}
    done = subprocess.run([sys.executable, "-c", PTX_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if done.stdout.startswith("NO-NVVM"):
        pytest.skip(f"NVVM not found, nothing to compile with: {done.stdout.strip()}")
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"im2col", "col2im"}
    for name, ops in lines.items():
        assert ops != "[]" and "64" not in ops, f"{name}: {ops}"


# -- launching without waiting, and the checks that the target works ----------------------------

def test_views_of_cupy_arrays_do_not_synchronise(monkeypatch):
    """as_cuda_array(a) waits for the stream CuPy exports unless sync=False; the kernels run on
    that same stream (_launch), so the wait is never needed."""
    calls = []
    marker = object()
    monkeypatch.setattr(cuda_kernels, "is_gpu_array", lambda a: a is marker)
    monkeypatch.setattr(cuda_kernels.cuda, "as_cuda_array", lambda a, **kw: calls.append(kw) or "view",
                        raising=False)     # the simulator has none
    assert cuda_kernels._device_view(marker, "x") == "view"
    assert calls == [{"sync": False}]


def test_low_occupancy_warning_is_off_in_tests():
    """tests/conftest.py sets NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 before Numba loads; else every
    tiny launch on a real GPU warns, and warnings are errors here (setup.cfg)."""
    try:
        from numba.cuda.core import config      # numba-cuda, the target the gpu extra installs
    except ImportError:
        from numba.core import config           # the target built into Numba
    assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 0


class FakeTarget:
    """A stand-in for numba.cuda: available or not, compiling or not, right or wrong."""

    def __init__(self, available=True, compile_error=None, writes=7):
        self.available, self.compile_error, self.writes = available, compile_error, writes

    def is_available(self):
        return self.available

    def jit(self, function):
        if self.compile_error is not None:
            raise self.compile_error
        target = self

        class Launcher:
            def __getitem__(self, config):
                return lambda out: out.__setitem__(0, target.writes)
        return Launcher()

    def device_array(self, n, dtype):
        array = np.zeros(n, dtype)
        return type("Device", (), {"copy_to_host": lambda self: array, "__setitem__":
                                   lambda self, i, v: array.__setitem__(i, v)})()


def test_the_target_check_launches_a_kernel_and_says_why_not():
    assert cuda_kernels.why_unusable(FakeTarget()) is None
    assert "is_available() is False" in cuda_kernels.why_unusable(FakeTarget(available=False))
    missing = cuda_kernels.why_unusable(FakeTarget(compile_error=OSError("libNVVM cannot be found")))
    assert missing == "a first Numba CUDA kernel failed: OSError: libNVVM cannot be found"
    assert "wrote 0 instead of 7" in cuda_kernels.why_unusable(FakeTarget(writes=0))
    message = cuda_kernels.unusable_message(missing)
    assert "libNVVM" in message and 'pip install -e ".[gpu]"' in message and "NUMBA_ENABLE_CUDASIM=1" in message


def test_gpu_arrays_fall_back_to_the_reference_loudly_once(monkeypatch):
    marker = object()
    monkeypatch.setattr(kernels, "is_gpu_array", lambda a: a is marker)
    monkeypatch.setattr(kernels, "_modules", {"reference": reference})
    monkeypatch.setattr(kernels, "_import_errors", {"cuda": "ImportError: libNVVM cannot be found"})
    monkeypatch.setattr(kernels, "_warned_fallback", False)
    monkeypatch.setattr(kernels, "_forced", None)
    with pytest.warns(kernels.KernelFallbackWarning, match="reference kernels.*libNVVM cannot be found"):
        assert kernels.implementation_for(marker) is reference
    assert kernels.implementation_for(marker) is reference      # once: no second warning (errors here)


# -- real GPUs, CuPy arrays -------------------------------------------------------------------

@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel, padding, stride", [(3, 1, 1), (2, ((0, 1), (0, 1)), 1), (3, ((2, 0), (1, 2)), 2),
                                                     (1, 0, 1), ((3, 2), ((1, 0), (0, 1)), (2, 1)),
                                                     ((2, 3), 1, (1, 2))])
def test_cuda_on_cupy_arrays_equals_reference(cupy, dtype, kernel, padding, stride):
    """Realistic sizes on CuPy arrays: the CUDA kernels against the reference run by CuPy."""
    rng = np.random.default_rng(11)
    x = cupy.asarray(rng.standard_normal((2, 16, 67, 45)).astype(dtype))
    cols = cuda_kernels.im2col(x, kernel, padding, stride)
    assert isinstance(cols, cupy.ndarray)
    cupy.testing.assert_array_equal(cols, reference.im2col(x, kernel, padding, stride))
    back = cuda_kernels.col2im(cols, x.shape, kernel, padding, stride)
    expected = reference.col2im(cols, x.shape, kernel, padding, stride)
    cupy.testing.assert_allclose(back, expected, rtol=0, atol=50 * np.finfo(dtype).eps)
    again = cuda_kernels.col2im(cols, x.shape, kernel, padding, stride)
    assert bool((again == back).all()), "col2im must be deterministic: it gathers, no atomics"


@pytest.mark.gpu
def test_the_cuda_kernels_are_really_available():
    """No silent fallback: on a GPU machine the Numba CUDA kernels must load (NVVM found, a
    kernel ran), or every CuPy im2col would quietly take the slow reference path."""
    assert not SIMULATOR, "the GPU tests must run on the real CUDA target, not the simulator"
    assert kernels.available()["cuda"] is None, kernels.available()["cuda"]


@pytest.mark.gpu
def test_cuda_kernels_on_a_non_default_stream(cupy):
    """The launch follows CuPy's current stream (_launch's external_stream branch), and the
    views are made without a wait (sync=False): results must still be right."""
    x = cupy.asarray(np.random.default_rng(2).standard_normal((2, 8, 33, 17)).astype(np.float32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = x * 2                                   # queued on the stream, not waited for
        cols = cuda_kernels.im2col(y, 3, 1, 1)
        back = cuda_kernels.col2im(cols, y.shape, 3, 1, 1)
    stream.synchronize()
    cupy.testing.assert_array_equal(cols, reference.im2col(x * 2, 3, 1, 1))
    cupy.testing.assert_allclose(back, reference.col2im(cols, x.shape, 3, 1, 1), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_cupy_arrays_are_dispatched_to_cuda(cupy):
    x = cupy.zeros((1, 1, 4, 4), dtype=cupy.float32)
    previous = kernels.forced()
    kernels.use(None)
    try:
        assert kernels.implementation_for(x) is cuda_kernels
    finally:
        kernels.use(previous)


@pytest.mark.gpu
def test_gpu_available_agrees_with_the_marker():
    assert gpu_available()
