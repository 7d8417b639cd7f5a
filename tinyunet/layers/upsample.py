"""Nearest-neighbour upsampling by an integer factor, forward and backward.

Shapes, for scale s::

    x: (N, C, H, W)  ->  y: (N, C, s*H, s*W)
    y[n, c, h, w] = x[n, c, h // s, w // s]

Backward: each input pixel was copied into an s x s block of the output, so it receives the
SUM of the gradients of that block:

    dx[n, c, h, w] = sum_{a, b < s} dy[n, c, s*h + a, s*w + b]

Two implementations with one result: NumPy broadcasting and reshaping (any array module: NumPy,
CuPy, and the reference) and, for NumPy arrays on the CPU, Numba kernels that write each output
row once (forward) and sum each s x s block in the order a, b = (0, 0), (0, 1), ... (backward),
one image plane per thread. TINYUNET_KERNELS=reference forces the NumPy path.

Proofs: tests/test_layers.py, tests/test_torch_oracle.py (F.interpolate, mode='nearest') and
tests/test_fast_paths.py (the Numba kernels against the NumPy path).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.kernels import cpu_layers

from .base import Layer

class Upsample2d(Layer):
    def __init__(self, scale: int = 2, name: str | None = None):
        super().__init__(name)
        if int(scale) < 1:
            raise ValueError(f"{self._label()}: scale must be an integer >= 1, got {scale}")
        self.scale = int(scale)
        self._x_shape = self._dtype = None

    def output_shape(self, x_shape):
        n, c, h, w = x_shape
        return (n, c, h * self.scale, w * self.scale)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, s*H, s*W)."""
        self._check_array(x)
        self._keeps_for_backward()       # keeps only shapes, never arrays; marks a no_grad() forward
        xp = get_array_module(x)
        n, c, h, w = x.shape
        s = self.scale
        self._x_shape, self._dtype = x.shape, x.dtype
        if cpu_layers.serves(x):
            y = np.empty((n, c, h * s, w * s), dtype=x.dtype)
            cpu_layers.upsample_forward(x.reshape(n * c, h, w), y.reshape(n * c, h * s, w * s), s)
            return y
        # A broadcast view (N, C, H, s, W, s) made contiguous is the repeat along both axes.
        blocks = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, s, w, s))
        return xp.ascontiguousarray(blocks).reshape(n, c, h * s, w * s)

    def backward(self, dy):
        """dy: (N, C, s*H, s*W) -> dx: (N, C, H, W), the sum over each s x s block."""
        self._check_grad(dy, None if self._x_shape is None else self.output_shape(self._x_shape), self._dtype)
        n, c, h, w = self._x_shape
        s = self.scale
        if cpu_layers.serves(dy):
            dx = np.empty(self._x_shape, dtype=dy.dtype)
            cpu_layers.upsample_backward(dy.reshape(n * c, h * s, w * s), dx.reshape(n * c, h, w), s)
            return dx
        return dy.reshape(n, c, h, s, w, s).sum(axis=(3, 5))
