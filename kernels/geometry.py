"""Shared geometry of im2col/col2im: the arguments every implementation takes, checked once.

    kernel  = (kh, kw)
    padding = ((top, bottom), (left, right))     zeros added around each image
    stride  = (sh, sw)
    OH = (H + top + bottom - kh) // sh + 1       (floored: rows that do not fit a whole
    OW = (W + left + right - kw) // sw + 1        window are never read)
"""
from __future__ import annotations


def as_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair of ints."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return (value, value)
    try:
        a, b = value
        return (int(a), int(b))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def as_padding(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """An int p, a pair (ph, pw), or explicit ((top, bottom), (left, right))."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        result = ((padding, padding), (padding, padding))
    else:
        try:
            first, second = padding
        except (TypeError, ValueError):
            raise ValueError(f"padding must be an int, (ph, pw) or ((top, bottom), (left, right)); "
                             f"got {padding!r}") from None
        result = (as_pair(first, "padding"), as_pair(second, "padding"))
    if min(result[0] + result[1]) < 0:
        raise ValueError(f"padding must not be negative, got {padding!r}")
    return result


def normalize(x_shape, kernel, padding, stride):
    """Check the geometry; return (kernel, padding, stride, (OH, OW)) in canonical form."""
    kh, kw = as_pair(kernel, "kernel")
    sh, sw = as_pair(stride, "stride")
    (pt, pb), (pl, pr) = pad = as_padding(padding)
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel sizes must be >= 1, got {(kh, kw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"strides must be >= 1, got {(sh, sw)}")
    if len(x_shape) != 4:
        raise ValueError(f"expected an (N, C, H, W) shape, got {tuple(x_shape)}")
    _, _, h, w = x_shape
    oh = (h + pt + pb - kh) // sh + 1
    ow = (w + pl + pr - kw) // sw + 1
    if h + pt + pb < kh or w + pl + pr < kw:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {h}x{w} image padded by {pad}: "
                         f"use a larger input or more padding")
    return (kh, kw), pad, (sh, sw), (oh, ow)


def cols_shape(x_shape, kernel, padding, stride):
    """The (N, C*kh*kw, OH*OW) shape of im2col's output."""
    (kh, kw), _, _, (oh, ow) = normalize(x_shape, kernel, padding, stride)
    n, c = x_shape[:2]
    return (n, c * kh * kw, oh * ow)


def check_out(out, shape, dtype, array_type=None):
    """Return ``out`` if it can receive a result of ``shape`` and ``dtype``, else raise.

    A reused buffer must be C-contiguous: the kernels write it through flat indices, and a
    reshape of a non-contiguous array would silently be a copy that the result never reaches.
    """
    if array_type is not None and not isinstance(out, array_type):
        raise TypeError(f"out must be a {array_type.__module__}.{array_type.__name__}, "
                        f"got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; this call needs "
                         f"shape {tuple(shape)} and dtype {dtype}")
    if not is_c_contiguous(out):
        raise ValueError("out must be C-contiguous (a fresh xp.empty(shape, dtype) is)")
    return out


def is_c_contiguous(a) -> bool:
    """True when ``a`` (NumPy, CuPy or a Numba device array: anything with shape, strides
    and dtype) lays its elements out in C order without gaps."""
    expected = a.dtype.itemsize
    for size, stride in zip(reversed(a.shape), reversed(a.strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
