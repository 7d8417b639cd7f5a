"""Every layer's backward is the derivative of its forward (float64 gradient checks).

Small inputs: every element by central differences (relative error < 1e-6).
Larger inputs: the directional derivative along a random direction.
Plus the behaviour each docstring promises (shapes, dtypes, tie rule, floor, mask reuse).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import PATHS, layer_path
from strategies import NON_SQUARE_CASES, conv_geometries, image_shapes, pool_geometries, seeds

from tinyunet.gradcheck import check_layer, relative_error
from tinyunet.kernels import cpu_layers
from tinyunet.layers import (Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid, Upsample2d,
                             conv2d_naive)
from tinyunet.layers import conv
from tinyunet.layers.conv import resolve_padding

TOLERANCE = 1e-6


def distinct_values(shape, rng):
    """Distinct values in [-0.5, 0.5), at least 1/size apart (>= 1e-4 here): no ties, so the
    max of every window is unique and stays so under a 1e-6 perturbation."""
    size = int(np.prod(shape))
    return rng.permutation(size).reshape(shape) / size - 0.5


def away_from_zero(shape, rng, margin=0.05):
    """Values with |x| >= margin: ReLU's kink at 0 is never crossed by a 1e-6 perturbation."""
    return rng.choice([-1.0, 1.0], size=shape) * (margin + rng.random(shape))


def assert_gradients_match(errors, tolerance=TOLERANCE):
    assert errors, "nothing was checked"
    bad = {name: err for name, err in errors.items() if not err < tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"


# -- Conv2d ---------------------------------------------------------------------------------

def make_conv(g, seed, dtype=np.float64, bias=True):
    return Conv2d(g["c"], g["f"], g["kernel"], padding=g["padding"], stride=g["stride"],
                  bias=bias, seed=seed, dtype=dtype)


@given(conv_geometries(), seeds)
def test_conv_forward_matches_naive_loops(g, seed):
    rng = np.random.default_rng(seed)
    layer = make_conv(g, seed)
    layer.params["bias"][:] = rng.standard_normal(g["f"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    expected = conv2d_naive(x, layer.params["weight"], layer.params["bias"], g["padding"], g["stride"])
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)


@given(conv_geometries(max_size=6, max_channels=2), seeds)
def test_conv_gradients_by_central_differences(g, seed):
    rng = np.random.default_rng(seed)
    layer = make_conv(g, seed)
    layer.params["bias"][:] = rng.standard_normal(g["f"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    errors = check_layer(layer, x, rng=rng)
    assert set(errors) == {"x", "param.weight", "param.bias"}
    assert_gradients_match(errors)


@pytest.mark.parametrize("kernel, stride, padding", NON_SQUARE_CASES)
def test_non_square_kernels_and_strides_by_naive_loops_and_central_differences(kernel, stride, padding):
    """Row and column geometry differ on purpose: a stride, kernel side or padding read from
    the other axis changes y or a gradient here (hypothesis draws such cases too)."""
    rng = np.random.default_rng(17)
    layer = Conv2d(2, 3, kernel, padding=padding, stride=stride, seed=4, dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(3)
    x = rng.standard_normal((2, 2, 7, 6))
    expected = conv2d_naive(x, layer.params["weight"], layer.params["bias"], padding, stride)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert_gradients_match(check_layer(layer, x, rng=rng))


@st.composite
def method_cases(draw, method):
    """A geometry that ``method`` computes itself (no fallback to im2col): 'flip' and
    'shifted' need stride 1 and padding <= kernel - 1, Winograd a 3x3 kernel at stride 1;
    up to 3 channels each way, so F < C, F = C and F > C all come up."""
    if method.startswith("winograd"):
        kh = kw = 3
    else:
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if method == "im2col":
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        pad = st.integers(0, 2)
        padding = ((draw(pad), draw(pad)), (draw(pad), draw(pad)))
    else:
        stride = (1, 1)
        rows, columns = st.integers(0, kh - 1 if method in ("flip", "shifted") else 2), \
            st.integers(0, kw - 1 if method in ("flip", "shifted") else 2)
        padding = ((draw(rows), draw(rows)), (draw(columns), draw(columns)))
    (pt, pb), (pl, pr) = padding
    h = draw(st.integers(max(1, kh - pt - pb), 5))
    w = draw(st.integers(max(1, kw - pl - pr), 5))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), f=draw(st.integers(1, 3)), h=h, w=w,
                kernel=(kh, kw), stride=stride, padding=padding,
                per_image_weight_gradient=draw(st.booleans()), seed=draw(seeds))


@pytest.mark.parametrize("method", ["im2col", "flip", "shifted", "winograd-2x2", "winograd-4x4"])
@settings(max_examples=10)
@given(data=st.data())
def test_conv_gradients_by_central_differences_with_each_method(method, data):
    """Every conv method's backward (kernels: tinyunet/layers/conv.py), forced, against central
    differences over every element of x, W and b. Half the examples take the weight gradient
    image by image, the layout of images above conv.SMALL_IMAGE_PIXELS (the other half: the
    batch laid side by side)."""
    g = data.draw(method_cases(method))
    name, tile = (method.split("-")[0], int(method[-1])) if method.startswith("winograd") else (method, 0)
    rng = np.random.default_rng(g["seed"])
    layer = Conv2d(g["c"], g["f"], g["kernel"], padding=g["padding"], stride=g["stride"], seed=g["seed"] % 1000,
                   dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(g["f"])
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"]))
    with pytest.MonkeyPatch.context() as patch, conv.using_method(name):
        patch.setattr(conv, "WINOGRAD_TILE", tile)
        patch.setattr(conv, "SMALL_IMAGE_PIXELS", 0 if g["per_image_weight_gradient"] else 10 ** 9)
        assert conv._resolve_method(layer.params["weight"], g["padding"], g["stride"], x.shape) == name
        errors = check_layer(layer, x, rng=rng)
    assert set(errors) == {"x", "param.weight", "param.bias"}
    assert_gradients_match(errors)


@pytest.mark.parametrize("method", ["auto", "im2col", "flip"])
def test_conv_gradients_on_an_image_above_small_image_pixels(method):
    """No monkeypatching: an image large enough (1200 output pixels) that the weight gradient
    is summed image by image, as on the U-Net's upper levels; a non-square stride too."""
    rng = np.random.default_rng(9)
    for stride in [(1, 1), (1, 2)]:
        layer = Conv2d(3, 2, (3, 2), padding="same", stride=stride, seed=5, dtype=np.float64)
        layer.params["bias"][:] = rng.standard_normal(2)
        x = rng.standard_normal((2, 3, 40, 30 * stride[1]))
        assert np.prod(layer.output_shape(x.shape)[2:]) > conv.SMALL_IMAGE_PIXELS
        with conv.using_method(method):
            assert_gradients_match(check_layer(layer, x, mode="directional", rng=rng))


@pytest.mark.parametrize("kernel, padding, stride", [(3, "same", 1), (2, "same", 1), (3, "valid", 2),
                                                     (1, "valid", 1), (3, ((0, 2), (1, 0)), 2),
                                                     ((3, 2), "same", (2, 1))])
def test_conv_gradients_directional_on_larger_input(kernel, padding, stride):
    rng = np.random.default_rng(7)
    layer = Conv2d(8, 6, kernel, padding=padding, stride=stride, seed=1, dtype=np.float64)
    x = rng.standard_normal((2, 8, 24, 20))
    assert_gradients_match(check_layer(layer, x, mode="directional", rng=rng))


def test_conv_without_bias_has_only_a_weight_gradient():
    layer = Conv2d(2, 3, 3, bias=False, seed=0, dtype=np.float64)
    errors = check_layer(layer, np.random.default_rng(0).standard_normal((1, 2, 5, 5)))
    assert set(errors) == {"x", "param.weight"}
    assert_gradients_match(errors)


def test_same_padding_keeps_size_and_pads_an_even_kernel_after():
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 5))
    layer = Conv2d(1, 1, 2, padding="same", bias=False, seed=0, dtype=np.float64)
    y = layer.forward(x)
    assert y.shape == (1, 1, 5, 5)
    # 0 rows/cols before, 1 after (TensorFlow/Keras): output (0, 0) sees x[0:2, 0:2]
    w = layer.params["weight"][0, 0]
    assert y[0, 0, 0, 0] == pytest.approx((x[0, 0, :2, :2] * w).sum())
    assert y[0, 0, 4, 4] == pytest.approx(x[0, 0, 4, 4] * w[0, 0])


@pytest.mark.parametrize("size, stride, expected", [(7, 2, 4), (8, 2, 4), (5, 1, 5)])
def test_same_padding_output_is_ceil_of_size_over_stride(size, stride, expected):
    layer = Conv2d(1, 1, 3, padding="same", stride=stride, seed=0)
    assert layer.forward(np.zeros((1, 1, size, size), np.float32)).shape[2:] == (expected, expected)


def test_same_padding_is_computed_per_axis():
    """TensorFlow's 'same' rule on each axis with that axis's kernel side, stride and size:
    ceil(size / stride) outputs, the odd zero after."""
    from tinyunet.layers.conv import resolve_padding
    assert resolve_padding("same", (3, 3), (2, 1), (8, 8)) == ((0, 1), (1, 1))
    assert resolve_padding("same", (3, 3), (1, 2), (8, 8)) == ((1, 1), (0, 1))
    assert resolve_padding("same", (2, 3), (1, 1), (5, 6)) == ((0, 1), (1, 1))
    assert resolve_padding("same", (3, 1), (1, 1), (4, 9)) == ((1, 1), (0, 0))
    assert resolve_padding("same", (3, 3), (2, 2), (7, 8)) == ((1, 1), (0, 1))
    layer = Conv2d(1, 1, (3, 2), padding="same", stride=(2, 1), seed=0, dtype=np.float64)
    assert layer.forward(np.zeros((1, 1, 7, 5))).shape[2:] == (4, 5)


# -- MaxPool2d ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@given(pool_geometries(), seeds)
def test_maxpool_gradients_by_central_differences(path, g, seed):
    rng = np.random.default_rng(seed)
    layer = MaxPool2d(g["kernel"], g["stride"])
    x = distinct_values((g["n"], g["c"], g["h"], g["w"]), rng)
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        y = layer.forward(x)
        stride = g["stride"] or g["kernel"]
        assert y.shape[2:] == ((g["h"] - g["kernel"]) // stride + 1, (g["w"] - g["kernel"]) // stride + 1)
        assert_gradients_match(check_layer(layer, x, rng=rng))


def maxpool_first_maximum_loops(x, k, s, dy):
    """The documented rule read literally: each window's gradient to its FIRST maximum in
    row-major order (np.argmax returns the first), added where windows overlap."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y, dx = np.zeros((n, c, oh, ow)), np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for r in range(oh):
                for q in range(ow):
                    window = x[b, ch, r * s:r * s + k, q * s:q * s + k]
                    i, j = divmod(int(np.argmax(window)), k)
                    y[b, ch, r, q] = window[i, j]
                    dx[b, ch, r * s + i, q * s + j] += dy[b, ch, r, q]
    return y, dx


@pytest.mark.parametrize("path", PATHS)
@given(pool_geometries(), seeds)
def test_maxpool_ties_send_the_gradient_to_the_first_maximum_on_both_paths(path, g, seed):
    """Inputs drawn from {-1, 0, -0.0, 1}: nearly every window has a tie (the kink of max);
    both implementations must follow the documented rule (PyTorch's and cuDNN's too:
    tests/test_torch_oracle.py), not merely agree with each other."""
    rng = np.random.default_rng(seed)
    shape = (g["n"], g["c"], g["h"], g["w"])
    x = rng.choice(np.array([-1.0, 0.0, -0.0, 1.0]), size=shape)
    layer = MaxPool2d(g["kernel"], g["stride"])
    dy = rng.standard_normal(layer.output_shape(shape))
    expected_y, expected_dx = maxpool_first_maximum_loops(x, g["kernel"], layer.stride, dy)
    with layer_path(path):
        y = layer.forward(x)
        dx = layer.backward(dy)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-15, atol=0)


def test_maxpool_floors_and_gives_dropped_rows_zero_gradient():
    x = distinct_values((1, 2, 5, 7), np.random.default_rng(0))
    layer = MaxPool2d(2)
    y = layer.forward(x)
    assert y.shape == (1, 2, 2, 3)
    dx = layer.backward(np.ones_like(y))
    assert np.all(dx[:, :, 4, :] == 0) and np.all(dx[:, :, :, 6] == 0)
    assert dx.sum() == y.size      # every window sent its gradient to exactly one element


def test_maxpool_tie_sends_the_gradient_to_the_first_maximum_only():
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]])
    layer = MaxPool2d(2)
    layer.forward(x)
    dx = layer.backward(np.array([[[[5.0]]]]))
    np.testing.assert_array_equal(dx, [[[[0.0, 5.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("path", PATHS)
def test_maxpool_overlapping_windows_add_their_gradients(path):
    layer = MaxPool2d(kernel_size=2, stride=1)
    x = np.array([[[[0.0, 0.1, -1.0], [0.2, 9.0, -1.0]]]])   # 9 is the max of both 2x2 windows
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        y = layer.forward(x)
        assert y.shape == (1, 1, 1, 2) and np.all(y == 9.0)
        dx = layer.backward(np.array([[[[1.0, 2.0]]]]))
    assert dx[0, 0, 1, 1] == 3.0 and dx.sum() == 3.0
    # a 3x3 window at stride 1 over a 4x4 peak: the peak is the max of all four windows
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0
    with layer_path(path):
        layer = MaxPool2d(3, 1)
        layer.forward(x)
        dx = layer.backward(np.array([[[[1.0, 2.0], [4.0, 8.0]]]]))
    assert dx[0, 0, 1, 2] == 15.0


def test_maxpool_directional_on_larger_input():
    rng = np.random.default_rng(3)
    x = distinct_values((2, 4, 32, 30), rng)
    assert_gradients_match(check_layer(MaxPool2d(2), x, mode="directional", rng=rng))


# -- Upsample2d -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@given(image_shapes(max_size=4), st.integers(1, 3), seeds)
def test_upsample_gradients_by_central_differences(path, shape, scale, seed):
    rng = np.random.default_rng(seed)
    layer = Upsample2d(scale)
    x = rng.standard_normal(shape)
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        y = layer.forward(x)
        assert y.shape == shape[:2] + (shape[2] * scale, shape[3] * scale)
        assert_gradients_match(check_layer(layer, x, rng=rng))


def test_upsample_copies_each_pixel_into_a_block_and_backward_sums_it():
    x = np.array([[[[1.0, 2.0]]]])
    layer = Upsample2d(2)
    np.testing.assert_array_equal(layer.forward(x), [[[[1, 1, 2, 2], [1, 1, 2, 2]]]])
    dy = np.arange(8.0).reshape(1, 1, 2, 4)
    np.testing.assert_array_equal(layer.backward(dy), [[[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7]]]])


# -- Concat ---------------------------------------------------------------------------------

@given(image_shapes(max_size=4), st.integers(1, 3), seeds)
def test_concat_gradients_and_split(shape, second_channels, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    b = rng.standard_normal((shape[0], second_channels) + shape[2:])
    layer = Concat()
    y = layer.forward((a, b))
    assert y.shape == (shape[0], shape[1] + second_channels) + shape[2:]
    da, db = layer.backward(y * 2)
    np.testing.assert_array_equal(da, a * 2)
    np.testing.assert_array_equal(db, b * 2)
    assert_gradients_match(check_layer(Concat(), (a, b), rng=rng))


# -- Dropout --------------------------------------------------------------------------------

def test_dropout_gradients_with_the_mask_held_fixed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4))
    assert_gradients_match(check_layer(Dropout(0.5, seed=3), x, rng=rng))


def test_dropout_scales_kept_values_and_backward_reuses_the_mask():
    x = np.ones((1, 1, 100, 100))
    layer = Dropout(0.25, seed=1)
    y = layer.forward(x)
    kept = y != 0
    assert set(np.unique(y)) == {0.0, 1 / 0.75}
    assert abs(kept.mean() - 0.75) < 0.02          # 10,000 draws: within ~4.6 sigma
    dx = layer.backward(np.full_like(x, 3.0))
    np.testing.assert_array_equal(dx, np.where(kept, 3.0 / 0.75, 0.0))


def test_dropout_is_identity_in_evaluation_and_seeded():
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8))
    layer = Dropout(0.5, seed=4).eval()
    assert layer.forward(x) is x and layer.backward(x) is x
    first = Dropout(0.5, seed=9).forward(x)
    again = Dropout(0.5, seed=9).forward(x)
    other = Dropout(0.5, seed=10).forward(x)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


# -- ReLU, Sigmoid --------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@given(image_shapes(), seeds)
def test_relu_gradients_away_from_the_kink(path, shape, seed):
    rng = np.random.default_rng(seed)
    x = away_from_zero(shape, rng)
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        assert_gradients_match(check_layer(ReLU(), x, rng=rng))


KINK = [0.0, -0.0, 0.5, -0.5, -0.0, 0.0, 1e-30, -1e-30]   # exact zeros of both signs, and neighbours


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_at_exactly_zero_outputs_zero_and_passes_no_gradient(path, dtype):
    """At the kink the derivative does not exist; the documented rule (PyTorch's: its ReLU
    backward is dy where x > 0, else 0) gives gradient 0 at 0.0 and at -0.0, on both paths.
    Central differences cannot see this (they straddle the kink), so it is asserted exactly."""
    x = np.array(KINK, dtype=dtype).reshape(1, 2, 2, 2)
    layer = ReLU()
    with layer_path(path):
        assert cpu_layers.serves(x) == (path == "numba")
        y = layer.forward(x)
        dx = layer.backward(np.full_like(x, 3.0))
    np.testing.assert_array_equal(y.reshape(-1), np.array([0, 0, 0.5, 0, 0, 0, 1e-30, 0], dtype=dtype))
    np.testing.assert_array_equal(dx.reshape(-1), np.array([0, 0, 3, 0, 0, 0, 3, 0], dtype=dtype))
    assert layer.dead_fraction() == 6 / 8
    # one step to either side of 0 takes the two branches: slopes 0 and 1
    for x0, slope in [(np.nextafter(dtype(0), dtype(1)), 1.0), (np.nextafter(dtype(0), dtype(-1)), 0.0)]:
        with layer_path(path):
            layer.forward(np.full((1, 1, 1, 1), x0, dtype=dtype))
            assert layer.backward(np.ones((1, 1, 1, 1), dtype=dtype))[0, 0, 0, 0] == slope


def test_relu_dead_fraction_counts_zeros():
    layer = ReLU()
    layer.forward(np.array([[-1.0, 2.0, -3.0, 4.0]]))
    assert layer.dead_fraction() == 0.5


@given(image_shapes(), seeds)
def test_sigmoid_gradients(shape, seed):
    rng = np.random.default_rng(seed)
    assert_gradients_match(check_layer(Sigmoid(), rng.standard_normal(shape) * 3, rng=rng))


def test_sigmoid_at_zero_of_both_signs_takes_either_branch_to_the_same_value():
    """sigmoid is smooth, but computed in two branches (x >= 0 and x < 0) that meet at 0:
    0.0 and -0.0 must give 1/2 and slope 1/4, and the two branches must agree near 0."""
    layer = Sigmoid()
    x = np.array([[0.0, -0.0, 1e-9, -1e-9]])
    y = layer.forward(x)
    np.testing.assert_array_equal(y[0, :2], [0.5, 0.5])
    np.testing.assert_array_equal(layer.backward(np.ones_like(x))[0, :2], [0.25, 0.25])
    np.testing.assert_allclose(y[0, 2:], [0.5 + 0.25e-9, 0.5 - 0.25e-9], rtol=1e-15)
    assert_gradients_match(check_layer(Sigmoid(), np.linspace(-1e-3, 1e-3, 7).reshape(1, 7)))


def test_sigmoid_is_finite_and_exact_at_extremes():
    layer = Sigmoid()
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # no overflow, no NaN
        y = layer.forward(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert y[0] == 0.0 and y[2] == 0.5 and y[4] == 1.0
    assert y[1] == pytest.approx(np.exp(-30.0) / (1 + np.exp(-30.0)), rel=1e-12)


# -- shared promises ------------------------------------------------------------------------

def all_layers(dtype):
    return [Conv2d(2, 3, 3, seed=0, dtype=dtype), Conv2d(2, 3, 2, stride=2, seed=0, dtype=dtype),
            MaxPool2d(2), Upsample2d(2), Dropout(0.5, seed=0), ReLU(), Sigmoid()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out_and_dx_has_the_input_shape(dtype):
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 5)).astype(dtype)
    for layer in all_layers(dtype):
        y = layer.forward(x)
        dx = layer.backward(np.ones_like(y))
        assert y.dtype == dtype and dx.dtype == dtype, layer
        assert dx.shape == x.shape, layer
        for name, grad in layer.grads.items():
            assert grad.dtype == dtype and grad.shape == layer.params[name].shape, (layer, name)
    ys = Concat().forward((x, x))
    assert ys.dtype == dtype


def test_float32_conv_agrees_with_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 9))
    wide = Conv2d(4, 5, 3, seed=2, dtype=np.float64)
    narrow = Conv2d(4, 5, 3, seed=2, dtype=np.float32)
    assert relative_error(narrow.forward(x.astype(np.float32)), wide.forward(x)) < 1e-6
    dy = rng.standard_normal((2, 5, 9, 9))
    assert relative_error(narrow.backward(dy.astype(np.float32)), wide.backward(dy)) < 1e-6
    assert relative_error(narrow.grads["weight"], wide.grads["weight"]) < 1e-6


@pytest.mark.parametrize("make_layer, make_input", [
    (lambda: Upsample2d(2), lambda rng: rng.standard_normal((2, 6, 20, 18))),
    (lambda: Dropout(0.4, seed=2), lambda rng: rng.standard_normal((2, 6, 40, 36))),
    (lambda: ReLU(), lambda rng: away_from_zero((2, 6, 40, 36), rng)),
    (lambda: Sigmoid(), lambda rng: rng.standard_normal((2, 6, 40, 36)) * 3),
    (lambda: Concat(), lambda rng: (rng.standard_normal((2, 5, 24, 24)), rng.standard_normal((2, 7, 24, 24)))),
], ids=["upsample", "dropout", "relu", "sigmoid", "concat"])
def test_directional_derivative_on_larger_inputs(make_layer, make_input):
    rng = np.random.default_rng(11)
    assert_gradients_match(check_layer(make_layer(), make_input(rng), mode="directional", rng=rng))
