"""The Numba CPU kernels of the element-wise layers, pooling, upsampling and Adam give what
their plain NumPy paths give (the reference, which also serves CuPy arrays).

Each test runs a layer twice on the same input, once with the NumPy path forced through
tinyunet.kernels.use("reference"), once with automatic dispatch (Numba for NumPy arrays), and
asserts that the Numba path really ran: a dispatch that silently fell back would pass anything.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import image_shapes, pool_geometries, seeds

from tinyunet import kernels
from tinyunet.layers import MaxPool2d, ReLU, UpConv2d, Upsample2d
from tinyunet.kernels import cpu_layers
from tinyunet.kernels.cpu_layers import njit
from tinyunet.kernels.cpu_layers import serves as use_numba
from tinyunet.optim import Adam

pytestmark = pytest.mark.skipif(njit is None, reason="Numba is not installed")


@pytest.fixture(autouse=True, scope="module")
def numba_for_small_arrays():
    """The kernels serve only large arrays; these tests use small ones, so lower the bar
    (module-scoped: hypothesis runs many examples per test function)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1)
        yield


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


DTYPES = st.sampled_from([np.float32, np.float64])


@settings(max_examples=15)
@given(g=pool_geometries(max_size=10), dtype=DTYPES, seed=seeds)
def test_maxpool_numba_equals_numpy(g, dtype, seed):
    """Hypothesis-drawn geometries (overlapping, disjoint and gapped windows, sizes that do not
    divide); small integers, so many ties, and NaN, which both paths treat alike."""
    rng = np.random.default_rng(seed)
    shape = (g["n"], g["c"], g["h"], g["w"])
    x = rng.integers(-3, 4, shape).astype(dtype)
    x.reshape(-1)[rng.integers(0, 17)::17] = np.nan
    dy = rng.standard_normal(MaxPool2d(g["kernel"], g["stride"]).output_shape(shape)).astype(dtype)

    def run():
        layer = MaxPool2d(g["kernel"], g["stride"])
        y = layer.forward(x)
        return y, layer._argmax, layer.backward(dy)
    # overlapping windows too: both add a pixel's shares offset by offset, in one order
    assert_same(*both_paths(run, x, dy))


@settings(max_examples=15)
@given(shape=image_shapes(max_size=5), scale=st.integers(1, 3), dtype=DTYPES, seed=seeds)
def test_upsample_numba_equals_numpy(shape, scale, dtype, seed):
    rng = np.random.default_rng(seed)
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


@settings(max_examples=10)
@given(shape=image_shapes(max_size=9), dtype=DTYPES, seed=seeds)
def test_relu_numba_equals_numpy_on_drawn_shapes(shape, dtype, seed):
    """Zeros of both signs, NaN and infinities sprinkled over a drawn shape."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    special = np.array([np.nan, 0.0, -0.0, np.inf, -np.inf, 0.0, -0.0], dtype=dtype)
    flat = x.reshape(-1)
    where = rng.integers(0, flat.size, size=min(flat.size, 7))
    flat[where] = special[:where.size]
    dy = rng.standard_normal(shape).astype(dtype)

    def run():
        layer = ReLU()
        y = layer.forward(x)
        return y, layer._positive, layer.backward(dy)
    reference, fast = both_paths(run, x, dy)
    assert_same(reference, fast)
    assert not fast[1][x == 0].any()            # 0.0 and -0.0: no gradient (PyTorch's rule)


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


@settings(max_examples=15)
@given(shape=image_shapes(max_size=6), f=st.integers(1, 4), bias=st.booleans(), dtype=DTYPES, seed=seeds)
def test_upconv_numba_data_movement_equals_numpy(shape, f, bias, dtype, seed):
    """UpConv2d's four Numba kernels (columns, interleave, split, gather) against its NumPy
    path on drawn shapes (one row or one column included): the same additions in the same
    order, so the same bits."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal((shape[0], f, 2 * shape[2], 2 * shape[3])).astype(dtype)
    b = rng.standard_normal(f)

    def run():
        layer = UpConv2d(shape[1], f, bias=bias, seed=0, dtype=dtype)
        if bias:
            layer.params["bias"][...] = b
        y = layer.forward(x)
        return y, layer._cols.copy(), layer.backward(dy), layer.grads["weight"]
    reference, fast = both_paths(run, x, dy)
    for want, got in zip(reference, fast):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)
