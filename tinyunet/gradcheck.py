"""Numerical gradient checks: is a hand-written backward the derivative of its forward?

Central differences, element by element (exact up to O(eps^2), one pair of forwards per
element, so for small inputs)::

    dL/da[i] ~ (L(a + eps e_i) - L(a - eps e_i)) / (2 eps)

The directional derivative along a random unit direction u (two forwards per array, so for
large inputs and whole networks; Chainer's check_backward and JAX's check_grads do this)::

    (L(a + eps u) - L(a - eps u)) / (2 eps)  ~  <dL/da, u>

Both need float64: in float32, rounding in L (about 1e-7 relative) divided by eps swamps the
difference, and a wrong gradient could pass or a right one fail by luck. So they refuse
float32. ``relative_error(a, b) = |a - b| / max(|a|, |b|)`` (norms for arrays); with
eps = 1e-6, a correct float64 gradient typically scores 1e-10 to 1e-8.

A layer is checked through the scalar L = sum(forward(x) * r) for a fixed random r, so that
dL/dy = r is what backward receives. Used by tests/test_layers.py, tests/test_unet.py and
examples/backprop_tour.py.
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module, to_numpy

DEFAULT_EPS = 1e-6


def relative_error(a, b) -> float:
    """|a - b| / max(|a|, |b|) with Euclidean norms; 0 when both are 0."""
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(b), dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def _require_float64(arrays: dict):
    for name, a in arrays.items():
        if a.dtype != np.float64:
            raise TypeError(f"gradient checks need float64 ({name!r} is {a.dtype}): float32 central "
                            f"differences are too noisy to prove anything; cast with .astype(np.float64)")


def numerical_gradient(loss_fn, array, eps: float = DEFAULT_EPS):
    """Central differences of ``loss_fn()`` with respect to every element of ``array``.

    ``array`` is perturbed in place and restored; ``loss_fn`` must read it. Returns an array
    of its shape.
    """
    xp = get_array_module(array)
    grad = xp.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i].item()
        flat[i] = original + eps
        plus = loss_fn()
        flat[i] = original - eps
        minus = loss_fn()
        flat[i] = original
        flat_grad[i] = (plus - minus) / (2 * eps)
    return grad


def directional_derivative(loss_fn, array, direction, eps: float = DEFAULT_EPS) -> float:
    """(L(a + eps u) - L(a - eps u)) / (2 eps), ``array`` moved in place and restored."""
    original = array.copy()
    array += eps * direction
    plus = loss_fn()
    array[...] = original - eps * direction
    minus = loss_fn()
    array[...] = original
    return (plus - minus) / (2 * eps)


def check_gradients(loss_fn, arrays: dict, analytic: dict, mode: str = "full",
                    eps: float = DEFAULT_EPS, rng: np.random.Generator | None = None) -> dict:
    """Compare analytic gradients with numerical ones, array by array.

    loss_fn:  () -> float, computed from the current contents of ``arrays``
    arrays:   {name: float64 array}, perturbed in place (and restored)
    analytic: {name: dL/d(array)} from the backward pass
    mode:     'full' (every element) or 'directional' (one random direction per array)
    Returns {name: relative error}.
    """
    _require_float64(arrays)
    if mode not in ("full", "directional"):
        raise ValueError(f"mode must be 'full' or 'directional', got {mode!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    errors = {}
    for name, array in arrays.items():
        if mode == "full":
            errors[name] = relative_error(analytic[name], numerical_gradient(loss_fn, array, eps))
        else:
            xp = get_array_module(array)
            direction = rng.standard_normal(array.shape)
            direction = xp.asarray(direction / np.linalg.norm(direction))
            numeric = directional_derivative(loss_fn, array, direction, eps)
            exact = float((analytic[name] * direction).sum())
            errors[name] = relative_error(np.array([exact]), np.array([numeric]))
    return errors


def _frozen_randomness(layer):
    """A function that rewinds the layer's generator, so every forward draws the same mask."""
    rng = getattr(layer, "rng", None)
    if rng is None:
        return lambda: None
    state = rng.bit_generator.state
    return lambda: setattr(rng.bit_generator, "state", state)


def check_layer(layer, x, mode: str = "full", eps: float = DEFAULT_EPS,
                rng: np.random.Generator | None = None) -> dict:
    """Gradient-check one layer at input ``x`` (an array, or a tuple for Concat).

    Builds L = sum(forward(x) * r) for a random r, runs backward(r) once for the analytic
    gradients, then compares dL/dx (named 'x', or 'x0', 'x1', ... for a tuple) and every
    parameter gradient with numerical ones. Returns {name: relative error}.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    rewind = _frozen_randomness(layer)
    inputs = {f"x{i}": a for i, a in enumerate(x)} if isinstance(x, tuple) else {"x": x}
    call_input = tuple(inputs.values()) if isinstance(x, tuple) else inputs["x"]

    rewind()
    y = layer.forward(call_input)
    xp = get_array_module(y)
    r = xp.asarray(rng.standard_normal(y.shape))

    def loss_fn():
        rewind()
        return float((layer.forward(call_input) * r).sum())

    rewind()
    layer.forward(call_input)
    dx = layer.backward(r)
    analytic = dict(zip(inputs, dx)) if isinstance(x, tuple) else {"x": dx}
    analytic.update({f"param.{k}": g.copy() for k, g in layer.grads.items()})
    arrays = dict(inputs)
    arrays.update({f"param.{k}": p for k, p in layer.params.items()})
    return check_gradients(loss_fn, arrays, analytic, mode=mode, eps=eps, rng=rng)
