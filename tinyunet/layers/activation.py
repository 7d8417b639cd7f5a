"""Element-wise activations, forward and backward: ReLU and Sigmoid.

Shapes: any; y has the shape of x, and so has dx.

ReLU:     y = max(x, 0)                  dy/dx = 1 where x > 0, else 0
          (at x = 0 the derivative does not exist; we use 0, as PyTorch does, and the
          gradient checks draw inputs away from that kink)
          dx = dy * [x > 0]

Sigmoid:  y = 1 / (1 + exp(-x))          dy/dx = y (1 - y)
          dx = dy * y * (1 - y)
          computed without overflow: for x < 0, exp(-x) overflows, so there we use the equal
          form exp(x) / (1 + exp(x)); both branches only ever exponentiate -|x|.

For training, prefer the loss from the logits (tinyunet.losses.bce_with_logits): it fuses the
sigmoid into the loss, which is both stabler and simpler (its gradient is sigmoid(z) - t).

ReLU has two implementations with one result: NumPy expressions (any array module: NumPy,
CuPy, and the reference) and, for NumPy arrays on the CPU, a Numba kernel that writes y and
the mask in ONE pass over x (NumPy needs two: x > 0, then max) and dx = dy * mask in one
more, on every core (kernels/cpu_layers.py, which also decides when it serves);
TINYUNET_KERNELS=reference (or tinyunet.kernels.use("reference")) forces the NumPy paths.

Proofs: tests/test_layers.py, tests/test_torch_oracle.py, and tests/test_fast_paths.py (the
Numba kernels equal the NumPy paths, NaN included).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.kernels import cpu_layers

from .base import Layer

def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow, for any x."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))                       # in (0, 1]: never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


class ReLU(Layer):
    _saved = ("_positive",)

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self._positive = None
        self._dtype = None

    def forward(self, x, out=None):
        """y = max(x, 0), keeping the mask x > 0 for backward. ``out``: the array to write y
        into; ``out=x`` computes it in place (the U-Net does so inside no_grad(), where the
        conv output it receives has no other reader)."""
        self._check_array(x, ndim=None)
        self._dtype = x.dtype
        keep = self._keeps_for_backward()
        if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
            raise ValueError(f"{self._label()}: out must have the input's shape and dtype, got "
                             f"{tuple(out.shape)} {out.dtype} for {tuple(x.shape)} {x.dtype}")
        if cpu_layers.serves(x) and (out is None or cpu_layers.serves(out)):
            y = np.empty_like(x) if out is None else out
            if keep:
                self._positive = np.empty(x.shape, dtype=np.bool_)
                cpu_layers.relu_forward(x.reshape(-1), y.reshape(-1), self._positive.reshape(-1))
            else:                                # no mask: nothing will read it
                cpu_layers.relu_forward_values(x.reshape(-1), y.reshape(-1))
            return y
        xp = get_array_module(x)
        if keep:
            self._positive = x > 0               # a bool mask: a quarter of x's bytes in float32
        # np.maximum: NaN stays NaN, as the kernel keeps it
        return xp.maximum(x, 0) if out is None else xp.maximum(x, 0, out=out)

    def backward(self, dy):
        self._check_grad(dy, None if self._positive is None else self._positive.shape, self._dtype)
        if cpu_layers.serves(dy, self._positive):
            dx = np.empty_like(dy)
            cpu_layers.relu_backward(dy.reshape(-1), self._positive.reshape(-1), dx.reshape(-1))
            return dx
        return dy * self._positive

    def dead_fraction(self) -> float:
        """The share of the last forward's outputs that were zero (their gradient is zero too)."""
        return 1.0 - float(self._positive.mean()) if self._positive is not None else float("nan")


class Sigmoid(Layer):
    _saved = ("_y",)

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self._y = None

    def forward(self, x):
        self._check_array(x, ndim=None)
        y = sigmoid(x)
        if self._keeps_for_backward():
            self._y = y
        return y

    def backward(self, dy):
        y = self._y
        self._check_grad(dy, None if y is None else y.shape, None if y is None else y.dtype)
        return dy * y * (1 - y)
