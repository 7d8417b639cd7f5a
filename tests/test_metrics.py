"""Proofs for tinyunet/metrics.py: every expected number is worked out by hand in a comment."""
from math import log

import numpy as np
import pytest

from tinyunet.metrics import (MetricInputError, best_over_thresholds, confusion_counts, dice, evaluate,
                              iou, label_cells, otsu_baseline, otsu_threshold, pixel_scores,
                              report_table, segmentation_scores)

# 3x3, 1 = membrane.
TARGET_3x3 = np.array([[1, 1, 0],
                       [0, 1, 0],
                       [0, 0, 0]])
PRED_3x3 = np.array([[1, 0, 0],
                     [0, 1, 1],
                     [0, 0, 0]])
# tp: (0,0), (1,1) -> 2; fp: (1,2) -> 1; fn: (0,1) -> 1; tn: 9 - 4 = 5.

# 4x4: a membrane in column 1 separates true cell A (column 0, 4 px) from B (columns 2-3, 8 px).
TARGET_4x4 = np.array([[0, 1, 0, 0]] * 4)


def test_confusion_counts_by_hand():
    assert confusion_counts(PRED_3x3, TARGET_3x3) == {"tp": 2, "fp": 1, "fn": 1, "tn": 5}


def test_iou_and_dice_by_hand_3x3():
    assert iou(PRED_3x3, TARGET_3x3) == pytest.approx(2 / 4)        # tp / (tp + fp + fn)
    assert dice(PRED_3x3, TARGET_3x3) == pytest.approx(4 / 6)       # 2 tp / (2 tp + fp + fn)


def test_pixel_scores_by_hand_3x3():
    s = pixel_scores(PRED_3x3.astype(bool), TARGET_3x3.astype(np.float32))
    assert s["accuracy"] == pytest.approx(7 / 9)
    assert s["majority_accuracy"] == pytest.approx(6 / 9)          # 6 cell pixels of 9
    assert s["membrane_precision"] == pytest.approx(2 / 3)          # 2 / (2 + 1)
    assert s["membrane_recall"] == pytest.approx(2 / 3)             # 2 / (2 + 1)
    assert s["cell_precision"] == pytest.approx(5 / 6)              # tn / (tn + fn)
    assert s["cell_recall"] == pytest.approx(5 / 6)                 # tn / (tn + fp)
    assert s["iou_cell"] == pytest.approx(5 / 7)                    # tn / (tn + fn + fp)
    assert s["mean_iou"] == pytest.approx((1 / 2 + 5 / 7) / 2)


def test_pixel_scores_by_hand_4x4():
    # The prediction finds the top half of the membrane and adds a false pixel at (3, 3):
    # tp = 2, fn = 2, fp = 1, tn = 11.
    pred = np.zeros((4, 4), int)
    pred[0:2, 1] = 1
    pred[3, 3] = 1
    s = pixel_scores(pred, TARGET_4x4)
    assert s["accuracy"] == pytest.approx(13 / 16)
    assert s["majority_accuracy"] == pytest.approx(12 / 16)
    assert s["membrane_recall"] == pytest.approx(2 / 4)
    assert s["membrane_precision"] == pytest.approx(2 / 3)
    assert s["iou_membrane"] == pytest.approx(2 / 5)
    assert s["dice"] == pytest.approx(4 / 7)


def test_empty_masks_score_one():
    empty = np.zeros((3, 3))
    s = pixel_scores(empty, empty)
    # 0 / 0 means no mistake of that kind was possible: 1.0.
    assert s["iou_membrane"] == s["dice"] == s["membrane_precision"] == s["membrane_recall"] == 1.0
    assert s["accuracy"] == 1.0
    # Predicting membrane where there is none: IoU and Dice 0, precision 0, recall vacuously 1.
    s = pixel_scores(TARGET_3x3, empty)
    assert (s["iou_membrane"], s["dice"], s["membrane_precision"], s["membrane_recall"]) == (0, 0, 0, 1)
    # Missing every membrane pixel: precision vacuously 1, recall 0.
    s = pixel_scores(empty, TARGET_3x3)
    assert (s["iou_membrane"], s["membrane_precision"], s["membrane_recall"]) == (0, 1, 0)


def test_label_cells_diagonal_membrane():
    # The two cells touch only at a corner: 4-connectivity keeps them apart.
    labels, count = label_cells(np.array([[0, 1], [1, 0]], bool))
    assert count == 2 and labels[0, 0] != labels[1, 1] and labels[0, 1] == 0


def test_segmentation_scores_by_hand_4x4_merge():
    # The prediction keeps only the top half of the membrane, so A and B become one segment.
    # n_ij: (A, S) = 4, (B, S) = 8. sum n^2 = 80, sum a^2 = 16 + 64 = 80, sum b^2 = 12^2 = 144.
    pred = np.zeros((4, 4), int)
    pred[0:2, 1] = 1
    s = segmentation_scores(pred, TARGET_4x4)
    assert s["v_rand_split"] == pytest.approx(1.0)
    assert s["v_rand_merge"] == pytest.approx(80 / 144)
    assert s["v_rand"] == pytest.approx(2 * 80 / (80 + 144))
    # One predicted segment: H(S) = 0, so I = 0 and the merge is fully penalised.
    assert s["v_info"] == 0.0 and s["v_info_merge"] == 0.0


def test_segmentation_scores_by_hand_4x4_split_with_singletons():
    # The prediction cuts B with a membrane along row 2: B1 (rows 0-1, 4 px), B2 (row 3, 2 px),
    # and the two cut pixels (2, 2), (2, 3) inside B are singletons.
    pred = np.array([[0, 1, 0, 0],
                     [0, 1, 0, 0],
                     [0, 1, 1, 1],
                     [0, 1, 0, 0]])
    # n_ij: (A, A') = 4, (B, B1) = 4, (B, B2) = 2, plus 2 singletons.
    # sum n^2 = 16 + 16 + 4 + 2 = 38; sum a^2 = 16 + 64 = 80; sum b^2 = 16 + 16 + 4 + 2 = 38.
    s = segmentation_scores(pred, TARGET_4x4)
    assert s["v_rand_split"] == pytest.approx(38 / 80)
    assert s["v_rand_merge"] == pytest.approx(1.0)
    assert s["v_rand"] == pytest.approx(76 / 118)
    # Over n = 12 pixels: H(T) from sizes (4, 8); H(S) from (4, 4, 2, 1, 1). Every predicted
    # segment lies inside one true cell, so H(S, T) = H(S) and I = H(T).
    h_t = -(4 / 12 * log(4 / 12) + 8 / 12 * log(8 / 12))
    h_s = -(2 * 4 / 12 * log(4 / 12) + 2 / 12 * log(2 / 12) + 2 * 1 / 12 * log(1 / 12))
    assert s["v_info_merge"] == pytest.approx(1.0)
    assert s["v_info_split"] == pytest.approx(h_t / h_s)
    assert s["v_info"] == pytest.approx(2 * h_t / (h_s + h_t))


def _random_cells(seed, size=48):
    """A membrane mask of random straight membranes: a few rows and columns."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    mask[rng.choice(size, 4, replace=False), :] = True
    mask[:, rng.choice(size, 4, replace=False)] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_segmentations_score_one(seed):
    target = _random_cells(seed)
    s = segmentation_scores(target, target)
    assert all(value == pytest.approx(1.0) for value in s.values()), s


def test_split_and_merge_lower_the_scores():
    target = np.zeros((20, 20), bool)
    target[:, 10] = True                 # two cells
    split = target.copy()
    split[10, :] = True                  # four cells
    merged = np.zeros_like(target)       # one cell
    for pred in (split, merged):
        s = segmentation_scores(pred, target)
        assert s["v_rand"] < 0.95 and s["v_info"] < 0.95
    assert segmentation_scores(split, target)["v_rand_merge"] == pytest.approx(1.0)
    assert segmentation_scores(merged, target)["v_rand_split"] == pytest.approx(1.0)


def test_all_membrane_truth_scores_one():
    full = np.ones((4, 4))
    assert segmentation_scores(np.zeros((4, 4)), full)["v_rand"] == 1.0


def test_best_over_thresholds_finds_the_right_threshold():
    target = np.zeros((8, 8), np.float32)
    target[:, 3] = 1
    prob = np.where(target == 1, 0.45, 0.05).astype(np.float32)
    prob[5, 4:] = 0.25  # a faint false membrane: at thresholds <= 0.2 it splits cell B
    # thresholds 0.1, 0.2: split; 0.3, 0.4: exact; >= 0.5: membrane lost, cells merged.
    best = best_over_thresholds(prob, target)
    assert best["v_rand"] == pytest.approx(1.0) and best["v_rand_threshold"] == pytest.approx(0.3)
    assert best["v_info"] == pytest.approx(1.0) and best["v_info_threshold"] == pytest.approx(0.3)
    assert segmentation_scores(prob >= 0.5, target)["v_rand"] < 1


def test_otsu_baseline_marks_dark_pixels():
    image = np.full((6, 6), 0.8, np.float32)
    image[2, :] = 0.2
    assert 0.2 < otsu_threshold(image) <= 0.8
    np.testing.assert_array_equal(otsu_baseline(image), image == np.float32(0.2))
    # A uint8 image is the same image: value v falls into bin v.
    assert otsu_threshold((image * 255).round().astype(np.uint8)) == otsu_threshold(image)
    assert not otsu_baseline(np.full((3, 3), 0.5)).any()  # no contrast: nothing is membrane


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_otsu_matches_brute_force_search(seed):
    # Otsu minimises the within-class variance of the bin indices; search every split by hand.
    rng = np.random.default_rng(seed)
    image = np.clip(np.concatenate([rng.normal(0.3, 0.08, 300), rng.normal(0.7, 0.1, 500)]), 0, 1)
    bins = np.minimum((image * 256).astype(int), 255)
    best_k, best_within = None, np.inf
    for k in range(255):
        dark, light = bins[bins <= k], bins[bins > k]
        if dark.size and light.size:
            within = dark.size * dark.var() + light.size * light.var()
            if within < best_within - 1e-9:
                best_k, best_within = k, within
    assert otsu_threshold(image.reshape(20, 40)) == pytest.approx((best_k + 1) / 256)


def test_evaluate_perfect_prediction_and_baselines():
    target = _random_cells(0).astype(np.float32)
    image = np.where(target == 1, 0.2, 0.8).astype(np.float32)
    result = evaluate(target, target, image=image)
    for key in ("accuracy", "iou_membrane", "dice", "v_rand", "v_info", "best_v_rand", "best_v_info"):
        assert result[key] == pytest.approx(1.0), key
    assert result["otsu"]["iou_membrane"] == pytest.approx(1.0)          # dark = membrane here
    majority = result["majority"]
    assert majority["accuracy"] == pytest.approx(1 - target.mean())      # "cell" everywhere
    assert majority["accuracy"] == pytest.approx(result["majority_accuracy"])
    assert majority["iou_membrane"] == 0.0


def test_evaluate_stack_pools_pixels_and_averages_slices():
    targets = np.stack([_random_cells(0), _random_cells(1)]).astype(np.float32)[:, None]  # (2, 1, H, W)
    prob = np.stack([np.zeros_like(targets[0]), targets[1]])
    result = evaluate(prob, targets)
    assert result["accuracy"] == pytest.approx(1 - targets[0].mean() / 2)
    first = segmentation_scores(np.zeros((48, 48)), targets[0, 0])["v_rand"]
    assert result["v_rand"] == pytest.approx((first + 1.0) / 2)


def test_report_table_lists_model_and_baselines():
    target = _random_cells(1).astype(np.float32)
    result = evaluate(target * 0.9, target, image=1 - target)
    table = report_table(result)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["model", "otsu", "majority"]
    assert "V_Rand" in lines[0] and f"{result['majority']['accuracy']:.4f}" in lines[4]
    assert report_table([("only", {"dice": 0.5})]).splitlines()[2].split()[1:] == ["-"] * 5 + ["0.5000", "-", "-"]


def test_bad_inputs_are_named():
    with pytest.raises(MetricInputError, match="255"):
        pixel_scores(PRED_3x3, TARGET_3x3 * 255)
    with pytest.raises(MetricInputError, match=r"shape \(3, 3\).*\(4, 4\)"):
        pixel_scores(PRED_3x3, TARGET_4x4)
    with pytest.raises(MetricInputError, match="sigmoid"):
        evaluate(np.full((4, 4), 3.0), TARGET_4x4)
    with pytest.raises(MetricInputError, match="NaN"):
        evaluate(np.full((4, 4), np.nan), TARGET_4x4)
