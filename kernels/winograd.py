"""Winograd's minimal filtering F(2x2, 3x3) and F(4x4, 3x3): a 3x3 stride-1 convolution with
2.25x (4x) fewer multiplications than im2col + GEMM, and its backward as the same steps run
in reverse.

Lavin and Gray (2016), "Fast Algorithms for Convolutional Neural Networks". Cut the output
into 2x2 tiles; the tile at (2i, 2j) reads the 4x4 input patch d at rows 2i..2i+3 and columns
2j..2j+3 of the zero-padded input. For one input channel and one filter g (3x3),

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* element-wise on 4x4; Y is the 2x2 tile)

gives the tile's four outputs exactly (in exact arithmetic) with 16 multiplications instead of
36. With the matrices below, write U = G g G^T (per filter f and channel c), V = B^T d B (per
channel c and tile t), and the sum over channels becomes 16 matrix products, one per position
k = (a, b) of the 4x4 grid:

    U: (16, F, C)    V: (16, C, T)    M[k] = U[k] @ V[k]: (16, F, T)    Y = A^T M A per tile

T = N * tiles_h * tiles_w. Those products do 16 F C T = 4 F C N OH OW multiply-adds, against
9 F C N OH OW for im2col: the saving that pays for the three transforms.

Backward. Every step above is linear, so its gradient is its transpose, in reverse order:

    dM = A dY A^T                    (per tile: the transpose of the output transform)
    dU[k] = dM[k] @ V[k]^T           (16 products, summed over tiles: the weight gradient in
    dg = G^T dU G                     the transformed space, then back to 3x3)
    dV[k] = U[k]^T @ dM[k]           (16 products)
    dd = B dV B^T, added into dx     (patches overlap by 2 rows and columns: a pixel gets the
                                      sum of every patch that read it, as col2im)

The same holds for larger tiles. F(4x4, 3x3) cuts the output into 4x4 tiles read from 6x6
patches (every 4 pixels, overlapping by 2): 36 products, one per position of the 6x6 grid, on
a quarter as many tiles, so 36 F C T = 2.25 F C N OH OW multiply-adds, and V and M hold 36
numbers per 16 pixels instead of 16 per 4. Its matrices have larger entries (2, 4, 5, 8,
1/6, 1/24), which costs precision: float32 results are within about 1e-5 of the exact ones
instead of 5e-7. Every function below takes ``tile`` = 2 (the default) or 4; the conv layer
picks 4 for large images (tinyunet/layers/conv.py, ``_winograd_tile``).

This module holds the matrices and the six transforms (weights, input, output, and the
backward of each), every one twice: ``*_reference`` written with array slicing, einsum and
tensordot (NumPy and CuPy: the oracle), and a Numba kernel for NumPy arrays that does it in
one pass over memory (the weight transform instead: one matrix product with the Kronecker
product G (x) G). ``weight_transform``, ``input_transform`` and the others pick the kernel
for NumPy arrays and the reference otherwise, as tinyunet.kernels does for im2col
(TINYUNET_KERNELS=reference forces the reference).
Tests: tests/test_winograd.py (each kernel against its reference, the transforms against the
direct convolution, and the adjoint identities).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module

from . import forced

try:  # Numba is a dependency, but the reference works without it
    from numba import get_num_threads, njit, prange
except ImportError:  # pragma: no cover
    njit = None

#: G: (4, 3), the filter transform; B^T: (4, 4), the input transform; A^T: (2, 4), the output
#: transform (Lavin and Gray, F(2x2, 3x3), with the interpolation points 0, 1, -1).
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
BT = np.array([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
AT = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])

#: F(4x4, 3x3): 4x4 output tiles from 6x6 patches, with the points 0, 1, -1, 2, -2 (Lavin and
#: Gray): 36 multiplications per tile instead of 144, so the 36 products below do 2.25 multiply-
#: adds per output where F(2x2, 3x3) does 4 and im2col 9; the price is rounding: the larger
#: coefficients lose about 3 more bits in float32 (relative error ~1e-5 instead of ~5e-7).
G4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
BT4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=float)
AT4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=float)

#: output tile size m -> (G, B^T, A^T); a tile reads an (m + 2) x (m + 2) patch
TILINGS = {2: (G, BT, AT), 4: (G4, BT4, AT4)}


def tiles(out_h: int, out_w: int, tile: int = 2) -> tuple[int, int]:
    """Tiles per column and per row: a size that is not a multiple of the tile gets a last
    tile partly outside."""
    return -(-out_h // tile), -(-out_w // tile)


# -- the filters ---------------------------------------------------------------------------------

def weight_transform_reference(weight, tile: int = 2):
    """weight g: (F, C, 3, 3) -> U: (a^2, F, C), U[i*a + j] = (G g G^T)[i, j], a = tile + 2."""
    xp = get_array_module(weight)
    g = xp.asarray(TILINGS[tile][0], dtype=weight.dtype)
    right = xp.tensordot(weight, g, axes=([3], [1]))                  # g G^T: (F, C, 3, a)
    u = xp.tensordot(g, right, axes=([1], [2]))                       # G g G^T: (a, F, C, a)
    return xp.ascontiguousarray(u.transpose(0, 3, 1, 2)).reshape(-1, *weight.shape[:2])


def weight_transform_backward_reference(du_t, tile: int = 2):
    """dU^T: (a^2, C, F) (the layout the conv's backward computes) -> dg: (F, C, 3, 3) =
    G^T dU G, the transpose of weight_transform."""
    xp = get_array_module(du_t)
    g = xp.asarray(TILINGS[tile][0], dtype=du_t.dtype)
    a = tile + 2
    du = du_t.transpose(0, 2, 1).reshape(a, a, du_t.shape[2], du_t.shape[1])     # (a, a, F, C)
    left = xp.tensordot(g, du, axes=([0], [0]))                       # G^T dU: (3i, a, F, C)
    dg = xp.tensordot(left, g, axes=([1], [0]))                       # G^T dU G: (3i, F, C, 3j)
    return xp.ascontiguousarray(dg.transpose(1, 2, 0, 3))


# -- the data transforms, reference versions: slicing and einsum (NumPy or CuPy) -----------------

def _padded_for_tiles(x, top, left, tiles_h, tiles_w, tile=2):
    """x with top/left zeros, and enough zeros below and right for every tile's patch."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, tile * tiles_h + 2, tile * tiles_w + 2), dtype=x.dtype)
    rows, cols = min(h, out.shape[2] - top), min(w, out.shape[3] - left)
    out[:, :, top:top + rows, left:left + cols] = x[:, :, :rows, :cols]
    return out


def input_transform_reference(x, top, left, tiles_h, tiles_w, tile: int = 2):
    """x: (N, C, H, W) -> V: (a^2, C, T), V[:, c, t] = B^T d B for the patch d of tile t."""
    xp = get_array_module(x)
    n, c = x.shape[:2]
    a = tile + 2
    padded = _padded_for_tiles(x, top, left, tiles_h, tiles_w, tile)
    patches = xp.stack([xp.stack([padded[:, :, i:i + tile * tiles_h:tile, j:j + tile * tiles_w:tile]
                                  for j in range(a)], -1) for i in range(a)], -2)    # (N, C, th, tw, a, a)
    bt = xp.asarray(TILINGS[tile][1], dtype=x.dtype)
    v = xp.einsum("ka,nctuab,lb->klcntu", bt, patches, bt)                # (a, a, C, N, th, tw)
    return xp.ascontiguousarray(v.reshape(a * a, c, n * tiles_h * tiles_w))


def output_transform_reference(m, n, out_h, out_w, bias=None, tile: int = 2):
    """M: (a^2, F, T) -> y: (N, F, OH, OW), each tile A^T M A, plus bias (F,) if given."""
    xp = get_array_module(m)
    f, a = m.shape[1], tile + 2
    th, tw = tiles(out_h, out_w, tile)
    at = xp.asarray(TILINGS[tile][2], dtype=m.dtype)
    y = xp.einsum("ak,klfntu,bl->nftaub", at, m.reshape(a, a, f, n, th, tw), at)   # (N, F, th, m, tw, m)
    y = y.reshape(n, f, tile * th, tile * tw)[:, :, :out_h, :out_w]
    if bias is not None:
        y = y + bias[:, None, None]
    return xp.ascontiguousarray(y)


def output_transform_backward_reference(dy, tile: int = 2):
    """dY: (N, F, OH, OW) -> dM: (a^2, F, T) = A dY A^T per tile (outputs past OH, OW are 0)."""
    xp = get_array_module(dy)
    n, f, out_h, out_w = dy.shape
    th, tw = tiles(out_h, out_w, tile)
    full = xp.zeros((n, f, tile * th, tile * tw), dtype=dy.dtype)
    full[:, :, :out_h, :out_w] = dy
    at = xp.asarray(TILINGS[tile][2], dtype=dy.dtype)
    dm = xp.einsum("ak,nftaub,bl->klfntu", at, full.reshape(n, f, th, tile, tw, tile), at)
    return xp.ascontiguousarray(dm.reshape((tile + 2) ** 2, f, n * th * tw))


def input_transform_backward_reference(dv, x_shape, top, left, tiles_h, tiles_w, tile: int = 2):
    """dV: (a^2, C, T) -> dx: (N, C, H, W), each patch's B dV B^T added where it was read."""
    xp = get_array_module(dv)
    n, c, h, w = x_shape
    a = tile + 2
    bt = xp.asarray(TILINGS[tile][1], dtype=dv.dtype)
    dd = xp.einsum("ka,klcntu,lb->nctuab", bt, dv.reshape(a, a, c, n, tiles_h, tiles_w), bt)
    padded = xp.zeros((n, c, tile * tiles_h + 2, tile * tiles_w + 2), dtype=dv.dtype)
    for i in range(a):
        for j in range(a):
            padded[:, :, i:i + tile * tiles_h:tile, j:j + tile * tiles_w:tile] += dd[..., i, j]
    dx = xp.zeros(x_shape, dtype=dv.dtype)
    rows, cols = min(h, padded.shape[2] - top), min(w, padded.shape[3] - left)
    dx[:, :, :rows, :cols] = padded[:, :, top:top + rows, left:left + cols]
    return dx


# -- the four data transforms as Numba kernels: one pass, every core ------------------------------
# Work is split so that no two threads write the same element: by (image, channel) plane for
# the transforms that read or write planes, and V / M are written at [k, channel, tile].
#
# Their constants are float32: Numba types a bare 4 as int64 and 0.5 as float64, and either
# times float32 is float64 there, so `4 * d` in a float32 kernel would widen every value to
# float64 and back (half the vector lanes, plus the conversions: F(4x4) kernels ran up to 1.5x
# slower so). A float32 constant times float64 data is still exact float64 arithmetic.
HALF, TWO, FOUR, FIVE, EIGHT = np.float32(0.5), np.float32(2), np.float32(4), np.float32(5), np.float32(8)

if njit is not None:
    @njit(cache=True, inline="always")
    def _load_row(dst, plane, row, count):
        """dst[:count] = plane[row, :count], or zeros where row lies outside the plane (padding
        above or below, or past the last output row)."""
        if 0 <= row < plane.shape[0]:
            src = plane[row]
            for e in range(count):
                dst[e] = src[e]
        else:
            for e in range(count):
                dst[e] = 0

    # Each task keeps its plane's share of V (or M, dV, dM) in a local array, tiles: (a^2,
    # tiles_h * tiles_w), copied in or out one whole row of T per k. Read or written a tile row
    # at a time, straight in V, the a^2 short runs per tile row are as many interleaved streams
    # through memory: the F(4x4) input backward ran up to 1.6x slower so (128 channels at
    # 128x128; 1.0-1.15x on smaller planes), the writers 1.1-1.2x. The kernels that write
    # build each group of a outputs per tile in a small buffer (one row per k), which _put_rows
    # copies into tiles: stored straight into four or six views of one array, the values went
    # where LLVM could not prove the views apart, and it left that loop scalar (1.3-3x slower).
    @njit(cache=True, inline="always")
    def _tiles_in(tiles, big, ch, first):
        """tiles[k] = big[k, ch, first:first + T] for every k; tiles: (a^2, T)."""
        for k in range(tiles.shape[0]):
            src = big[k, ch, first:first + tiles.shape[1]]
            dst = tiles[k]
            for t in range(tiles.shape[1]):
                dst[t] = src[t]

    @njit(cache=True, inline="always")
    def _tiles_out(big, ch, first, tiles):
        """big[k, ch, first:first + T] = tiles[k] for every k; tiles: (a^2, T)."""
        for k in range(tiles.shape[0]):
            src = tiles[k]
            dst = big[k, ch, first:first + tiles.shape[1]]
            for t in range(tiles.shape[1]):
                dst[t] = src[t]

    @njit(cache=True, inline="always")
    def _put_rows(tiles, first, col, small):
        """tiles[first + q, col:col + w] = small[q] for each row q of small: (rows, w)."""
        for q in range(small.shape[0]):
            dst = tiles[first + q, col:col + small.shape[1]]
            src = small[q]
            for j in range(small.shape[1]):
                dst[j] = src[j]

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _input_kernel(x, v, top, left, tiles_h, tiles_w):
        """One tile row at a time: its 4 input rows copied into a zero-padded buffer, B^T down
        the columns for the whole row at once, then B along each tile's 4 columns. Every loop
        runs over contiguous or stride-2 memory, so LLVM vectorises it."""
        n, c, h, w = x.shape
        width = 2 * tiles_w + 2
        copied = min(w, width - left)                # image columns that land in the buffer
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            rows = np.zeros((4, width), dtype=x.dtype)
            down = np.empty((4, width), dtype=x.dtype)
            out = np.empty((4, tiles_w), dtype=x.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((16, tiles_h * tiles_w), dtype=x.dtype)
            for i in range(tiles_h):
                for a in range(4):
                    _load_row(rows[a, left:left + copied], x[b, ch], 2 * i + a - top, copied)
                for e in range(width):                       # B^T d, every column at once
                    r0, r1, r2, r3 = rows[0, e], rows[1, e], rows[2, e], rows[3, e]
                    down[0, e] = r0 - r2
                    down[1, e] = r1 + r2
                    down[2, e] = r2 - r1
                    down[3, e] = r1 - r3
                col = i * tiles_w
                for a in range(4):                           # (B^T d) B, tile by tile
                    src = down[a]
                    for j in range(tiles_w):
                        d0, d1, d2, d3 = src[2 * j], src[2 * j + 1], src[2 * j + 2], src[2 * j + 3]
                        out[0, j] = d0 - d2
                        out[1, j] = d1 + d2
                        out[2, j] = d2 - d1
                        out[3, j] = d1 - d3
                    _put_rows(tiles, 4 * a, col, out)
            _tiles_out(v, ch, t0, tiles)

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _output_kernel(m, y, bias, has_bias):
        """One tile row at a time: M A along each row of the 4x4 tiles (two outputs per tile,
        written side by side into a row buffer), then A^T down the columns for the whole row."""
        n, f, out_h, out_w = y.shape
        tiles_h, tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            add = bias[ch if has_bias else 0]  # bias[0] is the caller's 0 without one
            across = np.empty((4, 2 * tiles_w), dtype=m.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((16, tiles_h * tiles_w), dtype=m.dtype)
            _tiles_in(tiles, m, ch, t0)
            for i in range(tiles_h):
                col = i * tiles_w
                for a in range(4):                           # M A, tile by tile
                    m0 = tiles[4 * a, col:col + tiles_w]
                    m1 = tiles[4 * a + 1, col:col + tiles_w]
                    m2 = tiles[4 * a + 2, col:col + tiles_w]
                    m3 = tiles[4 * a + 3, col:col + tiles_w]
                    dst = across[a]
                    for j in range(tiles_w):
                        dst[2 * j] = m0[j] + m1[j] + m2[j]
                        dst[2 * j + 1] = m1[j] - m2[j] - m3[j]
                top_row = y[b, ch, 2 * i]                    # A^T (M A), the whole row at once
                for e in range(out_w):
                    top_row[e] = across[0, e] + across[1, e] + across[2, e] + add
                if 2 * i + 1 < out_h:
                    bottom_row = y[b, ch, 2 * i + 1]
                    for e in range(out_w):
                        bottom_row[e] = across[1, e] - across[2, e] - across[3, e] + add

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _output_backward_kernel(dy, dm):
        """One tile row at a time, as _input_kernel: A down the columns of the two dy rows
        (A's rows: (1, 0), (1, 1), (1, -1), (0, -1)), then A^T along each tile's 2 columns."""
        n, f, out_h, out_w = dy.shape
        tiles_h, tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            rows = np.zeros((2, 2 * tiles_w), dtype=dy.dtype)     # past out_w: stays 0
            down = np.empty((4, 2 * tiles_w), dtype=dy.dtype)
            out = np.empty((4, tiles_w), dtype=dy.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((16, tiles_h * tiles_w), dtype=dy.dtype)
            for i in range(tiles_h):
                for a in range(2):
                    _load_row(rows[a], dy[b, ch], 2 * i + a, out_w)
                for e in range(2 * tiles_w):                 # A g, every column at once
                    g0, g1 = rows[0, e], rows[1, e]
                    down[0, e] = g0
                    down[1, e] = g0 + g1
                    down[2, e] = g0 - g1
                    down[3, e] = -g1
                col = i * tiles_w
                for a in range(4):                           # (A g) A^T, tile by tile
                    src = down[a]
                    for j in range(tiles_w):
                        r0, r1 = src[2 * j], src[2 * j + 1]
                        out[0, j] = r0
                        out[1, j] = r0 + r1
                        out[2, j] = r0 - r1
                        out[3, j] = -r1
                    _put_rows(tiles, 4 * a, col, out)
            _tiles_out(dm, ch, t0, tiles)

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _input_backward_kernel(dv, dx, top, left, tiles_h, tiles_w):
        """One tile row at a time: dV B^T along each tile's row (neighbouring tiles overlap by
        two columns: tile j's last two outputs add to tile j+1's first two), then B down the
        columns for the whole row, added into the plane (tile rows overlap by two rows)."""
        n, c, h, w = dx.shape
        width = 2 * tiles_w + 2
        copied = min(w, width - left)                # image columns the buffer covers
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            plane = dx[b, ch]
            for yy in range(h):
                for xx in range(w):
                    plane[yy, xx] = 0
            across = np.empty((4, width), dtype=dv.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((16, tiles_h * tiles_w), dtype=dv.dtype)
            _tiles_in(tiles, dv, ch, t0)
            for i in range(tiles_h):
                col = i * tiles_w
                for a in range(4):                           # dV B^T, overlapping tiles added
                    v0 = tiles[4 * a, col:col + tiles_w]
                    v1 = tiles[4 * a + 1, col:col + tiles_w]
                    v2 = tiles[4 * a + 2, col:col + tiles_w]
                    v3 = tiles[4 * a + 3, col:col + tiles_w]
                    dst = across[a]
                    dst[0] = v0[0]
                    dst[1] = v1[0] - v2[0] + v3[0]
                    for j in range(1, tiles_w):
                        dst[2 * j] = v0[j] + v1[j - 1] + v2[j - 1] - v0[j - 1]
                        dst[2 * j + 1] = v1[j] - v2[j] + v3[j] - v3[j - 1]
                    last = tiles_w - 1
                    dst[2 * tiles_w] = v1[last] + v2[last] - v0[last]
                    dst[2 * tiles_w + 1] = -v3[last]
                for a in range(4):                           # B (dV B^T), added row by row
                    row = 2 * i + a - top
                    if row < 0 or row >= h:
                        continue
                    target = plane[row]
                    x0, x1, x2, x3 = across[0], across[1], across[2], across[3]
                    if a == 0:
                        for e in range(copied):
                            target[e] += x0[left + e]
                    elif a == 1:
                        for e in range(copied):
                            target[e] += x1[left + e] - x2[left + e] + x3[left + e]
                    elif a == 2:
                        for e in range(copied):
                            target[e] += x1[left + e] + x2[left + e] - x0[left + e]
                    else:
                        for e in range(copied):
                            target[e] -= x3[left + e]


if njit is not None:
    @njit(cache=True, inline="always")
    def _gt_rows(d0, d1, d2, d3):
        """G^T applied to one column of four values: three (G's rows: (1, 0, 0), (1/2, 1/2, 1/2),
        (1/2, -1/2, 1/2), (0, 0, 1))."""
        return d0 + HALF * (d1 + d2), HALF * (d1 - d2), HALF * (d1 + d2) + d3

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _weight_backward_kernel(du_t, dg):
        """dU^T: (16, C, F) -> dg: (F, C, 3, 3), one input channel c at a time with all its
        filters at once: G^T dU G as sums of whole rows along f (contiguous in dU^T), then the
        9 results of each f scattered into dg."""
        c_count, f_count = du_t.shape[1:]
        for c in prange(c_count):
            s = np.empty((3, 4, f_count), dtype=du_t.dtype)        # G^T dU: down each column
            for b in range(4):
                d0, d1, d2, d3 = du_t[b, c], du_t[4 + b, c], du_t[8 + b, c], du_t[12 + b, c]
                for f in range(f_count):
                    s[0, b, f], s[1, b, f], s[2, b, f] = _gt_rows(d0[f], d1[f], d2[f], d3[f])
            out = np.empty((9, f_count), dtype=du_t.dtype)         # (G^T dU) G: along each row
            for i in range(3):
                row = s[i]
                for f in range(f_count):
                    out[3 * i, f], out[3 * i + 1, f], out[3 * i + 2, f] = _gt_rows(row[0, f], row[1, f],
                                                                                   row[2, f], row[3, f])
            for f in range(f_count):
                g = dg[f, c]
                for k in range(9):
                    g[k // 3, k % 3] = out[k, f]


    # -- F(4x4, 3x3), written out: B^T (6x6), A^T (4x6) and their transposes, row by row -----

    @njit(cache=True, inline="always")
    def _bt4(d0, d1, d2, d3, d4, d5):
        """B^T of F(4x4, 3x3) applied to a column of six values."""
        return (FOUR * d0 - FIVE * d2 + d4, d3 + d4 - FOUR * (d1 + d2), FOUR * (d1 - d2) - d3 + d4,
                TWO * (d3 - d1) - d2 + d4, TWO * (d1 - d3) - d2 + d4, FOUR * d1 - FIVE * d3 + d5)

    @njit(cache=True, inline="always")
    def _at4(m0, m1, m2, m3, m4, m5):
        """A^T of F(4x4, 3x3) applied to a column of six values: four."""
        return (m0 + m1 + m2 + m3 + m4, m1 - m2 + TWO * (m3 - m4), m1 + m2 + FOUR * (m3 + m4),
                m1 - m2 + EIGHT * (m3 - m4) + m5)

    @njit(cache=True, inline="always")
    def _a4(g0, g1, g2, g3):
        """A (the transpose of A^T) applied to a column of four values: six."""
        return (g0, g0 + g1 + g2 + g3, g0 - g1 + g2 - g3, g0 + TWO * g1 + FOUR * g2 + EIGHT * g3,
                g0 - TWO * g1 + FOUR * g2 - EIGHT * g3, g3)

    @njit(cache=True, inline="always")
    def _b4(e0, e1, e2, e3, e4, e5):
        """B (the transpose of B^T) applied to a column of six values."""
        return (FOUR * e0, FOUR * (e2 - e1 + e5) + TWO * (e4 - e3), -FIVE * e0 - FOUR * (e1 + e2) - e3 - e4,
                e1 - e2 + TWO * (e3 - e4) - FIVE * e5, e0 + e1 + e2 + e3 + e4, e5)

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _input_kernel4(x, v, top, left, tiles_h, tiles_w):
        """As _input_kernel, for 6x6 patches every 4 pixels."""
        n, c, h, w = x.shape
        width = 4 * tiles_w + 2
        copied = min(w, width - left)
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            rows = np.zeros((6, width), dtype=x.dtype)
            down = np.empty((6, width), dtype=x.dtype)
            out = np.empty((6, tiles_w), dtype=x.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((36, tiles_h * tiles_w), dtype=x.dtype)
            for i in range(tiles_h):
                for r in range(6):
                    _load_row(rows[r, left:left + copied], x[b, ch], 4 * i + r - top, copied)
                for e in range(width):                       # B^T d, every column at once
                    (down[0, e], down[1, e], down[2, e], down[3, e], down[4, e],
                     down[5, e]) = _bt4(rows[0, e], rows[1, e], rows[2, e], rows[3, e], rows[4, e], rows[5, e])
                col = i * tiles_w
                for a in range(6):                           # (B^T d) B, tile by tile
                    src = down[a]
                    for j in range(tiles_w):
                        out[0, j], out[1, j], out[2, j], out[3, j], out[4, j], out[5, j] = _bt4(
                            src[4 * j], src[4 * j + 1], src[4 * j + 2], src[4 * j + 3], src[4 * j + 4], src[4 * j + 5])
                    _put_rows(tiles, 6 * a, col, out)
            _tiles_out(v, ch, t0, tiles)

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _output_kernel4(m, y, bias, has_bias):
        """As _output_kernel, for 4x4 tiles."""
        n, f, out_h, out_w = y.shape
        tiles_h, tiles_w = (out_h + 3) // 4, (out_w + 3) // 4
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            add = bias[ch if has_bias else 0]  # bias[0] is the caller's 0 without one
            across = np.empty((6, 4 * tiles_w), dtype=m.dtype)
            spare = np.empty(out_w, dtype=m.dtype)               # rows past out_h land here
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((36, tiles_h * tiles_w), dtype=m.dtype)
            _tiles_in(tiles, m, ch, t0)
            for i in range(tiles_h):
                col = i * tiles_w
                for a in range(6):                           # M A, tile by tile
                    m0, m1, m2 = tiles[6 * a, col:col + tiles_w], tiles[6 * a + 1, col:col + tiles_w], \
                        tiles[6 * a + 2, col:col + tiles_w]
                    m3, m4, m5 = tiles[6 * a + 3, col:col + tiles_w], tiles[6 * a + 4, col:col + tiles_w], \
                        tiles[6 * a + 5, col:col + tiles_w]
                    dst = across[a]
                    for j in range(tiles_w):
                        dst[4 * j], dst[4 * j + 1], dst[4 * j + 2], dst[4 * j + 3] = _at4(m0[j], m1[j], m2[j], m3[j],
                                                                                          m4[j], m5[j])
                r0 = y[b, ch, 4 * i]                         # A^T (M A), four rows at once
                r1 = y[b, ch, 4 * i + 1] if 4 * i + 1 < out_h else spare
                r2 = y[b, ch, 4 * i + 2] if 4 * i + 2 < out_h else spare
                r3 = y[b, ch, 4 * i + 3] if 4 * i + 3 < out_h else spare
                for e in range(out_w):
                    o0, o1, o2, o3 = _at4(across[0, e], across[1, e], across[2, e], across[3, e], across[4, e],
                                          across[5, e])
                    r0[e] = o0 + add
                    r1[e] = o1 + add
                    r2[e] = o2 + add
                    r3[e] = o3 + add

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _output_backward_kernel4(dy, dm):
        """As _output_backward_kernel, for 4x4 tiles: A down the columns, A^T's transpose along."""
        n, f, out_h, out_w = dy.shape
        tiles_h, tiles_w = (out_h + 3) // 4, (out_w + 3) // 4
        for task in prange(n * f):
            b = task // f
            ch = task - b * f
            rows = np.zeros((4, 4 * tiles_w), dtype=dy.dtype)     # past out_w: stays 0
            down = np.empty((6, 4 * tiles_w), dtype=dy.dtype)
            out = np.empty((6, tiles_w), dtype=dy.dtype)
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((36, tiles_h * tiles_w), dtype=dy.dtype)
            for i in range(tiles_h):
                for q in range(4):
                    _load_row(rows[q], dy[b, ch], 4 * i + q, out_w)
                for e in range(4 * tiles_w):                 # A g, every column at once
                    (down[0, e], down[1, e], down[2, e], down[3, e], down[4, e],
                     down[5, e]) = _a4(rows[0, e], rows[1, e], rows[2, e], rows[3, e])
                col = i * tiles_w
                for a in range(6):                           # (A g) A^T, tile by tile
                    src = down[a]
                    for j in range(tiles_w):
                        out[0, j], out[1, j], out[2, j], out[3, j], out[4, j], out[5, j] = _a4(
                            src[4 * j], src[4 * j + 1], src[4 * j + 2], src[4 * j + 3])
                    _put_rows(tiles, 6 * a, col, out)
            _tiles_out(dm, ch, t0, tiles)

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _input_backward_kernel4(dv, dx, top, left, tiles_h, tiles_w):
        """As _input_backward_kernel, for 6x6 patches every 4 pixels (neighbours overlap by 2)."""
        n, c, h, w = dx.shape
        width = 4 * tiles_w + 2
        copied = min(w, width - left)
        for task in prange(n * c):
            b = task // c
            ch = task - b * c
            plane = dx[b, ch]
            for yy in range(h):
                for xx in range(w):
                    plane[yy, xx] = 0
            across = np.empty((6, width), dtype=dv.dtype)
            out = np.zeros((6, tiles_w + 1), dtype=dv.dtype)     # out[4:, 0] stays 0: no tile before
            t0 = b * tiles_h * tiles_w
            tiles = np.empty((36, tiles_h * tiles_w), dtype=dv.dtype)
            _tiles_in(tiles, dv, ch, t0)
            for i in range(tiles_h):
                col = i * tiles_w
                for a in range(6):                           # dV B^T, overlapping tiles added
                    v0, v1, v2 = tiles[6 * a, col:col + tiles_w], tiles[6 * a + 1, col:col + tiles_w], \
                        tiles[6 * a + 2, col:col + tiles_w]
                    v3, v4, v5 = tiles[6 * a + 3, col:col + tiles_w], tiles[6 * a + 4, col:col + tiles_w], \
                        tiles[6 * a + 5, col:col + tiles_w]
                    for j in range(tiles_w):                 # per tile: six columns
                        out[0, j], out[1, j], out[2, j], out[3, j], out[4, j + 1], out[5, j + 1] = _b4(
                            v0[j], v1[j], v2[j], v3[j], v4[j], v5[j])
                    dst = across[a]
                    for j in range(tiles_w):                 # tile j's first four + tile j-1's last two
                        dst[4 * j] = out[0, j] + out[4, j]
                        dst[4 * j + 1] = out[1, j] + out[5, j]
                        dst[4 * j + 2] = out[2, j]
                        dst[4 * j + 3] = out[3, j]
                    dst[width - 2] = out[4, tiles_w]
                    dst[width - 1] = out[5, tiles_w]
                for r in range(6):                           # B (dV B^T), added row by row
                    row = 4 * i + r - top
                    if row < 0 or row >= h:
                        continue
                    target = plane[row]
                    x0, x1, x2 = across[0, left:left + copied], across[1, left:left + copied], across[2, left:left + copied]
                    x3, x4, x5 = across[3, left:left + copied], across[4, left:left + copied], across[5, left:left + copied]
                    if r == 0:
                        for e in range(copied):
                            target[e] += FOUR * x0[e]
                    elif r == 1:
                        for e in range(copied):
                            target[e] += FOUR * (x2[e] - x1[e] + x5[e]) + TWO * (x4[e] - x3[e])
                    elif r == 2:
                        for e in range(copied):
                            target[e] -= FIVE * x0[e] + FOUR * (x1[e] + x2[e]) + x3[e] + x4[e]
                    elif r == 3:
                        for e in range(copied):
                            target[e] += x1[e] - x2[e] + TWO * (x3[e] - x4[e]) - FIVE * x5[e]
                    elif r == 4:
                        for e in range(copied):
                            target[e] += x0[e] + x1[e] + x2[e] + x3[e] + x4[e]
                    else:
                        for e in range(copied):
                            target[e] += x5[e]

    # -- the weight transform's backward for any tile size, with G read from an array (F(4x4,
    # 3x3) uses it; it equals the written-out F(2x2, 3x3) one above: tests/test_winograd.py) --

    @njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def _weight_backward_kernel_any(du_t, dg, g):
        """dU^T: (a^2, C, F) -> dg: (F, C, 3, 3), as _weight_backward_kernel, for G: (a, 3)."""
        c_count, f_count = du_t.shape[1:]
        a = g.shape[0]
        for c in prange(c_count):
            s = np.zeros((3, a, f_count), dtype=du_t.dtype)      # G^T dU
            for i in range(3):
                for l in range(a):
                    dst = s[i, l]
                    for k in range(a):
                        coef = g[k, i]
                        if coef != 0:
                            src = du_t[k * a + l, c]
                            for f in range(f_count):
                                dst[f] += coef * src[f]
            out = np.zeros((9, f_count), dtype=du_t.dtype)       # (G^T dU) G
            for i in range(3):
                for j in range(3):
                    dst = out[3 * i + j]
                    for l in range(a):
                        coef = g[l, j]
                        if coef != 0:
                            src = s[i, l]
                            for f in range(f_count):
                                dst[f] += coef * src[f]
            for f in range(f_count):
                w = dg[f, c]
                for k in range(9):
                    w[k // 3, k % 3] = out[k, f]


def weight_transform(weight, tile: int = 2):
    """weight g: (F, C, 3, 3) -> U: (a^2, F, C), U[i*a + j] = (G g G^T)[i, j], a = tile + 2.

    One matrix product: (G g G^T)[i, j] = sum_{p, q} G[i, p] G[j, q] g[p, q], the same (a^2, 9)
    matrix (G (x) G, the Kronecker product) for every (f, c) pair, so U = (G (x) G) @ g with g
    as (9, F*C). BLAS streams it on every core at memory speed; the Numba kernel it replaced
    (taps gathered per filter, then G down and across) took 1.5-5x longer (512x1024 weights:
    10.9 vs 4.2 ms, the best of five runs each, side by side)."""
    if not _fast(weight):
        return weight_transform_reference(weight, tile)
    f, c = weight.shape[:2]
    g = TILINGS[tile][0]
    kron = np.kron(g, g).astype(weight.dtype)                            # (a^2, 9)
    return np.matmul(kron, weight.reshape(f * c, 9).T).reshape(-1, f, c)


def weight_transform_backward(du_t, tile: int = 2):
    """dU^T: (a^2, C, F) -> dg: (F, C, 3, 3) = G^T dU G, a fresh array."""
    if not _fast(du_t):
        return weight_transform_backward_reference(du_t, tile)
    du_t = np.ascontiguousarray(du_t)
    dg = np.empty((du_t.shape[2], du_t.shape[1], 3, 3), dtype=du_t.dtype)
    if tile == 2:
        _weight_backward_kernel(du_t, dg)
    else:
        _weight_backward_kernel_any(du_t, dg, np.asarray(TILINGS[tile][0], dtype=du_t.dtype))
    return dg


def _fast(*arrays) -> bool:
    return njit is not None and forced() != "reference" and all(isinstance(a, np.ndarray) for a in arrays)


# -- the a^2 products between the transforms ----------------------------------------------------
# M[k] = U[k] @ V[k] forward; dU^T[k] = V[k] @ dM[k]^T and dV[k] = U[k]^T @ dM[k] backward.
# np.matmul hands each of the 16 or 36 products to OpenBLAS, whose own threads split it, while
# the transforms before and after run on Numba's threads: on two cores every hand-over between
# the two pools wakes a sleeping thread (75-80 us on the development VM) and the pools' threads
# contend for the cores. With more than one Numba thread the products run on Numba's pool
# instead, one product per task, each a single-threaded BLAS call (np.dot inside Numba calls
# SciPy's OpenBLAS, a library apart from NumPy's; _scipy_blas_on_one_thread holds it to one
# thread for the whole process, or this path is not taken). Together with a short spin of
# Numba's idle threads (GOMP_SPINCOUNT, tinyunet/__init__.py) a SegNet step (width 16, 128x128,
# batch 2) on two threads took 122-156 ms against 148-211 ms, four alternations each; FCN-8s
# 178-234 against 209-232 ms; the exact U-Net's 128x128 step 968-994 against 1003-1098 ms
# (examples/RESULTS.md, fourth session). On one thread np.matmul stays: there Numba's BLAS calls
# measured 1.3-1.5x slower than NumPy's.

def _scipy_blas_on_one_thread() -> bool:
    """Set SciPy's OpenBLAS (what np.dot inside Numba calls) to one thread; False where it
    cannot be found (SciPy built against another BLAS): then np.matmul serves."""
    import ctypes
    import glob
    import os
    try:
        import scipy
    except ImportError:  # pragma: no cover
        return False
    for path in glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs", "libscipy_openblas*.so*")):
        try:
            ctypes.CDLL(path).scipy_openblas_set_num_threads(1)
            return True
        except (OSError, AttributeError):
            continue
    return False


if njit is not None:
    @njit(parallel=True, cache=True, nogil=True)
    def _products_nn(a, b, out):
        for k in prange(a.shape[0]):
            np.dot(a[k], b[k], out[k])

    @njit(parallel=True, cache=True, nogil=True)
    def _products_nt(a, b, out):
        for k in prange(a.shape[0]):
            np.dot(a[k], b[k].T, out[k])

    @njit(parallel=True, cache=True, nogil=True)
    def _products_tn(a, b, out):
        for k in prange(a.shape[0]):
            np.dot(a[k].T, b[k], out[k])

_PRODUCTS_ON_NUMBA = {"ready": None}


def products(a, b, out=None, transpose_a: bool = False, transpose_b: bool = False):
    """out[k] = op(a[k]) @ op(b[k]) for every k, op the transpose where asked; a, b: (K, ., .),
    out: of the result's shape or None (a fresh array). NumPy arrays, C-contiguous, float32 or
    float64, with more than one Numba thread: Numba's tasks (above); otherwise matmul (NumPy's
    or CuPy's), which is also the reference (tests/test_winograd.py)."""
    if transpose_a and transpose_b:
        raise ValueError("products: transpose a or b, not both")
    a_op = a.transpose(0, 2, 1) if transpose_a else a
    b_op = b.transpose(0, 2, 1) if transpose_b else b
    on_numba = (_fast(a, b) and get_num_threads() > 1 and a.dtype == b.dtype and a.dtype in (np.float32, np.float64)
                and a.flags.c_contiguous and b.flags.c_contiguous
                and (out is None or (out.flags.c_contiguous and out.dtype == a.dtype)))
    if on_numba and _PRODUCTS_ON_NUMBA["ready"] is None:       # the first time it is wanted
        _PRODUCTS_ON_NUMBA["ready"] = _scipy_blas_on_one_thread()
    if not (on_numba and _PRODUCTS_ON_NUMBA["ready"]):
        xp = get_array_module(a)
        return xp.matmul(a_op, b_op) if out is None else xp.matmul(a_op, b_op, out=out)
    if out is None:
        out = np.empty((a.shape[0], a_op.shape[1], b_op.shape[2]), dtype=a.dtype)
    (_products_tn if transpose_a else _products_nt if transpose_b else _products_nn)(a, b, out)
    return out


def input_transform(x, top, left, tiles_h, tiles_w, out=None, tile: int = 2):
    """x: (N, C, H, W) -> V: (a^2, C, N*tiles_h*tiles_w) (into ``out`` when given)."""
    if not _fast(x):
        return input_transform_reference(x, top, left, tiles_h, tiles_w, tile)
    x = np.ascontiguousarray(x)
    n, c = x.shape[:2]
    v = np.empty(((tile + 2) ** 2, c, n * tiles_h * tiles_w), dtype=x.dtype) if out is None else out
    if tile == 2:
        _input_kernel(x, v, top, left, tiles_h, tiles_w)
    else:
        _input_kernel4(x, v, top, left, tiles_h, tiles_w)
    return v


def output_transform(m, n, out_h, out_w, bias=None, tile: int = 2):
    """M: (a^2, F, T) -> y: (N, F, OH, OW) + bias, a fresh array."""
    if not _fast(m):
        return output_transform_reference(m, n, out_h, out_w, bias, tile)
    y = np.empty((n, m.shape[1], out_h, out_w), dtype=m.dtype)
    has_bias = bias is not None
    bias = bias if has_bias else np.zeros(1, m.dtype)
    if tile == 2:
        _output_kernel(np.ascontiguousarray(m), y, bias, has_bias)
    else:
        _output_kernel4(np.ascontiguousarray(m), y, bias, has_bias)
    return y


def output_transform_backward(dy, out=None, tile: int = 2):
    """dY: (N, F, OH, OW) -> dM: (a^2, F, T) (into ``out`` when given)."""
    if not _fast(dy):
        return output_transform_backward_reference(dy, tile)
    dy = np.ascontiguousarray(dy)
    n, f, out_h, out_w = dy.shape
    th, tw = tiles(out_h, out_w, tile)
    dm = np.empty(((tile + 2) ** 2, f, n * th * tw), dtype=dy.dtype) if out is None else out
    if tile == 2:
        _output_backward_kernel(dy, dm)
    else:
        _output_backward_kernel4(dy, dm)
    return dm


def input_transform_backward(dv, x_shape, top, left, tiles_h, tiles_w, tile: int = 2):
    """dV: (a^2, C, T) -> dx: (N, C, H, W), a fresh array."""
    if not _fast(dv):
        return input_transform_backward_reference(dv, x_shape, top, left, tiles_h, tiles_w, tile)
    dx = np.empty(tuple(int(s) for s in x_shape), dtype=dv.dtype)
    if tile == 2:
        _input_backward_kernel(np.ascontiguousarray(dv), dx, top, left, tiles_h, tiles_w)
    else:
        _input_backward_kernel4(np.ascontiguousarray(dv), dx, top, left, tiles_h, tiles_w)
    return dx
