"""The Numba CPU kernels of the element-wise layers, pooling, upsampling and Adam give what
their plain NumPy paths give (the reference, which also serves CuPy arrays).

Each test runs a layer twice on the same input, once with the NumPy path forced through
tinyunet.kernels.use("reference"), once with automatic dispatch (Numba for NumPy arrays), and
asserts that the Numba path really ran: a dispatch that silently fell back would pass anything.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinyunet import kernels
from tinyunet.layers import MaxPool2d, ReLU, UpConv2d, Upsample2d
from tinyunet.kernels import cpu_layers
from tinyunet.kernels.cpu_layers import njit
from tinyunet.kernels.cpu_layers import serves as use_numba
from tinyunet.optim import Adam

pytestmark = pytest.mark.skipif(njit is None, reason="Numba is not installed")


@pytest.fixture(autouse=True)
def numba_for_small_arrays(monkeypatch):
    """The kernels serve only large arrays; these tests use small ones, so lower the bar."""
    monkeypatch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1)


def both_paths(run, *arrays):
    """(NumPy result, Numba result) of ``run()``; checks that the dispatch differs."""
    kernels.use("reference")
    try:
        assert not use_numba(*arrays)
        reference = run()
    finally:
        kernels.use(None)
    assert use_numba(*arrays)
    return reference, run()


def assert_same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)          # exact, NaN equal to NaN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel,stride,shape", [(2, None, (2, 3, 8, 6)), (2, None, (1, 2, 7, 9)),
                                                 (3, 2, (2, 2, 9, 8)), (2, 1, (1, 3, 5, 6)),
                                                 (3, 3, (1, 1, 10, 11)), (2, 3, (1, 2, 8, 8))])
def test_maxpool_numba_equals_numpy(dtype, kernel, stride, shape):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, shape).astype(dtype)  # small integers: many ties
    x.reshape(-1)[::17] = np.nan                    # and NaN, which both paths treat alike
    dy = rng.standard_normal(MaxPool2d(kernel, stride).output_shape(shape)).astype(dtype)

    def run():
        layer = MaxPool2d(kernel, stride)
        y = layer.forward(x)
        return y, layer._argmax, layer.backward(dy)
    # overlapping windows too: both add a pixel's shares offset by offset, in one order
    assert_same(*both_paths(run, x, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale,shape", [(2, (2, 3, 4, 5)), (3, (1, 2, 3, 2)), (1, (1, 1, 2, 2))])
def test_upsample_numba_equals_numpy(dtype, scale, shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape[:2] + (shape[2] * scale, shape[3] * scale)).astype(dtype)

    def run():
        layer = Upsample2d(scale)
        return layer.forward(x), layer.backward(dy)
    (y_ref, dx_ref), (y_fast, dx_fast) = both_paths(run, x, dy)
    assert_same(y_ref, y_fast)
    # the same s*s numbers added in another order: equal up to rounding
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(dx_fast, dx_ref, rtol=tolerance, atol=tolerance * np.abs(dy).max())
    assert dx_fast.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_numba_equals_numpy_nan_and_signed_zero_included(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 70, 500)).astype(dtype)    # > one block of 65536
    x.reshape(-1)[:6] = [np.nan, 0.0, -0.0, np.inf, -np.inf, 1e-30]
    dy = rng.standard_normal(x.shape).astype(dtype)
    dy.reshape(-1)[6:9] = np.nan                               # NaN * 0 stays NaN, as NumPy

    def run():
        layer = ReLU()
        y = layer.forward(x)
        return y, layer._positive, layer.backward(dy), np.array(layer.dead_fraction())
    assert_same(*both_paths(run, x, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_numba_equals_numpy_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    shapes = {"w": (64, 3, 3, 3), "b": (64,), "big": (300, 700)}
    start = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()} for _ in range(4)]

    def run():
        params = {k: v.copy() for k, v in start.items()}
        adam = Adam(params, lr=1e-2)
        for g in grads:
            adam.step(g)
        return tuple(params.values()) + tuple(adam.m.values()) + tuple(adam.v.values())
    reference, fast = both_paths(run, start["w"])
    assert_same(reference, fast)
    assert not np.array_equal(fast[0], start["w"])


def test_small_arrays_take_the_numpy_path(monkeypatch):
    monkeypatch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1 << 17)
    assert not use_numba(np.zeros((1, 1, 256, 256), np.float32))        # 65536 elements
    assert use_numba(np.zeros((2, 1, 256, 256), np.float32))


def test_non_contiguous_inputs_take_the_numpy_path():
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8))[:, :, ::2]      # a strided view
    assert not use_numba(x)
    y = MaxPool2d(2).forward(x)
    assert y.shape == (2, 3, 2, 4)
    np.testing.assert_array_equal(ReLU().forward(x), np.maximum(x, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,bias", [((2, 3, 4, 5), True), ((1, 2, 1, 3), False), ((1, 1, 3, 1), True)])
def test_upconv_numba_data_movement_equals_numpy(dtype, shape, bias):
    """UpConv2d's four Numba kernels (columns, interleave, split, gather) against its NumPy
    path: the same additions in the same order, so the same bits."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal((shape[0], 3, 2 * shape[2], 2 * shape[3])).astype(dtype)
    b = rng.standard_normal(3)

    def run():
        layer = UpConv2d(shape[1], 3, bias=bias, seed=0, dtype=dtype)
        if bias:
            layer.params["bias"][...] = b
        y = layer.forward(x)
        return y, layer._cols.copy(), layer.backward(dy), layer.grads["weight"]
    reference, fast = both_paths(run, x, dy)
    for want, got in zip(reference, fast):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
