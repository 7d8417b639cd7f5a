"""tinyunet: a U-Net written from scratch on NumPy/CuPy, every backward by hand.

Start with README.md; the model is tinyunet/unet.py, the layers tinyunet/layers/.
"""
import os

# Numba's parallel kernels run on an OpenMP thread pool, the matrix products on OpenBLAS's own
# threads. By default an idle OpenMP thread keeps spinning for a while after each kernel, on the
# cores the next matrix product needs: on 2 cores one 128x128 U-Net training step measured
# 2.65 s with active waiting against 1.09 s with passive waiting (examples/RESULTS.md). So ask
# for passive waiting unless the user chose a policy; it counts because the OpenMP runtime
# starts at the first parallel kernel, after this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_large_blocks_in_the_heap() -> bool:
    """Ask glibc's malloc to serve large arrays from its heap and keep them there when freed.

    A training step allocates and frees the same large arrays (activations, gradients) every
    step. By default glibc maps each block over 32 MB fresh from the kernel and unmaps it on
    free, so every step faults all those pages in again; with transparent huge pages on
    'madvise' (NumPy asks for them) the kernel may also compact memory to find them. With the
    threshold at 1 GiB freed blocks stay in the process for the next step: one 256x256 training
    step measured 3.42-3.52 s before, 2.77-2.88 s after (examples/RESULTS.md).
    Process-wide, like the OpenMP policy above, so it is skipped when the user tuned malloc
    (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES set) or set TINYUNET_NO_MALLOPT=1, and wherever
    the C library is not glibc. Returns whether the setting was made.
    """
    if (os.environ.get("TINYUNET_NO_MALLOPT") == "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "GLIBC_TUNABLES" in os.environ):
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

__version__ = "0.1.0"
