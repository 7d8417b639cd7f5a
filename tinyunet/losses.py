"""Binary cross-entropy computed from the logits, as loss and gradient.

Shapes: logits z: (N, 1, H, W) (any shape works), targets t: same shape, values in [0, 1],
optional per-pixel weights w: same shape (e.g. the U-Net paper's border weights).

With p = sigmoid(z), the per-pixel loss is -(t log p + (1 - t) log(1 - p)). Written in z:

    log p = -log(1 + e^-z),  log(1 - p) = -z - log(1 + e^-z)
    l(z, t) = (1 - t) z + log(1 + e^-z)
            = max(z, 0) - z t + log(1 + e^-|z|)        (the stable form)

The stable form never exponentiates a positive number, so a logit of +-1000 gives a finite
loss where log(sigmoid(z)) would give log(0) = -inf.

    L = sum_pixels w * l / (number of pixels)           (the mean; w = 1 without weights)

Gradient: dl/dz = (1 - t) - e^-z / (1 + e^-z) = (1 - t) - (1 - p) = p - t, so

    dL/dz = w * (sigmoid(z) - t) / (number of pixels)

Proofs: tests/test_losses.py (gradient check, extreme logits) and tests/test_torch_oracle.py
(F.binary_cross_entropy_with_logits with weight=).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module, is_array
from tinyunet.layers.activation import sigmoid


class LossInputError(ValueError):
    """The loss was given logits, targets or weights that do not fit together."""


def _check_metadata(logits, targets, weights):
    """The checks that read no array values: types, shapes, dtype (free on any device)."""
    for name, a in (("logits", logits), ("targets", targets)) + ((("weights", weights),) if weights is not None else ()):
        if not is_array(a):
            raise TypeError(f"bce_with_logits: {name} must be a numpy or cupy array, got {type(a).__name__}")
        if a.shape != logits.shape:
            raise LossInputError(f"bce_with_logits: {name} have shape {tuple(a.shape)} but the logits have "
                                 f"{tuple(logits.shape)}; they must match pixel for pixel")
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"bce_with_logits: logits must be float32 or float64, got {logits.dtype}")


def check_values(logits, targets, weights=None) -> None:
    """The checks that read the values: targets in [0, 1], weights >= 0, finite logits.

    Each reads a reduction back to the host: free on the CPU, a wait for the GPU on the GPU
    (see bce_with_logits for when that is paid)."""
    xp = get_array_module(logits)
    low, high = float(targets.min()), float(targets.max())
    if low < 0 or high > 1:
        hint = " (labels stored as 0/255? divide by 255)" if high > 1 else ""
        raise LossInputError(f"bce_with_logits: targets must lie in [0, 1], found values in [{low}, {high}]{hint}")
    if weights is not None and float(weights.min()) < 0:
        raise LossInputError("bce_with_logits: weights must be >= 0")
    if not bool(xp.isfinite(logits).all()):
        raise LossInputError("bce_with_logits: the logits contain NaN or inf; the network diverged "
                             "upstream (try a lower learning rate)")


def bce_with_logits(logits, targets, weights=None, check: bool | None = None):
    """Mean binary cross-entropy of sigmoid(logits) against targets.

    Returns (loss, dlogits: array of the logits' shape and dtype). loss is a float (np.float64)
    for NumPy arrays and a 0-d float64 array on the GPU for CuPy arrays: ``float(loss)`` reads
    it, and a training loop should read it when it logs, not every step, since on the GPU each
    read waits for all the work queued so far.

    check: read the values and raise on bad ones (check_values) before computing. The default
    (None) checks NumPy inputs always, and CuPy inputs never on the host: there the same three
    checks run on the device, folded into the loss, which is NaN when any fails, so a bad
    input shows at the next read of the loss. Pass check=True for the named message (a
    training loop does on its first step; tinyunet/train.py).
    """
    _check_metadata(logits, targets, weights)
    xp = get_array_module(logits)
    on_host = xp is np
    if check or (check is None and on_host):
        check_values(logits, targets, weights)
    z = logits
    t = targets.astype(z.dtype, copy=False)
    per_pixel = xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))
    grad = sigmoid(z) - t
    count = z.size
    if weights is not None:
        w = weights.astype(z.dtype, copy=False)
        per_pixel = per_pixel * w
        grad = grad * w
    loss = per_pixel.sum(dtype=np.float64) / count      # stays on the device for CuPy arrays
    if not on_host and not check:
        bad = (t.min() < 0) | (t.max() > 1)             # device reductions, nothing read back
        if weights is not None:
            bad = bad | (w.min() < 0)
        loss = xp.where(bad, xp.float64(np.nan), loss)  # non-finite logits already give NaN/inf
    grad /= z.dtype.type(count)
    return loss, grad
