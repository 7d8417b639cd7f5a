"""tinyunet: a U-Net written from scratch on NumPy/CuPy, every backward by hand.

Start with README.md; the model is tinyunet/unet.py, the layers tinyunet/layers/.
"""
import os

# Numba's parallel kernels run on an OpenMP thread pool, the matrix products on OpenBLAS's own
# threads. By default an idle OpenMP thread keeps spinning for a while after each kernel, on the
# cores the next matrix product needs: on 2 cores one 128x128 U-Net training step measured
# 2.65 s with active waiting against 1.09 s with passive waiting (examples/RESULTS.md). So ask
# for passive waiting unless the user chose a policy; it counts because the OpenMP runtime
# starts at the first parallel kernel, after this import. Passive waiting alone puts an idle
# thread to sleep at once, and waking it costs every parallel kernel 75-80 us on the
# development VM (a 2 MB ReLU: 80 us on one thread, 150 us on two); so a short spin first,
# GOMP_SPINCOUNT=10000 (GNU OpenMP's, which Numba uses here; it overrides the policy's zero),
# which with the Winograd products on Numba's threads (kernels/winograd.py, products) took a
# two-thread SegNet step from 148-211 ms to 122-156 ms and left the U-Net's unchanged; 100,000
# made the U-Net's 128x128 step 15 % slower (examples/RESULTS.md, fourth session).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _short_openblas_spin() -> bool:
    """Ask OpenBLAS's threads to stop spinning soon after each matrix product.

    After a product, OpenBLAS's worker threads keep polling for the next one for 2**28 cycles
    (its default THREAD_TIMEOUT: tens of milliseconds) before they sleep. In a training step
    a Numba kernel (a Winograd transform, im2col, ReLU) follows almost every product, and the
    polling thread takes cycles from it: with 2**18 cycles (under 0.1 ms) a 128x128 step
    measured 0.71-0.74 s against 0.85-0.89 s, a 256x256 step 2.31-2.43 s against 2.82-3.00 s
    (examples/RESULTS.md). OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when NumPy loads it, so
    this works only when tinyunet is imported before NumPy (every script in examples/ does);
    a value the user set is left alone. Returns whether the setting will take effect.
    """
    import sys
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or "numpy" in sys.modules:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "18"
    return True


OPENBLAS_SPIN_SHORTENED = _short_openblas_spin()


def _keep_large_blocks_in_the_heap() -> bool:
    """Ask glibc's malloc to serve large arrays from its heap and keep them there when freed.

    A training step allocates and frees the same large arrays (activations, gradients) every
    step. By default glibc maps each block over 32 MB fresh from the kernel and unmaps it on
    free, so every step faults all those pages in again; with transparent huge pages on
    'madvise' (NumPy asks for them) the kernel may also compact memory to find them. With the
    threshold at 1 GiB freed blocks stay in the process for the next step: one 256x256 training
    step measured 3.42-3.52 s before, 2.77-2.88 s after (examples/RESULTS.md).
    The first backward also raises the trim threshold (tinyunet/grad_mode.py, keep_freed_memory).
    Process-wide, like the OpenMP policy above, so both are skipped when the user tuned malloc
    (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES set) or set
    TINYUNET_NO_MALLOPT=1, and wherever the C library is not glibc. Returns whether the setting
    was made.
    """
    if (os.environ.get("TINYUNET_NO_MALLOPT") == "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "GLIBC_TUNABLES" in os.environ):
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):   # glibc answers this
            return False
    except (ValueError, OSError, AttributeError):                         # other C libraries do not
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1


MALLOPT_APPLIED = _keep_large_blocks_in_the_heap()

# Inference mode (tinyunet/grad_mode.py): ``with tinyunet.no_grad():`` forwards keep nothing for a
# backward. A plain module without imports, so that it leaves the settings above in force.
from tinyunet.grad_mode import enable_grad, is_grad_enabled, no_grad  # noqa: E402

__version__ = "0.1.0"
