"""BatchNorm2d: central differences in both modes, the running averages, PyTorch."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paths import PATHS, layer_path
from strategies import seeds

from tinyunet.gradcheck import check_layer
from tinyunet.layers import BatchNorm2d

# at least 4 values per channel: with 2, xhat = +-d / sqrt(d^2 + eps) is nearly constant, dL/dx
# is of the order eps / d^3 and a relative error measures only the rounding of the differences
shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)).filter(
    lambda s: s[0] * s[2] * s[3] >= 4)


def make(c, seed):
    rng = np.random.default_rng(seed)
    layer = BatchNorm2d(c, dtype=np.float64)
    layer.params["weight"][:] = rng.uniform(0.5, 2.0, c)
    layer.params["bias"][:] = rng.standard_normal(c)
    layer.buffers["running_mean"][:] = rng.standard_normal(c)
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2.0, c)
    return layer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@given(shape=shapes, seed=seeds)
def test_gradients_by_central_differences(path, training, shape, seed):
    layer = make(shape[1], seed).train(training)
    x = 3.0 + 2.0 * np.random.default_rng(seed + 1).standard_normal(shape)
    with layer_path(path):
        errors = check_layer(layer, x, rng=np.random.default_rng(seed))
    assert max(errors.values()) < 1e-6, errors


def test_dropping_the_mean_or_the_variance_path_fails_the_check(monkeypatch):
    """The two terms the derivation adds are both needed: remove each, the check fails."""
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 4)) * 2 + 1   # not the seed of dL/dy:
    layer = make(3, 1)                      # dL/dy = xhat would have dL/dx = 0 (scale invariance)
    assert check_layer(layer, x)["x"] < 1e-8
    original = BatchNorm2d.backward

    def without(term):
        def backward(self, dy):
            shape = (1, self.channels, 1, 1)
            dxhat = dy * self.params["weight"].reshape(shape)
            self.grads["weight"] = (dy * self._xhat).sum(axis=(0, 2, 3))
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
            mean_term = 0 if term == "mean" else dxhat.mean(axis=(0, 2, 3), keepdims=True)
            var_term = 0 if term == "var" else self._xhat * (dxhat * self._xhat).mean(axis=(0, 2, 3), keepdims=True)
            return self._inv_std.reshape(shape) * (dxhat - mean_term - var_term)
        return backward

    for term in ("mean", "var"):
        monkeypatch.setattr(BatchNorm2d, "backward", without(term))
        assert check_layer(layer, x)["x"] > 1e-3, term
    monkeypatch.setattr(BatchNorm2d, "backward", original)


def test_running_averages_follow_pytorchs_convention():
    rng = np.random.default_rng(0)
    layer = BatchNorm2d(2, dtype=np.float64)
    x = rng.standard_normal((2, 2, 3, 3)) * 3 + 5
    layer.forward(x)
    m = 2 * 3 * 3
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.9 * 0 + 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 * 1 + 0.1 * var * m / (m - 1), rtol=1e-12)
    y = layer.forward(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), var / (var + 1e-5), rtol=1e-9)
    layer.eval()
    rm, rv = layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy()
    np.testing.assert_allclose(layer.forward(x), (x - rm[None, :, None, None]) / np.sqrt(rv + 1e-5)[None, :, None, None])
    np.testing.assert_array_equal(layer.buffers["running_mean"], rm)     # evaluation leaves them


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm2d(2, dtype=np.float64).forward(np.zeros((1, 2, 1, 1)))
    with pytest.raises(ValueError, match="expected 2 channels"):
        BatchNorm2d(2).forward(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="momentum must be in"):
        BatchNorm2d(2, momentum=0.99 + 1)


@pytest.mark.torch
@pytest.mark.parametrize("path", PATHS)       # the Numba kernels too (training mode): bar lowered to 1
@pytest.mark.parametrize("training", [True, False])
@given(shape=shapes, seed=seeds)
def test_against_torch(path, training, shape, seed):
    torch = pytest.importorskip("torch")
    layer = make(shape[1], seed).train(training)
    rm, rv = (torch.tensor(layer.buffers[k].copy()) for k in ("running_mean", "running_var"))
    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    with layer_path(path):
        y = layer.forward(x)
        dx = layer.backward(dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, layer.params["weight"], layer.params["bias"]))
    yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=training, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))
    pairs = [(y, yt), (dx, xt.grad), (layer.grads["weight"], wt.grad), (layer.grads["bias"], bt.grad),
             (layer.buffers["running_mean"], rm), (layer.buffers["running_var"], rv)]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_constant_channel_stays_finite_and_equals_torch(dtype):
    """Variance 0 (a dead channel): eps keeps 1 / sqrt(var + eps) finite, xhat = 0, y = beta;
    dx = s (dxhat - mean(dxhat)) is finite; values, gradients and running statistics equal
    torch's; in float64 the central differences agree too (var is smooth at 0)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 3, 3)) * 2 + 1).astype(dtype)
    x[:, 1] = 2.5                                                      # channel 1: constant
    layer = make(3, 3).astype(dtype)
    rm, rv = (torch.tensor(layer.buffers[k].copy()) for k in ("running_mean", "running_var"))
    y = layer.forward(x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = layer.backward(dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(y[:, 1], layer.params["bias"][1])    # xhat = 0 exactly
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, layer.params["weight"], layer.params["bias"]))
    yt = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=0.1, eps=1e-5)
    yt.backward(torch.tensor(dy))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)
    pairs = [(y, yt), (dx, xt.grad), (layer.grads["weight"], wt.grad), (layer.grads["bias"], bt.grad),
             (layer.buffers["running_mean"], rm), (layer.buffers["running_var"], rv)]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.detach().numpy(), **tol)
    if dtype == np.float64:
        errors = check_layer(make(3, 3), x, rng=rng)
        assert max(errors.values()) < 1e-6, errors
