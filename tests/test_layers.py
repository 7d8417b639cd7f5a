"""Every layer's backward is the derivative of its forward (float64 gradient checks).

Small inputs: every element by central differences (relative error < 1e-6).
Larger inputs: the directional derivative along a random direction.
Plus the behaviour each docstring promises (shapes, dtypes, tie rule, floor, mask reuse).
"""
import numpy as np
import pytest
from hypothesis import given
from strategies import conv_geometries, image_shapes, pool_geometries, seeds

from tinyunet.gradcheck import check_layer, relative_error
from tinyunet.layers import (Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid, Upsample2d,
                             conv2d_naive)

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


@pytest.mark.parametrize("kernel, padding, stride", [(3, "same", 1), (2, "same", 1), (3, "valid", 2),
                                                     (1, "valid", 1), (3, ((0, 2), (1, 0)), 2)])
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


# -- MaxPool2d ------------------------------------------------------------------------------

@given(pool_geometries(), seeds)
def test_maxpool_gradients_by_central_differences(g, seed):
    rng = np.random.default_rng(seed)
    layer = MaxPool2d(g["kernel"], g["stride"])
    x = distinct_values((g["n"], g["c"], g["h"], g["w"]), rng)
    y = layer.forward(x)
    stride = g["stride"] or g["kernel"]
    assert y.shape[2:] == ((g["h"] - g["kernel"]) // stride + 1, (g["w"] - g["kernel"]) // stride + 1)
    assert_gradients_match(check_layer(layer, x, rng=rng))


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


def test_maxpool_overlapping_windows_add_their_gradients():
    layer = MaxPool2d(kernel_size=2, stride=1)
    x = np.array([[[[0.0, 0.1, -1.0], [0.2, 9.0, -1.0]]]])   # 9 is the max of both 2x2 windows
    y = layer.forward(x)
    assert y.shape == (1, 1, 1, 2) and np.all(y == 9.0)
    dx = layer.backward(np.array([[[[1.0, 2.0]]]]))
    assert dx[0, 0, 1, 1] == 3.0 and dx.sum() == 3.0


def test_maxpool_directional_on_larger_input():
    rng = np.random.default_rng(3)
    x = distinct_values((2, 4, 32, 30), rng)
    assert_gradients_match(check_layer(MaxPool2d(2), x, mode="directional", rng=rng))


# -- Upsample2d -----------------------------------------------------------------------------

@given(image_shapes(max_size=4), st_scale := __import__("hypothesis").strategies.integers(1, 3), seeds)
def test_upsample_gradients_by_central_differences(shape, scale, seed):
    rng = np.random.default_rng(seed)
    layer = Upsample2d(scale)
    x = rng.standard_normal(shape)
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

@given(image_shapes(max_size=4), __import__("hypothesis").strategies.integers(1, 3), seeds)
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

@given(image_shapes(), seeds)
def test_relu_gradients_away_from_the_kink(shape, seed):
    rng = np.random.default_rng(seed)
    assert_gradients_match(check_layer(ReLU(), away_from_zero(shape, rng), rng=rng))


def test_relu_dead_fraction_counts_zeros():
    layer = ReLU()
    layer.forward(np.array([[-1.0, 2.0, -3.0, 4.0]]))
    assert layer.dead_fraction() == 0.5


@given(image_shapes(), seeds)
def test_sigmoid_gradients(shape, seed):
    rng = np.random.default_rng(seed)
    assert_gradients_match(check_layer(Sigmoid(), rng.standard_normal(shape) * 3, rng=rng))


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
