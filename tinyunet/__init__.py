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

__version__ = "0.1.0"
