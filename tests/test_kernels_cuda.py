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
