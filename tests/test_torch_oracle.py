"""Every layer's forward and gradients equal torch.nn.functional's on the same float64 data.

Skipped cleanly where torch does not import; .ci/run installs the CPU build so CI runs them.
"""
import numpy as np
import pytest
from hypothesis import given
from paths import PATHS, layer_path
from strategies import NON_SQUARE_CASES, conv_geometries, pool_geometries, seeds

from tinyunet.layers import Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid, Upsample2d
from tinyunet.layers.conv import resolve_padding
from tinyunet.losses import bce_with_logits

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch


def torch_leaf(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def assert_close(ours, theirs, rtol=1e-10):
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=rtol, atol=1e-12)


def run_both(layer, torch_fn, x, rng):
    """Forward both, push the same random dL/dy through both, return (ours, theirs) pairs."""
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = torch_leaf(x)
    yt = torch_fn(xt)
    yt.backward(torch.tensor(dy))
    return (y, yt), (dx, xt.grad)


def compare_conv(g, seed):
    rng = np.random.default_rng(seed)
    layer = Conv2d(g["c"], g["f"], g["kernel"], padding=g["padding"], stride=g["stride"], seed=seed,
                   dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(g["f"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    (pt, pb), (pl, pr) = resolve_padding(g["padding"], g["kernel"], g["stride"], (g["h"], g["w"]))
    wt, bt = torch_leaf(layer.params["weight"]), torch_leaf(layer.params["bias"])

    def torch_conv(xt):
        return F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, bt, stride=g["stride"])

    (y, yt), (dx, dxt) = run_both(layer, torch_conv, x, rng)
    assert_close(y, yt)
    assert_close(dx, dxt)
    assert_close(layer.grads["weight"], wt.grad)
    assert_close(layer.grads["bias"], bt.grad)


@given(conv_geometries(), seeds)
def test_conv2d_with_asymmetric_padding(g, seed):
    """Kernel sides, strides and paddings drawn per axis (strategies.conv_geometries)."""
    compare_conv(g, seed)


@pytest.mark.parametrize("kernel, stride, padding", NON_SQUARE_CASES)
def test_conv2d_with_non_square_kernels_and_strides(kernel, stride, padding):
    compare_conv(dict(n=2, c=2, f=3, h=7, w=6, kernel=kernel, stride=stride, padding=padding), 3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kernel, stride, shape", [(2, None, (2, 3, 8, 8)), (2, None, (1, 2, 7, 9)),
                                                   (3, 2, (1, 2, 9, 8)), (3, 1, (2, 1, 5, 6))])
def test_max_pool2d(kernel, stride, shape, path):
    rng = np.random.default_rng(1)
    x = rng.permutation(int(np.prod(shape))).reshape(shape) / np.prod(shape)   # no ties
    with layer_path(path):
        (y, yt), (dx, dxt) = run_both(MaxPool2d(kernel, stride), lambda t: F.max_pool2d(t, kernel, stride), x, rng)
    assert_close(y, yt)
    assert_close(dx, dxt)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [2, 3])
def test_nearest_upsampling(scale, path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 5))
    fn = lambda t: F.interpolate(t, scale_factor=scale, mode="nearest")   # noqa: E731
    with layer_path(path):
        (y, yt), (dx, dxt) = run_both(Upsample2d(scale), fn, x, rng)
    assert_close(y, yt)
    assert_close(dx, dxt)


def test_concat():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 5, 4, 4))
    layer = Concat()
    y = layer.forward((a, b))
    dy = rng.standard_normal(y.shape)
    da, db = layer.backward(dy)
    at, bt = torch_leaf(a), torch_leaf(b)
    yt = torch.cat([at, bt], dim=1)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt)
    assert_close(da, at.grad)
    assert_close(db, bt.grad)


def test_dropout_with_the_same_mask():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 6))
    layer = Dropout(0.3, seed=8)
    y = layer.forward(x)
    kept = torch.tensor(layer.mask != 0)
    # F.dropout draws its own mask; the same function with our mask is x * kept / (1 - p)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = torch_leaf(x)
    yt = xt * kept / (1 - 0.3)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt)
    assert_close(dx, xt.grad)
    # and F.dropout itself scales kept values the same way
    out = F.dropout(torch.ones(1000, dtype=torch.float64), p=0.3, training=True)
    assert set(np.unique(out.numpy()).round(12)) <= {0.0, round(1 / 0.7, 12)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make, fn", [(ReLU, F.relu), (Sigmoid, torch.sigmoid)], ids=["relu", "sigmoid"])
def test_activations_at_and_away_from_the_kink(make, fn, path):
    """A third of the inputs exactly 0.0 or -0.0 (ReLU's kink: PyTorch's gradient there is 0),
    the rest away from it; on the NumPy and the Numba path."""
    rng = np.random.default_rng(5)
    x = rng.choice([-1, 1], size=(2, 2, 5, 5)) * (0.05 + rng.random((2, 2, 5, 5)))
    x.reshape(-1)[::3] = 0.0
    x.reshape(-1)[1::6] = -0.0
    with layer_path(path):
        (y, yt), (dx, dxt) = run_both(make(), fn, x, rng)
    assert_close(y, yt)
    assert_close(dx, dxt)


@pytest.mark.parametrize("path", PATHS)
@given(pool_geometries(), seeds)
def test_max_pool2d_with_ties(path, g, seed):
    """Inputs from {-1, 0, 1}: ties in nearly every window, where the gradient goes to the
    first maximum in PyTorch's CPU max_pool2d as here (overlapping windows included)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (g["n"], g["c"], g["h"], g["w"])).astype(np.float64)
    stride = g["stride"] or g["kernel"]
    with layer_path(path):
        (y, yt), (dx, dxt) = run_both(MaxPool2d(g["kernel"], g["stride"]),
                                      lambda t: F.max_pool2d(t, g["kernel"], stride), x, rng)
    assert_close(y, yt)
    assert_close(dx, dxt)


@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits(weighted):
    rng = np.random.default_rng(6)
    z = rng.standard_normal((2, 1, 6, 6)) * 4
    t = (rng.random(z.shape) > 0.3).astype(np.float64)
    w = rng.random(z.shape) * 3 if weighted else None
    loss, dz = bce_with_logits(z, t, w)
    zt = torch_leaf(z)
    lt = F.binary_cross_entropy_with_logits(zt, torch.tensor(t), weight=None if w is None else torch.tensor(w))
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-12)
    assert_close(dz, zt.grad)
