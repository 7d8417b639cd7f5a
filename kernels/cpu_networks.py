"""Numba CPU kernels for the layers FCN and SegNet add: batch normalisation in training mode,
max-unpooling, and the ceil-rounded max-pool without its padded copy.

Each kernel computes what the layer's NumPy expression computes (the layer file holds that
expression, the reference, and the derivation), in fewer passes over memory, without
temporaries, on every core. They are called only where ``cpu_layers.serves(...)`` says so
(NumPy, C-contiguous, large enough, Numba importable, the reference not forced), so the NumPy
path stays the oracle, serves CuPy arrays and runs where Numba is missing.

    batchnorm_train_forward    tinyunet/layers/batchnorm.py, training mode: one task per
                               channel, the mean and the (biased) variance in two passes with
                               float64 accumulators, then xhat and y in a third; NumPy makes
                               about seven passes and three full-size temporaries
    batchnorm_train_backward   the same layer's backward: sum dy and sum dy * xhat in one
                               pass (float64), dx in a second; NumPy: about eight passes
    unpool_forward/backward    tinyunet/layers/unpool.py: one task per plane, zero + scatter,
                               and the gather; NumPy's fancy indexing builds an index array
                               of (planes, positions) pairs first
    ceil_maxpool_forward       tinyunet/layers/pool.py, CeilMaxPool2d: windows clipped at the
    ceil_maxpool_backward      bottom/right edge instead of an input padded with -inf (a full
                               copy per call), the flat indices for MaxUnpool2d in the same
                               pass; the backward writes dx at the unpadded size directly

Exactness. The pool and unpool kernels move values, so they equal the NumPy path bit for bit
(ties and NaN included: the same strict ``>`` in the same window order; a clipped window is
the padded one minus the -inf entries, which never win). The batch-norm kernels sum in a
different order (float64 accumulators instead of NumPy's pairwise float32 sums), so they
agree to rounding: tests/test_network_kernels.py holds them to 1e-12 in float64 and 1e-5 in
float32, and the float64 gradient checks and PyTorch oracles pass through them.
"""
from __future__ import annotations

import numpy as np

from .cpu_layers import njit, prange

if njit is not None:
    # -- batch normalisation, training mode (tinyunet/layers/batchnorm.py) -------------------
    # fastmath "reassoc" only lets LLVM split the float64 sums into vector lanes (a serial
    # float sum cannot be vectorized without reassociation); nothing else is relaxed
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
    def batchnorm_train_forward(x, gamma, beta, eps, xhat, y, mean, var):
        """x, xhat, y: (N, C, P) with P = H*W; gamma, beta: (C,); writes mean, var: (C,) float64.

        Per channel c over its m = N*P values: mu = sum x / m; var = sum (x - mu)^2 / m
        (biased, two passes: no cancellation); xhat = (x - mu) / sqrt(var + eps);
        y = gamma * xhat + beta."""
        n, c, p = x.shape
        m = n * p
        for ch in prange(c):
            total = 0.0
            for b in range(n):
                row = x[b, ch]
                for i in range(p):
                    total += row[i]
            mu = total / m
            squares = 0.0
            for b in range(n):
                row = x[b, ch]
                for i in range(p):
                    d = row[i] - mu
                    squares += d * d
            v = squares / m
            inv_std = 1.0 / np.sqrt(v + eps)
            g, shift = gamma[ch], beta[ch]
            for b in range(n):
                row, xh, out = x[b, ch], xhat[b, ch], y[b, ch]
                for i in range(p):
                    value = (row[i] - mu) * inv_std
                    xh[i] = value
                    out[i] = g * xh[i] + shift         # from the stored (rounded) xhat, as NumPy
            mean[ch] = mu
            var[ch] = v

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
    def batchnorm_train_backward(dy, xhat, gamma, inv_std, dx, dgamma, dbeta):
        """dy, xhat, dx: (N, C, P); gamma, inv_std: (C,); writes dgamma, dbeta: (C,) float64.

        dbeta = sum dy, dgamma = sum dy * xhat, and with dxhat = dy * gamma the module's
        dx = s * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
           = gamma * s * (dy - dbeta / m - xhat * dgamma / m)."""
        n, c, p = dy.shape
        m = n * p
        for ch in prange(c):
            sum_dy = 0.0
            sum_dy_xhat = 0.0
            for b in range(n):
                d, xh = dy[b, ch], xhat[b, ch]
                for i in range(p):
                    sum_dy += d[i]
                    sum_dy_xhat += d[i] * xh[i]
            dbeta[ch] = sum_dy
            dgamma[ch] = sum_dy_xhat
            scale = gamma[ch] * inv_std[ch]
            mean_dy, mean_dy_xhat = sum_dy / m, sum_dy_xhat / m
            for b in range(n):
                d, xh, out = dy[b, ch], xhat[b, ch], dx[b, ch]
                for i in range(p):
                    out[i] = scale * (d[i] - mean_dy - xh[i] * mean_dy_xhat)

    # -- max-unpooling (tinyunet/layers/unpool.py) ----------------------------------------------
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def unpool_forward(x, indices, y):
        """x, indices: (P, Q); y: (P, H*W): y[p] = 0, y[p, indices[p, q]] = x[p, q] (in q order,
        as NumPy's assignment: a repeated index keeps the last value)."""
        planes, q = x.shape
        size = y.shape[1]
        for p in prange(planes):
            out = y[p]
            for i in range(size):
                out[i] = 0
            for j in range(q):
                out[indices[p, j]] = x[p, j]

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def unpool_backward(dy, indices, dx):
        """dy: (P, H*W), indices: (P, Q) -> dx: (P, Q), dx[p, q] = dy[p, indices[p, q]]."""
        planes, q = dx.shape
        for p in prange(planes):
            for j in range(q):
                dx[p, j] = dy[p, indices[p, j]]

    # -- ceil-rounded max-pooling (tinyunet/layers/pool.py, CeilMaxPool2d) ---------------------
    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def ceil_maxpool_forward(x, y, argmax, indices, k, s, want_indices):
        """x: (P, H, W) -> y, argmax (int8 window offset i*k + j), and when want_indices the
        flat positions in the H x W plane (int64): (P, OH, OW). A window that hangs over the
        bottom/right edge takes the max of what it covers (every window starts inside).

        The 2x2/2 windows of FCN and SegNet have their own loop, four comparisons written out
        (about 4x faster than the general loop, whose trip counts LLVM cannot see): a clipped
        window reads its last row or column twice instead, which changes nothing, since a
        value equal to one already seen never passes the strict ``>``."""
        planes, out_h, out_w = y.shape
        _, h, w = x.shape
        for p in prange(planes):
            plane = x[p]
            if k == 2 and s == 2:
                for oh in range(out_h):
                    top = 2 * oh
                    row0, row1 = plane[top], plane[top + 1 if top + 1 < h else top]
                    out, where_out = y[p, oh], argmax[p, oh]
                    for ow in range(out_w):
                        left = 2 * ow
                        right = left + 1 if left + 1 < w else left
                        best = row0[left]
                        where = 0
                        if row0[right] > best:        # strict: a tie keeps the first
                            best = row0[right]
                            where = 1
                        if row1[left] > best:
                            best = row1[left]
                            where = 2
                        if row1[right] > best:
                            best = row1[right]
                            where = 3
                        out[ow] = best
                        where_out[ow] = where
            else:
                for oh in range(out_h):
                    top = oh * s
                    rows = min(k, h - top)
                    for ow in range(out_w):
                        left = ow * s
                        cols = min(k, w - left)
                        best = plane[top, left]
                        where = 0
                        for i in range(rows):
                            for j in range(cols):
                                value = plane[top + i, left + j]
                                if value > best:      # strict: a tie keeps the first
                                    best = value
                                    where = i * k + j
                        y[p, oh, ow] = best
                        argmax[p, oh, ow] = where
            if want_indices:
                for oh in range(out_h):
                    for ow in range(out_w):
                        where = argmax[p, oh, ow]
                        indices[p, oh, ow] = (oh * s + where // k) * w + ow * s + where % k

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def ceil_maxpool_backward(dy, argmax, dx, k):
        """Disjoint windows (stride = kernel): dy, argmax: (P, OH, OW) -> dx: (P, H, W), each
        dy at its window's argmax, every other element 0 (the windows tile the plane, the last
        ones clipped at the edge; an argmax always lies inside). The plane is zeroed in one
        flat loop (vectorized) and then gets one write per window: cheaper than testing every
        element against its window's argmax."""
        planes, out_h, out_w = dy.shape
        _, h, w = dx.shape
        for p in prange(planes):
            plane = dx[p].reshape(h * w)
            for i in range(h * w):
                plane[i] = 0
            for oh in range(out_h):
                for ow in range(out_w):
                    where = argmax[p, oh, ow]
                    plane[(oh * k + where // k) * w + ow * k + where % k] = dy[p, oh, ow]
