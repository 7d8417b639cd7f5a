"""Center crop of the spatial axes, forward and backward: the unpadded U-Net's skip crop.

Shapes, for a target size (h, w)::

    x: (N, C, H, W)  ->  y: (N, C, h, w),    h <= H, w <= W
    top = (H - h) // 2,  left = (W - w) // 2
    y[n, c, i, j] = x[n, c, top + i, left + j]

Why: in the U-Net paper every 3x3 convolution is unpadded ('valid') and loses a border of
one pixel, so a skip from the contracting path is larger than the upsampled tensor it joins;
its center is cut out to match (the paper's "cropping is necessary due to the loss of border
pixels in every convolution"). In the U-Net the difference H - h is always even, so the crop
is symmetric; for an odd difference the extra row/column is dropped at the bottom/right.

Backward: y copies a window of x, so each copied pixel gets its gradient back and every
pixel outside the window was never used and gets zero:

    dx = 0 everywhere;  dx[:, :, top:top + h, left:left + w] = dy

Proofs: tests/test_unet.py (gradient check of the layer, and of the 'valid' network) and
tests/test_unet_torch.py (the 'valid' network against PyTorch).
"""
from __future__ import annotations

from tinyunet.backend import get_array_module

from .base import Layer, LayerInputError


class CenterCrop2d(Layer):
    """y = the central (h, w) window of x; the target size is given with each call."""

    def __init__(self, name: str | None = None):
        super().__init__(name)
        self._x_shape = self._size = self._dtype = None

    def _offsets(self, x_shape, size):
        (h, w), (H, W) = size, x_shape[2:]
        return (H - h) // 2, (W - w) // 2

    def output_shape(self, x_shape, size):
        n, c, H, W = x_shape
        h, w = (int(s) for s in size)
        if not (1 <= h <= H and 1 <= w <= W):
            raise LayerInputError(f"{self._label()}: cannot cut a {h}x{w} center out of an input of shape "
                                  f"{tuple(x_shape)}: the crop must be at least 1x1 and no larger than the "
                                  f"input. In a U-Net this means the input size is not a valid size for "
                                  f"unpadded convolutions")
        return (n, c, h, w)

    def forward(self, x, size):
        """x: (N, C, H, W), size = (h, w) -> y: (N, C, h, w), a contiguous copy of the center."""
        self._check_array(x)
        size = tuple(int(s) for s in size)
        self.output_shape(x.shape, size)
        self._keeps_for_backward()       # keeps only shapes, never arrays; marks a no_grad() forward
        xp = get_array_module(x)
        top, left = self._offsets(x.shape, size)
        self._x_shape, self._size, self._dtype = x.shape, size, x.dtype
        return xp.ascontiguousarray(x[:, :, top:top + size[0], left:left + size[1]])

    def backward(self, dy):
        """dy: (N, C, h, w) -> dx: (N, C, H, W), zero outside the cropped window."""
        expected = None if self._x_shape is None else self.output_shape(self._x_shape, self._size)
        self._check_grad(dy, expected, self._dtype)
        xp = get_array_module(dy)
        top, left = self._offsets(self._x_shape, self._size)
        h, w = self._size
        dx = xp.zeros(self._x_shape, dtype=dy.dtype)       # the border was never used: zero
        dx[:, :, top:top + h, left:left + w] = dy
        return dx
