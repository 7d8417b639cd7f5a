"""im2col and col2im as Numba kernels for NumPy arrays on the CPU (``@njit(parallel=True)``).

Same signature, same column layout and same results as reference.py (see its docstring)::

    cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x_padded[n, c, oh*sh + i, ow*sw + j]
    x: (N, C, H, W)      cols: (N, C*kh*kw, OH*OW)

How they are fast:

* No padded copy of x. For one column row (n, c, i, j) the output columns ``ow`` whose input
  column ``ow*sw + j - left`` falls inside the image form one interval [lo, hi), the same for
  every output row: zeros are written left of it and right of it, and the interval itself is
  a run copied from one image row (contiguous for stride 1, so LLVM turns it into vector
  moves). Output rows whose input row lies in the padding are zero-filled whole.
* Work is split across threads by column row (im2col) and by image plane (col2im), so no two
  threads ever write the same element: no atomics, no locks, and the result does not depend on
  the number of threads.
* col2im *gathers* into one (H, W) plane at a time: the plane stays in cache while all kh*kw
  column rows of its channel are added to it, in the order (i, j) = (0, 0), (0, 1), ... which
  is the order of reference.py, so the float sums are rounded identically.

Proof: tests/test_kernels.py::test_cpu_im2col_equals_reference and
::test_cpu_col2im_equals_reference (hypothesis over geometries and dtypes), and
::test_cpu_matches_naive_loops, which checks the kernels against `im2col_naive` below.

Threads: Numba uses ``numba.get_num_threads()`` workers (NUMBA_NUM_THREADS, all cores by
default). They never run at the same time as BLAS in tinyunet (a conv runs im2col, then the
matrix product), so both may use every core.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .geometry import check_out, normalize


@njit(cache=True, inline="always")
def _interval(width, out_width, left, j, sw):
    """[lo, hi): the output columns ow whose input column ow*sw + j - left lies in [0, width).

    lo is the smallest ow >= 0 with ow*sw >= left - j; hi - 1 the largest with
    ow*sw + j - left <= width - 1 (floor division, so it may be <= 0: then the run is empty).
    """
    need = left - j
    lo = 0 if need <= 0 else (need + sw - 1) // sw
    hi = min(out_width, (width - 1 + left - j) // sw + 1)
    return lo, max(lo, hi)


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _im2col_kernel(x, cols, kh, kw, top, left, sh, sw, out_h, out_w):
    """x: (N, C, H, W) contiguous -> cols: (N, C*kh*kw, OH*OW) contiguous, every element set."""
    n, c, h, w = x.shape
    rows = c * kh * kw
    for task in prange(n * rows):          # one task per column row: disjoint writes
        b = task // rows
        r = task - b * rows
        ch = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        lo, hi = _interval(w, out_w, left, j, sw)
        shift = j - left                    # input column = ow*sw + shift
        dst = cols[b, r]
        for oy in range(out_h):
            base = oy * out_w
            row = oy * sh + i - top
            if row < 0 or row >= h:         # the whole output row reads padding
                for o in range(out_w):
                    dst[base + o] = 0
                continue
            for o in range(lo):
                dst[base + o] = 0
            # Views starting at the run, indexed from 0 up: indices that cannot be negative
            # let LLVM drop the wrap-around test and vectorise the copy.
            run = dst[base + lo:base + hi]
            src = x[b, ch, row, lo * sw + shift:]
            if sw == 1:
                for o in range(hi - lo):
                    run[o] = src[o]
            else:
                for o in range(hi - lo):
                    run[o] = src[o * sw]
            for o in range(hi, out_w):
                dst[base + o] = 0


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _col2im_kernel(cols, x, kh, kw, top, left, sh, sw, out_h, out_w):
    """cols: (N, C*kh*kw, OH*OW) -> x: (N, C, H, W), overwritten with the sum of windows."""
    n, c, h, w = x.shape
    for task in prange(n * c):              # one task per (image, channel) plane
        b = task // c
        ch = task - b * c
        plane = x[b, ch]
        for yy in range(h):
            for xx in range(w):
                plane[yy, xx] = 0
        for i in range(kh):
            for j in range(kw):
                src = cols[b, (ch * kh + i) * kw + j]
                lo, hi = _interval(w, out_w, left, j, sw)
                shift = j - left
                for oy in range(out_h):
                    row = oy * sh + i - top
                    if row < 0 or row >= h:
                        continue
                    # views from the run's start, as in _im2col_kernel: vectorised adds
                    dst = plane[row, lo * sw + shift:]
                    run = src[oy * out_w + lo:oy * out_w + hi]
                    if sw == 1:
                        for o in range(hi - lo):
                            dst[o] += run[o]                  # += : windows overlap
                    else:
                        for o in range(hi - lo):
                            dst[o * sw] += run[o]


def _as_host_array(a, name: str):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"the Numba CPU kernels take NumPy arrays, got {type(a).__name__} for {name}; "
                        f"use tinyunet.backend.to_numpy(...) or the 'cuda'/'reference' implementation")
    return np.ascontiguousarray(a)


def im2col(x, kernel, padding, stride, out=None):
    """x: (N, C, H, W) -> cols: (N, C*kh*kw, OH*OW) (into ``out`` when given: C-contiguous,
    that shape, x's dtype). Layout and formula: module docstring and reference.py."""
    x = _as_host_array(x, "x")
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x.shape, kernel, padding, stride)
    n, c = x.shape[:2]
    shape = (n, c * kh * kw, oh * ow)
    out = np.empty(shape, dtype=x.dtype) if out is None else check_out(out, shape, x.dtype, np.ndarray)
    _im2col_kernel(x, out, kh, kw, top, left, sh, sw, oh, ow)
    return out


def col2im(cols, x_shape, kernel, padding, stride, out=None):
    """cols: (N, C*kh*kw, OH*OW) -> x: (N, C, H, W), each pixel the sum of every window that
    read it (into ``out`` when given: C-contiguous, x_shape, cols' dtype)."""
    cols = _as_host_array(cols, "cols")
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x_shape, kernel, padding, stride)
    n, c = x_shape[:2]
    expected = (n, c * kh * kw, oh * ow)
    if cols.shape != expected:
        raise ValueError(f"cols has shape {cols.shape}, but x_shape {tuple(x_shape)} with this "
                         f"geometry needs {expected}")
    shape = tuple(int(s) for s in x_shape)
    out = np.empty(shape, dtype=cols.dtype) if out is None else check_out(out, shape, cols.dtype, np.ndarray)
    _col2im_kernel(cols, out, kh, kw, top, left, sh, sw, oh, ow)
    return out


# -- the naive version: one element at a time, the definition read literally ----------------

def im2col_naive(x, kernel, padding, stride):
    """cols[n, (c*kh + i)*kw + j, oy*OW + ox] = x[n, c, oy*sh + i - top, ox*sw + j - left],
    or 0 where that lies in the padding. Pure Python loops: tiny inputs only (tests)."""
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x.shape, kernel, padding, stride)
    n, c, h, w = x.shape
    cols = np.zeros((n, c * kh * kw, oh * ow), dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for oy in range(oh):
                        for ox in range(ow):
                            row, col = oy * sh + i - top, ox * sw + j - left
                            if 0 <= row < h and 0 <= col < w:
                                cols[b, (ch * kh + i) * kw + j, oy * ow + ox] = x[b, ch, row, col]
    return cols


def col2im_naive(cols, x_shape, kernel, padding, stride):
    """The adjoint of im2col_naive, element by element: x[...] += cols[...] for every pair."""
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x_shape, kernel, padding, stride)
    n, c, h, w = x_shape
    x = np.zeros(x_shape, dtype=cols.dtype)
    for b in range(n):
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    for oy in range(oh):
                        for ox in range(ow):
                            row, col = oy * sh + i - top, ox * sw + j - left
                            if 0 <= row < h and 0 <= col < w:
                                x[b, ch, row, col] += cols[b, (ch * kh + i) * kw + j, oy * ow + ox]
    return x
