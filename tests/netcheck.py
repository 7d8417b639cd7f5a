"""Shared by tests/test_fcn.py and tests/test_segnet.py: whole-network gradient checks with the
K-class softmax cross-entropy, and copying a tinyunet network's weights into PyTorch tensors."""
import numpy as np

from tinyunet.gradcheck import check_gradients
from tinyunet.losses import softmax_cross_entropy


def rewinder(model):
    """A function that rewinds every Dropout generator, so each forward draws the same masks."""
    states = {name: rng.bit_generator.state for name, rng in model.random_generators().items()}

    def rewind():
        for name, rng in model.random_generators().items():
            rng.bit_generator.state = states[name]
    return rewind


def network_gradient_errors(model, x, labels, rng, mode="directional", eps=1e-6):
    """{name: relative error} of dL/dx and every trainable dL/dparam against the directional
    (or central) derivative of L = softmax_cross_entropy(model(x), labels)."""
    rewind = rewinder(model)
    rewind()
    _, dlogits = softmax_cross_entropy(model.forward(x), labels)
    analytic = {"x": model.backward(dlogits)}
    analytic.update({name: g.copy() for name, g in model.gradients().items()})

    def loss_fn():
        rewind()
        return softmax_cross_entropy(model.forward(x), labels)[0]

    arrays = {"x": x, **model.trainable_parameters()}
    return check_gradients(loss_fn, arrays, analytic, mode=mode, rng=rng, eps=eps)


def randomize(model, rng, scale=0.05):
    """Nonzero biases (and batch-norm shifts/scales), so that mix-ups show."""
    for name, p in model.parameters().items():
        if name.endswith(".bias"):
            p[...] = rng.normal(0, scale, p.shape)
        elif name.endswith(".weight") and p.ndim == 1:          # batch norm's gamma
            p[...] = rng.uniform(0.5, 1.5, p.shape)


def joint_directional_errors(model, x, labels, rng, directions=2, eps=1e-6):
    """[relative error] of <grad, u> against (L(theta + eps u) - L(theta - eps u)) / (2 eps) for
    random unit directions u over the input and every trainable parameter at once: two
    forwards per direction, whatever the number of layers (Chainer's check_backward)."""
    rewind = rewinder(model)
    rewind()
    _, dlogits = softmax_cross_entropy(model.forward(x), labels)
    arrays = {"x": x, **model.trainable_parameters()}
    grads = {"x": model.backward(dlogits), **{k: g.copy() for k, g in model.gradients().items()}}

    def loss_at(step, u):
        for name, a in arrays.items():
            a += step * u[name]
        rewind()
        value = softmax_cross_entropy(model.forward(x), labels)[0]
        for name, a in arrays.items():
            a -= step * u[name]
        return value

    errors = []
    for _ in range(directions):
        u = {name: rng.standard_normal(a.shape) for name, a in arrays.items()}
        norm = np.sqrt(sum(float((v * v).sum()) for v in u.values()))
        u = {name: v / norm for name, v in u.items()}
        exact = sum(float((grads[name] * u[name]).sum()) for name in arrays)
        numeric = (loss_at(eps, u) - loss_at(-eps, u)) / (2 * eps)
        errors.append(abs(exact - numeric) / max(abs(exact), abs(numeric)))
    return errors
