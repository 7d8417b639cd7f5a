"""Optimizers that update parameters in place from their gradients: Adam and SGD.

Both work on dicts {name: array} (NumPy or CuPy), the same names for params and grads, and
their state (moments, step) can be read with ``state_dict()`` and restored with
``load_state_dict()`` for checkpoints.

Adam, with Keras/TensorFlow semantics (lr 1e-4 as the reference U-Net, beta1 0.9,
beta2 0.999, epsilon 1e-7). At step t = 1, 2, ...:

    m = beta1 m + (1 - beta1) g
    v = beta2 v + (1 - beta2) g^2
    alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t)        (the bias correction, folded into lr)
    p = p - alpha m / (sqrt(v) + epsilon)

This is the form of the Adam paper's section 2 ("epsilon hat"): epsilon is added to the
uncorrected sqrt(v). PyTorch adds epsilon to the corrected sqrt(v / (1 - beta2^t)), so the
two agree only when epsilon is negligible.

SGD with momentum, Keras form (the U-Net paper used momentum 0.99):

    velocity = momentum velocity - lr g
    p = p + velocity

which equals PyTorch's buf = momentum buf + g, p -= lr buf for a constant lr.

Adam's update has two implementations with one result: NumPy expressions (any array module:
NumPy, CuPy, and the reference), and for NumPy arrays on the CPU a Numba kernel that does the
whole update in ONE pass over p, g, m and v, on every core, with no temporaries (NumPy makes
five passes and three temporary arrays the size of the largest weight). The kernel performs
the same float operations in the same order, in the parameters' dtype, so the two agree bit
for bit. TINYUNET_KERNELS=reference forces the NumPy path.
Proofs: tests/test_optim.py (hand-computed steps, state round trip) and tests/test_fast_paths.py
(the Numba update equals the NumPy one, bit for bit).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module, to_device, device_of
from tinyunet.kernels import cpu_layers

class Optimizer:
    def __init__(self, params: dict):
        if not isinstance(params, dict) or not params:
            raise TypeError(f"{type(self).__name__}: params must be a non-empty dict {{name: array}}")
        self.params = params
        self.step_count = 0

    def _check_grads(self, grads: dict):
        missing = sorted(set(self.params) - set(grads))
        if missing:
            raise KeyError(f"{type(self).__name__}.step: no gradient for {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}; run backward() first")
        for name, p in self.params.items():
            if grads[name].shape != p.shape:
                raise ValueError(f"{type(self).__name__}.step: gradient of {name!r} has shape "
                                 f"{tuple(grads[name].shape)}, the parameter {tuple(p.shape)}")

    def _zeros_like_params(self):
        return {k: get_array_module(p).zeros_like(p) for k, p in self.params.items()}

    # -- state for checkpoints: flat {key: array} plus the step -----------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step_count}
        for slot in self.slots:
            for name, value in getattr(self, slot).items():
                state[f"{slot}.{name}"] = value
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for slot in self.slots:
            target = getattr(self, slot)
            for name, p in self.params.items():
                value = state[f"{slot}.{name}"]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {slot}.{name} has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(p.shape)}")
                target[name] = to_device(value, device_of(p)).astype(p.dtype, copy=True)


class Adam(Optimizer):
    slots = ("m", "v")

    def __init__(self, params: dict, lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-7):
        super().__init__(params)
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or epsilon <= 0:
            raise ValueError(f"Adam: need lr > 0, 0 <= beta1, beta2 < 1, epsilon > 0; got "
                             f"lr={lr}, beta1={beta1}, beta2={beta2}, epsilon={epsilon}")
        self.lr, self.beta1, self.beta2, self.epsilon = lr, beta1, beta2, epsilon
        self.m = self._zeros_like_params()
        self.v = self._zeros_like_params()

    def step(self, grads: dict) -> None:
        self._check_grads(grads)
        self.step_count += 1
        t = self.step_count
        alpha = self.lr * np.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)
        for name, p in self.params.items():
            xp = get_array_module(p)
            g, m, v = grads[name], self.m[name], self.v[name]
            dtype = p.dtype.type
            if cpu_layers.serves(p, g, m, v) and g.dtype == p.dtype:
                cpu_layers.adam(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                             dtype(self.beta1), dtype(1 - self.beta1), dtype(self.beta2),
                             dtype(1 - self.beta2), dtype(alpha), dtype(self.epsilon))
                continue
            m *= dtype(self.beta1)
            m += dtype(1 - self.beta1) * g
            v *= dtype(self.beta2)
            v += dtype(1 - self.beta2) * (g * g)
            p -= dtype(alpha) * m / (xp.sqrt(v) + dtype(self.epsilon))


class SGD(Optimizer):
    slots = ("velocity",)

    def __init__(self, params: dict, lr: float = 1e-2, momentum: float = 0.99):
        super().__init__(params)
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"SGD: need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        self.lr, self.momentum = lr, momentum
        self.velocity = self._zeros_like_params()

    def step(self, grads: dict) -> None:
        self._check_grads(grads)
        self.step_count += 1
        for name, p in self.params.items():
            dtype = p.dtype.type
            velocity = self.velocity[name]
            velocity *= dtype(self.momentum)
            velocity -= dtype(self.lr) * grads[name]
            p += velocity
