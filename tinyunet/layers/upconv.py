"""Nearest 2x upsampling followed by a 2x2 'same' convolution, as one layer: the U-Net's
up-convolution, computed without ever building the upsampled tensor.

Shapes::

    x: (N, C, H, W)  ->  u = upsample(x): (N, C, 2H, 2W)  ->  y = conv2x2(u) + b: (N, F, 2H, 2W)

'same' for a 2x2 kernel pads one zero row below and one zero column to the right (as Keras and
Conv2d here do), so output pixel (p, q) reads u at rows p, p+1 and columns q, q+1. Write
p = 2i + a and q = 2j + b (a, b in {0, 1}: the output's four "phases") and W_rs = W[:, :, r, s]:
an (F, C) matrix per tap. Since u[2i + r'] = x[i] for r' in {0, 1}:

    phase (0, 0): both rows and both columns read x[i, j]:
        y = (W_00 + W_01 + W_10 + W_11) x[i, j]
    phase (0, 1): both rows read row i; columns 2j+1 -> j and 2j+2 -> j+1:
        y = (W_00 + W_10) x[i, j] + (W_01 + W_11) x[i, j+1]
    phase (1, 0): y = (W_00 + W_01) x[i, j] + (W_10 + W_11) x[i+1, j]
    phase (1, 1): y = W_00 x[i, j] + W_01 x[i, j+1] + W_10 x[i+1, j] + W_11 x[i+1, j+1]

(x is zero past its last row and column.) 1 + 2 + 2 + 4 = 9 products of F x C matrices per
low-resolution pixel, where the conv on u does 4 x 4 = 16: 44% fewer multiply-adds, and the
column matrix is built from x, a quarter of u's size.

As matrix products. Stack the shifted copies of x, X_ab[c, (n, i, j)] = x[n, c, i + a, j + b],
in the block order [X_01; X_00; X_10; X_11] into cols: (4C, N*H*W). In that order every phase
reads one contiguous run of blocks, so each phase is one product with an effective weight E_ab:

    Y_00 = E_00 @ cols[C:2C]     E_00 = W_00 + W_01 + W_10 + W_11              (F, C)
    Y_01 = E_01 @ cols[0:2C]     E_01 = [W_01 + W_11, W_00 + W_10]             (F, 2C)
    Y_10 = E_10 @ cols[C:3C]     E_10 = [W_00 + W_01, W_10 + W_11]             (F, 2C)
    Y_11 = E_11 @ cols           E_11 = [W_01, W_00, W_10, W_11]               (F, 4C)

and y[n, :, 2i + a, 2j + b] = Y_ab[:, (n, i, j)] + b.

Backward, given dY_ab (dy's phase (a, b), as (F, N*H*W)). Each product Y = E @ X gives
dE = dY @ X^T and dX = E^T @ dY:

    P_ab = dY_ab @ cols[run_ab]^T            (F, width of the run)
    dW_rs = the sum of the blocks of every P_ab whose E_ab contains W_rs, at that W's block:
        dW_00 = P_00 + P_01[X_00] + P_10[X_00] + P_11[X_00]
        dW_01 = P_00 + P_01[X_01] + P_10[X_00] + P_11[X_01]
        dW_10 = P_00 + P_01[X_00] + P_10[X_10] + P_11[X_10]
        dW_11 = P_00 + P_01[X_01] + P_10[X_10] + P_11[X_11]
    dcols[run_ab] += E_ab^T @ dY_ab          (4C, N*H*W), the four phases added
    dx[i, j] = dX_00[i, j] + dX_01[i, j-1] + dX_10[i-1, j] + dX_11[i-1, j-1]   (each shift undone)
    db = sum of dy over n, p, q

The naive reference is the two layers it fuses, Upsample2d then Conv2d(kernel 2, 'same'); the
tests hold this layer to it, values and gradients (tests/test_upconv.py). Every step is an
array operation of the array's own module, so NumPy and CuPy take the same path; on NumPy
arrays the four data movements (cols, the phases into y and back, dcols into dx) run as Numba
kernels instead (tinyunet/kernels/cpu_layers.py; tests/test_fast_paths.py holds them to this
path).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module
from tinyunet.kernels import cpu_layers

from . import conv
from .conv import Conv2d


class UpConv2d(Conv2d):
    """y = conv2x2_same(upsample2x_nearest(x)) + b, with Conv2d's parameters (weight:
    (F, C, 2, 2), bias: (F,)), initialisation and checks; x: (N, C, H, W) -> y: (N, F, 2H, 2W)."""
    _saved = ("_cols",)          # cols holds all backward needs of x; x itself is not kept

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__(in_channels, out_channels, 2, padding="same", **kwargs)
        self._cols = self._x_shape = None

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        return (n, self.out_channels, 2 * h, 2 * w)

    def workspace_bytes(self, x_shape) -> int:
        return 0                                  # no shared column buffer: cols is its own

    def kept_bytes(self, x_shape) -> int:
        """What forward keeps for backward: cols, four times x."""
        return 4 * int(np.prod(x_shape)) * np.dtype(self.dtype).itemsize

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, F, 2H, 2W)."""
        self._check_array(x, channels=self.in_channels)
        if not self._keeps_for_backward():    # inside no_grad(): nothing kept, bands of rows
            return self._forward_in_bands(x)
        xp = get_array_module(x)
        n, c, h, w = x.shape
        f = self.out_channels
        cols = _shifted_columns(x)                                   # (4C, N*H*W)
        phases = xp.empty((2, 2, f, n * h * w), dtype=x.dtype)       # Y_ab
        for (a, b), weight, run in zip(PHASES, _phase_weights(self.params["weight"]), _runs(c)):
            xp.matmul(weight, cols[run], out=phases[a, b])
        bias = self.params.get("bias")
        if cpu_layers.serves(x):
            y = np.empty((n, f, 2 * h, 2 * w), dtype=x.dtype)
            cpu_layers.upconv_interleave(phases.reshape(2, 2, f, n, h, w),
                                         np.zeros(f, x.dtype) if bias is None else bias, y)
        else:
            y = xp.empty((n, f, h, 2, w, 2), dtype=x.dtype)          # y[n, f, i, a, j, b]
            y[...] = phases.reshape(2, 2, f, n, h, w).transpose(3, 2, 4, 0, 5, 1)
            if bias is not None:
                y += bias.reshape(1, f, 1, 1, 1, 1)
            y = y.reshape(n, f, 2 * h, 2 * w)
        self._cols, self._x_shape = cols, x.shape
        return y

    def inference_bytes(self, x_shape) -> tuple[int, str, int]:
        """What _forward_in_bands allocates besides y (see Conv2d.inference_bytes): temporary,
        the copy of one band of x (with the row below) and the phase weights E_ab (9 F C);
        workspace 'cols': the columns (4C) and phases (4F) of one band."""
        n, c, h, w = x_shape
        f, itemsize = self.out_channels, np.dtype(self.dtype).itemsize
        rows = min(self._band_rows(x_shape) + 1, h)
        return ((n * c * rows * w + 9 * f * c) * itemsize, "cols",
                4 * (c + f) * n * rows * w * itemsize)

    def _band_rows(self, x_shape) -> int:
        """Rows of x per band: its columns (4C) and phases (4F) for rows + 1 rows of x (the band and
        the row below it) within conv.WORKSPACE_BYTES, or one row where even that does not fit."""
        n, c, h, w = x_shape
        row_bytes = 4 * (c + self.out_channels) * n * w * np.dtype(self.dtype).itemsize
        return max(1, min(h, conv.WORKSPACE_BYTES // row_bytes - 1))

    def _forward_in_bands(self, x):
        """The forward without keeping cols (inside no_grad()): x: (N, C, H, W) -> y: (N, F, 2H, 2W).

        Output rows 2i and 2i + 1 read only x's rows i and i + 1, so y is computed a band of x's
        rows [r0, r1) at a time: the columns and the phases of rows r0 .. r1 (the row below the
        band too, for the shift X_1b; the phases of that extra row are not used) go into the
        reused workspace, and their interleave into y's rows [2 r0, 2 r1). The same products
        on fewer columns: the column matrix and the phases never exist whole (at 512x512 the
        last up-conv's would take 192 MB, more than its output). Test:
        tests/test_inference_mode.py::test_upconv_bands_equal_the_whole_forward."""
        xp = get_array_module(x)
        n, c, h, w = x.shape
        f = self.out_channels
        y = xp.empty((n, f, 2 * h, 2 * w), dtype=x.dtype)
        bias = self.params.get("bias")
        bias = xp.zeros(f, x.dtype) if bias is None else bias
        weights, runs = _phase_weights(self.params["weight"]), _runs(c)
        rows = self._band_rows(x.shape)
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            stop = min(r1 + 1, h)                                    # with the row below, if any
            band = xp.ascontiguousarray(x[:, :, r0:stop])            # (N, C, b, W), b = stop - r0
            b = stop - r0
            block = conv._scratch(xp, (4 * (c + f) * n * b * w,), x.dtype)
            cols = _shifted_columns(band, out=block[:4 * c * n * b * w].reshape(4, c, n, b, w))
            phases = block[4 * c * n * b * w:].reshape(2, 2, f, n * b * w)
            for (a, bb), weight, run in zip(PHASES, weights, runs):
                xp.matmul(weight, cols[run], out=phases[a, bb])
            phases = phases.reshape(2, 2, f, n, b, w)[:, :, :, :, :r1 - r0]   # drop the extra row
            target = y[:, :, 2 * r0:2 * r1]                          # (N, F, 2 (r1 - r0), 2W), a view
            if cpu_layers.serves(x):
                cpu_layers.upconv_interleave(phases, bias, target)
            else:
                target.reshape(n, f, r1 - r0, 2, w, 2)[...] = (phases.transpose(3, 2, 4, 0, 5, 1)
                                                                + bias.reshape(1, f, 1, 1, 1, 1))
        return y

    def backward(self, dy):
        """dy: (N, F, 2H, 2W) -> dx: (N, C, H, W); fills grads['weight'] and grads['bias']."""
        cols = self._cols
        self._check_grad(dy, None if cols is None else self.output_shape(self._x_shape),
                         None if cols is None else cols.dtype)
        xp = get_array_module(dy)
        n, c, h, w = self._x_shape
        f = self.out_channels
        dphases = xp.empty((2, 2, f, n, h, w), dtype=dy.dtype)       # dY_ab
        if cpu_layers.serves(dy):
            cpu_layers.upconv_split(dy, dphases)
        else:
            dphases[...] = dy.reshape(n, f, h, 2, w, 2).transpose(3, 5, 1, 0, 2, 4)
        dphases = dphases.reshape(2, 2, f, n * h * w)
        weights = _phase_weights(self.params["weight"])
        runs = _runs(c)
        # P_ab = dY_ab @ cols[run]^T; dW_rs gathers the blocks that held W_rs (docstring)
        p00, p01, p10, p11 = (xp.matmul(dphases[a, b], cols[run].T) for (a, b), run in zip(PHASES, runs))
        x01, x00, x10, x11 = (slice(k * c, (k + 1) * c) for k in range(4))     # blocks of P_11
        dw = xp.empty_like(self.params["weight"])
        dw[:, :, 0, 0] = p00 + p01[:, c:] + p10[:, :c] + p11[:, x00]
        dw[:, :, 0, 1] = p00 + p01[:, :c] + p10[:, :c] + p11[:, x01]
        dw[:, :, 1, 0] = p00 + p01[:, c:] + p10[:, c:] + p11[:, x10]
        dw[:, :, 1, 1] = p00 + p01[:, :c] + p10[:, c:] + p11[:, x11]
        self.grads["weight"] = dw
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        # dcols = sum over phases of E_ab^T @ dY_ab, each into its run; phase (1, 1) spans all
        dcols = xp.matmul(weights[3].T, dphases[1, 1])
        for (a, b), weight, run in list(zip(PHASES, weights, runs))[:3]:
            dcols[run] += xp.matmul(weight.T, dphases[a, b])
        if cpu_layers.serves(dcols):
            dx = np.empty((n, c, h, w), dtype=dy.dtype)
            cpu_layers.upconv_gather(dcols.reshape(4, c, n, h, w), dx)
            return dx
        d01, d00, d10, d11 = dcols.reshape(4, c, n, h, w)
        dxt = d00                                                    # (C, N, H, W), then the shifts
        dxt[:, :, :, 1:] += d01[:, :, :, :-1]
        dxt[:, :, 1:] += d10[:, :, :-1]
        dxt[:, :, 1:, 1:] += d11[:, :, :-1, :-1]
        return xp.ascontiguousarray(dxt.transpose(1, 0, 2, 3))


PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _runs(c: int):
    """The rows of cols each phase reads (blocks [X_01, X_00, X_10, X_11], C rows each)."""
    return slice(c, 2 * c), slice(0, 2 * c), slice(c, 3 * c), slice(0, 4 * c)


def _phase_weights(weight):
    """E_00 (F, C), E_01 (F, 2C), E_10 (F, 2C), E_11 (F, 4C) from W: (F, C, 2, 2)."""
    xp = get_array_module(weight)
    w00, w01, w10, w11 = weight[:, :, 0, 0], weight[:, :, 0, 1], weight[:, :, 1, 0], weight[:, :, 1, 1]
    return (w00 + w01 + w10 + w11,
            xp.concatenate([w01 + w11, w00 + w10], axis=1),
            xp.concatenate([w00 + w01, w10 + w11], axis=1),
            xp.concatenate([w01, w00, w10, w11], axis=1))


def _shifted_columns(x, out=None):
    """x: (N, C, H, W) -> cols: (4C, N*H*W), blocks [X_01; X_00; X_10; X_11] with
    X_ab[c, (n, i, j)] = x[n, c, i + a, j + b], zero past the last row or column.
    ``out``: a C-contiguous (4, C, N, H, W) array to write them into."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    cols = xp.empty((4, c, n, h, w), dtype=x.dtype) if out is None else out
    if cpu_layers.serves(x):
        cpu_layers.upconv_columns(x, cols)
        return cols.reshape(4 * c, n * h * w)
    xt = x.transpose(1, 0, 2, 3)                                     # (C, N, H, W), a view
    cols[1] = xt
    cols[0, ..., :-1] = xt[..., 1:]
    cols[0, ..., -1] = 0
    cols[2, :, :, :-1] = xt[:, :, 1:]
    cols[2, :, :, -1] = 0
    cols[3, :, :, :-1, :-1] = xt[:, :, 1:, 1:]
    cols[3, :, :, -1] = 0
    cols[3, ..., -1] = 0
    return cols.reshape(4 * c, n * h * w)
