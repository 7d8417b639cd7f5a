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

Proofs: tests/test_metrics.py (hand-computed 3x3 and 4x4 examples, empty masks, splits and
merges, Otsu against a brute-force search).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from tinyunet.backend import to_numpy

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
