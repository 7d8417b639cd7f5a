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


# ---------------------------------------------------------------------------------------------
# K classes: softmax cross-entropy from the logits
# ---------------------------------------------------------------------------------------------
# Shapes: logits z: (N, K, H, W), K >= 2; labels t: (N, H, W) integers in [0, K), or the
# ignore label; optional class weights c: (K,) and per-pixel weights w: (N, H, W).
#
# Softmax p_k = e^{z_k} / sum_j e^{z_j}; the per-pixel loss is -log p_t. Written in z, with the
# log-sum-exp taken about the largest logit M = max_j z_j (so no exponent is positive):
#
#     lse(z) = M + log sum_j e^{z_j - M}           l = lse(z) - z_t
#
# Scored pixels are those whose label is not the ignore label. The reduction is PyTorch's
# weighted mean (F.cross_entropy with weight= and ignore_index=), the pixel weights multiplying
# the numerator only, as the BCE above (its denominator is the pixel count):
#
#     D = sum_{scored} c[t]           L = sum_{scored} w * c[t] * l / D
#
# Gradient: dlse/dz_k = p_k and dz_t/dz_k = [k = t], so dl/dz_k = p_k - [k = t], and
#
#     dL/dz_k = w * c[t] * (p_k - [k = t]) / D          (0 at ignored pixels)
#
# With K = 2 this is the BCE of the logit difference z_1 - z_0; K = 1 has no softmax (p = 1
# always): use bce_with_logits. Proofs: tests/test_softmax_ce.py (central differences in
# float64, extreme logits, ignore label, weights; torch.nn.functional.cross_entropy).

def _check_softmax_ce(logits, labels, class_weights, ignore_index, weights):
    name = "softmax_cross_entropy"
    for what, a in (("logits", logits), ("labels", labels)):
        if not is_array(a):
            raise TypeError(f"{name}: {what} must be a numpy or cupy array, got {type(a).__name__}")
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: logits must be float32 or float64, got {logits.dtype}")
    if logits.ndim != 4:
        raise LossInputError(f"{name}: logits must be (N, K, H, W), got shape {tuple(logits.shape)}")
    n, k, h, w = logits.shape
    if k < 2:
        raise LossInputError(f"{name}: the logits have {k} class channel; one class is the binary model: "
                             f"use bce_with_logits with a 0/1 target")
    if tuple(labels.shape) != (n, h, w):
        hint = "; drop the channel axis with labels[:, 0]" if labels.ndim == 4 and labels.shape[1] == 1 else ""
        raise LossInputError(f"{name}: labels must be (N, H, W) = {(n, h, w)} for logits of shape "
                             f"{tuple(logits.shape)}, got {tuple(labels.shape)}{hint}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name}: labels must be integer class indices, got {labels.dtype}; "
                        f"convert with labels.astype(np.int64) (not one-hot, not probabilities)")
    xp = get_array_module(logits)
    scored = labels if ignore_index is None else labels[labels != ignore_index]
    if scored.size and (int(scored.min()) < 0 or int(scored.max()) >= k):
        found = sorted({int(v) for v in xp.unique(scored).tolist()} - set(range(k)))
        ignore = f" (the ignore label is {ignore_index})" if ignore_index is not None else \
            " (pass ignore_index= for a void label such as 255)"
        raise LossInputError(f"{name}: labels must be class indices in [0, {k - 1}]{ignore}; found {found[:10]}")
    if class_weights is not None:
        if tuple(class_weights.shape) != (k,):
            raise LossInputError(f"{name}: class_weights must have one entry per class, shape ({k},), "
                                 f"got {tuple(class_weights.shape)}")
        if float(class_weights.min()) < 0:
            raise LossInputError(f"{name}: class_weights must be >= 0")
    if weights is not None:
        if tuple(weights.shape) != (n, h, w):
            raise LossInputError(f"{name}: weights must be per pixel, (N, H, W) = {(n, h, w)}, "
                                 f"got {tuple(weights.shape)}")
        if float(weights.min()) < 0:
            raise LossInputError(f"{name}: weights must be >= 0")
    if not bool(xp.isfinite(logits).all()):
        raise LossInputError(f"{name}: the logits contain NaN or inf; the network diverged upstream "
                             f"(try a lower learning rate)")


def log_softmax(logits, axis: int = 1):
    """log p = z - lse(z), with the log-sum-exp about the largest logit (stable)."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_cross_entropy(logits, labels, class_weights=None, ignore_index: int | None = None, weights=None):
    """Weighted mean of -log softmax(logits)[label] over the scored pixels.

    logits (N, K, H, W); labels (N, H, W) ints; class_weights (K,) or None; ignore_index: the
    label of pixels not scored (e.g. 255), or None; weights (N, H, W) per-pixel (e.g. border
    weights) or None. Returns (loss: float, dlogits: array of the logits' shape and dtype).
    Nothing scored (every pixel ignored, or every scored class of weight 0: D = 0): loss 0.0
    and a zero gradient, where torch's mean reduction gives NaN (0 / 0).
    """
    _check_softmax_ce(logits, labels, class_weights, ignore_index, weights)
    xp = get_array_module(logits)
    dtype = logits.dtype
    scored = xp.ones(labels.shape, dtype=bool) if ignore_index is None else labels != ignore_index
    target = xp.where(scored, labels, 0).astype(xp.int64)                 # ignored: any valid index
    logp = log_softmax(logits)                                            # (N, K, H, W)
    per_pixel = -xp.take_along_axis(logp, target[:, None], axis=1)[:, 0]  # l = lse - z_t
    c = xp.ones(labels.shape, dtype=dtype) if class_weights is None else \
        xp.asarray(class_weights, dtype=dtype)[target]
    c = c * scored                                                        # 0 where not scored
    denominator = float(c.sum(dtype=np.float64))
    pixel_weight = c if weights is None else c * weights.astype(dtype, copy=False)
    grad = xp.exp(logp)                                                   # p_k
    grad -= xp.arange(logits.shape[1])[None, :, None, None] == target[:, None]   # - [k = t]
    if denominator == 0:                                                  # nothing scored
        return 0.0, xp.zeros_like(logits)
    loss = float((pixel_weight * per_pixel).sum(dtype=np.float64)) / denominator
    grad *= (pixel_weight / dtype.type(denominator))[:, None]
    return loss, grad


def median_frequency_weights(labels, num_classes: int, ignore_index: int | None = None):
    """SegNet's class weights (Eigen and Fergus's median frequency balancing), float64 (K,).

    freq[c] = (pixels of class c) / (pixels of the images, axis 0, in which c appears),
    weight[c] = median(freq over the classes that appear) / freq[c]; a class that never
    appears gets 0. Ignored pixels count for no class and no image size.
    """
    xp = get_array_module(labels)
    labels = labels.reshape(labels.shape[0], -1)
    valid = xp.ones(labels.shape, dtype=bool) if ignore_index is None else labels != ignore_index
    freq = np.zeros(num_classes)
    for c in range(num_classes):
        is_c = labels == c
        per_image = is_c.sum(axis=1)
        present = per_image > 0
        if bool(present.any()):
            freq[c] = float(per_image.sum()) / float(valid[present].sum())
    appears = freq > 0
    weights = np.zeros(num_classes)
    if appears.any():
        weights[appears] = np.median(freq[appears]) / freq[appears]
    return weights
