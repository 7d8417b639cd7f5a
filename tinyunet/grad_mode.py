"""Inference mode: ``with tinyunet.no_grad():`` runs forwards that keep nothing for a backward.

A layer's forward normally keeps what its backward will need (a conv its input, a ReLU its
mask, a pool its argmax: tinyunet/layers/base.py). Prediction never runs a backward, so that
memory only costs: at 512x512 the exact U-Net keeps about 1 GB of it. Inside ``no_grad()``
every layer keeps nothing (it also drops what an earlier forward kept), the U-Net lets go of
each activation as soon as the layer that reads it has run (a skip lives until its concat),
and work done only for a backward (the pool's argmax, the ReLU's mask) is skipped. Outputs
are the same numbers. A backward after such a forward raises an error that says so.

    import tinyunet
    model.eval()                       # dropout off: what prediction wants
    with tinyunet.no_grad():           # keep nothing for a backward
        logits = model.forward(x)

Why a context manager and not ``eval()``: the two are different switches, as in PyTorch.
``eval()`` changes what the forward computes (dropout off); ``no_grad()`` changes only what
it keeps. A gradient check or a saliency map runs a backward in evaluation mode, so ``eval()``
cannot imply "no backward"; and ``no_grad()`` also serves a forward in training mode whose
result is only looked at. tinyunet.infer's prediction functions use both.

The switch is per thread (as PyTorch's), so a thread that predicts does not change what
another thread's training forward keeps. Tests: tests/test_inference_mode.py.
"""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


# -- where freed arrays go inside no_grad() ---------------------------------------------------
# tinyunet/__init__.py asks glibc to serve every block from its heap and keep it there when
# freed (M_MMAP_THRESHOLD = 1 GiB): a training step reallocates the same large arrays each step
# and then finds their pages already mapped. A forward inside no_grad() instead frees each
# activation once its reader has run, and the next arrays rarely fit the holes exactly: the
# heap fragments, and at 512x512 the process held 0.87 GB at the peak for 0.56 GB of live
# arrays, parameters, workspace and imports (examples/RESULTS.md, issue 18). So while any thread
# is inside no_grad() the threshold is INFERENCE_MMAP_THRESHOLD (32 MiB, glibc's own upper
# bound for its adaptive threshold): blocks of that size or more (the large activations) are
# mapped fresh and given back to the kernel when freed. The cost is page faults on each fresh
# large array (with the transparent huge pages NumPy asks for, one per 2 MB). Smaller blocks
# stay in the heap: the Numba kernels' per-task buffers (2-10 MB) would otherwise be mapped
# and unmapped per task. (Giving the heap's free pages back on entry too, malloc_trim, did not
# lower the 512x512 peak, 0.658 GB either way, and cost 6,000 more page faults a forward.)
# Only when tinyunet made the setting (tinyunet.MALLOPT_APPLIED): a user's own malloc tuning
# is left alone. Process-wide, as malloc is, so the first thread to enter sets it and the last
# to leave puts 1 GiB back; a training forward in another thread meanwhile runs unchanged, only
# with fresh pages for its large arrays.
INFERENCE_MMAP_THRESHOLD = 32 * 2 ** 20
#
# The trim threshold. Setting the mmap threshold freezes glibc's trim threshold at its default,
# 128 KiB: whenever more than that lies free at the top of a heap, glibc gives it back to the
# kernel, from the main thread's heap and from the worker threads' alike (OpenBLAS's threads
# allocate their buffers per product, Numba's per task), and a training step faults it all in
# again the next time: a SegNet step (width 16, 128x128, batch 2) took 4,400-4,600 minor page
# faults, and a batch of 36 (16, 16) @ (16, 2178) products on two OpenBLAS threads 2.2-2.5 ms
# instead of 0.7-0.8 (examples/RESULTS.md). So the first backward of any network
# (keep_freed_memory) raises it to TRAINING_TRIM_THRESHOLD: from then on what a step frees stays
# in the process for the next step (4 faults a step). Not at import: building a model frees its
# float64 initial weights and then allocates its zero gradients (calloc, tinyunet/layers/base.py:
# zero_grad), and with the freed heap kept calloc would reuse it and write every byte, 124 MB
# resident for an exact U-Net that only predicts. Inside no_grad() it is glibc's default again.
TRAINING_TRIM_THRESHOLD = 2 ** 30
GLIBC_TRIM_THRESHOLD = 128 * 2 ** 10
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc = {"inside": 0, "lock": threading.Lock(), "libc": None, "training": False}


def _libc():
    """glibc through ctypes, or None where tinyunet did not set its malloc threshold."""
    import tinyunet                              # set up by now: grad_mode is used after import
    if not getattr(tinyunet, "MALLOPT_APPLIED", False):
        return None
    if _malloc["libc"] is None:
        import ctypes
        _malloc["libc"] = ctypes.CDLL("libc.so.6")
    return _malloc["libc"]


def _enter_inference_malloc():
    with _malloc["lock"]:
        _malloc["inside"] += 1
        if _malloc["inside"] == 1 and (libc := _libc()) is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, INFERENCE_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)


def _leave_inference_malloc():
    with _malloc["lock"]:
        _malloc["inside"] -= 1
        if _malloc["inside"] == 0 and (libc := _libc()) is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)          # tinyunet/__init__.py's setting
            libc.mallopt(_M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD if _malloc["training"] else GLIBC_TRIM_THRESHOLD)


def keep_freed_memory():
    """Called by every network's backward: from the first one on, the process keeps what a step
    frees (the trim threshold above). Once per process; cheap after that. Test:
    tests/test_inference_mode.py::test_the_first_backward_keeps_freed_memory_and_no_grad_gives_it_back."""
    if _malloc["training"]:
        return
    with _malloc["lock"]:
        if not _malloc["training"]:
            _malloc["training"] = True
            if _malloc["inside"] == 0 and (libc := _libc()) is not None:
                libc.mallopt(_M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``: forwards then keep nothing for a backward."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Forwards inside this block keep nothing for a backward (see the module docstring).
    Nests; the previous setting comes back when the block ends, also on an error."""
    previous = is_grad_enabled()
    _state.enabled = False
    _enter_inference_malloc()
    try:
        yield
    finally:
        _state.enabled = previous
        _leave_inference_malloc()


@contextlib.contextmanager
def enable_grad():
    """Inside a ``no_grad()`` block: forwards keep what backward needs again."""
    previous = is_grad_enabled()
    _state.enabled = True
    try:
        yield
    finally:
        _state.enabled = previous
