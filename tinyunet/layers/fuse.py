"""FCN's skip connections: crop a score map at a derived offset, then add it. Forward and backward.

Crop2d, for an offset (oy, ox) and the size (h, w) of a reference map::

    x: (N, C, H, W)  ->  y: (N, C, h, w),    y[n, c, i, j] = x[n, c, oy + i, ox + j]

Backward: each copied pixel gets its gradient back, the rest of x was never used:
dx = 0, dx[:, :, oy:oy + h, ox:ox + w] = dy. (Unlike CenterCrop2d the offset is not the
center: FCN derives it from the receptive fields, see tinyunet/fcn.py.)

Add, FCN's sum fusion::

    (a, b) both (N, C, H, W)  ->  y = a + b

Backward: dy/da = dy/db = identity, so dL/dy flows UNCHANGED into both branches:
(da, db) = (dy, dy). The coarse path and the skip each get the whole gradient (compare the
U-Net's concat, which splits dL/dy by channels, and its skip, where two gradients ADD).

Proofs: tests/test_fcn.py (central differences of both layers, and of the whole network).
"""
from __future__ import annotations

from tinyunet.backend import get_array_module, is_array

from .base import Layer, LayerInputError


class Crop2d(Layer):
    """y = x[:, :, oy:oy + h, ox:ox + w], (h, w) taken from a reference array or shape."""

    def __init__(self, offset=(0, 0), name: str | None = None):
        super().__init__(name)
        self.offset = tuple(int(o) for o in offset)
        self._x_shape = self._size = self._dtype = None

    def output_shape(self, x_shape, like):
        size = tuple(like.shape[2:]) if is_array(like) else tuple(int(s) for s in like)[-2:]
        (oy, ox), (h, w) = self.offset, size
        if min(oy, ox) < 0 or oy + h > x_shape[2] or ox + w > x_shape[3]:
            raise LayerInputError(f"{self._label()}: a {h}x{w} window at offset {self.offset} does not fit "
                                  f"an input of shape {tuple(x_shape)}")
        return tuple(x_shape[:2]) + (h, w)

    def forward(self, x, like):
        """x: (N, C, H, W), like: an array (or shape) whose (h, w) the output takes."""
        self._check_array(x)
        out = self.output_shape(x.shape, like)
        (oy, ox), (h, w) = self.offset, out[2:]
        self._keeps_for_backward()       # keeps only shapes, never arrays; marks a no_grad() forward
        self._x_shape, self._size, self._dtype = x.shape, (h, w), x.dtype
        return get_array_module(x).ascontiguousarray(x[:, :, oy:oy + h, ox:ox + w])

    def backward(self, dy):
        """dy: (N, C, h, w) -> dx: (N, C, H, W), zero outside the window."""
        expected = None if self._x_shape is None else tuple(self._x_shape[:2]) + self._size
        self._check_grad(dy, expected, self._dtype)
        (oy, ox), (h, w) = self.offset, self._size
        dx = get_array_module(dy).zeros(self._x_shape, dtype=dy.dtype)
        dx[:, :, oy:oy + h, ox:ox + w] = dy
        return dx


class Add(Layer):
    """y = a + b (FCN's fuse); backward sends dy to both."""

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self._shape = self._dtype = None

    def forward(self, inputs):
        """inputs: (a, b), both (N, C, H, W) -> a + b."""
        a, b = inputs
        self._check_array(a, what="first input")
        self._check_array(b, what="second input")
        if a.shape != b.shape:
            raise LayerInputError(f"{self._label()}: the two inputs must have one shape to be added, got "
                                  f"{tuple(a.shape)} and {tuple(b.shape)}")
        self._keeps_for_backward()       # keeps only shapes, never arrays; marks a no_grad() forward
        self._shape, self._dtype = a.shape, a.dtype
        return a + b

    def backward(self, dy):
        """dy -> (dy, dy): the sum's gradient reaches each term unchanged."""
        self._check_grad(dy, self._shape, self._dtype)
        return dy, dy
