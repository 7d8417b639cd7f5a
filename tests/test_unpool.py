"""MaxPool2d's indices and MaxUnpool2d: loops, central differences, adjoint, ties, PyTorch."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paths import PATHS, layer_path
from strategies import seeds

from tinyunet.kernels import cpu_layers
from tinyunet.gradcheck import check_gradients
from tinyunet.layers import MaxPool2d, MaxUnpool2d
from tinyunet.layers.unpool import max_unpool2d_naive


@st.composite
def pools(draw):
    k = draw(st.integers(1, 3))
    s = draw(st.integers(k, 3))                 # windows that do not overlap: distinct indices
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=draw(st.integers(k, 9)),
                w=draw(st.integers(k, 9)), k=k, s=s)


def distinct(shape, rng):
    size = int(np.prod(shape))
    return rng.permutation(size).reshape(shape) / size - 0.5


@pytest.mark.parametrize("path", PATHS)       # the Numba kernel too: its size bar lowered to 1
@given(g=pools(), seed=seeds)
def test_indices_point_at_each_windows_maximum(path, g, seed):
    x = distinct((g["n"], g["c"], g["h"], g["w"]), np.random.default_rng(seed))
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        y, idx = MaxPool2d(g["k"], g["s"], return_indices=True).forward(x)
    assert idx.dtype == np.int64 and idx.shape == y.shape
    np.testing.assert_array_equal(np.take_along_axis(x.reshape(g["n"], g["c"], -1),
                                                     idx.reshape(g["n"], g["c"], -1), axis=2).reshape(y.shape), y)


def test_indices_take_the_first_maximum_at_a_tie_like_the_backward():
    x = np.zeros((1, 1, 4, 4))
    pool = MaxPool2d(2, return_indices=True)
    y, idx = pool.forward(x)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])       # top-left of every window
    dx = pool.backward(np.ones_like(y))
    np.testing.assert_array_equal(MaxUnpool2d(2).forward(np.ones_like(y), idx, (4, 4)), dx)


@given(pools(), seeds)
def test_unpool_matches_the_loops_and_pool_undoes_it(g, seed):
    rng = np.random.default_rng(seed)
    x = distinct((g["n"], g["c"], g["h"], g["w"]), rng)
    pool = MaxPool2d(g["k"], g["s"], return_indices=True)
    y, idx = pool.forward(x)
    up = MaxUnpool2d(g["k"], g["s"]).forward(y, idx, (g["h"], g["w"]))
    np.testing.assert_array_equal(up, max_unpool2d_naive(y, idx, (g["h"], g["w"])))
    assert (up != 0).sum() <= y.size
    placed = MaxUnpool2d(g["k"], g["s"]).forward(np.ones_like(y), idx, (g["h"], g["w"])) == 1
    assert placed.sum() == y.size                                     # distinct: nothing overwritten
    np.testing.assert_array_equal(MaxPool2d(g["k"], g["s"]).forward(np.where(placed, up, -10)), y)


@given(pools(), seeds)
def test_unpool_gradient_and_adjoint(g, seed):
    rng = np.random.default_rng(seed)
    _, idx = MaxPool2d(g["k"], g["s"], return_indices=True).forward(distinct((g["n"], g["c"], g["h"], g["w"]), rng))
    layer = MaxUnpool2d(g["k"], g["s"])
    x = rng.standard_normal(idx.shape)
    r = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    y = layer.forward(x, idx, (g["h"], g["w"]))
    dx = layer.backward(r)
    np.testing.assert_allclose((y * r).sum(), (x * dx).sum(), rtol=1e-12)   # <P x, r> = <x, P^T r>
    errors = check_gradients(lambda: float((layer.forward(x, idx, (g["h"], g["w"])) * r).sum()), {"x": x}, {"x": dx})
    assert errors["x"] < 1e-8


def test_bad_indices_are_refused_before_any_work():
    layer = MaxUnpool2d(2)
    x = np.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="do not fit an output plane of 4x4"):
        layer.forward(x, np.full((1, 1, 2, 2), 16), (4, 4))
    with pytest.raises(ValueError, match="pass the indices of the pool"):
        layer.forward(x, np.zeros((1, 1, 3, 3), np.int64))
    with pytest.raises(TypeError, match="must be integers"):
        layer.forward(x, np.zeros((1, 1, 2, 2)))
    with pytest.raises(RuntimeError, match="before forward"):
        MaxPool2d(2).indices()


@pytest.mark.torch
@given(pools(), seeds)
def test_against_torch(g, seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    x = distinct((g["n"], g["c"], g["h"], g["w"]), rng)
    y, idx = MaxPool2d(g["k"], g["s"], return_indices=True).forward(x)
    yt, idxt = F.max_pool2d(torch.tensor(x), g["k"], g["s"], return_indices=True)
    np.testing.assert_array_equal(idx, idxt.numpy())
    layer = MaxUnpool2d(g["k"], g["s"])
    up = layer.forward(y, idx, (g["h"], g["w"]))
    dy = rng.standard_normal(up.shape)
    dx = layer.backward(dy)
    leaf = torch.tensor(y, requires_grad=True)
    upt = F.max_unpool2d(leaf, idxt, g["k"], g["s"], output_size=(g["h"], g["w"]))
    upt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(up, upt.detach().numpy())
    np.testing.assert_array_equal(dx, leaf.grad.numpy())


@st.composite
def tied_images(draw, g):
    """Values from {-1, -0.0, 0.0, 1}: most windows hold a tie, -0.0 against 0.0 included."""
    seed = draw(seeds)
    values = np.array([-1.0, -0.0, 0.0, 1.0])
    return values[np.random.default_rng(seed).integers(0, 4, (g["n"], g["c"], g["h"], g["w"]))], seed


@pytest.mark.torch
@pytest.mark.parametrize("path", PATHS)
@given(data=st.data())
def test_ties_take_the_first_maximum_like_torch_and_unpool_follows(path, data):
    """At a tie (and 0.0 against -0.0, equal under >) the index is the window's first maximum
    in row-major order, as torch's CPU max_pool2d; the unpool puts the value there and its
    backward reads the gradient from there: indices, unpool, both backwards equal torch's."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = data.draw(pools())
    x, seed = data.draw(tied_images(g))
    rng = np.random.default_rng(seed)
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        pool = MaxPool2d(g["k"], g["s"], return_indices=True)
        y, idx = pool.forward(x)
        dy = rng.standard_normal(y.shape)
        dx = pool.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt, idxt = F.max_pool2d(xt, g["k"], g["s"], return_indices=True)
    yt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(idx, idxt.numpy())
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    layer = MaxUnpool2d(g["k"], g["s"])
    up = layer.forward(y, idx, (g["h"], g["w"]))
    dup = rng.standard_normal(up.shape)
    back = layer.backward(dup)
    leaf = torch.tensor(y, requires_grad=True)
    upt = F.max_unpool2d(leaf, idxt, g["k"], g["s"], output_size=(g["h"], g["w"]))
    upt.backward(torch.tensor(dup))
    np.testing.assert_array_equal(up, upt.detach().numpy())
    np.testing.assert_array_equal(back, leaf.grad.numpy())
