"""im2col and col2im by array slicing: the reference every other implementation must equal.

Runs on NumPy and CuPy alike (the array module is taken from the input). It loops only over
the kh*kw kernel offsets; each offset copies one strided view of the padded image at once.

Layout of the columns, shared by every implementation::

    cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x_padded[n, c, oh*sh + i, ow*sw + j]

    x:    (N, C, H, W)
    cols: (N, C*kh*kw, OH*OW)

Why this layout: with the weights as a (F, C*kh*kw) matrix, the convolution of image n is one
matrix product ``W @ cols[n]`` of shape (F, OH*OW), which already is the NCHW output: no
transpose follows the product. Along a column row the output pixels run in memory order, so
each (c, i, j) row is filled by copying whole image rows (contiguous runs for stride 1).

col2im is the adjoint (the transpose) of im2col: every window that read a pixel gives its
gradient back to that pixel, and windows overlap, so the contributions must be ADDED (``+=``),
never assigned. tests/test_kernels.py proves <im2col(x), y> == <x, col2im(y)>.
"""
from __future__ import annotations

from tinyunet.backend import get_array_module

from .geometry import check_out, normalize


def im2col(x, kernel, padding, stride, out=None):
    """x: (N, C, H, W) -> cols: (N, C*kh*kw, OH*OW), written into ``out`` when given."""
    xp = get_array_module(x)
    (kh, kw), ((pt, pb), (pl, pr)), (sh, sw), (oh, ow) = normalize(x.shape, kernel, padding, stride)
    n, c = x.shape[:2]
    padded = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if pt or pb or pl or pr else x
    shape = (n, c * kh * kw, oh * ow)
    out = xp.empty(shape, dtype=x.dtype) if out is None else check_out(out, shape, x.dtype)
    view = out.reshape(n, c, kh, kw, oh, ow)
    for i in range(kh):
        for j in range(kw):
            view[:, :, i, j] = padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
    return out


def col2im(cols, x_shape, kernel, padding, stride, out=None):
    """cols: (N, C*kh*kw, OH*OW) -> x: (N, C, H, W), the sum of every window's contribution."""
    xp = get_array_module(cols)
    (kh, kw), ((pt, pb), (pl, pr)), (sh, sw), (oh, ow) = normalize(x_shape, kernel, padding, stride)
    n, c, h, w = x_shape
    if tuple(cols.shape) != (n, c * kh * kw, oh * ow):
        raise ValueError(f"cols has shape {tuple(cols.shape)}, but x_shape {tuple(x_shape)} with this "
                         f"geometry needs {(n, c * kh * kw, oh * ow)}")
    padded = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    view = cols.reshape(n, c, kh, kw, oh, ow)
    for i in range(kh):
        for j in range(kw):
            # += : overlapping windows each add their share to the same pixel
            padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += view[:, :, i, j]
    result = padded[:, :, pt:pt + h, pl:pl + w]
    if out is None:
        return xp.ascontiguousarray(result)
    check_out(out, tuple(x_shape), cols.dtype)[...] = result
    return out
