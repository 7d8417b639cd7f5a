"""The gradient checker itself (tinyunet/gradcheck.py): every gradient proof in the suite rests
on it, so it is held to known values and must flag backwards that are slightly wrong.

A checker that always said "fine" would pass every layer test; these tests fail then. Each
broken backward below is wrong in a way a real bug is: off by 1% everywhere, one element off,
the kernel transposed, a gradient left out.
"""
import numpy as np
import pytest

from tinyunet.gradcheck import (check_gradients, check_layer, directional_derivative, numerical_gradient,
                                relative_error)
from tinyunet.layers import Concat, Conv2d, Dropout

PASS = 1e-6          # what the layer tests require
FLAGGED = 1e-3       # what a 1% error must exceed by far


# -- relative_error on known values -----------------------------------------------------------

@pytest.mark.parametrize("a, b, expected", [
    ([3.0, 4.0], [0.0, 0.0], 1.0),                         # |a - b| = 5, max norm 5
    ([1.0, 0.0], [0.0, 1.0], np.sqrt(2)),                  # orthogonal: sqrt 2 / 1
    ([1.0, 2.0], [1.0, 2.0], 0.0),
    ([0.0], [0.0], 0.0),                                   # both zero: 0, not NaN
    ([100.0], [101.0], 1 / 101),                           # the larger norm divides
    ([-2.0, 0.0], [2.0, 0.0], 2.0),                        # opposite signs
    ([[1.0, 2.0], [2.0, 4.0]], [[1.0, 2.0], [2.0, 4.0 + 5.0]], 5.0 / np.linalg.norm([1, 2, 2, 9])),
])
def test_relative_error_on_known_values(a, b, expected):
    assert relative_error(np.array(a), np.array(b)) == pytest.approx(expected, rel=1e-14, abs=1e-300)
    assert relative_error(np.array(b), np.array(a)) == pytest.approx(expected, rel=1e-14, abs=1e-300)


def test_relative_error_reads_float32_in_float64_and_returns_a_float():
    got = relative_error(np.array([1.0], np.float32), np.array([1.0 + 2 ** -20]))
    assert isinstance(got, float) and got == pytest.approx(2 ** -20 / (1 + 2 ** -20), rel=1e-12)


# -- the numerical derivatives on functions with known gradients --------------------------------

def test_numerical_gradient_of_a_known_function_and_the_array_is_restored():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4))
    before = a.copy()
    w = rng.standard_normal((3, 4))
    grad = numerical_gradient(lambda: float((w * a ** 3).sum()), a)       # d/da = 3 w a^2
    np.testing.assert_allclose(grad, 3 * w * before ** 2, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(a, before)


def test_directional_derivative_of_a_known_function_and_the_array_is_restored():
    rng = np.random.default_rng(1)
    a, u = rng.standard_normal(5), rng.standard_normal(5)
    before = a.copy()
    got = directional_derivative(lambda: float(np.sin(a).sum()), a, u)     # <cos a, u>
    assert got == pytest.approx(float(np.cos(before) @ u), rel=1e-8)
    np.testing.assert_array_equal(a, before)


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_check_gradients_passes_the_true_gradient_and_flags_a_wrong_one(mode):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 3))
    true = {"a": 2 * a * np.cos(a ** 2)}
    loss = lambda: float(np.sin(a ** 2).sum())                              # noqa: E731
    assert check_gradients(loss, {"a": a}, true, mode=mode)["a"] < PASS
    assert check_gradients(loss, {"a": a}, {"a": true["a"] * 1.01}, mode=mode)["a"] > FLAGGED
    assert check_gradients(loss, {"a": a}, {"a": -true["a"]}, mode=mode)["a"] > 1.0


def test_float32_is_refused_with_the_fix():
    a = np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"float64.*'a' is float32.*astype\(np.float64\)"):
        check_gradients(lambda: float(a.sum()), {"a": a}, {"a": np.ones(3)})
    layer = Conv2d(1, 1, 3, seed=0)                                          # float32 parameters
    with pytest.raises(TypeError, match="float64"):
        check_layer(layer, np.ones((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):                          # float64 x, float32 weights
        check_layer(layer, np.ones((1, 1, 4, 4)))


def test_an_unknown_mode_is_refused():
    a = np.ones(2)
    with pytest.raises(ValueError, match="'full' or 'directional'"):
        check_gradients(lambda: float(a.sum()), {"a": a}, {"a": np.ones(2)}, mode="forward")


# -- check_layer flags broken backwards ---------------------------------------------------------

class Broken:
    """A layer whose backward is wrapped by ``spoil(dx, grads) -> (dx, grads)``; everything
    else (params, the dropout generator that check_layer rewinds) is the wrapped layer's."""

    def __init__(self, layer, spoil):
        self.layer, self.spoil = layer, spoil
        self.grads = {}

    def __getattr__(self, name):
        return getattr(self.__dict__["layer"], name)

    def forward(self, x):
        return self.layer.forward(x)

    def backward(self, dy):
        dx, self.grads = self.spoil(self.layer.backward(dy), dict(self.layer.grads))
        return dx


def conv_and_input(seed=3):
    rng = np.random.default_rng(seed)
    layer = Conv2d(2, 3, 3, padding="same", seed=seed, dtype=np.float64)
    layer.params["bias"][:] = rng.standard_normal(3)
    return layer, rng.standard_normal((2, 2, 5, 4))


def one_element_off(a, relative=0.01):
    a = a.copy()
    k = int(np.argmax(np.abs(a)))
    a.reshape(-1)[k] *= 1 + relative
    return a


# name -> (the gradient it spoils, how)
SPOILERS = {
    "dx scaled by 1.01": ("x", lambda dx, g: (dx * 1.01, g)),
    "dW scaled by 1.01": ("param.weight", lambda dx, g: (dx, {**g, "weight": g["weight"] * 1.01})),
    "db scaled by 1.01": ("param.bias", lambda dx, g: (dx, {**g, "bias": g["bias"] * 1.01})),
    "one element of dx 1% off": ("x", lambda dx, g: (one_element_off(dx), g)),
    "one element of dW 1% off": ("param.weight", lambda dx, g: (dx, {**g, "weight": one_element_off(g["weight"])})),
    "dW transposed": ("param.weight", lambda dx, g: (dx, {**g, "weight": g["weight"].transpose(0, 1, 3, 2)})),
    "dx mirrored left-right": ("x", lambda dx, g: (dx[..., ::-1], g)),
}


@pytest.mark.parametrize("spoiled", list(SPOILERS))
def test_check_layer_flags_a_backward_that_is_slightly_wrong(spoiled):
    layer, x = conv_and_input()
    assert max(check_layer(layer, x).values()) < PASS, "the unbroken layer must pass first"
    name, spoil = SPOILERS[spoiled]
    errors = check_layer(Broken(layer, spoil), x)
    assert errors[name] > 1e-4, errors             # one element 1% off among ~40: above 1e-4
    assert all(err < PASS for other, err in errors.items() if other != name), errors


@pytest.mark.parametrize("spoiled", ["dx scaled by 1.01", "dW scaled by 1.01", "dW transposed"])
def test_directional_mode_flags_them_too(spoiled):
    layer, x = conv_and_input(4)
    name, spoil = SPOILERS[spoiled]
    errors = check_layer(Broken(layer, spoil), x, mode="directional")
    assert errors[name] > 1e-3, errors


def test_check_layer_checks_every_input_and_parameter_by_name():
    rng = np.random.default_rng(5)
    layer, x = conv_and_input()
    assert set(check_layer(layer, x)) == {"x", "param.weight", "param.bias"}
    a, b = rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3))
    assert max(check_layer(Concat(), (a, b)).values()) < PASS
    assert set(check_layer(Concat(), (a, b))) == {"x0", "x1"}
    swapped = Broken(Concat(), lambda dx, g: ((dx[1], dx[0]), g))      # the split order reversed
    errors = check_layer(swapped, (a, b))
    assert errors["x0"] > 0.1 and errors["x1"] > 0.1, errors


def test_check_layer_rewinds_dropout_and_leaves_inputs_unchanged():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 2, 4, 4))
    before = x.copy()
    assert max(check_layer(Dropout(0.5, seed=2), x).values()) < PASS    # one mask for every forward
    np.testing.assert_array_equal(x, before)
    # through the wrapper too (check_layer finds its generator), and a backward that
    # forgets the 1 / (1 - p) scale is flagged
    assert max(check_layer(Broken(Dropout(0.5, seed=2), lambda dx, g: (dx, g)), x).values()) < PASS
    assert check_layer(Broken(Dropout(0.5, seed=2), lambda dx, g: (dx * 0.5, g)), x)["x"] > 0.1
