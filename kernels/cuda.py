"""im2col and col2im as Numba CUDA kernels for arrays in GPU memory.

Same signature, same column layout and same results as reference.py (see its docstring)::

    cols[n, (c*kh + i)*kw + j, oh*OW + ow] = x_padded[n, c, oh*sh + i, ow*sw + j]
    x: (N, C, H, W)      cols: (N, C*kh*kw, OH*OW)

The arrays are taken as they come, through ``__cuda_array_interface__``: CuPy arrays (what
tinyunet uses) and Numba device arrays alike, without a copy. The result is allocated like the
input (a CuPy array for CuPy input). Under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) plain
NumPy arrays are accepted too, so the kernels' logic is tested on machines without a GPU.

* im2col: one thread per column element. Consecutive threads write consecutive columns of one
  row, so the writes coalesce; a thread whose source lies in the padding writes 0.
* col2im: one thread per *input* pixel, which gathers every column element that was read from
  it: the windows (i, j) with (y + top - i) and (x + left - j) divisible by the stride and
  inside the output. Each thread owns its pixel, so there are no atomics, and it adds in the
  order (i, j) = (0, 0), (0, 1), ... like reference.py: the result is deterministic and equal
  to the reference's bit for bit.

Both kernels loop with a grid stride, so any size runs on a bounded grid, and index in
unsigned 32 bits where every index is below 2**31 (a 64-bit build otherwise: index_type).
They run on CuPy's current stream, and the Numba views of CuPy arrays are made without a
stream wait (as_cuda_array(sync=False)): a call blocks nothing.
At import, Numba's CUDA target must compile and run a one-line kernel (why_unusable); if it
cannot, the ImportError says why, and the dispatcher serves CuPy arrays with reference.py,
saying so once (kernels.KernelFallbackWarning).
Proof: tests/test_kernels_cuda.py (the simulator on tiny inputs, and real CuPy arrays where a
GPU exists).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from numba import config as _numba_config
from numba import cuda

from tinyunet.backend import get_array_module, is_gpu_array

from .geometry import check_out, is_c_contiguous, normalize

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)


def why_unusable(api) -> str | None:
    """None when Numba's CUDA target ``api`` (numba.cuda) compiles and runs a kernel, else why not.

    Counting devices is not enough: Numba compiles with NVVM (libnvvm, from a CUDA toolkit or
    the numba-cuda[cu12] wheels), which can be missing where the driver and the GPU answer.
    So this compiles a one-line kernel, launches it and reads its result back.
    """
    try:
        if not api.is_available():
            return "no CUDA driver or no GPU (numba.cuda.is_available() is False)"

        @api.jit
        def write_seven(out):
            out[0] = 7

        out = api.device_array(1, dtype=np.int32)
        with warnings.catch_warnings():           # a one-block launch: Numba's occupancy advice
            warnings.filterwarnings("ignore", message="Grid size")
            write_seven[1, 1](out)
        got = int(out.copy_to_host()[0])
    except Exception as error:                    # NVVM or the driver missing, a launch failure
        return f"a first Numba CUDA kernel failed: {type(error).__name__}: {error}"
    return None if got == 7 else f"a first Numba CUDA kernel wrote {got} instead of 7"


def unusable_message(reason: str) -> str:
    """The ImportError's one line: the reason, and the two ways out."""
    return (f"Numba's CUDA target cannot be used here: {reason}. On a GPU machine, "
            f"pip install -e \".[gpu]\" brings numba-cuda[cu12] with NVVM, the compiler it needs; "
            f"without a GPU, NUMBA_ENABLE_CUDASIM=1 runs these kernels in the simulator")


# TINYUNET_CUDA_COMPILE_ONLY=1 skips the check: for compiling these kernels to PTX where no GPU
# is (tests/test_kernels_cuda.py::test_the_32_bit_build_compiles_to_32_bit_divisions).
if not SIMULATOR and os.environ.get("TINYUNET_CUDA_COMPILE_ONLY") != "1":
    _reason = why_unusable(cuda)
    if _reason is not None:
        # The dispatcher catches this and serves GPU arrays with reference.py, saying so once.
        raise ImportError(unusable_message(_reason))

# cuda.to_device's array type: a real device array, or the simulator's stand-in for one
_NUMBA_DEVICE_ARRAY = cuda.devicearray.FakeCUDAArray if SIMULATOR else cuda.devicearray.DeviceNDArray
THREADS_PER_BLOCK = 32 if SIMULATOR else 256   # the simulator runs one Python thread each
MAX_BLOCKS = 8 if SIMULATOR else 65535


# -- index arithmetic ---------------------------------------------------------------------------
#
# Every flat index t is split into coordinates with // and %, which the GPU has no instruction
# for: each is a software routine, about twice as long in 64 bits as in 32. cuda.grid(1) is a
# 64-bit integer, and Numba widens every integer operation to 64 bits, so the kernels below are
# built for one index type I and cast each result back to it: I(a // b) on two unsigned 32-bit
# values compiles to one 32-bit division (LLVM narrows a division of zero-extended operands).
# Unsigned, because a signed floor division needs sign fix-ups, and because mixing signed with
# unsigned 64-bit integers would make Numba compute in float64; the signed pixel coordinates
# (which go negative in the padding) are formed in int64 only after the divisions.
#
# 32 bits serve while every index fits below 2**31, as CuPy's own kernels do: then t + the grid
# size (< 2**24) cannot wrap 2**32 either. Larger arrays get the 64-bit build.

INDEX_LIMIT_32 = 2 ** 31


def index_type(*sizes: int):
    """np.uint32 when every size (an element count a kernel indexes) is below 2**31, else
    np.uint64. Tests: tests/test_kernels_cuda.py::test_index_type_*."""
    return np.uint32 if max(int(s) for s in sizes) < INDEX_LIMIT_32 else np.uint64


def _build_kernels(I):
    """(im2col kernel, col2im kernel) indexing in the unsigned integer type I."""

    @cuda.jit
    def im2col_kernel(x, cols, kh, kw, top, left, sh, sw, out_h, out_w):
        h, w = x.shape[2], x.shape[3]
        kk, kw_, ow = I(kh * kw), I(kw), I(out_w)
        rows, plane = I(cols.shape[1]), I(cols.shape[2])
        per_image = I(rows * plane)
        total = I(I(cols.shape[0]) * per_image)
        t, step = I(cuda.grid(1)), I(cuda.gridsize(1))
        while t < total:
            b = I(t // per_image)
            r = I(I(t // plane) % rows)
            q = I(t % plane)
            ch = I(r // kk)
            i = I(I(r // kw_) % I(kh))
            j = I(r % kw_)
            row = np.int64(I(q // ow)) * sh + np.int64(i) - top
            col = np.int64(I(q % ow)) * sw + np.int64(j) - left
            if 0 <= row < h and 0 <= col < w:
                cols[b, r, q] = x[b, ch, row, col]
            else:
                cols[b, r, q] = 0
            t = I(t + step)

    @cuda.jit
    def col2im_kernel(cols, x, kh, kw, top, left, sh, sw, out_h, out_w, zero):
        c, h, w = I(x.shape[1]), I(x.shape[2]), I(x.shape[3])
        hw = I(h * w)
        chw = I(c * hw)
        total = I(I(x.shape[0]) * chw)
        kh_, kw_, sh_, sw_, oh, ow = I(kh), I(kw), I(sh), I(sw), I(out_h), I(out_w)
        t, step = I(cuda.grid(1)), I(cuda.gridsize(1))
        while t < total:
            b = I(t // chw)
            ch = I(I(t // hw) % c)
            y = I(I(t // w) % h)
            xx = I(t % w)
            acc = zero                          # zero of cols' dtype: no float64 detour
            for i in range(kh):
                ty = np.int64(y) + top - i      # = oy * sh for the window row oy that read y
                if ty < 0:
                    continue
                tyu = I(ty)
                if I(tyu % sh_) != 0 or I(tyu // sh_) >= oh:
                    continue
                for j in range(kw):
                    tx = np.int64(xx) + left - j
                    if tx < 0:
                        continue
                    txu = I(tx)
                    if I(txu % sw_) != 0 or I(txu // sw_) >= ow:
                        continue
                    row = I(I(I(ch * kh_) + I(i)) * kw_ + I(j))
                    acc += cols[b, row, I(I(I(tyu // sh_) * ow) + I(txu // sw_))]
            x[b, ch, y, xx] = acc
            t = I(t + step)

    return im2col_kernel, col2im_kernel


_KERNELS = {np.uint32: _build_kernels(np.uint32), np.uint64: _build_kernels(np.uint64)}


# -- launching --------------------------------------------------------------------------------

def _device_view(a, name: str):
    """What the kernels index, without a copy: a Numba view of a CuPy array (made once here,
    not by every launch), a Numba device array as it is, or a NumPy array in the simulator."""
    if is_gpu_array(a):
        # sync=False: CuPy exports its current stream in __cuda_array_interface__, and Numba
        # would wait for it on every view (two blocking waits per call, ~100 per U-Net step).
        # Not needed: _launch runs the kernel on that same stream, after the work that made a.
        return cuda.as_cuda_array(a, sync=False)
    if isinstance(a, _NUMBA_DEVICE_ARRAY) or hasattr(a, "__cuda_array_interface__"):
        return a
    if SIMULATOR and isinstance(a, np.ndarray):
        return a
    raise TypeError(f"the CUDA kernels take GPU arrays (CuPy, or anything with "
                    f"__cuda_array_interface__), got {type(a).__name__} for {name}; move it with "
                    f"tinyunet.backend.to_device(a, 'gpu') or use the 'cpu' implementation")


def _empty_like_input(a, shape, dtype):
    """A fresh result array of the input's kind: CuPy for CuPy, Numba device array, NumPy."""
    xp = get_array_module(a)
    if xp is not np:
        return xp.empty(shape, dtype=dtype)
    if isinstance(a, np.ndarray):        # simulator only (_device_view refused it otherwise)
        return np.empty(shape, dtype=dtype)
    return cuda.device_array(shape, dtype=dtype)


def _launch(kernel, size, source, *args):
    """Run ``kernel`` over ``size`` elements on the stream CuPy is using, if any."""
    blocks = max(1, min(MAX_BLOCKS, -(-size // THREADS_PER_BLOCK)))
    xp = get_array_module(source)
    if xp is not np and not SIMULATOR:
        pointer = xp.cuda.get_current_stream().ptr
        stream = cuda.external_stream(pointer) if pointer else cuda.default_stream()
        kernel[blocks, THREADS_PER_BLOCK, stream](*args)
    else:
        kernel[blocks, THREADS_PER_BLOCK](*args)


def _contiguous(a, name: str):
    """``a`` in C order: CuPy and NumPy arrays are copied if needed, others must already be."""
    if is_c_contiguous(a):
        return a
    if is_gpu_array(a) or isinstance(a, np.ndarray):
        return get_array_module(a).ascontiguousarray(a)
    raise ValueError(f"{name} must be C-contiguous")


def im2col(x, kernel, padding, stride, out=None):
    """x: (N, C, H, W) on the GPU -> cols: (N, C*kh*kw, OH*OW) on the GPU (into ``out`` when
    given: C-contiguous, that shape, x's dtype). Layout: module docstring and reference.py."""
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x.shape, kernel, padding, stride)
    x = _contiguous(x, "x")
    n, c = x.shape[:2]
    shape = (n, c * kh * kw, oh * ow)
    out = _empty_like_input(x, shape, x.dtype) if out is None else check_out(out, shape, x.dtype)
    im2col_kernel = _KERNELS[index_type(x.size, int(np.prod(shape)))][0]
    _launch(im2col_kernel, int(np.prod(shape)), x,
            _device_view(x, "x"), _device_view(out, "out"), kh, kw, top, left, sh, sw, oh, ow)
    return out


def col2im(cols, x_shape, kernel, padding, stride, out=None):
    """cols: (N, C*kh*kw, OH*OW) on the GPU -> x: (N, C, H, W), each pixel the sum of every
    window that read it (into ``out`` when given: C-contiguous, x_shape, cols' dtype)."""
    (kh, kw), ((top, _), (left, _)), (sh, sw), (oh, ow) = normalize(x_shape, kernel, padding, stride)
    n, c = x_shape[:2]
    if tuple(cols.shape) != (n, c * kh * kw, oh * ow):
        raise ValueError(f"cols has shape {tuple(cols.shape)}, but x_shape {tuple(x_shape)} with this "
                         f"geometry needs {(n, c * kh * kw, oh * ow)}")
    cols = _contiguous(cols, "cols")
    shape = tuple(int(s) for s in x_shape)
    out = _empty_like_input(cols, shape, cols.dtype) if out is None else check_out(out, shape, cols.dtype)
    zero = np.dtype(cols.dtype).type(0)
    col2im_kernel = _KERNELS[index_type(cols.size, int(np.prod(shape)))][1]
    _launch(col2im_kernel, int(np.prod(shape)), cols,
            _device_view(cols, "cols"), _device_view(out, "out"), kh, kw, top, left, sh, sw, oh, ow, zero)
    return out
