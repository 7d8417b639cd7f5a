"""2-D max unpooling with the pool's indices, forward and backward: SegNet's decoder upsampling.

Shapes, for the indices of a MaxPool2d(k, s) (``MaxPool2d(k, s, return_indices=True)``)::

    x: (N, C, OH, OW)    indices: (N, C, OH, OW) int, flat positions in an H x W plane
    y: (N, C, H, W),     H x W = the pooled input's size (default (OH - 1) * s + k)

Forward. Every value goes back to where its window's maximum was; every other pixel is 0:

    y[n, c].flat[indices[n, c, i, j]] = x[n, c, i, j],    y = 0 elsewhere

So the decoder of SegNet gets a sparse map with the encoder's "where", and the convs that
follow fill it in (no learned upsampling, no skip of whole feature maps as in U-Net).

Backward. y is linear in x, a scatter P x with P a 0/1 matrix that has one 1 per column; its
transpose is the gather:

    dx[n, c, i, j] = dy[n, c].flat[indices[n, c, i, j]]

Pixels that received no value (three of four for 2x2 windows) send no gradient anywhere:
their dL/dy is dropped, as the max-pool's backward drops dL/dx of its non-maxima. Unpooling
followed by pooling (with the same indices) is the identity.

The indices must be distinct within a plane: true for a pool whose windows do not overlap
(stride >= kernel, SegNet's 2x2/2). With overlapping windows two values can share an index;
PyTorch then keeps one of them unspecified, and so would this forward. Out-of-range indices
are refused before any work (CuPy would wrap them silently).

Two implementations with one result: the NumPy fancy indexing below (NumPy and CuPy; the
reference) and, for large NumPy arrays, the Numba kernels of kernels/cpu_networks.py (one task
per plane: zero it and scatter; the gather), which skip building the (plane, position) index
pairs. ``max_unpool2d_naive`` is the loop definition, the test oracle. Proofs:
tests/test_unpool.py (loops, central differences, adjoint identity,
torch.nn.functional.max_unpool2d, on both paths) and tests/test_network_kernels.py.
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.kernels import cpu_layers, cpu_networks

from .base import Layer, LayerInputError


def max_unpool2d_naive(x, indices, size):
    """The definition, loop by loop (NumPy)."""
    n, c, oh, ow = x.shape
    y = np.zeros((n, c, size[0] * size[1]), dtype=x.dtype)
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    y[a, b, indices[a, b, i, j]] = x[a, b, i, j]
    return y.reshape(n, c, *size)


class MaxUnpool2d(Layer):
    """y = x placed at the pool's argmax positions, 0 elsewhere; see the module docstring."""
    _saved = ("_indices", "_x_shape")

    def __init__(self, kernel_size: int = 2, stride: int | None = None, name: str | None = None):
        super().__init__(name)
        if int(kernel_size) < 1 or (stride is not None and int(stride) < 1):
            raise ValueError(f"{self._label()}: kernel_size and stride must be >= 1, got {kernel_size} and {stride}")
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size
        self._indices = self._x_shape = self._size = self._dtype = None

    def output_shape(self, x_shape, size=None):
        n, c, oh, ow = x_shape
        if size is None:
            k, s = self.kernel_size, self.stride
            size = ((oh - 1) * s + k, (ow - 1) * s + k)
        return (n, c, int(size[0]), int(size[1]))

    def forward(self, x, indices, size=None):
        """x: (N, C, OH, OW), indices: same shape, size: (H, W) -> y: (N, C, H, W)."""
        self._check_array(x)
        out = self.output_shape(x.shape, size)
        xp = get_array_module(x)
        if tuple(indices.shape) != tuple(x.shape):
            raise LayerInputError(f"{self._label()}: the indices have shape {tuple(indices.shape)} but the input "
                                  f"{tuple(x.shape)}; pass the indices of the pool whose output this upsamples")
        if indices.dtype.kind not in "iu":
            raise TypeError(f"{self._label()}: the indices must be integers, got {indices.dtype}")
        plane = out[2] * out[3]
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= plane):
            raise LayerInputError(f"{self._label()}: indices in [{int(indices.min())}, {int(indices.max())}] do "
                                  f"not fit an output plane of {out[2]}x{out[3]}; pass size= the pooled "
                                  f"input's (H, W)")
        n, c = x.shape[:2]
        flat_idx = xp.ascontiguousarray(indices.reshape(n * c, -1), dtype=xp.int64)
        if cpu_layers.serves(x, flat_idx):                                # Numba: zero + scatter per plane
            y = np.empty((n * c, plane), dtype=x.dtype)
            cpu_networks.unpool_forward(x.reshape(n * c, -1), flat_idx, y)
        else:
            rows = xp.arange(n * c)[:, None]                             # (plane, position) pairs:
            y = xp.zeros((n * c, plane), dtype=x.dtype)                   # plain fancy indexing, the
            y[rows, flat_idx] = x.reshape(n * c, -1)                     # same on NumPy and CuPy
        if self._keeps_for_backward():                                   # inside no_grad(): keep nothing
            self._indices, self._x_shape, self._size, self._dtype = flat_idx, x.shape, out[2:], x.dtype
        return y.reshape(out)

    def backward(self, dy):
        """dy: (N, C, H, W) -> dx: (N, C, OH, OW), dy gathered at the indices."""
        expected = None if self._x_shape is None else self.output_shape(self._x_shape, self._size)
        self._check_grad(dy, expected, self._dtype)
        xp = get_array_module(dy)
        n, c = dy.shape[:2]
        if cpu_layers.serves(dy, self._indices):                         # Numba: the gather per plane
            dx = np.empty(self._indices.shape, dtype=dy.dtype)
            cpu_networks.unpool_backward(dy.reshape(n * c, -1), self._indices, dx)
            return dx.reshape(self._x_shape)
        rows = xp.arange(n * c)[:, None]
        return dy.reshape(n * c, -1)[rows, self._indices].reshape(self._x_shape)
