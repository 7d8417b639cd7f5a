"""2-D max pooling, forward and backward.

Shapes, for kernel k and stride s (s = k unless given)::

    x: (N, C, H, W)  ->  y: (N, C, OH, OW),  OH = (H - k) // s + 1,  OW likewise

    y[n, c, oh, ow] = max_{i, j < k} x[n, c, oh*s + i, ow*s + j]

Sizes that do not divide are floored, as Keras does: the last rows and columns that do not
fill a whole window are never read, so their gradient is zero.

Backward. The max is piecewise the identity of ONE input: where that input is the strict
maximum, dy/dx is 1 for it and 0 for every other element of the window. So each window's
gradient goes to exactly one element, its argmax. At a tie the derivative does not exist;
we pick the FIRST maximum in row-major window order, as cuDNN does, and the gradient
checks draw inputs without ties. Windows overlap when s < k: an input that is the argmax of
several windows gets the sum of their gradients.

Two implementations with one result: the NumPy one below (k*k strided views, any array
module: NumPy and CuPy, and the reference) and, for NumPy arrays on the CPU, a Numba kernel
that reads each window once and writes y and argmax in the same pass, one image plane per
thread; its backward writes every element of dx exactly once (no zero fill, no k*k passes).
Both compare with ``>`` in row-major window order, so ties and NaN go the same way.
TINYUNET_KERNELS=reference (or tinyunet.kernels.use("reference")) forces the NumPy path.

Proofs: tests/test_layers.py (gradient checks, against a loop version),
tests/test_torch_oracle.py (torch.nn.functional.max_pool2d) and tests/test_fast_paths.py
(the Numba kernels equal the NumPy path, bit for bit).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.kernels import cpu_layers

from .base import Layer, LayerInputError

class MaxPool2d(Layer):
    _saved = ("_x_shape", "_argmax")

    def __init__(self, kernel_size: int = 2, stride: int | None = None, name: str | None = None):
        super().__init__(name)
        if int(kernel_size) < 1 or (stride is not None and int(stride) < 1):
            raise ValueError(f"{self._label()}: kernel_size and stride must be >= 1, "
                             f"got {kernel_size} and {stride}")
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size
        self._x_shape = self._argmax = self._dtype = None

    def output_shape(self, x_shape):
        n, c, h, w = x_shape
        k, s = self.kernel_size, self.stride
        return (n, c, (h - k) // s + 1, (w - k) // s + 1)

    def _window_views(self, a, oh, ow):
        """The k*k strided views of ``a``, one per window offset (i, j), in row-major order."""
        k, s = self.kernel_size, self.stride
        return [a[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                for i in range(k) for j in range(k)]

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW); remembers the argmax offset of every window."""
        self._check_array(x)
        if x.shape[2] < self.kernel_size or x.shape[3] < self.kernel_size:
            raise LayerInputError(f"{self._label()}: a {self.kernel_size}x{self.kernel_size} window does "
                                  f"not fit an input of shape {tuple(x.shape)}")
        xp = get_array_module(x)
        n, c, oh, ow = self.output_shape(x.shape)
        if not self._keeps_for_backward():            # inside no_grad(): the maxima, no argmax
            return self._forward_values(x, xp, n, c, oh, ow)
        if cpu_layers.serves(x) and self.kernel_size ** 2 <= 127:
            y = np.empty((n, c, oh, ow), dtype=x.dtype)
            argmax = np.empty((n, c, oh, ow), dtype=np.int8)
            cpu_layers.maxpool_forward(x.reshape(n * c, *x.shape[2:]), y.reshape(n * c, oh, ow),
                                    argmax.reshape(n * c, oh, ow), self.kernel_size, self.stride)
            self._x_shape, self._argmax, self._dtype = x.shape, argmax, x.dtype
            return y
        views = self._window_views(x, oh, ow)
        y = views[0].copy()
        argmax = xp.zeros(y.shape, dtype=xp.int8)     # window offset index i*k + j
        for offset, candidate in enumerate(views[1:], start=1):
            better = candidate > y                    # strict: a tie keeps the earlier (first) max
            xp.copyto(y, candidate, where=better)
            argmax[better] = offset
        self._x_shape, self._argmax, self._dtype = x.shape, argmax, x.dtype
        return y

    def _forward_values(self, x, xp, n, c, oh, ow):
        """y alone, by the same comparisons in the same order as forward (so the same y)."""
        if cpu_layers.serves(x):
            y = np.empty((n, c, oh, ow), dtype=x.dtype)
            cpu_layers.maxpool_forward_values(x.reshape(n * c, *x.shape[2:]), y.reshape(n * c, oh, ow),
                                              self.kernel_size, self.stride)
            return y
        views = self._window_views(x, oh, ow)
        y = views[0].copy()
        for candidate in views[1:]:
            xp.copyto(y, candidate, where=candidate > y)
        return y

    def backward(self, dy):
        """dy: (N, C, OH, OW) -> dx: (N, C, H, W), each dy routed to its window's argmax."""
        self._check_grad(dy, None if self._x_shape is None else self.output_shape(self._x_shape), self._dtype)
        xp = get_array_module(dy)
        n, c, oh, ow = dy.shape
        if cpu_layers.serves(dy, self._argmax):
            dx = np.empty(self._x_shape, dtype=dy.dtype)
            cpu_layers.maxpool_backward(dy.reshape(n * c, oh, ow), self._argmax.reshape(n * c, oh, ow),
                                     dx.reshape(n * c, *dx.shape[2:]), self.kernel_size, self.stride)
            return dx
        dx = xp.zeros(self._x_shape, dtype=dy.dtype)  # rows dropped by the floor keep 0
        for offset, target in enumerate(self._window_views(dx, oh, ow)):
            target += xp.where(self._argmax == offset, dy, 0)  # += : windows may overlap
        return dx
