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
from tinyunet.kernels import cpu_layers, cpu_networks

from .base import Layer, LayerInputError

class MaxPool2d(Layer):
    _saved = ("_x_shape", "_argmax")

    def __init__(self, kernel_size: int = 2, stride: int | None = None, name: str | None = None,
                 return_indices: bool = False):
        super().__init__(name)
        self.return_indices = bool(return_indices)   # forward returns (y, indices): see indices()
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
        keep = self._keeps_for_backward()             # False inside no_grad(): keep nothing
        if not keep and not self.return_indices:      # the maxima alone, no argmax
            return self._forward_values(x, xp, n, c, oh, ow)
        if cpu_layers.serves(x) and self.kernel_size ** 2 <= 127:
            y = np.empty((n, c, oh, ow), dtype=x.dtype)
            argmax = np.empty((n, c, oh, ow), dtype=np.int8)
            cpu_layers.maxpool_forward(x.reshape(n * c, *x.shape[2:]), y.reshape(n * c, oh, ow),
                                    argmax.reshape(n * c, oh, ow), self.kernel_size, self.stride)
        else:
            views = self._window_views(x, oh, ow)
            y = views[0].copy()
            argmax = xp.zeros(y.shape, dtype=xp.int8)     # window offset index i*k + j
            for offset, candidate in enumerate(views[1:], start=1):
                better = candidate > y                    # strict: a tie keeps the earlier (first) max
                xp.copyto(y, candidate, where=better)
                xp.copyto(argmax, np.int8(offset), where=better)  # no mask count read back (a GPU sync)
        if keep:
            self._x_shape, self._argmax, self._dtype = x.shape, argmax, x.dtype
        # inside no_grad() the indices are still returned (the unpool needs them), the argmax not kept
        return (y, self._indices_from(argmax, x.shape)) if self.return_indices else y

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

    # -- the argmax as flat indices, for MaxUnpool2d (SegNet's decoder) ------------------------
    def indices(self):
        """The last forward's argmax as flat indices into each input plane, PyTorch's
        convention: (N, C, OH, OW) int64, idx = (oh*s + i) * W + (ow*s + j) for the window
        offset (i, j) of the max (the first one at a tie, as the backward above).
        ``MaxPool2d(2, return_indices=True).forward(x)`` returns (y, indices()).
        Test: tests/test_unpool.py (against torch.nn.functional.max_pool2d's indices)."""
        if self._argmax is None:
            raise RuntimeError(f"{self._label()}: indices() called before forward() (or after a "
                               f"forward inside tinyunet.no_grad(), which keeps no argmax)")
        return self._indices_from(self._argmax, self._x_shape)

    def _indices_from(self, argmax, x_shape):
        """The window offsets ``argmax`` of an input of ``x_shape`` as flat plane positions."""
        xp = get_array_module(argmax)
        k, s = self.kernel_size, self.stride
        width = x_shape[3]
        oh, ow = argmax.shape[2:]
        offset = argmax.astype(xp.int64)
        row = xp.arange(oh, dtype=xp.int64)[:, None] * s + offset // k
        col = xp.arange(ow, dtype=xp.int64)[None, :] * s + offset % k
        return row * width + col


class CeilMaxPool2d(MaxPool2d):
    """Max pooling that rounds the output size UP, as Caffe (and FCN's and SegNet's reference
    models) do: OH = ceil((H - k) / s) + 1, the last window hanging over the bottom/right edge
    and taking the max of what it covers. PyTorch's ``ceil_mode=True``.

    Done with the layer above on an input padded at the bottom/right with -inf to
    (OH - 1) * s + k rows: -inf never wins a window that holds a real value, and every window
    starts inside the input (its start (OH - 1) * s <= H - 1 whenever k >= s), so y, the argmax,
    the ties and the gradient are those of the unpadded definition; the backward drops the
    padding's rows (they got no gradient). ``indices()`` counts positions in the unpadded plane.
    Why FCN needs it: its crops fit only if no row is floored away (with floor rounding 25, 109
    and 277 of the square input sizes 1-699 do not fit FCN-8s, -16s and -32s; with ceil, all do).
    For large NumPy arrays a Numba kernel (kernels/cpu_networks.py) skips the padded copy: it
    clips the last windows at the edge (the padded window minus its -inf entries, which never
    win: the same y, argmax and ties) and writes the flat indices in the same pass; with
    disjoint windows (stride = kernel, FCN's and SegNet's 2x2/2) its backward writes dx at the
    unpadded size directly (no padded dx to cut down).
    Tests: tests/test_fcn.py (against torch max_pool2d with ceil_mode=True, indices included,
    both paths) and tests/test_network_kernels.py (the kernel against the padded path).
    """

    def output_shape(self, x_shape):
        n, c, h, w = x_shape
        k, s = self.kernel_size, self.stride
        return (n, c, -(-max(h - k, 0) // s) + 1, -(-max(w - k, 0) // s) + 1)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW) with OH rounded up (and the indices, if asked)."""
        self._check_array(x)
        xp = get_array_module(x)
        n, c, oh, ow = self.output_shape(x.shape)
        k, s = self.kernel_size, self.stride
        if k < s:
            raise LayerInputError(f"{self._label()}: ceil rounding needs kernel >= stride (a last window could "
                                  f"start outside the input), got {k} and {s}")
        rows, cols = (oh - 1) * s + k - x.shape[2], (ow - 1) * s + k - x.shape[3]
        self._unpadded_shape = x.shape
        if cpu_layers.serves(x) and k * k <= 127:                      # Numba: clipped windows, no copy
            return self._forward_clipped(x, n, c, oh, ow, rows, cols)
        if rows or cols:
            x = xp.pad(x, ((0, 0), (0, 0), (0, rows), (0, cols)), constant_values=-np.inf)
        return super().forward(x)

    def _forward_clipped(self, x, n, c, oh, ow, rows, cols):
        """forward by the Numba kernel; keeps what the padded path keeps (the argmax and the
        padded shape, so that indices() and the overlapping-window backward still apply)."""
        k, s = self.kernel_size, self.stride
        h, w = x.shape[2:]
        y = np.empty((n, c, oh, ow), dtype=x.dtype)
        argmax = np.empty((n, c, oh, ow), dtype=np.int8)
        indices = np.empty((n, c, oh, ow) if self.return_indices else (1, 1, 1), dtype=np.int64)
        cpu_networks.ceil_maxpool_forward(x.reshape(n * c, h, w), y.reshape(n * c, oh, ow),
                                          argmax.reshape(n * c, oh, ow), indices.reshape(-1, *indices.shape[-2:]),
                                          k, s, self.return_indices)
        if self._keeps_for_backward():
            self._x_shape, self._argmax, self._dtype = (n, c, h + rows, w + cols), argmax, x.dtype
        return (y, indices) if self.return_indices else y

    def backward(self, dy):
        """dy: (N, C, OH, OW) -> dx: (N, C, H, W), the padding's rows dropped."""
        if self.kernel_size == self.stride and self._argmax is not None and cpu_layers.serves(dy, self._argmax):
            self._check_grad(dy, self.output_shape(self._x_shape), self._dtype)
            n, c, oh, ow = dy.shape
            dx = np.empty(self._unpadded_shape, dtype=dy.dtype)        # every element written once
            cpu_networks.ceil_maxpool_backward(dy.reshape(n * c, oh, ow), self._argmax.reshape(n * c, oh, ow),
                                               dx.reshape(n * c, *dx.shape[2:]), self.kernel_size)
            return dx
        dx = super().backward(dy)
        h, w = self._unpadded_shape[2:]
        return dx if dx.shape[2:] == (h, w) else get_array_module(dx).ascontiguousarray(dx[:, :, :h, :w])

    def _indices_from(self, argmax, x_shape):
        """Flat argmax positions in the UNPADDED H x W plane (see MaxPool2d.indices)."""
        padded_width, width = x_shape[3], self._unpadded_shape[3]
        idx = super()._indices_from(argmax, x_shape)
        return (idx // padded_width) * width + idx % padded_width
