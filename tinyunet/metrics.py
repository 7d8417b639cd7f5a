"""How good is a membrane segmentation? Pixel scores, the ISBI 2012 scores, and an Otsu baseline.

The positive class is MEMBRANE: a target t has t = 1 on membrane and t = 0 inside cells
(see tinyunet/data.py for the conversion from the ISBI files, where 0 = membrane).
A prediction is either a probability map p in [0, 1] (thresholded at 0.5 unless said
otherwise) or a boolean membrane mask of the same shape.

Shapes: (H, W), or a stack (N, H, W) / (N, 1, H, W). Pixel scores pool every pixel of the
stack; the segmentation scores (V_Rand, V_Info) are computed per slice and averaged.

Pixel scores, from the confusion counts tp, fp, fn, tn (membrane positive):

    accuracy            (tp + tn) / (tp + fp + fn + tn)
    majority accuracy   max(share of membrane, share of cell): what "predict one class
                        everywhere" scores; ISBI's is about 0.78, so accuracy alone says little
    precision           tp / (tp + fp)        recall  tp / (tp + fn)   (and the same for cell)
    IoU (Jaccard)       tp / (tp + fp + fn)   (and tn / (tn + fn + fp) for cell); mean IoU
    Dice                2 tp / (2 tp + fp + fn)

Empty masks: every 0 / 0 above means "no mistake of this kind was possible" and is 1.0.
So two empty membrane masks have IoU = Dice = 1.0, precision with nothing predicted is 1.0,
and recall with nothing to find is 1.0. No division ever runs on a zero denominator.

Segmentation scores (Arganda-Carreras et al., 2015, "Crowdsourcing the creation of image
segmentation algorithms for connectomics", the ISBI 2012 challenge): cells are the connected
components (4-connectivity) of the non-membrane pixels of the truth and of the prediction.
Only pixels inside a true cell count (true membrane is excluded: "foreground-restricted").
A pixel that the prediction calls membrane inside a true cell is counted as its own
one-pixel segment (a singleton), so predicting membrane everywhere is not rewarded.
With n_ij = pixels in true cell i and predicted segment j, a_i = sum_j n_ij, b_j = sum_i n_ij:

    V_Rand_split = sum n_ij^2 / sum a_i^2      V_Rand_merge = sum n_ij^2 / sum b_j^2
    V_Rand       = 2 sum n_ij^2 / (sum a_i^2 + sum b_j^2)     (their harmonic mean)
    V_Info_split = I(S;T) / H(S)   V_Info_merge = I(S;T) / H(T)   V_Info = 2 I / (H(S) + H(T))

with S the predicted and T the true segmentation, H the entropy and I the mutual information
of the pixel distributions. Both are 1 for identical segmentations, lower for splits and merges.
A truth without any cell pixel scores 1.0 (nothing to segment), as do two one-cell partitions.

K classes (the second half of this file): confusion_matrix, class_scores (the FCN paper's
four scores, per-class IoU, precision, recall), class_report_table, and the baselines
kmeans_baseline + match_clusters and majority_baseline, with evaluate_classes for all at once;
save_confusion_png (from tinyunet/classes.py) draws the matrix.

Proofs: tests/test_metrics.py (hand-computed 3x3 and 4x4 examples, empty masks, splits and
merges, Otsu against a brute-force search), tests/test_multiclass_metrics.py (K classes).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from tinyunet.backend import to_numpy
from tinyunet.classes import save_confusion_png  # noqa: F401  (K classes: the confusion matrix as a PNG)

DEFAULT_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # 0.1 .. 0.9


class MetricInputError(ValueError):
    """A metric was given arrays of the wrong shape, values or type."""


# ----------------------------------------------------------------------------- input checks

def _as_mask(name: str, mask) -> np.ndarray:
    """A boolean membrane mask from bool or {0, 1} values; anything else is refused."""
    mask = np.asarray(to_numpy(mask))
    if mask.dtype == bool:
        return mask
    if not (np.issubdtype(mask.dtype, np.number)):
        raise MetricInputError(f"{name} must be a numeric or boolean array, got dtype {mask.dtype}")
    is_zero, is_one = mask == 0, mask == 1
    if not np.all(is_zero | is_one):
        found = np.unique(mask[~(is_zero | is_one)])[:5].tolist()
        raise MetricInputError(
            f"{name} must hold only 0 and 1 (1 = membrane), found also {found}. "
            "Fix: ISBI label files (255 = cell, 0 = membrane) become targets with "
            "tinyunet.data.load_folder, or by hand with target = (label == 0); threshold a "
            "probability map with prob >= 0.5.")
    return is_one


def _as_probability(prob) -> np.ndarray:
    prob = np.asarray(to_numpy(prob))
    if prob.dtype == bool:
        return prob.astype(np.float32)
    if not np.issubdtype(prob.dtype, np.floating):
        raise MetricInputError(f"prob must be a float array of probabilities in [0, 1], got dtype "
                               f"{prob.dtype}. Fix: pass sigmoid(logits), not labels or logits.")
    finite = np.isfinite(prob)
    if not finite.all():
        raise MetricInputError(f"prob holds {prob.size - int(finite.sum())} NaN or infinite values; "
                               "the model diverged or the map was not computed. Fix: check training.")
    if prob.size and (prob.min() < 0 or prob.max() > 1):
        raise MetricInputError(
            f"prob must hold values in [0, 1], found range [{prob.min()}, {prob.max()}]. "
            "Fix: pass sigmoid(logits), not the logits themselves.")
    return prob


def _same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise MetricInputError(f"prediction has shape {pred.shape} but target has shape "
                               f"{target.shape}; they must match pixel for pixel.")


def _slices(a: np.ndarray) -> np.ndarray:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    if a.ndim < 2:
        raise MetricInputError(f"expected an image of shape (H, W) or a stack, got shape {a.shape}")
    return a.reshape((-1,) + a.shape[-2:])


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0 / 0 = 1.0: no mistake of that kind was possible."""
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


# ----------------------------------------------------------------------------- pixel scores

def confusion_counts(pred, target) -> dict[str, int]:
    """tp, fp, fn, tn of a membrane mask pred against target (same shape, values {0, 1}).

    Membrane is the positive class: tp = predicted membrane on true membrane.
    Proof: test_confusion_counts_by_hand.
    """
    pred, target = _as_mask("pred", pred), _as_mask("target", target)
    _same_shape(pred, target)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size) - tp - fp - fn}


def pixel_scores(pred, target) -> dict[str, float]:
    """All pixel scores of a membrane mask pred against target, as a flat dict.

    Keys: accuracy, majority_accuracy, membrane_precision, membrane_recall, cell_precision,
    cell_recall, iou_membrane, iou_cell, mean_iou, dice (formulas in the module docstring;
    0 / 0 = 1.0). Proof: test_pixel_scores_by_hand_4x4, test_empty_masks_score_one.
    """
    c = confusion_counts(pred, target)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    total = tp + fp + fn + tn
    iou_membrane = _ratio(tp, tp + fp + fn)
    iou_cell = _ratio(tn, tn + fn + fp)
    return {
        "accuracy": _ratio(tp + tn, total),
        "majority_accuracy": _ratio(max(tp + fn, tn + fp), total),
        "membrane_precision": _ratio(tp, tp + fp),
        "membrane_recall": _ratio(tp, tp + fn),
        "cell_precision": _ratio(tn, tn + fn),
        "cell_recall": _ratio(tn, tn + fp),
        "iou_membrane": iou_membrane,
        "iou_cell": iou_cell,
        "mean_iou": (iou_membrane + iou_cell) / 2,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def iou(pred, target) -> float:
    """Membrane IoU (Jaccard) tp / (tp + fp + fn); 1.0 for two empty masks. Proof: test_iou_and_dice_by_hand_3x3."""
    return pixel_scores(pred, target)["iou_membrane"]


def dice(pred, target) -> float:
    """Membrane Dice 2 tp / (2 tp + fp + fn); 1.0 for two empty masks. Proof: test_iou_and_dice_by_hand_3x3."""
    return pixel_scores(pred, target)["dice"]


# ----------------------------------------------------------------------- segmentation scores

def label_cells(membrane: np.ndarray) -> tuple[np.ndarray, int]:
    """Cells of a 2-D membrane mask: (labels (H, W) int32 with 0 on membrane, number of cells).

    Cells are 4-connected components of the non-membrane pixels, so two cells that touch only
    at a corner across a diagonal membrane stay apart. Proof: test_label_cells_diagonal_membrane.
    """
    labels, count = ndimage.label(~membrane)  # default structure: 4-connectivity in 2-D
    return labels.astype(np.int32, copy=False), int(count)


def _entropy(counts: np.ndarray, total: int) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def segmentation_scores(pred, target) -> dict[str, float]:
    """Foreground-restricted V_Rand and V_Info of a 2-D membrane mask pred against target (H, W).

    Returns v_rand, v_rand_split, v_rand_merge, v_info, v_info_split, v_info_merge (formulas
    and the singleton rule in the module docstring). The contingency table n_ij is built
    sparsely with np.unique over (true cell, predicted cell) pairs: O(pixels log pixels),
    whatever the number of cells. Proof: test_segmentation_scores_by_hand_4x4_merge,
    test_segmentation_scores_by_hand_4x4_split_with_singletons,
    test_identical_segmentations_score_one, test_split_and_merge_lower_the_scores.
    """
    pred, target = _as_mask("pred", pred), _as_mask("target", target)
    _same_shape(pred, target)
    if pred.ndim != 2:
        raise MetricInputError(f"segmentation_scores takes one 2-D slice, got shape {pred.shape}; "
                               "use evaluate() for stacks")
    true_cells, _ = label_cells(target)
    pred_cells, _ = label_cells(pred)
    inside = true_cells > 0
    n = int(np.count_nonzero(inside))
    if n == 0:
        perfect = dict.fromkeys(("v_rand", "v_rand_split", "v_rand_merge"), 1.0)
        return perfect | dict.fromkeys(("v_info", "v_info_split", "v_info_merge"), 1.0)

    t = true_cells[inside].astype(np.int64)
    s = pred_cells[inside].astype(np.int64)
    singletons = int(np.count_nonzero(s == 0))  # predicted membrane inside a true cell
    paired = s > 0
    _, n_ij = np.unique(t[paired] * (int(s.max()) + 1) + s[paired], return_counts=True)
    a_i = np.bincount(t)[1:]                     # true cell sizes (singletons included)
    b_j = np.bincount(s[paired])[1:]             # predicted segment sizes, without singletons

    # Rand: sums of squared counts; each singleton adds 1 to the joint and predicted sums.
    sum_ab = float((n_ij.astype(np.float64) ** 2).sum()) + singletons
    sum_a = float((a_i.astype(np.float64) ** 2).sum())
    sum_b = float((b_j.astype(np.float64) ** 2).sum()) + singletons

    # Info: entropies in nats; a singleton has probability 1/n in the joint and in S.
    singleton_term = singletons * np.log(n) / n
    h_s = _entropy(b_j, n) + singleton_term
    h_t = _entropy(a_i, n)
    h_st = _entropy(n_ij, n) + singleton_term
    mutual = max(h_s + h_t - h_st, 0.0)  # >= 0 in exact arithmetic; clip rounding

    return {
        "v_rand": 2 * sum_ab / (sum_a + sum_b),
        "v_rand_split": sum_ab / sum_a,
        "v_rand_merge": sum_ab / sum_b,
        "v_info": _ratio(2 * mutual, h_s + h_t),
        "v_info_split": _ratio(mutual, h_s),
        "v_info_merge": _ratio(mutual, h_t),
    }


def _mean_segmentation_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    per_slice = [segmentation_scores(p, t) for p, t in zip(_slices(pred), _slices(target))]
    return {key: float(np.mean([scores[key] for scores in per_slice])) for key in per_slice[0]}


def best_over_thresholds(prob, target, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, float]:
    """The best V_Rand and V_Info over thresholds of a membrane probability map, and where.

    prob: (H, W) or a stack, values in [0, 1]; membrane = prob >= threshold. For a stack the
    score at a threshold is the mean over slices, and one threshold serves the whole stack.
    Returns v_rand, v_rand_threshold, v_info, v_info_threshold (the first best on ties).
    Proof: test_best_over_thresholds_finds_the_right_threshold.
    """
    prob = _as_probability(prob)
    target = _as_mask("target", target)
    _same_shape(prob, target)
    best = {"v_rand": -1.0, "v_rand_threshold": float("nan"), "v_info": -1.0, "v_info_threshold": float("nan")}
    for threshold in thresholds:
        scores = _mean_segmentation_scores(prob >= threshold, target)
        for key in ("v_rand", "v_info"):
            if scores[key] > best[key]:
                best[key], best[key + "_threshold"] = scores[key], float(threshold)
    return best


# -------------------------------------------------------------------------- Otsu's baseline

def _as_unit_image(image) -> np.ndarray:
    image = np.asarray(to_numpy(image))
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    if not np.issubdtype(image.dtype, np.floating):
        raise MetricInputError(f"image must be float in [0, 1] or uint8, got dtype {image.dtype}")
    if image.size == 0 or not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise MetricInputError("image must be a non-empty float array with finite values in [0, 1]; "
                               "scale 8-bit images with image / 255.")
    return image


def otsu_threshold(image) -> float:
    """Otsu's threshold of a grey image (float in [0, 1] or uint8): dark = image < threshold.

    A 256-bin histogram over [0, 1] (uint8 value v falls in bin v). Splitting after bin k
    gives class weights w0(k) = sum_{i<=k} p_i, w1 = 1 - w0 and means m0, m1; Otsu picks the
    k maximising the between-class variance w0 w1 (m0 - m1)^2, computed for all k at once as
    (m_T w0 - m(k))^2 / (w0 (1 - w0)) with m(k) = sum_{i<=k} i p_i. The threshold is the upper
    edge (k + 1) / 256 of bin k. A constant image has no split; its threshold is the lower
    edge of its only bin, so nothing is dark. Proof: test_otsu_matches_brute_force_search.
    """
    image = _as_unit_image(image)
    bins = np.minimum((image * 256).astype(np.int64), 255)
    counts = np.bincount(bins.ravel(), minlength=256)
    below = np.cumsum(counts)  # integers, so "both classes non-empty" is an exact test
    splittable = (below > 0) & (below < image.size)
    if not splittable.any():
        return float(bins.flat[0]) / 256
    p = counts / image.size
    w0 = below[splittable] / image.size
    m = np.cumsum(p * np.arange(256))[splittable]
    total_mean = float((p * np.arange(256)).sum())
    between = (total_mean * w0 - m) ** 2 / (w0 * (1 - w0))
    return float(np.flatnonzero(splittable)[np.argmax(between)] + 1) / 256


def otsu_baseline(image) -> np.ndarray:
    """Membrane mask by Otsu's threshold: membrane is dark in EM, so mask = image < otsu_threshold(image).

    image: (H, W) float in [0, 1] or uint8 -> bool (H, W). Proof: test_otsu_baseline_marks_dark_pixels.
    """
    threshold = otsu_threshold(image)
    return _as_unit_image(image) < threshold


# ------------------------------------------------------------------------ everything at once

def _scores_of_mask(mask: np.ndarray, target: np.ndarray) -> dict[str, float]:
    scores = pixel_scores(mask, target)
    segmentation = _mean_segmentation_scores(mask, target)
    scores.update(v_rand=segmentation["v_rand"], v_info=segmentation["v_info"])
    return scores


def evaluate(prob, target, image=None) -> dict:
    """Every score of a membrane probability map against the target, with baselines.

    prob: (H, W), (N, H, W) or (N, 1, H, W) probabilities; target: same shape, {0, 1}.
    Returns the pixel scores (see pixel_scores) and v_rand, v_info at threshold 0.5, plus
    best_v_rand, best_v_rand_threshold, best_v_info, best_v_info_threshold over 0.1 .. 0.9,
    and "majority": the same scores for predicting cell everywhere. With the grey image
    (same shape) it adds "otsu": the scores of otsu_baseline applied to each slice.
    Proof: test_evaluate_perfect_prediction_and_baselines.
    """
    prob = _as_probability(prob)
    target = _as_mask("target", target)
    _same_shape(prob, target)
    result = _scores_of_mask(prob >= 0.5, target)
    best = best_over_thresholds(prob, target)
    result.update({"best_" + key: value for key, value in best.items()})
    result["majority"] = _scores_of_mask(np.zeros_like(target), target)
    if image is not None:
        image = np.asarray(to_numpy(image))
        if image.shape != target.shape:
            raise MetricInputError(f"image has shape {image.shape} but target has shape {target.shape}")
        otsu = np.stack([otsu_baseline(slice_) for slice_ in _slices(image)]).reshape(target.shape)
        result["otsu"] = _scores_of_mask(otsu, target)
    return result


TABLE_COLUMNS = (("accuracy", "acc"), ("majority_accuracy", "majority"), ("iou_membrane", "IoU memb"),
                 ("iou_cell", "IoU cell"), ("mean_iou", "mIoU"), ("dice", "Dice"),
                 ("v_rand", "V_Rand"), ("v_info", "V_Info"))


def report_table(rows: Sequence[tuple[str, Mapping]] | Mapping) -> str:
    """A fixed-width text table, one row per (name, scores) pair, columns as TABLE_COLUMNS.

    Given one evaluate() result instead of rows, it shows it beside its baselines:
    rows "model", "otsu" (when present) and "majority class". A missing score shows as "-".
    Proof: test_report_table_lists_model_and_baselines.
    """
    if isinstance(rows, Mapping):
        result = rows
        rows = [("model", result)] + ([("otsu", result["otsu"])] if "otsu" in result else [])
        rows.append(("majority class", result["majority"]))
    name_width = max([len("method")] + [len(name) for name, _ in rows])
    header = "method".ljust(name_width) + "".join(f"  {title:>8}" for _, title in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, scores in rows:
        cells = [f"{scores[key]:8.4f}" if key in scores else f"{'-':>8}" for key, _ in TABLE_COLUMNS]
        lines.append(name.ljust(name_width) + "".join("  " + cell for cell in cells))
    return "\n".join(lines)


# ===================================================================================== K classes
#
# A K-class prediction is a class map (H, W) or a stack (N, H, W) / (N, 1, H, W) of integers
# 0..K-1 (argmax over the class axis of the scores); the target has the same shape, values
# 0..K-1 or ignore_index (pixels not scored; 255 by default). Every score below comes from one
# confusion matrix n (K, K): n_ij = scored pixels of true class i predicted as class j (rows =
# truth, columns = prediction). With t_i = sum_j n_ij (pixels of class i in the truth) and
# p_j = sum_i n_ij (pixels predicted as j), the four scores of Long, Shelhamer and Darrell,
# "Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015), section 5:
#
#     pixel accuracy            sum_i n_ii / sum_i t_i
#     mean accuracy             (1 / n_cl) sum_i n_ii / t_i
#     mean IU                   (1 / n_cl) sum_i n_ii / (t_i + p_i - n_ii)
#     frequency weighted IU     (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + p_i - n_ii)
#
# and per class: IoU_i = n_ii / (t_i + p_i - n_ii), precision_i = n_ii / p_i, recall_i =
# n_ii / t_i (= the class accuracy), support_i = t_i.
#
# Absent classes (not 0 and not 1, the trap LESSONS.md names): a ratio whose denominator is 0
# is NaN, "not measured". A class absent from both truth and prediction has IoU NaN and is
# left out of the mean IU (n_cl counts the classes with t_i + p_i > 0); a class absent from
# the truth has recall NaN and is left out of the mean accuracy (n_cl there counts t_i > 0);
# a class predicted but absent from the truth has IoU 0 and counts in the mean IU (every
# pixel predicted as it is a mistake). Nothing scored at all: every score is NaN.
# (The binary pixel_scores above use 0 / 0 = 1.0 instead; where both classes occur the two
# agree: class_scores(...)["iou"][1] == iou(...). Proof: test_binary_case_agrees.)

def _class_map(name: str, a, classes: int, ignore_index: int | None) -> np.ndarray:
    a = np.asarray(to_numpy(a))
    if a.dtype.kind not in "uib" or a.ndim < 2:
        raise MetricInputError(f"{name} must be a class map of integers (H, W) or a stack (N, H, W), got shape "
                               f"{a.shape} dtype {a.dtype}; take scores.argmax(axis=1) of (N, K, H, W) scores first")
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim > 3:
        raise MetricInputError(f"{name} must be (H, W), (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= classes)
    if ignore_index is not None:
        bad &= a != ignore_index
    if bad.any():
        values = np.unique(a[bad])[:8].tolist()
        allowed = f"0..{classes - 1}" + (f" or the ignore value {ignore_index}" if ignore_index is not None else "")
        raise MetricInputError(f"{name}: {int(bad.sum())} pixels hold values {values} outside {allowed}; "
                               f"check classes={classes} (and ignore_index)")
    return a


def _check_classes(classes) -> int:
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise MetricInputError(f"classes must be a whole number >= 2 for class maps, got {classes!r}; "
                               "binary membrane masks use pixel_scores / evaluate")
    return int(classes)


def confusion_matrix(pred, target, classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts n_ij of scored pixels with true class i predicted as j.

    pred: class map (H, W) or stack (N, H, W) / (N, 1, H, W), integers 0..K-1; target: the
    same shape, 0..K-1 or ignore_index (those pixels are not counted). One np.bincount of
    i * K + j. Proof: test_confusion_matrix_by_hand, test_confusion_and_scores_match_loops.
    """
    classes = _check_classes(classes)
    pred = _class_map("pred", pred, classes, None)
    target = _class_map("target", target, classes, ignore_index)
    _same_shape(pred, target)
    scored = target != ignore_index
    return np.bincount(target[scored] * classes + pred[scored], minlength=classes * classes).reshape(classes, classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, NaN where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan), where=denominator > 0)


def scores_from_confusion(matrix, class_names: Sequence[str] | None = None) -> dict:
    """The scores of class_scores from a (K, K) confusion matrix (formulas above)."""
    n = np.asarray(matrix, np.int64)
    if n.ndim != 2 or n.shape[0] != n.shape[1]:
        raise MetricInputError(f"a confusion matrix is (K, K), got shape {n.shape}")
    k = n.shape[0]
    names = [f"class {c}" for c in range(k)] if class_names is None else [str(name) for name in class_names]
    if len(names) != k:
        raise MetricInputError(f"{k} classes but {len(names)} class names: {names}")
    diagonal, truth, predicted = np.diag(n), n.sum(axis=1), n.sum(axis=0)
    total = int(truth.sum())
    iou = _divide(diagonal, truth + predicted - diagonal)
    recall = _divide(diagonal, truth)
    precision = _divide(diagonal, predicted)
    measured_iou = iou[~np.isnan(iou)]
    measured_recall = recall[~np.isnan(recall)]
    return {
        "pixel_accuracy": float(diagonal.sum() / total) if total else float("nan"),
        "mean_accuracy": float(measured_recall.mean()) if measured_recall.size else float("nan"),
        "mean_iou": float(measured_iou.mean()) if measured_iou.size else float("nan"),
        "frequency_weighted_iou": float(np.nansum(truth * iou) / total) if total else float("nan"),
        "class_names": names,
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "support": truth.tolist(),
        "pixels": total,
        "confusion": n.tolist(),
    }


def class_scores(pred, target, classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> dict:
    """The FCN paper's four scores and per-class scores of a class map against the truth.

    pred, target: as confusion_matrix. Returns a dict (JSON-ready):
        pixel_accuracy, mean_accuracy, mean_iou, frequency_weighted_iou   floats (NaN: nothing scored)
        class_names  list of K names ("class k" by default)
        iou, precision, recall   lists of K floats, NaN where not measured (see above)
        support      list of K ints: true pixels of each class
        pixels       scored pixels;  confusion: the (K, K) matrix as nested lists
    Classes absent from both truth and prediction are NaN and left out of the means.
    Proof: test_class_scores_by_hand, test_absent_classes_are_nan_and_left_out, test_binary_case_agrees.
    """
    return scores_from_confusion(confusion_matrix(pred, target, classes, ignore_index), class_names)


def _score_cell(value) -> str:
    return f"{'-':>8}" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:8.4f}"


def class_report_table(rows: Sequence[tuple[str, Mapping]] | Mapping) -> str:
    """A fixed-width text table of class_scores results: one row per (name, scores) pair, the
    four FCN scores then the IoU of each class (named by the first row's class_names); NaN or
    missing shows as "-". One result alone is shown as the row "model".
    Proof: test_class_report_table.
    """
    if isinstance(rows, Mapping):
        rows = [("model", rows)]
    rows = list(rows)
    if not rows:
        raise MetricInputError("class_report_table needs at least one (name, scores) row")
    names = list(rows[0][1].get("class_names", []))
    columns = [("pixel_accuracy", "pix acc"), ("mean_accuracy", "mean acc"), ("mean_iou", "mIoU"),
               ("frequency_weighted_iou", "fwIoU")]
    titles = [title for _, title in columns] + [f"IoU {name}"[:max(8, len(f"IoU {name}"))] for name in names]
    widths = [max(8, len(title)) for title in titles]
    name_width = max([len("method")] + [len(name) for name, _ in rows])
    header = "method".ljust(name_width) + "".join(f"  {title:>{w}}" for title, w in zip(titles, widths))
    lines = [header, "-" * len(header)]
    for name, scores in rows:
        values = [scores.get(key) for key, _ in columns]
        per_class = list(scores.get("iou", []))
        values += [per_class[c] if c < len(per_class) else None for c in range(len(names))]
        lines.append(name.ljust(name_width) + "".join(f"  {_score_cell(v):>{w}}" for v, w in zip(values, widths)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- K-class baselines

def kmeans_intensity(image, clusters: int, seed: int = 0, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on grey values, by hand: (cluster map int64 of image's shape, centres (k,)).

    Centres start at the quantiles (c + 1/2) / k of the values (deterministic); each round
    assigns every pixel to its nearest centre (in 1-D: the centres sorted, the cut between
    neighbours at their midpoint, np.searchsorted) and moves each centre to the mean of its
    pixels, until no assignment changes or `iterations` rounds. A cluster left empty restarts
    at a value drawn by np.random.default_rng(seed) (so the seed only matters then). Clusters
    are numbered by centre, darkest first. Proof: test_kmeans_finds_separated_levels.
    """
    values = _as_unit_image(image).astype(np.float64)
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) or clusters < 1:
        raise MetricInputError(f"k-means needs a whole number of clusters >= 1, got {clusters!r}")
    flat = values.ravel()
    rng = np.random.default_rng(seed)
    centres = np.quantile(flat, (np.arange(clusters) + 0.5) / clusters)
    assignment = None
    for _ in range(iterations):
        centres = np.sort(centres)
        cuts = (centres[1:] + centres[:-1]) / 2
        new = np.searchsorted(cuts, flat, side="right")
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        counts = np.bincount(assignment, minlength=clusters)
        sums = np.bincount(assignment, weights=flat, minlength=clusters)
        empty = counts == 0
        centres = np.where(empty, 0.0, sums / np.maximum(counts, 1))
        if empty.any():
            centres[empty] = flat[rng.integers(flat.size, size=int(empty.sum()))]
    order = np.argsort(centres, kind="stable")
    rank = np.empty(clusters, np.int64)
    rank[order] = np.arange(clusters)
    return rank[assignment].reshape(values.shape), centres[order]


def kmeans_baseline(image, classes: int, seed: int = 0) -> np.ndarray:
    """The classical method: k-means on intensity with k = K clusters (kmeans_intensity),
    returning the cluster map (image's shape, int64, 0 = darkest cluster). The clusters are
    not classes yet: match_clusters assigns them. Proof: test_kmeans_finds_separated_levels."""
    return kmeans_intensity(image, _check_classes(classes), seed)[0]


def cluster_assignment(cluster_map, target, classes: int, ignore_index: int = 255) -> np.ndarray:
    """The one-to-one map cluster -> class (K,) maximising the scored pixels where they agree.

    With n = confusion_matrix(clusters as prediction) (n_ij = pixels of class i in cluster j),
    it maximises sum_j n_{m(j), j} over permutations m. K <= 8: every one of the K!
    permutations is tried (at most 40,320; the first best in itertools order wins); larger
    K: scipy.optimize.linear_sum_assignment, the same optimum by the Hungarian method.
    Proof: test_match_clusters_exact_assignment.
    """
    import itertools

    classes = _check_classes(classes)
    n = confusion_matrix(cluster_map, target, classes, ignore_index)
    if classes <= 8:
        columns = np.arange(classes)
        best, best_score = None, -1
        for permutation in itertools.permutations(range(classes)):
            score = int(n[list(permutation), columns].sum())      # cluster j -> class permutation[j]
            if score > best_score:
                best, best_score = permutation, score
        return np.array(best, np.int64)
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(n, maximize=True)
    mapping = np.empty(classes, np.int64)
    mapping[cols] = rows
    return mapping


def match_clusters(cluster_map, target, classes: int, ignore_index: int = 255) -> np.ndarray:
    """The cluster map relabelled by cluster_assignment: a class map (same shape, int64).

    It looks at the truth to name the clusters (the lecture's "classical method + label
    matching"), so it is the best that intensity clusters can score, an upper bound for any
    rule that names them without the truth. Proof: test_match_clusters_exact_assignment.
    """
    mapping = cluster_assignment(cluster_map, target, classes, ignore_index)
    return mapping[np.asarray(to_numpy(cluster_map)).astype(np.int64)]


def majority_baseline(target, ignore_index: int = 255) -> np.ndarray:
    """The most frequent scored class of the target (ignored pixels left out; ties: the lowest
    class) everywhere: a class map of target's shape, int64. Proof: test_majority_baseline."""
    target = np.asarray(to_numpy(target))
    if target.dtype.kind not in "ui" or target.ndim < 2:
        raise MetricInputError(f"target must be an integer class map, got shape {target.shape} dtype {target.dtype}")
    scored = target[target != ignore_index].astype(np.int64)
    if scored.size and scored.min() < 0:
        raise MetricInputError("target holds negative values; class maps hold 0..K-1 and the ignore value")
    majority = int(np.argmax(np.bincount(scored))) if scored.size else 0
    return np.full(target.shape, majority, np.int64)


def evaluate_classes(pred, target, classes: int, image=None, ignore_index: int = 255,
                     class_names: Sequence[str] | None = None, seed: int = 0) -> dict:
    """class_scores of a prediction, with the baselines beside it: "majority" (majority_baseline)
    and, with the grey image (same shape as target), "kmeans": k-means on intensity per slice
    (k = K), clusters matched to classes over the whole stack. Proof: test_evaluate_classes."""
    result = class_scores(pred, target, classes, ignore_index, class_names)
    target_array = _class_map("target", target, _check_classes(classes), ignore_index)
    names = result["class_names"]
    result["majority"] = class_scores(majority_baseline(target_array, ignore_index), target_array, classes,
                                      ignore_index, names)
    if image is not None:
        image = np.asarray(to_numpy(image))
        if image.ndim == 4 and image.shape[1] == 1:
            image = image[:, 0]
        if image.shape != target_array.shape:
            raise MetricInputError(f"image has shape {image.shape} but target has shape {target_array.shape}")
        clusters = np.stack([kmeans_baseline(s, classes, seed) for s in _slices(image)]).reshape(image.shape)
        result["kmeans"] = class_scores(match_clusters(clusters, target_array, classes, ignore_index), target_array,
                                        classes, ignore_index, names)
    return result
