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

Both kernels loop with a grid stride, so any size runs on a bounded grid.
Proof: tests/test_kernels_cuda.py (the simulator on tiny inputs, and real CuPy arrays where a
GPU exists).
"""
from __future__ import annotations

import numpy as np
from numba import config as _numba_config
from numba import cuda

from tinyunet.backend import get_array_module, is_gpu_array

from .geometry import check_out, is_c_contiguous, normalize

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)
if not SIMULATOR and not cuda.is_available():
    # The dispatcher catches this and serves GPU arrays with reference.py instead.
    raise ImportError("Numba's CUDA target cannot be used here (no driver or no GPU); "
                      "set NUMBA_ENABLE_CUDASIM=1 to run these kernels in the simulator")

# cuda.to_device's array type: a real device array, or the simulator's stand-in for one
_NUMBA_DEVICE_ARRAY = cuda.devicearray.FakeCUDAArray if SIMULATOR else cuda.devicearray.DeviceNDArray
THREADS_PER_BLOCK = 32 if SIMULATOR else 256   # the simulator runs one Python thread each
MAX_BLOCKS = 8 if SIMULATOR else 65535


@cuda.jit
def _im2col_kernel(x, cols, kh, kw, top, left, sh, sw, out_h, out_w):
    n, c, h, w = x.shape
    rows = c * kh * kw
    plane = out_h * out_w
    for t in range(cuda.grid(1), n * rows * plane, cuda.gridsize(1)):
        b = t // (rows * plane)
        r = (t // plane) % rows
        q = t % plane
        ch = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        row = (q // out_w) * sh + i - top
        col = (q % out_w) * sw + j - left
        if 0 <= row < h and 0 <= col < w:
            cols[b, r, q] = x[b, ch, row, col]
        else:
            cols[b, r, q] = 0


@cuda.jit
def _col2im_kernel(cols, x, kh, kw, top, left, sh, sw, out_h, out_w, zero):
    n, c, h, w = x.shape
    for t in range(cuda.grid(1), n * c * h * w, cuda.gridsize(1)):
        b = t // (c * h * w)
        ch = (t // (h * w)) % c
        y = (t // w) % h
        xx = t % w
        total = zero                        # zero of cols' dtype: no float64 detour
        for i in range(kh):
            ty = y + top - i                # = oy * sh for the window row oy that read y
            if ty < 0 or ty % sh != 0 or ty // sh >= out_h:
                continue
            for j in range(kw):
                tx = xx + left - j
                if tx < 0 or tx % sw != 0 or tx // sw >= out_w:
                    continue
                total += cols[b, (ch * kh + i) * kw + j, (ty // sh) * out_w + tx // sw]
        x[b, ch, y, xx] = total


# -- launching --------------------------------------------------------------------------------

def _device_view(a, name: str):
    """What the kernels index, without a copy: a Numba view of a CuPy array (made once here,
    not by every launch), a Numba device array as it is, or a NumPy array in the simulator."""
    if is_gpu_array(a):
        return cuda.as_cuda_array(a)
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
    _launch(_im2col_kernel, n * c * kh * kw * oh * ow, x,
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
    _launch(_col2im_kernel, int(np.prod(shape)), cols,
            _device_view(cols, "cols"), _device_view(out, "out"), kh, kw, top, left, sh, sw, oh, ow, zero)
    return out
