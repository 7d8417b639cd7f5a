"""2-D convolution (cross-correlation, as every framework computes it), forward and backward.

Shapes::

    x: (N, C, H, W)    weight W: (F, C, kh, kw)    bias b: (F,)    y: (N, F, OH, OW)
    OH = (H + top + bottom - kh) // sh + 1,  OW likewise

Forward, with x_pad the input padded by zeros::

    y[n, f, oh, ow] = b[f] + sum_{c, i, j} W[f, c, i, j] * x_pad[n, c, oh*sh + i, ow*sw + j]

im2col lays every window out as one column, cols[n]: (C*kh*kw, OH*OW), so that with the
weights as a matrix W2 = W.reshape(F, C*kh*kw) the whole sum is one matrix product per image:

    Y[n] = W2 @ cols[n] + b          Y[n]: (F, OH*OW), already y[n] in NCHW order

Backward, given dY = dL/dy. A matrix product Y = A @ B has dA = dY @ B^T and dB = A^T @ dY, so

    dW2     = sum_n dY[n] @ cols[n]^T            (F, C*kh*kw): every image adds its share
    db[f]   = sum_{n, p} dY[n, f, p]             the bias touched every output pixel
    dcols[n] = W2^T @ dY[n]                      (C*kh*kw, OH*OW)
    dx      = col2im(dcols)                      (N, C, H, W)

col2im is the transpose of im2col: a pixel that sat in several (overlapping) windows gets the
SUM of their gradients, and the padding's gradient is dropped (padding is a constant).

Padding: 'valid' (none), 'same' (the output keeps ceil(H / stride) rows; an even kernel pads
0 before and 1 after, as TensorFlow/Keras do, so Keras weights give Keras outputs), an int,
or explicit ((top, bottom), (left, right)).

``conv2d_naive`` below is the loop-by-loop definition, kept as the test oracle.
Proofs: tests/test_layers.py (gradient checks, agreement with conv2d_naive) and
tests/test_torch_oracle.py (against torch.nn.functional.conv2d).
"""
from __future__ import annotations

import numpy as np

from tinyunet import kernels
from tinyunet.backend import get_array_module
from tinyunet.init import initialize
from tinyunet.kernels.geometry import as_padding, as_pair

from .base import Layer


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same': enough zeros that the output has ceil(size / stride) entries,
    split with the extra one AFTER (so a 2x2 kernel at stride 1 pads 0 before, 1 after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def resolve_padding(padding, kernel: tuple[int, int], stride: tuple[int, int], hw: tuple[int, int]):
    """Padding as ((top, bottom), (left, right)) for an input of height and width ``hw``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            return (same_padding(hw[0], kernel[0], stride[0]), same_padding(hw[1], kernel[1], stride[1]))
        raise ValueError(f"padding {padding!r} is not known: use 'same', 'valid', an int, "
                         f"or ((top, bottom), (left, right))")
    return as_padding(padding)


class Conv2d(Layer):
    """y = conv(x, W) + b; see the module docstring for the derivation of the backward."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, padding="same", stride=1,
                 bias: bool = True, *, weight_init: str = "he_normal", rng=None, seed: int | None = None,
                 dtype=np.float32, name: str | None = None):
        super().__init__(name)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{self._label()}: channel counts must be >= 1, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"{self._label()}: kernel_size and stride must be >= 1, "
                             f"got {self.kernel_size} and {self.stride}")
        resolve_padding(padding, self.kernel_size, self.stride, (1, 1))  # fail early on a bad value
        self.padding = padding
        rng = rng if rng is not None else np.random.default_rng(seed)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.params["weight"] = initialize(weight_init, shape, rng).astype(dtype)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=dtype)
        self.zero_grad()
        self._x = None
        self._geometry = None

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        _, _, _, (oh, ow) = kernels.normalize(x_shape, self.kernel_size, pad, self.stride)
        return (n, self.out_channels, oh, ow)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, F, OH, OW)."""
        self._check_array(x, channels=self.in_channels)
        xp = get_array_module(x)
        n, _, h, w = x.shape
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        _, _, _, (oh, ow) = kernels.normalize(x.shape, self.kernel_size, pad, self.stride)
        cols = kernels.im2col(x, self.kernel_size, pad, self.stride)    # (N, C*kh*kw, OH*OW)
        w2 = self.params["weight"].reshape(self.out_channels, -1)       # (F, C*kh*kw)
        y = xp.matmul(w2, cols)                                        # (N, F, OH*OW)
        if "bias" in self.params:
            y += self.params["bias"][:, None]
        # Keep x, not cols: recomputing im2col in backward costs a copy, keeping cols for
        # every layer of a U-Net would cost gigabytes.
        self._x, self._geometry = x, pad
        return y.reshape(n, self.out_channels, oh, ow)

    def backward(self, dy):
        """dy: (N, F, OH, OW) -> dx: (N, C, H, W); fills grads['weight'] and grads['bias']."""
        x = self._x
        self._check_grad(dy, None if x is None else self.output_shape(x.shape), x.dtype if x is not None else None)
        xp = get_array_module(dy)
        n = x.shape[0]
        pad = self._geometry
        dy3 = dy.reshape(n, self.out_channels, -1)                      # (N, F, P)
        cols = kernels.im2col(x, self.kernel_size, pad, self.stride)    # (N, K, P)
        w2 = self.params["weight"].reshape(self.out_channels, -1)       # (F, K)
        dw2 = xp.matmul(dy3, cols.transpose(0, 2, 1)).sum(axis=0)      # sum_n dY[n] @ cols[n]^T
        self.grads["weight"] = dw2.reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = dy3.sum(axis=(0, 2))
        dcols = xp.matmul(w2.T, dy3)                                   # (N, K, P)
        return kernels.col2im(dcols, x.shape, self.kernel_size, pad, self.stride)


def conv2d_naive(x, weight, bias=None, padding=((0, 0), (0, 0)), stride=(1, 1)):
    """The definition, loop by loop: the oracle that the fast path is tested against.

    x: (N, C, H, W), weight: (F, C, kh, kw), bias: (F,) or None -> y: (N, F, OH, OW).
    ``padding`` as Conv2d takes it ('same', 'valid', int or pairs).
    """
    kh, kw = weight.shape[2:]
    sh, sw = as_pair(stride, "stride")
    (pt, pb), (pl, pr) = resolve_padding(padding, (kh, kw), (sh, sw), x.shape[2:])
    xp = get_array_module(x)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, f = x.shape[0], weight.shape[0]
    oh = (x_pad.shape[2] - kh) // sh + 1
    ow = (x_pad.shape[3] - kw) // sw + 1
    y = xp.zeros((n, f, oh, ow), dtype=x.dtype)
    for b in range(n):
        for k in range(f):
            for r in range(oh):
                for c in range(ow):
                    window = x_pad[b, :, r * sh:r * sh + kh, c * sw:c * sw + kw]
                    y[b, k, r, c] = (window * weight[k]).sum() + (0 if bias is None else bias[k])
    return y
