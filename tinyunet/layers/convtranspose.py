"""2-D transposed convolution ("deconvolution"), forward and backward: FCN's upsamplers.

Shapes, for kernel (kh, kw), stride (sh, sw), cropping ((top, bottom), (left, right)) and
output padding (oph, opw)::

    x: (N, C, H, W)    weight W: (C, F, kh, kw)  (PyTorch's layout)    bias b: (F,)
    y: (N, F, OH, OW),   OH = (H - 1) * sh + kh - top - bottom + oph,   OW likewise

What it is. A strided Conv2d with weight W (viewed as F -> C: an (C, F, kh, kw) conv weight)
maps an (N, F, OH, OW) image to (N, C, H, W); it is a linear map A with, from
tinyunet/layers/conv.py, A z = W2 @ im2col(z) (W2 = W.reshape(C, F*kh*kw)). The transposed
convolution is its adjoint A^T, which maps (N, C, H, W) back to (N, F, OH, OW):

    y[n] = col2im(W2^T @ X[n]) + b          X[n] = x[n].reshape(C, H*W)

W2^T @ X[n]: (F*kh*kw, H*W) holds, for every input pixel, the kh x kw patch that pixel
"paints" (its value times the kernel), and col2im ADDS those patches into the output at
stride s, overlapping where kh > sh. In loops:

    y[n, f, i*sh + a - top, j*sw + b - left] += x[n, c, i, j] * W[c, f, a, b]

The conv's padding becomes the transposed conv's cropping: col2im drops what lands on it.
The output padding makes OH ambiguous no more: a strided conv floors, so oph < sh extra rows
at the bottom all map back to H (the rows that were never read by a whole window).

Backward, given dY = dL/dy (N, F, OH, OW). y is linear in x and in W, so with
dcols[n] = im2col(dY[n]) (F*kh*kw, H*W) (im2col is col2im's adjoint):

    dX[n]   = W2 @ dcols[n]                     (C, H*W): the strided conv of dy
    dW2     = sum_n X[n] @ dcols[n]^T           (C, F*kh*kw)
    db[f]   = sum_{n, p} dY[n, f, p]

so the backward of the transposed conv IS the forward of the strided conv, and the forward
is its input-gradient: the two layers are each other's adjoint.

Bilinear initialisation (FCN's upsample_filt): with factor = (k + 1) // 2 and
center = factor - 1 (k odd) or factor - 0.5 (k even), the kernel is the outer product
g(a) g(b), g(a) = 1 - |a - center| / factor; channel c feeds only output channel c. With
k = 2s, a kernel of stride s then interpolates bilinearly (interior pixels exactly).
``frozen=True`` keeps the weight as initialised, as FCN's reference does (learning rate 0):
backward still returns dL/dx but writes zeros as the weight's (and bias's) gradient, so Adam
and SGD move it by exactly 0, and a network's ``trainable_parameters()`` leaves it out.

``conv_transpose2d_naive`` below is the loop-by-loop definition, kept as the test oracle.
Proofs: tests/test_convtranspose.py (the loops, central differences in float64, the adjoint
identity <A z, x> = <z, A^T x> against Conv2d, torch.nn.functional.conv_transpose2d).
"""
from __future__ import annotations

import numpy as np

from tinyunet import kernels
from tinyunet.backend import get_array_module
from tinyunet.init import initialize
from tinyunet.kernels.geometry import as_padding, as_pair

from .base import Layer, LayerInputError


def bilinear_kernel(size: int) -> np.ndarray:
    """(size, size) bilinear interpolation kernel, FCN's upsample_filt (float64)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    g = 1 - np.abs(np.arange(size) - center) / factor
    return np.outer(g, g)


def bilinear_weight(in_channels: int, out_channels: int, kernel) -> np.ndarray:
    """(C, F, kh, kw) weight that upsamples channel c into channel c alone (needs C == F)."""
    kh, kw = kernel
    if in_channels != out_channels or kh != kw:
        raise ValueError(f"bilinear initialisation maps channel c to channel c with a square kernel: "
                         f"needs in_channels == out_channels and kh == kw, got {in_channels} -> "
                         f"{out_channels}, kernel {kernel}")
    weight = np.zeros((in_channels, out_channels, kh, kw))
    weight[np.arange(in_channels), np.arange(in_channels)] = bilinear_kernel(kh)
    return weight


def conv_transpose2d_naive(x, weight, bias, stride, cropping=0, output_padding=0):
    """The definition, loop by loop (NumPy, slow; the test oracle)."""
    (sh, sw), ((pt, pb), (pl, pr)), (oph, opw) = as_pair(stride, "stride"), as_padding(cropping), \
        as_pair(output_padding, "output_padding")
    n, c, h, w = x.shape
    _, f, kh, kw = weight.shape
    oh, ow = (h - 1) * sh + kh - pt - pb + oph, (w - 1) * sw + kw - pl - pr + opw
    y = np.zeros((n, f, oh, ow), dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            for a in range(kh):
                for b in range(kw):
                    r, s = i * sh + a - pt, j * sw + b - pl
                    if 0 <= r < oh and 0 <= s < ow:
                        y[:, :, r, s] += x[:, :, i, j] @ weight[:, :, a, b]
    if bias is not None:
        y += bias[None, :, None, None]
    return y


class ConvTranspose2d(Layer):
    """y = col2im(W2^T @ x) + b, the adjoint of a strided Conv2d; see the module docstring."""
    _saved = ("_x",)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, cropping=0,
                 output_padding=0, bias: bool = True, *, weight_init: str = "bilinear",
                 frozen: bool = False, rng=None, seed: int | None = None, dtype=np.float32,
                 name: str | None = None):
        super().__init__(name)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{self._label()}: channel counts must be >= 1, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.cropping = as_padding(cropping)
        self.output_padding = as_pair(output_padding, "output_padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"{self._label()}: kernel_size and stride must be >= 1, "
                             f"got {self.kernel_size} and {self.stride}")
        if not all(0 <= p < s for p, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"{self._label()}: output_padding must be in [0, stride), got "
                             f"{self.output_padding} for stride {self.stride} (a larger one would make "
                             f"rows that the strided conv never reads)")
        shape = (self.in_channels, self.out_channels) + self.kernel_size
        if weight_init == "bilinear":
            weight = bilinear_weight(self.in_channels, self.out_channels, self.kernel_size)
        else:
            rng = rng if rng is not None else np.random.default_rng(seed)
            # fans of the conv this one transposes: F -> C, i.e. a (C, F, kh, kw) conv weight
            weight = initialize(weight_init, shape, rng)
        self.params["weight"] = weight.astype(dtype)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype=dtype)
        self.frozen = bool(frozen)
        self.zero_grad()
        self._x = None

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (pt, pb), (pl, pr) = self.cropping
        oph, opw = self.output_padding
        return (n, self.out_channels, (h - 1) * sh + kh - pt - pb + oph, (w - 1) * sw + kw - pl - pr + opw)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, F, OH, OW)."""
        self._check_array(x, channels=self.in_channels)
        out_shape = self.output_shape(x.shape)
        if out_shape[2] < 1 or out_shape[3] < 1:
            raise LayerInputError(f"{self._label()}: cropping {self.cropping} leaves no output for an input "
                                  f"of shape {tuple(x.shape)}; crop less")
        xp = get_array_module(x)
        n, c, h, w = x.shape
        w2 = self.params["weight"].reshape(c, -1)                     # (C, F*kh*kw)
        cols = xp.matmul(w2.T, x.reshape(n, c, h * w))                # (N, F*kh*kw, H*W): each pixel's patch
        y = kernels.col2im(xp.ascontiguousarray(cols), out_shape, self.kernel_size, self.cropping,
                           self.stride)                               # patches added at stride s
        if "bias" in self.params:
            y += self.params["bias"][None, :, None, None]
        if self._keeps_for_backward():                                # inside no_grad(): keep nothing
            self._x = x
        return y

    def backward(self, dy):
        """dy: (N, F, OH, OW) -> dx: (N, C, H, W); fills grads (zeros when frozen)."""
        x = self._x
        self._check_grad(dy, None if x is None else self.output_shape(x.shape), None if x is None else x.dtype)
        xp = get_array_module(dy)
        n, c, h, w = x.shape
        dcols = kernels.im2col(xp.ascontiguousarray(dy), self.kernel_size, self.cropping, self.stride)  # (N, F*kh*kw, H*W)
        w2 = self.params["weight"].reshape(c, -1)
        dx = xp.matmul(w2, dcols).reshape(x.shape)                    # the strided conv of dy
        if self.frozen:                                               # no step: exactly zero
            self.zero_grad()
            return dx
        dw2 = xp.matmul(x.reshape(n, c, h * w), dcols.transpose(0, 2, 1)).sum(axis=0)
        self.grads["weight"] = dw2.reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=(0, 2, 3))
        return dx
