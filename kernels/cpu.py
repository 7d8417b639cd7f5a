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
* Large float32 outputs (STREAM_MIN_BYTES and up: more than the last-level cache holds)
  are written with streaming (non-temporal) stores, 64 bytes at a time. An ordinary store
  first reads the cache line it writes into, so a 302 MB column matrix costs 604 MB of
  memory traffic; a streaming store skips that read and does not evict what the cache holds.
  Measured here (64 channels at 256x256, batch 2, 3x3, stride 1, one process): 7.7-8.7 ms
  against 11.2-12.6 ms with ordinary stores, and 7.3-7.4 ms for a streaming fill of the same
  302 MB (write_streaming, below: no kernel can write its output faster). Small outputs keep
  ordinary stores: the matrix product that follows wants them in the cache. (No column
  matrix of a U-Net training step at 128x128 or 256x256 is that large: its 3x3 convs from
  16x16 up use Winograd. Direct calls on large inputs, as in kernels/bench.py, are.)
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

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .geometry import check_out, normalize

LANES = 16                   # float32 numbers in one 64-byte cache line (one streaming store)
STREAM_MIN_BYTES = 32 << 20  # outputs at least this large bypass the cache (see docstring)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


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


# -- streaming stores ----------------------------------------------------------------------
# Numba has no vector type, so the 64-byte store is written in LLVM IR: one unaligned
# 16-float load, one aligned store marked !nontemporal (x86: vmovntps).

def _is_float32_vector(array):
    return isinstance(array, types.Array) and array.ndim == 1 and array.dtype == types.float32


@intrinsic
def _stream16(typingctx, dst, d, src, s):
    """dst[d:d + 16] = src[s:s + 16], float32, as one non-temporal store: dst[d] must lie on
    a 64-byte boundary, src[s] anywhere. No bounds checks: the caller keeps both in range."""
    if not (_is_float32_vector(dst) and _is_float32_vector(src)
            and isinstance(d, types.Integer) and isinstance(s, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(ir.FloatType(), LANES).as_pointer()
        dst_array = context.make_array(signature.args[0])(context, builder, args[0])
        src_array = context.make_array(signature.args[2])(context, builder, args[2])
        d_index = context.cast(builder, args[1], signature.args[1], types.intp)
        s_index = context.cast(builder, args[3], signature.args[3], types.intp)
        values = builder.load(builder.bitcast(builder.gep(src_array.data, [s_index]), vector), align=4)
        store = builder.store(values, builder.bitcast(builder.gep(dst_array.data, [d_index]), vector), align=64)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(dst, d, src, s), codegen


@intrinsic
def _store_fence(typingctx):
    """Order this thread's streaming stores before anything it does next: they are weakly
    ordered, and the threads' results are read by others once the parallel loop ends."""
    def codegen(context, builder, signature, args):
        if _X86:   # sfence: LLVM lowers a generic fence to a locked add, not meant for these stores
            sfence = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, inline="always")
def _gather(buffer, start, count, plane, oy, ow, out_w, i, top, shift, sh, sw, h, w):
    """buffer[start:start + count] = the column row's numbers from output pixel (oy, ow) on,
    one at a time, by the definition: the input pixel each reads through offset (i, j), or 0
    in the padding. For the few numbers that cannot be streamed straight from an image row."""
    for k in range(count):
        row = oy * sh + i - top
        col = ow * sw + shift
        buffer[start + k] = plane[row * w + col] if 0 <= row < h and 0 <= col < w else 0
        ow += 1
        if ow == out_w:
            ow = 0
            oy += 1


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _im2col_stream_kernel(x, cols, kh, kw, top, left, sh, sw, out_h, out_w, head0):
    """_im2col_kernel's result written with streaming stores; float32 only.

    Each column row is cut at its 64-byte boundaries: ``head`` numbers before the first one
    (head0 for the first row of cols, head0 - row * OH*OW mod 16 for the others) and a tail
    after the last one get ordinary stores; every 16 numbers between them, one streaming
    store. A chunk that lies in one output row is streamed straight from the image row (or
    as zeros where that row is padding); one that crosses an output row or the image's edge
    is first gathered, number by number, into a small buffer (so is the head and the tail).
    """
    n, c, h, w = x.shape
    rows = c * kh * kw
    length = out_h * out_w
    for task in prange(n * rows):          # one task per column row: disjoint writes
        b = task // rows
        r = task - b * rows
        i = (r // kw) % kh
        j = r % kw
        lo, hi = _interval(w, out_w, left, j, sw)
        shift = j - left
        plane = x[b, r // (kh * kw)].reshape(h * w)
        dst = cols[b, r]
        chunk = np.empty(LANES, dtype=np.float32)
        zeros = np.zeros(LANES, dtype=np.float32)
        head = min((head0 - task * length) % LANES, length)
        _gather(dst, 0, head, plane, 0, 0, out_w, i, top, shift, sh, sw, h, w)
        p = head
        oy = head // out_w                 # p = oy*OW + o, advanced without a division
        o = head - oy * out_w
        while p + LANES <= length:
            row = oy * sh + i - top
            if o + LANES <= out_w and (row < 0 or row >= h):
                _stream16(dst, p, zeros, 0)
            elif o + LANES <= out_w and sw == 1 and lo <= o and o + LANES <= hi:
                _stream16(dst, p, plane, row * w + o + shift)
            else:
                _gather(chunk, 0, LANES, plane, oy, o, out_w, i, top, shift, sh, sw, h, w)
                _stream16(dst, p, chunk, 0)
            p += LANES
            o += LANES
            while o >= out_w:
                o -= out_w
                oy += 1
        _gather(dst, p, length - p, plane, oy, o, out_w, i, top, shift, sh, sw, h, w)
        _store_fence()


@njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _write_kernel(flat, source, size, head):
    """flat[q] = source[q % size]; source holds size + 16 numbers (its first 16 again at its
    end), so that the 16 read for a chunk never wrap around."""
    chunks = (flat.size - head) // LANES
    span = 4096                                 # 256 KB of streaming stores per task
    for task in prange((chunks + span - 1) // span):
        for t in range(task * span, min(chunks, (task + 1) * span)):
            q = head + t * LANES
            _stream16(flat, q, source, q % size)
        _store_fence()                          # each thread orders its own stores
    for q in range(head):
        flat[q] = source[q % size]
    for q in range(head + chunks * LANES, flat.size):
        flat[q] = source[q % size]


def _numbers_before_boundary(array) -> int:
    """How many float32 numbers of ``array`` (aligned to 4 bytes) come before its first
    64-byte boundary: the head that the streaming kernels write with ordinary stores."""
    return (-(array.ctypes.data // array.itemsize)) % LANES


def write_streaming(out, source):
    """out.flat[q] = source[q % source.size] with streaming stores: how fast this machine can
    write memory at all, the roof for im2col's output (kernels/bench.py measures it with a
    random source: some memory systems write constants, zeros above all, faster).
    out: C-contiguous float32; source: 1-D float32, a multiple of 16 numbers long.
    Test: tests/test_kernels.py::test_write_streaming_sets_every_number."""
    if out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.aligned:
        raise ValueError(f"write_streaming takes a C-contiguous, aligned float32 out, got {out.dtype}"
                         f"{'' if out.flags.c_contiguous else ', not C-contiguous'}"
                         f"{'' if out.flags.aligned else ', not on a 4-byte boundary'}")
    if source.dtype != np.float32 or source.ndim != 1 or source.size == 0 or source.size % LANES:
        raise ValueError(f"write_streaming's source must be 1-D float32 with a multiple of {LANES} "
                         f"numbers, got {source.dtype} of shape {source.shape}")
    flat = out.reshape(-1)
    wrapped = np.concatenate([source, source[:LANES]])
    _write_kernel(flat, wrapped, source.size, min(_numbers_before_boundary(out), flat.size))
    return out


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
    if streams(out, sw):
        head0 = _numbers_before_boundary(out)
        _im2col_stream_kernel(x, out, kh, kw, top, left, sh, sw, oh, ow, head0)
    else:
        _im2col_kernel(x, out, kh, kw, top, left, sh, sw, oh, ow)
    return out


def streams(out, stride_w) -> bool:
    """Whether im2col writes ``out`` with streaming stores: float32, at least STREAM_MIN_BYTES,
    stride 1 along the width (other strides gather every chunk number by number), and aligned.
    Tests: tests/test_kernels.py::test_cpu_im2col_with_streaming_stores_equals_reference and
    ::test_im2col_into_a_misaligned_out_takes_ordinary_stores."""
    return (out.dtype == np.float32 and out.nbytes >= STREAM_MIN_BYTES and stride_w == 1
            and out.flags.aligned)       # a float32 off a 4-byte boundary never meets a 64-byte one


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
