"""The Numba kernels of kernels/cpu_networks.py (batch norm in training mode, max-unpooling, the
ceil-rounded max-pool) give what the layers' NumPy paths give.

Each test runs a layer twice on the same input, once with the NumPy path forced
(tinyunet.kernels.use("reference")), once with automatic dispatch and the kernels' size bar
lowered to one element, and asserts which path ran each time (a dispatch that silently fell
back would pass anything). The pool and unpool kernels move values: bit for bit, ties and NaN
included. Batch norm sums in another order (float64 accumulators): to rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds

from tinyunet import kernels
from tinyunet.kernels import cpu_layers
from tinyunet.layers import BatchNorm2d, CeilMaxPool2d, MaxUnpool2d

pytestmark = pytest.mark.skipif(cpu_layers.njit is None, reason="Numba is not installed")


@pytest.fixture(autouse=True, scope="module")
def kernels_for_small_arrays():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1)
        yield


def both_paths(run, *arrays):
    """(NumPy result, Numba result) of ``run()``; checks which path each call took."""
    with kernels.using("reference"):
        assert not cpu_layers.serves(*arrays)
        reference = run()
    assert cpu_layers.serves(*arrays)
    return reference, run()


# -- batch normalisation ----------------------------------------------------------------------
bn_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)).filter(
    lambda s: s[0] * s[2] * s[3] >= 2)


@settings(max_examples=25)
@given(shape=bn_shapes, dtype=st.sampled_from([np.float64, np.float32]), seed=seeds)
def test_batchnorm_kernels_equal_the_numpy_path(shape, dtype, seed):
    """y, dx, dgamma, dbeta and the running statistics, from a shifted, scaled input (a mean
    far from 0 is where a one-pass variance would cancel), one channel constant."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    x[:, 0] = 7.25                                                    # variance 0: xhat = 0
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, shape[1]), rng.standard_normal(shape[1])

    def run():
        layer = BatchNorm2d(shape[1], dtype=dtype)
        layer.params["weight"][:], layer.params["bias"][:] = gamma, beta
        y = layer.forward(x)
        dx = layer.backward(dy)
        return [y, dx, layer.grads["weight"], layer.grads["bias"], *layer.buffers.values()]
    tol = dict(rtol=1e-11, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    for ours, reference in zip(*reversed(both_paths(run, x, dy))):
        assert ours.dtype == reference.dtype == dtype and ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, **tol)


def test_batchnorm_kernel_in_evaluation_mode_leaves_the_numpy_path_alone():
    """Evaluation mode (running statistics) has no kernel: both dispatches give the same bits."""
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5))

    def run():
        layer = BatchNorm2d(3, dtype=np.float64).eval()
        layer.buffers["running_var"][:] = [0.5, 1, 2]
        return layer.forward(x), layer.backward(dy)
    for a, b in zip(*both_paths(run, x, dy)):
        np.testing.assert_array_equal(a, b)


# -- max-unpooling ----------------------------------------------------------------------------
@settings(max_examples=20)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9),
       dtype=st.sampled_from([np.float64, np.float32]), seed=seeds)
def test_unpool_kernels_equal_the_numpy_path(n, c, h, w, dtype, seed):
    """Indices from a ceil pool (windows clipped at the edge), values with ties and NaN."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, c, h, w)).astype(dtype)
    x.reshape(-1)[rng.integers(0, 7)::7] = np.nan
    with kernels.using("reference"):
        pooled, indices = CeilMaxPool2d(2, return_indices=True).forward(x)
    dy = rng.standard_normal((n, c, h, w)).astype(dtype)

    def run():
        layer = MaxUnpool2d(2)
        return layer.forward(pooled, indices, (h, w)), layer.backward(dy)
    for a, b in zip(*both_paths(run, pooled, dy)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# -- ceil-rounded max-pooling -----------------------------------------------------------------
@settings(max_examples=30)
@given(k=st.integers(1, 3), data=st.data(), n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 9),
       w=st.integers(1, 9), dtype=st.sampled_from([np.float64, np.float32]), seed=seeds)
def test_ceil_pool_kernel_equals_the_padded_path(k, data, n, c, h, w, dtype, seed):
    """y, the argmax, the indices and dx: overhanging windows, overlapping ones (stride < kernel:
    the forward kernel, the padded path's backward), inputs smaller than a window, ties among
    values <= 0 (a padding that could win would show), NaN."""
    s = data.draw(st.integers(1, k))
    rng = np.random.default_rng(seed)
    x = np.array([-2.0, -1.0, -0.0, 0.0], dtype=dtype)[rng.integers(0, 4, (n, c, h, w))]
    x.reshape(-1)[rng.integers(0, 11)::11] = np.nan
    pool_shape = CeilMaxPool2d(k, s).output_shape(x.shape)
    dy = rng.standard_normal(pool_shape).astype(dtype)

    def run():
        layer = CeilMaxPool2d(k, s, return_indices=True)
        y, indices = layer.forward(x)
        return y, indices, layer.indices(), layer._argmax, layer.backward(dy)
    reference, ours = both_paths(run, x, dy)
    for a, b in zip(reference, ours):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))        # -0.0 and 0.0 apart


def test_ceil_pool_kernel_without_indices_and_without_keeping():
    """return_indices=False, and inside no_grad() (nothing kept): the same y either way."""
    from tinyunet import no_grad
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 5))

    def run():
        layer = CeilMaxPool2d(2)
        with no_grad():
            y = layer.forward(x)
        assert layer._argmax is None
        return y, layer.forward(x)
    for a, b in zip(*both_paths(run, x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("h, w", [(7, 5), (8, 8), (1, 3), (2, 1)])
def test_ceil_pool_kernel_2x2_loop_equals_the_padded_path(h, w):
    """FCN's and SegNet's 2x2/2 windows take their own loop in the kernel: every size parity,
    ties among values <= 0 and NaN, forward, indices and backward."""
    rng = np.random.default_rng(h * 10 + w)
    x = np.array([-2.0, -1.0, -0.0, 0.0])[rng.integers(0, 4, (2, 3, h, w))]
    x.reshape(-1)[5::13] = np.nan
    dy = rng.standard_normal(CeilMaxPool2d(2).output_shape(x.shape))

    def run():
        layer = CeilMaxPool2d(2, return_indices=True)
        y, indices = layer.forward(x)
        return y, indices, layer._argmax, layer.backward(dy)
    for a, b in zip(*both_paths(run, x, dy)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))
