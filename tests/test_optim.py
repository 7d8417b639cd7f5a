"""Adam (Keras semantics) and SGD with momentum against steps computed by hand."""
import math

import numpy as np
import pytest

from tinyunet.optim import SGD, Adam


def test_adam_two_steps_by_hand():
    p = {"w": np.array([1.0, -2.0])}
    adam = Adam(p, lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-7)
    grads = [np.array([0.5, -1.0]), np.array([0.1, 3.0])]
    expected = [1.0, -2.0]
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    for t, g in enumerate(grads, start=1):
        adam.step({"w": g})
        alpha = 0.1 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for i in range(2):
            m[i] = 0.9 * m[i] + 0.1 * g[i]
            v[i] = 0.999 * v[i] + 0.001 * g[i] ** 2
            expected[i] -= alpha * m[i] / (math.sqrt(v[i]) + 1e-7)
    np.testing.assert_allclose(p["w"], expected, rtol=1e-14)
    # first step of Adam moves every weight by about lr, whatever the gradient's size
    assert adam.step_count == 2


def test_adam_keras_defaults():
    adam = Adam({"w": np.zeros(1)})
    assert (adam.lr, adam.beta1, adam.beta2, adam.epsilon) == (1e-4, 0.9, 0.999, 1e-7)


def test_sgd_momentum_by_hand_equals_pytorch_form():
    p = {"w": np.array([1.0])}
    sgd = SGD(p, lr=0.01, momentum=0.99)
    buf, w = 0.0, 1.0          # PyTorch: buf = momentum * buf + g; w -= lr * buf
    for g in [2.0, -1.0, 0.5]:
        sgd.step({"w": np.array([g])})
        buf = 0.99 * buf + g
        w -= 0.01 * buf
    assert p["w"][0] == pytest.approx(w, rel=1e-13)


@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=0.01), lambda p: SGD(p, lr=0.01, momentum=0.9)])
def test_state_round_trip_continues_identically(make):
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal((3, 2)).astype(np.float32)} for _ in range(6)]
    straight = {"w": np.ones((3, 2), np.float32)}
    opt = make(straight)
    for g in grads:
        opt.step(g)
    resumed = {"w": np.ones((3, 2), np.float32)}
    first = make(resumed)
    for g in grads[:3]:
        first.step(g)
    state = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in first.state_dict().items()}
    second = make(resumed)
    second.load_state_dict(state)
    for g in grads[3:]:
        second.step(g)
    np.testing.assert_array_equal(resumed["w"], straight["w"])
    assert second.step_count == 6


def test_float32_parameters_stay_float32():
    p = {"w": np.ones(4, np.float32)}
    Adam(p).step({"w": np.ones(4, np.float32)})
    assert p["w"].dtype == np.float32


def test_missing_or_misshapen_gradients_are_named():
    adam = Adam({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(KeyError, match=r"no gradient for \['b'\]"):
        adam.step({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="gradient of 'b' has shape"):
        adam.step({"a": np.zeros(2), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="lr > 0"):
        Adam({"a": np.zeros(1)}, lr=0)
    with pytest.raises(TypeError, match="non-empty dict"):
        SGD({})
