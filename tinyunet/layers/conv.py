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

import contextlib
from typing import NamedTuple

import numpy as np

from tinyunet import kernels
from tinyunet.kernels import winograd
from tinyunet.backend import get_array_module, is_gpu_array
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
    _saved = ("_x", "_winograd")

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
        self._winograd = None                # V and U kept by a Winograd forward (WINOGRAD_KEEP_BYTES)
        self._geometry = None

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        _, _, _, (oh, ow) = kernels.normalize(x_shape, self.kernel_size, pad, self.stride)
        return (n, self.out_channels, oh, ow)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, F, OH, OW)."""
        self._check_array(x, channels=self.in_channels)
        keep = self._keeps_for_backward()     # False inside no_grad(): then keep nothing
        n, _, h, w = x.shape
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        # Y[n] = W2 @ cols[n] + b, or an equivalent formulation: see conv2d_forward below
        kept = {} if keep else None
        y = conv2d_forward(x, self.params["weight"], self.params.get("bias"), pad, self.stride, kept)
        # Keep x, not cols: recomputing im2col in backward costs a copy, keeping cols for
        # every layer of a U-Net would cost gigabytes. Inside no_grad(): keep nothing.
        if keep:
            self._x, self._geometry, self._winograd = x, pad, kept
        return y

    def workspace_bytes(self, x_shape) -> int:
        """Bytes of the reused buffer this layer's forward and backward need for an x of
        ``x_shape`` (N, C, H, W): the largest piece of a column matrix, m * C*kh*kw * rows*OW *
        itemsize (see pieces), Winograd's V and M, m * (t + 2)^2 * (C + F) * tiles * itemsize, or the
        padded copy of 'shifted'. Test: tests/test_kernels.py::test_workspace_bytes."""
        n, c, h, w = x_shape
        f, itemsize = self.out_channels, np.dtype(self.dtype).itemsize
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        (kh, kw), stride = self.kernel_size, self.stride
        method = _resolve_method(self.params["weight"], pad, stride, x_shape)
        if method == "shifted":
            (pt, pb), (pl, pr) = pad
            return n * c * ((h + pt + pb) * (w + pl + pr) + kw - 1) * itemsize
        if _is_pointwise((kh, kw), pad, stride):
            return 0
        if method == "winograd":            # V and M of the largest piece
            t = _winograd_tile(x_shape, pad)
            return max((n if piece.image == slice(None) else 1) * (t + 2) ** 2 * (c + f) * int(np.prod(
                winograd.tiles(piece.out_rows[1] - piece.out_rows[0], w + pad[1][0] + pad[1][1] - 2, t)))
                * itemsize for piece in _winograd_pieces(x_shape, f, pad, itemsize, t))
        largest = _largest_piece(x_shape, (kh, kw), pad, stride, itemsize)
        if method == "flip":                  # dx: the columns of dy, padded by kernel - 1 - padding
            (pt, pb), (pl, pr) = pad
            flip_pad = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
            dy_shape = self.output_shape(x_shape)
            largest = max(largest, _largest_piece(dy_shape, (kh, kw), flip_pad, (1, 1), itemsize))
        return largest

    def inference_bytes(self, x_shape) -> tuple[int, str, int]:
        """What a forward inside no_grad() allocates besides its output, for an x of x_shape:
        (temporary bytes, freed when it returns; the workspace slot it uses, 'cols' for every
        method; that slot's bytes, kept for reuse by the next conv; see _scratch).

            winograd   U, the transformed weights: (t + 2)^2 * F * C * itemsize, and with
                       several pieces one piece's output; workspace 'cols': V and M
            shifted    per band of output rows (_forward_shifted), the wide output and one
                       tap's product, 2 * N * F * rows * (W + pads) * itemsize, and the band's
                       output when there are several; workspace 'cols': the band's padded copy
            im2col, flip   nothing (the products write into y); workspace 'cols': a piece's
                       columns (workspace_bytes, which also counts flip's backward piece)
            1x1 pointwise  nothing, no workspace
        Used by UNet.inference_bytes; tests/test_infer.py holds it to tracemalloc."""
        n, c, h, w = x_shape
        f, itemsize = self.out_channels, np.dtype(self.dtype).itemsize
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, (h, w))
        method = _resolve_method(self.params["weight"], pad, self.stride, x_shape)
        if method == "shifted":              # per band (_forward_shifted): wide, part, and the
            (pt, pb), (pl, pr) = pad           # band's y when there are several bands
            (kh, kw), wp = self.kernel_size, w + pl + pr
            parts = _shifted_pieces(x_shape, self.kernel_size, pad, itemsize)
            ow = self.output_shape(x_shape)[3]
            temporary, workspace = 0, 0
            for p in parts:
                m, rows = (n if p.image == slice(None) else 1), p.out_rows[1] - p.out_rows[0]
                temporary = max(temporary, m * f * rows * (2 * wp + (ow if len(parts) > 1 else 0)) * itemsize)
                workspace = max(workspace, m * c * ((rows + kh - 1) * wp + kw - 1) * itemsize)
            return temporary, "cols", workspace
        temporary = 0
        if method == "winograd":
            t = _winograd_tile(x_shape, pad)
            temporary = (t + 2) ** 2 * f * c * itemsize
            parts = _winograd_pieces(x_shape, f, pad, itemsize, t)
            if len(parts) > 1:
                ow = self.output_shape(x_shape)[3]
                temporary += max((n if p.image == slice(None) else 1) * f * (p.out_rows[1] - p.out_rows[0])
                                 * ow * itemsize for p in parts)
        return temporary, "cols", self.workspace_bytes(x_shape)

    def kept_bytes(self, x_shape) -> int:
        """What forward keeps for backward: x, and Winograd's V and U where they are at most
        WINOGRAD_KEEP_BYTES (_winograd_kept: the rule the forward follows)."""
        itemsize = np.dtype(self.dtype).itemsize
        pad = resolve_padding(self.padding, self.kernel_size, self.stride, x_shape[2:])
        extra = 0
        if _resolve_method(self.params["weight"], pad, self.stride, x_shape) == "winograd":
            extra = sum(_winograd_kept(x_shape, self.out_channels, pad, itemsize).values())
        return int(np.prod(x_shape)) * itemsize + extra

    def backward(self, dy):
        """dy: (N, F, OH, OW) -> dx: (N, C, H, W); fills grads['weight'] and grads['bias']."""
        x = self._x
        self._check_grad(dy, None if x is None else self.output_shape(x.shape), x.dtype if x is not None else None)
        # dW2 = sum_n dY[n] @ cols[n]^T, db, dx = col2im(W2^T @ dY): see conv2d_backward below
        dx, dw, db = conv2d_backward(x, self.params["weight"], "bias" in self.params, dy,
                                     self._geometry, self.stride, self._winograd)
        self._winograd = None                # its V has become dV: not for a second backward
        self.grads["weight"] = dw
        if db is not None:
            self.grads["bias"] = db
        return dx


# ---------------------------------------------------------------------------------------------
# The compute path: how the sums above are carried out fast. Every method computes the same
# y, dW, db and dx (tests/test_kernels.py::test_conv_methods_agree_with_the_naive_loops and
# ::test_each_conv_method_passes_a_gradient_check); tinyunet.kernels.bench times each of them
# on every conv of the U-Net, and choose_method encodes what it measured.
# ---------------------------------------------------------------------------------------------
METHODS = ("im2col", "flip", "shifted", "winograd")
# im2col   the derivation above, as written: Y[n] = W2 @ cols[n]; dx = col2im(W2^T @ dY[n]).
#
# flip     forward and dW as im2col; dx computed as a convolution of dY instead of a col2im.
#          For stride 1, write the backward sum with i' = kh-1-i, j' = kw-1-j:
#
#              dx[n, c, h, w] = sum_{f, i, j} W[f, c, i, j] * dy[n, f, h + top - i, w + left - j]
#                             = sum_{f, i', j'} Wf[c, f, i', j'] * dy_pad[n, f, h + i', w + j']
#
#          with Wf[c, f, i', j'] = W[f, c, kh-1-i', kw-1-j'] (each filter turned by 180 degrees,
#          in and out channels swapped) and dy padded by kh-1-top above, kh-1-bottom below,
#          kw-1-left and kw-1-right at the sides (needs padding <= kernel - 1). So
#          dx[n] = Wf2 @ im2col(dy)[n]: the copy kernel reads F channels instead of
#          col2im reading C*kh*kw rows and scattering them, which pays when F < C.
#
# shifted  no column matrix at all, for few output channels (the U-Net's 64->2 head). Pad x
#          once and flatten each image to rows of width Wp = W + left + right; the window
#          offset (i, j) is then the flat offset i*Wp + j, so for stride 1
#
#              Y_wide[n] = sum_{i, j} W[:, :, i, j] @ x_flat[n][:, i*Wp + j : i*Wp + j + OH*Wp]
#
#          is kh*kw products of (F, C) by (C, OH*Wp) views (no copies); each output row carries
#          kw - 1 + left + right extra columns that are dropped. dW[:, :, i, j] is the same
#          view against dY widened by zeros, and dx comes from 'flip'. With F = 2 the column
#          matrix (C*kh*kw rows) would cost far more to write than the products cost to compute.
#
# winograd for 3x3 stride-1 convs: Winograd's F(2x2, 3x3) (kernels/winograd.py derives it).
#          Each 2x2 output tile from its 4x4 input patch with 16 multiplications instead of 36:
#          transform the filters (U: 16 x (F, C)) and the patches (V: 16 x (C, tiles)), do 16
#          matrix products M[k] = U[k] @ V[k], transform M back. 2.25x fewer multiply-adds
#          than im2col, and V holds 16 numbers per 4 pixels where the columns hold 9 per pixel.
#          Its backward runs the same linear steps transposed: dU[k] = dM[k] @ V[k]^T,
#          dV[k] = U[k]^T @ dM[k]. On large images F(4x4, 3x3) instead: 4x4 tiles from 6x6
#          patches, 36 products on a quarter of the tiles, 4x fewer multiply-adds than
#          im2col (_winograd_tile). Float32 results differ from im2col's by rounding only
#          (relative 1e-6 with 2x2 tiles, 1e-5 with 4x4); the float64 checks hold to 1e-10.
SHIFTED_MAX_OUT_CHANNELS = 8        # "shifted" up to this many output channels (bench: 2)
WINOGRAD_MIN_CHANNELS = 16          # "winograd" from this many in and out channels ...
WINOGRAD_MIN_PIXELS = 16 * 16       # ... and output pixels: below, its 16 transformed copies of
                                    # the weights cost more than the products save (a 128x128
                                    # step with the 8x8 layers too: 786-810 ms against 677-748 ms
                                    # without; with the 16x16 layers: 677-748 against 738-788 ms)
WINOGRAD_SMALL_MAX_U_BYTES = 8 * 2 ** 20   # ... but from 8x8 where F(2x2)'s U (16 F C floats)
                                    # is at most this: such weights stay in cache and the products
                                    # save more than U costs. One conv's forward + backward at 8x8,
                                    # batch 2, two threads, im2col against Winograd: 64 -> 64 1.15-1.22
                                    # against 0.76-0.83 ms, 128 -> 128 2.3-2.7 / 1.5-1.7, 256 -> 256
                                    # 5.2-6.8 / 4.2-4.7, but 512 -> 512 20-21 / 20-24, 1024 -> 1024
                                    # 75-95 / 64-75 (one thread 108 / 112): SegNet's block 5 at
                                    # width 16 gains, the exact U-Net's bottom does not
WINOGRAD_SMALL_MIN_PIXELS = 8 * 8
WINOGRAD_TILE4_MIN_PIXELS = 32 * 32 # F(4x4, 3x3) from this many output pixels, F(2x2, 3x3) below:
                                    # its 36 transformed copies of the weights cost more than they
                                    # save on the 16x16 layers (512->512 forward+backward 29.8 ms
                                    # against 26.7 with F(2x2)); at 32x32 it takes 0.72-0.86x the
                                    # time (1024->512 115.7 against 159.2 ms), at 64x64 0.70-0.73x.
                                    # Steps, alternating processes: 256x256 2095/1952/2173/2154
                                    # -> 1982/1849/1945/2090 ms with it from 32x32 instead of 64x64
                                    # (peak RSS 1.45 GB both), 128x128 within the noise
                                    # (718/695/681/609/618/648 -> 693/650/610/624/605/666 ms)
WINOGRAD_TILE = 0                   # 2 or 4 forces that tile everywhere (tests); 0: by size
WINOGRAD_KEEP_BYTES = 8 * 2 ** 20   # a training forward keeps Winograd's V and U for the backward
                                    # when each is at most this (and the conv is one piece): the
                                    # backward then skips two memory-bound passes that redo them
                                    # (on a SegNet step, width 16, 128x128, about 1/20 of its time);
                                    # larger ones are recomputed, so the peak of a large image or
                                    # a wide layer (the exact U-Net's) does not grow by them
SMALL_IMAGE_PIXELS = 1024           # dW from one product over the whole batch up to 32x32
_method = "auto"                    # set by use_method / using_method
_workspace: dict = {}               # reused buffers, see _scratch


def method_applies(method: str, kernel, padding, stride) -> bool:
    """Whether ``method`` can compute this geometry: 'flip' and 'shifted' need stride 1 and
    padding <= kernel - 1 on every side (the padding of dy in 'flip' is kernel - 1 - padding)."""
    if method == "im2col":
        return True
    (kh, kw), ((pt, pb), (pl, pr)) = kernel, padding
    if method == "winograd":
        return (kh, kw) == (3, 3) and tuple(stride) == (1, 1)
    return tuple(stride) == (1, 1) and max(pt, pb) <= kh - 1 and max(pl, pr) <= kw - 1


def choose_method(in_channels: int, out_channels: int, kernel, padding, stride, pixels: int | None = None,
                  gpu: bool = False) -> str:
    """The method the benchmark found fastest (kernels/RESULTS.md, "conv methods"): 'shifted'
    for a handful of output channels; 'winograd' for 3x3 stride-1 convs of at least
    WINOGRAD_MIN_CHANNELS channels on images of at least WINOGRAD_MIN_PIXELS output pixels, or
    WINOGRAD_SMALL_MIN_PIXELS for weights whose transform is small (WINOGRAD_SMALL_MAX_U_BYTES)
    (``pixels`` = OH*OW; None: large enough), on the CPU only (``gpu``: it was measured on the
    CPU; on a GPU the CUDA im2col kernels serve); 'flip' when F < C (its dy copy is then the
    smaller one; at F = C col2im's path measured as fast or faster); else 'im2col'."""
    if method_applies("shifted", kernel, padding, stride) and out_channels <= SHIFTED_MAX_OUT_CHANNELS \
            and tuple(kernel) != (1, 1):
        return "shifted"
    small_transform = 16 * in_channels * out_channels * 4 <= WINOGRAD_SMALL_MAX_U_BYTES      # U, float32
    large_enough = pixels is None or pixels >= WINOGRAD_MIN_PIXELS or (pixels >= WINOGRAD_SMALL_MIN_PIXELS
                                                                       and small_transform)
    if method_applies("winograd", kernel, padding, stride) and min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS \
            and large_enough and not gpu:
        return "winograd"
    if method_applies("flip", kernel, padding, stride) and out_channels < in_channels:
        return "flip"
    return "im2col"


def use_method(name: str) -> None:
    """Force one conv method for every Conv2d ('auto': choose_method decides), for benchmarks
    and for learners who want to step through one formulation."""
    global _method
    if name != "auto" and name not in METHODS:
        raise ValueError(f"unknown conv method {name!r}: expected 'auto' or one of {METHODS}")
    _method = name


@contextlib.contextmanager
def using_method(name: str):
    """``with using_method("im2col"): ...`` forces ``name`` inside the block only."""
    previous = _method
    use_method(name)
    try:
        yield
    finally:
        use_method(previous)


def _resolve_method(weight, padding, stride, x_shape) -> str:
    f, c, kh, kw = weight.shape
    if _method == "auto":
        _, _, _, (oh, ow) = kernels.normalize(x_shape, (kh, kw), padding, stride)
        return choose_method(c, f, (kh, kw), padding, stride, oh * ow, gpu=is_gpu_array(weight))
    if not method_applies(_method, (kh, kw), padding, stride):
        return "im2col"        # a forced method that cannot do this geometry: the general one
    return _method


def _scratch(xp, shape, dtype, slot: str = "cols"):
    """A reused buffer of ``shape``: a view into one grow-only block per (array module, dtype,
    slot). A fresh 300 MB column matrix per call costs tens of ms in page faults; every conv
    runs after the previous one finished with the block, so one block serves them all (which
    also means: one model per process at a time, not from several threads at once).
    Never return it: whatever leaves a function must be a fresh array."""
    key = (xp.__name__, np.dtype(dtype).str, slot)
    size = int(np.prod(shape))
    block = _workspace.get(key)
    if block is None or block.size < size:
        _workspace.pop(key, None)                 # free the old block before the new one
        block = _workspace[key] = xp.empty(size, dtype=dtype)
    return block[:size].reshape(shape)


def release_workspace() -> None:
    """Free the reused buffers (they grow to the largest column matrix seen)."""
    _workspace.clear()


def _columns(x, kernel, padding, stride):
    """im2col(x) into the workspace; a 1x1 stride-1 unpadded conv needs no copy at all."""
    n, c, h, w = x.shape
    if _is_pointwise(kernel, padding, stride):
        return x.reshape(n, c, h * w)
    shape = kernels.cols_shape(x.shape, kernel, padding, stride)
    return kernels.im2col(x, kernel, padding, stride, out=_scratch(get_array_module(x), shape, x.dtype))


def _is_pointwise(kernel, padding, stride) -> bool:
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and padding == ((0, 0), (0, 0))


# -- pieces: the column matrix a few output rows at a time -----------------------------------
# The column matrix of the U-Net's first up-level conv is 2 x 1152 x 65536 floats = 604 MB at
# 256x256, more than all the activations the backward keeps. Output rows [r0, r1) of one image
# need only input rows [r0*sh - top, (r1 - 1)*sh - top + kh), and the columns of those rows
# are im2col of that band of x with its own padding (zeros only where the band reaches past
# the image). So the products run piece by piece, each piece's columns within WORKSPACE_BYTES:
#
#     Y[n][:, r0*OW : r1*OW]  = W2 @ cols(band)
#     dW2                    += dY[n][:, r0*OW : r1*OW] @ cols(band)^T
#     dx[n][:, band rows]    += col2im(W2^T @ dY[n][:, r0*OW : r1*OW])   (bands overlap by
#                                                                          kh - sh rows: +=)
# The products stay large (over 14,000 columns at the 64 MiB default), so they run as fast.
WORKSPACE_BYTES = 64 * 2 ** 20


class Piece(NamedTuple):
    image: slice                    # the images of x it covers (all, or one)
    out_rows: tuple[int, int]       # output rows [r0, r1)
    in_rows: tuple[int, int]        # the input rows it reads, [lo, hi), inside the image
    padding: tuple                  # the band's own ((top, bottom), (left, right))


def pieces(x_shape, kernel, padding, stride, itemsize, limit=None, row_bytes=None, row_multiple=1) -> list[Piece]:
    """The pieces whose column matrices each fit ``limit`` bytes (WORKSPACE_BYTES): the whole
    batch when it fits, else one image at a time, in bands of output rows when one image is
    too large (bands need padding <= kernel - 1, so that every band reads the image).
    ``row_bytes``: the workspace one output row needs (default: its im2col columns);
    ``row_multiple``: bands start at multiples of it (2 for Winograd's 2x2 tiles).
    Tests: tests/test_kernels.py::test_pieces_cover_every_output_row_once_and_read_the_right_rows
    and ::test_pieces_give_the_same_conv_as_one_column_matrix."""
    limit = WORKSPACE_BYTES if limit is None else limit
    n, c, h, w = x_shape
    (kh, kw), ((pt, pb), (pl, pr)), (sh, sw), (oh, ow) = kernels.normalize(x_shape, kernel, padding, stride)
    row_bytes = c * kh * kw * ow * itemsize if row_bytes is None else row_bytes
    if n * oh * row_bytes <= limit:
        return [Piece(slice(None), (0, oh), (0, h), padding)]
    fitting = max(row_multiple, limit // row_bytes // row_multiple * row_multiple)
    rows = oh if max(pt, pb) > kh - 1 else min(oh, fitting)
    result = []
    for b in range(n):
        for r0 in range(0, oh, rows):
            r1 = min(r0 + rows, oh)
            first, stop = r0 * sh - pt, (r1 - 1) * sh - pt + kh       # rows read, padding included
            lo, hi = max(first, 0), min(stop, h)
            result.append(Piece(slice(b, b + 1), (r0, r1), (lo, hi), ((lo - first, stop - hi), (pl, pr))))
    return result


def _largest_piece(x_shape, kernel, padding, stride, itemsize) -> int:
    """Bytes of the largest column matrix among x's pieces."""
    n, c = x_shape[:2]
    (kh, kw), _, _, (_, ow) = kernels.normalize(x_shape, kernel, padding, stride)
    return max((n if piece.image == slice(None) else 1) * c * kh * kw * (piece.out_rows[1] - piece.out_rows[0])
               * ow * itemsize for piece in pieces(x_shape, kernel, padding, stride, itemsize))


def _band(x, piece: Piece):
    lo, hi = piece.in_rows
    return x[piece.image, :, lo:hi]


def _product(weight2d, x, kernel, padding, stride):
    """(N, F, OH*OW) = weight2d (F, C*kh*kw) @ im2col(x), piece by piece (see pieces)."""
    xp = get_array_module(x)
    _, _, _, (oh, ow) = kernels.normalize(x.shape, kernel, padding, stride)
    parts = pieces(x.shape, kernel, padding, stride, x.itemsize)
    if len(parts) == 1 or _is_pointwise(kernel, padding, stride):
        return xp.matmul(weight2d, _columns(x, kernel, padding, stride))   # fresh
    y = xp.empty((x.shape[0], weight2d.shape[0], oh * ow), dtype=x.dtype)
    for piece in parts:
        (r0, r1), cols = piece.out_rows, _columns(_band(x, piece), kernel, piece.padding, stride)
        xp.matmul(weight2d, cols, out=y[piece.image, :, r0 * ow:r1 * ow])
    return y


def conv2d_forward(x, weight, bias, padding, stride, kept: dict | None = None):
    """y = conv(x, weight) + bias by the current method. x: (N, C, H, W), weight: (F, C, kh, kw),
    bias: (F,) or None, padding ((top, bottom), (left, right)), stride (sh, sw) -> (N, F, OH, OW).
    ``kept``: a dict that a Winograd forward fills with what its backward can reuse (V, U)."""
    f, c, kh, kw = weight.shape
    n = x.shape[0]
    _, _, _, (oh, ow) = kernels.normalize(x.shape, (kh, kw), padding, stride)
    method = _resolve_method(weight, padding, stride, x.shape)
    if method == "shifted":
        return _forward_shifted(x, weight, bias, padding)
    if method == "winograd":
        return _forward_winograd(x, weight, bias, padding, kept)
    y = _product(weight.reshape(f, -1), x, (kh, kw), padding, stride)   # (N, F, OH*OW): W2 @ cols
    if bias is not None:
        y += bias[:, None]
    return y.reshape(n, f, oh, ow)


def conv2d_backward(x, weight, has_bias: bool, dy, padding, stride, kept: dict | None = None):
    """(dx, dW, db) for y = conv(x, weight) + bias, given dy = dL/dy; db is None without bias.
    ``kept``: what conv2d_forward kept for it (used up: V's memory becomes dV)."""
    xp = get_array_module(dy)
    f, c, kh, kw = weight.shape
    n = x.shape[0]
    method = _resolve_method(weight, padding, stride, x.shape)
    dy3 = dy.reshape(n, f, -1)                                          # (N, F, P)
    db = dy3.sum(axis=2).sum(axis=0) if has_bias else None
    if method == "shifted":
        dw = _weight_grad_shifted(x, weight.shape, dy, padding)
        return _input_grad_flip(weight, dy, padding).reshape(x.shape), dw, db
    if method == "winograd":
        return (*_backward_winograd(x, weight, dy, padding, kept or {}), db)
    if _is_pointwise((kh, kw), padding, stride):                        # cols = x itself
        x3 = x.reshape(n, c, -1)
        dw = _weight_grad(x3, dy3).reshape(weight.shape)
        dx = xp.matmul(weight.reshape(f, c).T, dy3)                     # col2im of 1x1 is the identity
        return dx.reshape(x.shape), dw, db
    parts = pieces(x.shape, (kh, kw), padding, stride, x.itemsize)
    _, _, _, (oh, ow) = kernels.normalize(x.shape, (kh, kw), padding, stride)
    w2t = weight.reshape(f, -1).T                                       # (K, F)
    dw2 = None
    dx = None if len(parts) == 1 or method != "im2col" else xp.zeros(x.shape, dtype=x.dtype)
    for piece in parts:
        band = _band(x, piece)
        cols = _columns(band, (kh, kw), piece.padding, stride)          # (m, K, rows*OW)
        (r0, r1) = piece.out_rows
        dy_piece = dy3[piece.image, :, r0 * ow:r1 * ow]                 # (m, F, rows*OW)
        part = _weight_grad(cols, dy_piece)                             # (F, K)
        dw2 = part if dw2 is None else dw2 + part
        if method == "im2col":
            # dcols = W2^T @ dY into the workspace (the columns have served), then col2im
            dcols = xp.matmul(w2t, dy_piece, out=_scratch(xp, cols.shape, dy.dtype))
            if dx is None:                                              # one piece: the whole dx
                dx = kernels.col2im(dcols, x.shape, (kh, kw), padding, stride)
            else:
                lo, hi = piece.in_rows
                dx[piece.image, :, lo:hi] += kernels.col2im(dcols, band.shape, (kh, kw), piece.padding, stride)
    dw = dw2.reshape(weight.shape)
    if method != "im2col":
        dx = _input_grad_flip(weight, dy, padding)
    return dx.reshape(x.shape), dw, db


def _weight_grad(cols, dy3):
    """dW2 = sum_n dY[n] @ cols[n]^T: (F, K) from cols (N, K, P) and dY (N, F, P)."""
    xp = get_array_module(cols)
    n, f, p = dy3.shape
    if p <= SMALL_IMAGE_PIXELS:
        # Deep in the U-Net the images are small (P = 64 at 8x8) and the sum over n of
        # products with an inner dimension of P is mostly the writing of N large (F, K)
        # results. Lay the batch side by side instead, (F, N*P) @ (N*P, K): one product,
        # one result; the two copies cost little at this P (measured 80 -> 13 ms for
        # 1024 -> 1024 channels at 8x8, batch 2).
        dy_wide = dy3.transpose(1, 0, 2).reshape(f, n * p)
        cols_wide = cols.transpose(1, 0, 2).reshape(-1, n * p)
        return xp.matmul(dy_wide, cols_wide.T)
    # Computed transposed, as sum_n cols[n] @ dY[n]^T: the same numbers, but OpenBLAS splits
    # a (K, P) @ (P, F) product well across threads, while (F, P) @ (P, K) with its long inner
    # dimension ran 20 to 60 times slower here whenever another process held a core.
    dw2t = xp.matmul(cols[0], dy3[0].T)                                 # (K, F)
    for b in range(1, n):
        dw2t += xp.matmul(cols[b], dy3[b].T)
    return dw2t.T


def _input_grad_flip(weight, dy, padding):
    """dx as the convolution of dy with the turned, transposed filters ('flip' above)."""
    f, c, kh, kw = weight.shape
    (pt, pb), (pl, pr) = padding
    turned = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)   # (C, F*kh*kw), a copy
    return _product(turned, dy, (kh, kw), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), (1, 1))


def _winograd_tile(x_shape, padding) -> int:
    """The Winograd output tile for this geometry: 4, F(4x4, 3x3), on images of at least
    WINOGRAD_TILE4_MIN_PIXELS output pixels, else 2, F(2x2, 3x3)."""
    if WINOGRAD_TILE:
        return WINOGRAD_TILE
    (pt, pb), (pl, pr) = padding
    pixels = (x_shape[2] + pt + pb - 2) * (x_shape[3] + pl + pr - 2)
    return 4 if pixels >= WINOGRAD_TILE4_MIN_PIXELS else 2


def _winograd_pieces(x_shape, f, padding, itemsize, t):
    """pieces() for Winograd with output tile t: per output row, V and M hold (t + 2)^2 / t *
    (C + F) numbers per tile column (8 for t = 2, 9 for t = 4); bands are whole tile rows."""
    n, c, h, w = x_shape
    ow = w + padding[1][0] + padding[1][1] - 2
    tiles_w = winograd.tiles(1, ow, t)[1]
    return pieces(x_shape, (3, 3), padding, (1, 1), itemsize,
                  row_bytes=(t + 2) ** 2 * (c + f) * tiles_w * itemsize // t, row_multiple=t)


def _winograd_geometry(band_shape, piece, t):
    """(top, left, rows, OW, tiles_h, tiles_w) of one piece."""
    (top, _), (left, right) = piece.padding
    rows, ow = piece.out_rows[1] - piece.out_rows[0], band_shape[3] + left + right - 2
    return (top, left, rows, ow) + winograd.tiles(rows, ow, t)


def _winograd_buffers(xp, c, f, tiles, dtype, t):
    """V: (a^2, C, T) and M: (a^2, F, T), a = t + 2, side by side in the one
    workspace block that the column matrices use (a conv uses one or the other), so that
    pieces() bounds them together."""
    k = (t + 2) ** 2
    block = _scratch(xp, (k * (c + f) * tiles,), dtype)
    return block[:k * c * tiles].reshape(k, c, tiles), block[k * c * tiles:].reshape(k, f, tiles)


def _winograd_kept(x_shape, f, padding, itemsize) -> dict:
    """{'v': bytes, 'u': bytes} of what a training forward keeps for the backward: each of V
    (a^2, C, T) and U (a^2, F, C) that is at most WINOGRAD_KEEP_BYTES, V only when the conv is
    one piece (bands recompute theirs)."""
    n, c, h, w = x_shape
    t = _winograd_tile(x_shape, padding)
    (pt, pb), (pl, pr) = padding
    v_bytes = (t + 2) ** 2 * c * n * int(np.prod(winograd.tiles(h + pt + pb - 2, w + pl + pr - 2, t))) * itemsize
    kept = {}
    # pieces() lists every image of a batch that does not fit: asked only for a small V, so that
    # a huge batch (step_memory_bytes checks --batch 10**9) costs nothing to estimate
    if v_bytes <= WINOGRAD_KEEP_BYTES and len(_winograd_pieces(x_shape, f, padding, itemsize, t)) == 1:
        kept["v"] = v_bytes
    if (t + 2) ** 2 * f * c * itemsize <= WINOGRAD_KEEP_BYTES:
        kept["u"] = (t + 2) ** 2 * f * c * itemsize
    return kept


def _forward_winograd(x, weight, bias, padding, kept: dict | None = None):
    """y by F(t x t, 3x3), piece by piece: V = input transform, M[k] = U[k] @ V[k], y = A^T M A.
    ``kept`` (training): filled with V and U as _winograd_kept allows, for _backward_winograd."""
    xp = get_array_module(x)
    n, c = x.shape[:2]
    f = weight.shape[0]
    t = _winograd_tile(x.shape, padding)
    u = winograd.weight_transform(weight, t)                            # (a^2, F, C)
    _, _, _, (oh, ow) = kernels.normalize(x.shape, (3, 3), padding, (1, 1))
    parts = _winograd_pieces(x.shape, f, padding, x.itemsize, t)
    keep = {} if kept is None else _winograd_kept(x.shape, f, padding, x.itemsize)
    if "u" in keep:
        kept["u"] = u
    y = None if len(parts) == 1 else xp.empty((n, f, oh, ow), dtype=x.dtype)
    for piece in parts:
        band = _band(x, piece)
        top, left, rows, _, th, tw = _winograd_geometry(band.shape, piece, t)
        m_images = band.shape[0]
        v, m = _winograd_buffers(xp, c, f, m_images * th * tw, x.dtype, t)
        if "v" in keep:                                                 # a fresh V, not the workspace's
            v = xp.empty_like(v)
        v = winograd.input_transform(band, top, left, th, tw, out=v, tile=t)   # (the reference: fresh)
        if "v" in keep:
            kept["v"] = v
        m = winograd.products(u, v, out=m)                              # M[k] = U[k] @ V[k]
        if y is None:
            return winograd.output_transform(m, n, oh, ow, bias, tile=t)
        r0, r1 = piece.out_rows
        y[piece.image, :, r0:r1] = winograd.output_transform(m, m_images, rows, ow, bias, tile=t)
    return y


def _backward_winograd(x, weight, dy, padding, kept: dict):
    """(dx, dW) by the transposed steps: dM = A dY A^T, dU = dM V^T, dV = U^T dM, dx = B dV B^T.
    ``kept``: V and U from the forward where it kept them; the others are computed again."""
    xp = get_array_module(dy)
    c, f = x.shape[1], weight.shape[0]
    # U again unless kept: one memory-bound product (ms), where keeping it for every layer until
    # its backward would hold 16/9 (2x2 tiles) or 36/9 of the weights' bytes more
    t = _winograd_tile(x.shape, padding)
    u = kept["u"] if "u" in kept else winograd.weight_transform(weight, t)     # (a^2, F, C)
    parts = _winograd_pieces(x.shape, f, padding, x.itemsize, t)
    du_t = None                                                         # dU^T: (a^2, C, F)
    dx = None if len(parts) == 1 else xp.zeros(x.shape, dtype=x.dtype)
    for piece in parts:
        band = _band(x, piece)
        top, left, _, _, th, tw = _winograd_geometry(band.shape, piece, t)
        tile_count = band.shape[0] * th * tw
        r0, r1 = piece.out_rows
        v, dm = _winograd_buffers(xp, c, f, tile_count, x.dtype, t)
        if "v" in kept:                                                 # one piece: the forward's V
            v = kept["v"]
        else:
            v = winograd.input_transform(band, top, left, th, tw, out=v, tile=t)
        dm = winograd.output_transform_backward(dy[piece.image, :, r0:r1], out=dm, tile=t)
        # dU^T[k] = V[k] @ dM[k]^T: the long dimension (tiles) inside, as conv2d_backward's dW
        if du_t is None:
            du_t = winograd.products(v, dm, transpose_b=True)
        else:
            du_t += winograd.products(v, dm, transpose_b=True)
        dv = winograd.products(u, dm, out=v, transpose_a=True)          # U^T dM; V has served: reuse it
        band_dx = winograd.input_transform_backward(dv, band.shape, top, left, th, tw, tile=t)
        if dx is None:
            dx = band_dx
        else:
            lo, hi = piece.in_rows
            dx[piece.image, :, lo:hi] += band_dx
    dw = winograd.weight_transform_backward(du_t, t)
    return dx, dw


def _flat_padded(x, padding, kw):
    """x padded by zeros, each image flattened: (N, C, Hp*Wp + kw - 1), and (Hp, Wp).
    The kw - 1 extra zeros let the last tap's view of OH*Wp elements stay inside."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (pt, pb), (pl, pr) = padding
    hp, wp = h + pt + pb, w + pl + pr
    # In the block the columns use: no conv needs both at once (the shifted backward's dx
    # builds its columns after dW has read this copy). A slot of its own kept 68 MB resident
    # beside the columns' 64 MiB in every 512x512 prediction after the first (issue 18).
    flat = _scratch(xp, (n, c, hp * wp + kw - 1), x.dtype)
    flat[...] = 0
    flat[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, pt:pt + h, pl:pl + w] = x
    return flat, hp, wp


def _shifted_pieces(x_shape, kernel, padding, itemsize):
    """pieces() for the shifted forward: per output row its padded copy holds C * Wp numbers."""
    c, w = x_shape[1], x_shape[3]
    (pl, pr) = padding[1]
    return pieces(x_shape, kernel, padding, (1, 1), itemsize, row_bytes=c * (w + pl + pr) * itemsize)


def _forward_shifted(x, weight, bias, padding):
    """y by the shifted products, a band of output rows at a time when x's padded copy exceeds
    WORKSPACE_BYTES: each band is the same sum over a padded copy of the rows it reads (pieces()
    gives them and their padding), so the copy stays within the workspace. The U-Net's head
    (64 -> 2 channels) at 512x512 otherwise copied 68 MB, at 1024x1024 270 MB, for products
    that take milliseconds. The backward still copies x whole (_weight_grad_shifted).
    Test: tests/test_inference_mode.py::test_shifted_forward_in_bands_equals_one_pass."""
    f, _, kh, kw = weight.shape
    parts = _shifted_pieces(x.shape, (kh, kw), padding, x.itemsize)
    if len(parts) == 1:
        return _forward_shifted_whole(x, weight, bias, padding)
    _, _, _, (oh, ow) = kernels.normalize(x.shape, (kh, kw), padding, (1, 1))
    y = get_array_module(x).empty((x.shape[0], f, oh, ow), dtype=x.dtype)
    for piece in parts:
        r0, r1 = piece.out_rows
        y[piece.image, :, r0:r1] = _forward_shifted_whole(_band(x, piece), weight, bias, piece.padding)
    return y


def _forward_shifted_whole(x, weight, bias, padding):
    """y as kh*kw products of shifted views of the flat padded x ('shifted' above)."""
    xp = get_array_module(x)
    f, c, kh, kw = weight.shape
    n = x.shape[0]
    flat, hp, wp = _flat_padded(x, padding, kw)
    oh, ow = hp - kh + 1, wp - kw + 1
    length = oh * wp
    wide = xp.empty((n, f, length), dtype=x.dtype)                      # (N, F, OH*Wp)
    part = xp.empty_like(wide)
    for i in range(kh):
        for j in range(kw):
            view = flat[:, :, i * wp + j:i * wp + j + length]           # (N, C, OH*Wp), no copy
            if i == 0 and j == 0:
                xp.matmul(weight[:, :, i, j], view, out=wide)
            else:
                xp.matmul(weight[:, :, i, j], view, out=part)
                wide += part
    y = wide.reshape(n, f, oh, wp)[:, :, :, :ow]                        # drop the wrap-around columns
    if bias is not None:
        y = y + bias[:, None, None]
    return xp.ascontiguousarray(y)


def _weight_grad_shifted(x, weight_shape, dy, padding):
    """dW[:, :, i, j] = sum_n dY_wide[n] @ view_ij[n]^T, dY_wide = dy with zero columns
    where the wide forward had its dropped ones ('shifted' above)."""
    xp = get_array_module(x)
    f, c, kh, kw = weight_shape
    n, _, oh, ow = dy.shape
    flat, hp, wp = _flat_padded(x, padding, kw)
    length = oh * wp
    wide = xp.zeros((n, f, oh, wp), dtype=dy.dtype)
    wide[:, :, :, :ow] = dy
    wide = wide.reshape(n, f, length)
    dw = xp.empty((f, c, kh, kw), dtype=dy.dtype)
    for i in range(kh):
        for j in range(kw):
            views = flat[:, :, i * wp + j:i * wp + j + length]
            acc = xp.matmul(views[0], wide[0].T)                        # (C, F): transposed, as in
            for b in range(1, n):                                       # conv2d_backward's dW
                acc += xp.matmul(views[b], wide[b].T)
            dw[:, :, i, j] = acc.T
    return dw


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
