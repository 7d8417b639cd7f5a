"""ConvTranspose2d: the loops, central differences, the adjoint of the strided conv, PyTorch."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import seeds, strides

from tinyunet.gradcheck import check_layer
from tinyunet.layers import Conv2d, ConvTranspose2d
from tinyunet.layers.convtranspose import bilinear_kernel, conv_transpose2d_naive


@st.composite
def geometries(draw):
    """Both kernel sides, both strides, the four croppings and both output paddings drawn on
    their own: a row stride taken from the column one (or a top crop from the bottom one)
    passes every square geometry."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(strides(max_stride=3))
    crop = ((draw(st.integers(0, 2)), draw(st.integers(0, 2))), (draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    op = (draw(st.integers(0, sh - 1)), draw(st.integers(0, sw - 1)))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 3)),
                h=draw(st.integers(1, 4)), w=draw(st.integers(1, 4)), k=(kh, kw), s=(sh, sw), crop=crop, op=op)


def make(g, seed, **kw):
    layer = ConvTranspose2d(g["c"], g["f"], g["k"], stride=g["s"], cropping=g["crop"], output_padding=g["op"],
                            weight_init="he_normal", seed=seed, dtype=np.float64, **kw)
    if "bias" in layer.params:
        layer.params["bias"][:] = np.random.default_rng(seed).standard_normal(g["f"])
    return layer


def fits(g):
    (pt, pb), (pl, pr) = g["crop"]
    (kh, kw), (sh, sw) = g["k"], g["s"]
    return (g["h"] - 1) * sh + kh - pt - pb + g["op"][0] >= 1 and (g["w"] - 1) * sw + kw - pl - pr + g["op"][1] >= 1


@given(geometries(), seeds)
def test_forward_matches_the_loops(g, seed):
    if not fits(g):
        return
    layer = make(g, seed)
    x = np.random.default_rng(seed).standard_normal((g["n"], g["c"], g["h"], g["w"]))
    expected = conv_transpose2d_naive(x, layer.params["weight"], layer.params["bias"], g["s"], g["crop"], g["op"])
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)


@given(geometries(), seeds)
def test_gradients_by_central_differences(g, seed):
    if not fits(g):
        return
    layer = make(g, seed)
    x = np.random.default_rng(seed + 1).standard_normal((g["n"], g["c"], g["h"], g["w"]))
    errors = check_layer(layer, x, rng=np.random.default_rng(seed))
    assert set(errors) == {"x", "param.weight", "param.bias"}
    assert max(errors.values()) < 1e-6, errors


@given(geometries(), seeds)
def test_is_the_adjoint_of_the_strided_conv(g, seed):
    """<A z, x> = <z, A^T x>: A the Conv2d (F -> C) with the same weight, stride and padding."""
    if not fits(g):
        return
    rng = np.random.default_rng(seed)
    up = make(g, seed, bias=False)
    down = Conv2d(g["f"], g["c"], g["k"], padding=g["crop"], stride=g["s"], bias=False, dtype=np.float64)
    down.params["weight"] = up.params["weight"]                      # (C, F, k, k): F -> C
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    y = up.forward(x)                                                # A^T x: (N, F, OH, OW)
    z = rng.standard_normal(y.shape)
    az = down.forward(z)                                             # A z: back to (N, C, H, W)
    assert az.shape == x.shape
    np.testing.assert_allclose((az * x).sum(), (z * y).sum(), rtol=1e-11)


def test_bilinear_kernel_is_fcns_and_interpolates():
    np.testing.assert_allclose(bilinear_kernel(4)[0], np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25])[0])
    layer = ConvTranspose2d(2, 2, 4, stride=2, bias=False, dtype=np.float64)
    w = layer.params["weight"]
    assert np.all(w[0, 1] == 0) and np.all(w[1, 0] == 0)            # channel c -> channel c only
    ramp = np.broadcast_to(np.arange(6.0), (1, 2, 6, 6)).copy()      # a linear ramp along x
    y = layer.forward(ramp)                                          # (1, 2, 14, 14)
    interior = y[0, 0, 5, 3:11]                                      # away from the borders
    np.testing.assert_allclose(np.diff(interior), 0.5)               # half a step per output pixel


def test_frozen_gives_zero_weight_gradient_and_the_true_dx():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 4))
    frozen = ConvTranspose2d(3, 3, 4, stride=2, bias=False, frozen=True, dtype=np.float64)
    free = ConvTranspose2d(3, 3, 4, stride=2, bias=False, dtype=np.float64)
    dy = rng.standard_normal(frozen.forward(x).shape)
    free.forward(x)
    np.testing.assert_array_equal(frozen.backward(dy), free.backward(dy))
    assert np.all(frozen.grads["weight"] == 0) and np.any(free.grads["weight"] != 0)
    free.frozen = True                       # frozen after learning: no stale gradient survives
    free.forward(x)
    free.backward(dy)
    assert not free.grads["weight"].any()


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="output_padding must be in"):
        ConvTranspose2d(1, 1, 4, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        ConvTranspose2d(2, 3, 4, stride=2)
    with pytest.raises(ValueError, match="expected 2 channels"):
        ConvTranspose2d(2, 2, 4, stride=2).forward(np.zeros((1, 3, 2, 2), np.float32))


@pytest.mark.torch
@given(geometries(), seeds)
def test_against_torch(g, seed):
    """Every drawn geometry: torch crops symmetrically only (padding=), so an asymmetric
    cropping is torch's uncropped output sliced [top : top + OH], the gradient flowing back
    through the slice."""
    torch = pytest.importorskip("torch")
    (pt, pb), (pl, pr) = g["crop"]
    if not fits(g):
        return
    layer = make(g, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, layer.params["weight"], layer.params["bias"]))
    conv_t = torch.nn.functional.conv_transpose2d
    if pt == pb and pl == pr:
        yt = conv_t(xt, wt, bt, stride=g["s"], padding=(pt, pl), output_padding=g["op"])
    else:
        full = conv_t(xt, wt, bt, stride=g["s"], output_padding=g["op"])
        yt = full[:, :, pt:pt + y.shape[2], pl:pl + y.shape[3]]
    assert tuple(yt.shape) == y.shape
    yt.backward(torch.tensor(dy))
    for ours, theirs in ((y, yt), (dx, xt.grad), (layer.grads["weight"], wt.grad), (layer.grads["bias"], bt.grad)):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_non_square_geometries_written_down():
    """Two fixed non-square cases hypothesis cannot shrink away: stride (2, 1) and (1, 3) with
    kernels (3, 2) and (1, 4) and a cropping that differs on each side."""
    rng = np.random.default_rng(11)
    for kernel, stride, crop, op in (((3, 2), (2, 1), ((1, 0), (0, 1)), (1, 0)), ((1, 4), (1, 3), ((0, 0), (2, 1)), (0, 2))):
        layer = ConvTranspose2d(2, 3, kernel, stride=stride, cropping=crop, output_padding=op,
                                weight_init="he_normal", seed=1, dtype=np.float64)
        layer.params["bias"][:] = rng.standard_normal(3)
        x = rng.standard_normal((2, 2, 3, 4))
        expected = conv_transpose2d_naive(x, layer.params["weight"], layer.params["bias"], stride, crop, op)
        np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)
        errors = check_layer(layer, x, rng=rng)
        assert max(errors.values()) < 1e-6, errors
