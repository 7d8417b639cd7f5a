"""Numba CPU kernels for the layers other than the convolution: ReLU, max-pooling, nearest
upsampling, Adam's update, and the data movement of the fused upsampling + 2x2 conv.

Each one computes exactly what the layer's NumPy expression computes (the layer file holds that
expression and the derivation), in one pass over memory and on every core, where NumPy makes
several passes and temporaries. The layers call them only through ``serves(...)`` below, so the
NumPy path remains the reference, serves CuPy arrays, and runs where Numba is missing.
TINYUNET_KERNELS=reference (or tinyunet.kernels.use("reference")) forces the NumPy paths.
Proofs: tests/test_fast_paths.py (each kernel against the NumPy path, bit for bit where the
operations are the same, NaN and ties included).
"""
from __future__ import annotations

import numpy as np

from . import forced

try:  # Numba is a dependency, but every layer works without it
    from numba import njit, prange
except ImportError:  # pragma: no cover
    njit = None

# Below this many elements the NumPy path serves: the work (microseconds) would cost less than
# waking the threads of a parallel kernel, and on a busy machine a parallel kernel can wait a
# whole scheduler time slice (milliseconds) for a core. Both paths give the same values.
PARALLEL_MIN_SIZE = 1 << 17


def serves(*arrays) -> bool:
    """True when the Numba CPU kernels should serve these arrays: NumPy, C-contiguous, the first
    one at least PARALLEL_MIN_SIZE elements, Numba importable, and the reference implementation
    not forced (TINYUNET_KERNELS=reference or tinyunet.kernels.use("reference"))."""
    return (njit is not None and forced() != "reference" and arrays[0].size >= PARALLEL_MIN_SIZE
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays))


if njit is not None:
    # ReLU (tinyunet/layers/activation.py)
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def relu_forward(x, y, positive):
        """Flat x -> y = max(x, 0) (NaN stays NaN, as np.maximum), positive = x > 0."""
        for i in prange(x.size):                # one flat loop: Numba splits it, LLVM vectorizes it
            value = x[i]
            positive[i] = value > 0
            y[i] = 0 if value <= 0 else value       # NaN <= 0 is False: NaN passes through

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def relu_forward_values(x, y):
        """relu_forward without the mask, for tinyunet.no_grad(); y may be x itself."""
        for i in prange(x.size):
            value = x[i]
            y[i] = 0 if value <= 0 else value

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def relu_backward(dy, positive, dx):
        """Flat dx = dy * positive (a multiply, as NumPy: NaN * 0 stays NaN)."""
        for i in prange(dy.size):
            dx[i] = dy[i] * positive[i]             # exact: a product with 1 or 0

    # max-pooling (tinyunet/layers/pool.py)
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def maxpool_forward(x, y, argmax, k, s):
        """x: (P, H, W) planes -> y, argmax: (P, OH, OW); the first maximum in row-major order."""
        planes, out_h, out_w = y.shape
        for p in prange(planes):
            for oh in range(out_h):
                for ow in range(out_w):
                    best = x[p, oh * s, ow * s]
                    where = 0
                    for i in range(k):
                        for j in range(k):
                            value = x[p, oh * s + i, ow * s + j]
                            if value > best:          # strict: a tie keeps the first
                                best = value
                                where = i * k + j
                    y[p, oh, ow] = best
                    argmax[p, oh, ow] = where

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def maxpool_forward_values(x, y, k, s):
        """maxpool_forward without the argmax, for tinyunet.no_grad(): the same comparisons
        in the same order, so the same y."""
        planes, out_h, out_w = y.shape
        for p in prange(planes):
            for oh in range(out_h):
                for ow in range(out_w):
                    best = x[p, oh * s, ow * s]
                    for i in range(k):
                        for j in range(k):
                            value = x[p, oh * s + i, ow * s + j]
                            if value > best:
                                best = value
                    y[p, oh, ow] = best

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def maxpool_backward(dy, argmax, dx, k, s):
        """dy, argmax: (P, OH, OW) -> dx: (P, H, W), every element written."""
        planes, out_h, out_w = dy.shape
        _, h, w = dx.shape
        for p in prange(planes):
            if s == k:                                # disjoint windows: write each once
                for oh in range(out_h):
                    for ow in range(out_w):
                        where = argmax[p, oh, ow]
                        for i in range(k):
                            for j in range(k):
                                dx[p, oh * k + i, ow * k + j] = dy[p, oh, ow] if i * k + j == where else 0
                for r in range(out_h * k, h):         # rows and columns the floor dropped
                    for c in range(w):
                        dx[p, r, c] = 0
                for r in range(out_h * k):
                    for c in range(out_w * k, w):
                        dx[p, r, c] = 0
            else:                                     # overlapping or gapped windows: add up
                for r in range(h):
                    for c in range(w):
                        dx[p, r, c] = 0
                for offset in range(k * k):           # the NumPy path's order: offset by offset
                    i, j = offset // k, offset % k
                    for oh in range(out_h):
                        for ow in range(out_w):
                            if argmax[p, oh, ow] == offset:
                                dx[p, oh * s + i, ow * s + j] += dy[p, oh, ow]

    # nearest upsampling (tinyunet/layers/upsample.py)
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upsample_forward(x, y, s):
        """x: (P, H, W) -> y: (P, s*H, s*W), y[p, r, c] = x[p, r // s, c // s]."""
        planes, h, w = x.shape
        for p in prange(planes):
            for r in range(h * s):
                for c in range(w):
                    value = x[p, r // s, c]
                    for b in range(s):
                        y[p, r, c * s + b] = value

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upsample_backward(dy, dx, s):
        """dy: (P, s*H, s*W) -> dx: (P, H, W), the sum of each s x s block."""
        planes, h, w = dx.shape
        for p in prange(planes):
            for r in range(h):
                for c in range(w):
                    total = dy[p, r * s, c * s]
                    for a in range(s):
                        for b in range(s):
                            if a or b:
                                total += dy[p, r * s + a, c * s + b]
                    dx[p, r, c] = total

    # Adam (tinyunet/optim.py)
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def adam(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, alpha, epsilon):
        """One Adam step over flat arrays, in place; the scalars come in the arrays' dtype."""
        for i in prange(p.size):
            gi = g[i]
            mi = m[i] * beta1 + one_minus_beta1 * gi          # as NumPy: m *= b1; m += (1-b1) g
            vi = v[i] * beta2 + one_minus_beta2 * (gi * gi)
            m[i] = mi
            v[i] = vi
            p[i] -= alpha * mi / (np.sqrt(vi) + epsilon)

    # UpConv2d's data movement (tinyunet/layers/upconv.py): the column matrix of shifted
    # copies, the phases into the output and back, and the shifted blocks of dcols into dx.
    # The matrix products between them stay with BLAS.
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upconv_columns(x, cols):
        """x: (N, C, H, W) -> cols: (4, C, N, H, W), blocks [X_01, X_00, X_10, X_11] with
        X_ab[c, n, i, j] = x[n, c, i + a, j + b], zero past the last row or column."""
        n, c, h, w = x.shape
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            for i in range(h):
                row = x[b, ch, i]
                x00, x01 = cols[1, ch, b, i], cols[0, ch, b, i]
                for j in range(w):
                    x00[j] = row[j]
                for j in range(w - 1):
                    x01[j] = row[j + 1]
                x01[w - 1] = 0
                x10, x11 = cols[2, ch, b, i], cols[3, ch, b, i]
                if i + 1 < h:
                    below = x[b, ch, i + 1]
                    for j in range(w):
                        x10[j] = below[j]
                    for j in range(w - 1):
                        x11[j] = below[j + 1]
                    x11[w - 1] = 0
                else:
                    for j in range(w):
                        x10[j] = 0
                        x11[j] = 0

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upconv_interleave(phases, bias, y):
        """phases: (2, 2, F, N, H, W) -> y: (N, F, 2H, 2W),
        y[n, f, 2i + a, 2j + b] = phases[a, b, f, n, i, j] + bias[f]."""
        f, n, h, w = phases.shape[2:]
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            add = bias[ch]
            for i in range(h):
                for a in range(2):
                    out = y[b, ch, 2 * i + a]
                    even, odd = phases[a, 0, ch, b, i], phases[a, 1, ch, b, i]
                    for j in range(w):
                        out[2 * j] = even[j] + add
                        out[2 * j + 1] = odd[j] + add

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upconv_split(dy, phases):
        """dy: (N, F, 2H, 2W) -> phases: (2, 2, F, N, H, W), the inverse of upconv_interleave
        without the bias: phases[a, b, f, n, i, j] = dy[n, f, 2i + a, 2j + b]."""
        f, n, h, w = phases.shape[2:]
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            for i in range(h):
                for a in range(2):
                    row = dy[b, ch, 2 * i + a]
                    even, odd = phases[a, 0, ch, b, i], phases[a, 1, ch, b, i]
                    for j in range(w):
                        even[j] = row[2 * j]
                        odd[j] = row[2 * j + 1]

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def upconv_gather(dcols, dx):
        """dcols: (4, C, N, H, W), blocks [dX_01, dX_00, dX_10, dX_11] -> dx: (N, C, H, W),
        dx[i, j] = dX_00[i, j] + dX_01[i, j-1] + dX_10[i-1, j] + dX_11[i-1, j-1] (terms past
        the edge left out), added in that order, as the NumPy path adds them."""
        n, c, h, w = dx.shape
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            for i in range(h):
                out = dx[b, ch, i]
                d00, d01 = dcols[1, ch, b, i], dcols[0, ch, b, i]
                out[0] = d00[0]
                for j in range(1, w):
                    out[j] = d00[j] + d01[j - 1]
                if i > 0:
                    d10, d11 = dcols[2, ch, b, i - 1], dcols[3, ch, b, i - 1]
                    out[0] += d10[0]
                    for j in range(1, w):
                        out[j] += d10[j]
                    for j in range(1, w):
                        out[j] += d11[j - 1]
