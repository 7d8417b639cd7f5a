"""Proofs for the K-class scores and baselines of tinyunet/metrics.py and the colour outputs of
tinyunet/classes.py: hand-computed cases, an independent loop computation, ignore pixels,
absent classes, the binary case against today's IoU."""
import itertools
import math

import numpy as np
import pytest
from PIL import Image

from tinyunet.classes import (IGNORE_COLOR, ClassError, colorize, default_palette, label_png, overlay_classes,
                              save_label_png)
from tinyunet.metrics import (MetricInputError, class_report_table, class_scores, cluster_assignment,
                              confusion_matrix, evaluate_classes, iou, kmeans_baseline, kmeans_intensity,
                              majority_baseline, match_clusters, pixel_scores, save_confusion_png)

# Truth and prediction, 2 x 4, classes 0..2, one ignored pixel (255).
TRUTH = np.array([[0, 0, 1, 1], [2, 2, 0, 255]])
PRED = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])


def test_confusion_matrix_by_hand():
    # Scored pixels (truth, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0); the 255 is dropped.
    expected = np.array([[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    matrix = confusion_matrix(PRED, TRUTH, 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    stacked = confusion_matrix(np.stack([PRED, PRED])[:, None], np.stack([TRUTH, TRUTH])[:, None], 3)
    np.testing.assert_array_equal(stacked, 2 * expected)             # stacks (N, 1, H, W) pool their pixels


def test_class_scores_by_hand():
    s = class_scores(PRED, TRUTH, 3, class_names=["a", "b", "c"])
    # n = [[2,1,0],[0,2,0],[1,0,1]]: t = (3, 2, 2), p = (3, 3, 1), diagonal (2, 2, 1), 7 pixels.
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    ious = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]
    assert s["iou"] == pytest.approx(ious)
    assert s["mean_iou"] == pytest.approx(sum(ious) / 3)
    assert s["frequency_weighted_iou"] == pytest.approx((3 * ious[0] + 2 * ious[1] + 2 * ious[2]) / 7)
    assert s["precision"] == pytest.approx([2 / 3, 2 / 3, 1.0]) and s["recall"] == pytest.approx([2 / 3, 1.0, 0.5])
    assert s["support"] == [3, 2, 2] and s["pixels"] == 7 and s["class_names"] == ["a", "b", "c"]


def _loop_scores(pred, truth, classes, ignore):
    """The same scores from per-pixel loops and sets, independent of the confusion matrix."""
    pairs = [(int(t), int(p)) for t, p in zip(truth.ravel(), pred.ravel()) if t != ignore]
    matrix = [[0] * classes for _ in range(classes)]
    for t, p in pairs:
        matrix[t][p] += 1
    iou, recall, precision = [], [], []
    for c in range(classes):
        both = sum(1 for t, p in pairs if t == c and p == c)
        either = sum(1 for t, p in pairs if t == c or p == c)
        truth_c = sum(1 for t, _ in pairs if t == c)
        pred_c = sum(1 for _, p in pairs if p == c)
        iou.append(both / either if either else math.nan)
        recall.append(both / truth_c if truth_c else math.nan)
        precision.append(both / pred_c if pred_c else math.nan)
    weights = [sum(1 for t, _ in pairs if t == c) for c in range(classes)]
    measured = [v for v in iou if not math.isnan(v)]
    fw = sum(w * v for w, v in zip(weights, iou) if not math.isnan(v)) / len(pairs)
    return matrix, iou, recall, precision, sum(measured) / len(measured), fw


def test_confusion_and_scores_match_loops():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, (2, 9, 11))
    truth[rng.random(truth.shape) < 0.1] = 255
    truth[truth == 3] = 4                                   # class 3 absent from the truth
    pred = rng.integers(0, 5, truth.shape)
    pred[pred == 3] = 2                                     # and from the prediction
    matrix, ious, recall, precision, mean_iou, fw = _loop_scores(pred, truth, 5, 255)
    np.testing.assert_array_equal(confusion_matrix(pred, truth, 5), matrix)
    s = class_scores(pred, truth, 5)
    np.testing.assert_allclose(s["iou"], ious)
    np.testing.assert_allclose(s["recall"], recall)
    np.testing.assert_allclose(s["precision"], precision)
    assert s["mean_iou"] == pytest.approx(mean_iou) and s["frequency_weighted_iou"] == pytest.approx(fw)


def test_absent_classes_are_nan_and_left_out():
    truth = np.array([[0, 0, 1, 1]])
    s = class_scores(np.array([[0, 0, 1, 3]]), truth, 4)
    # class 2: absent from both -> NaN, left out; class 3: predicted only -> IoU 0, counted.
    assert math.isnan(s["iou"][2]) and s["iou"][3] == 0.0
    assert math.isnan(s["recall"][2]) and math.isnan(s["recall"][3]) and math.isnan(s["precision"][2])
    assert s["mean_iou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["mean_accuracy"] == pytest.approx((1 + 0.5) / 2)
    nothing = class_scores(np.zeros((2, 2), int), np.full((2, 2), 255), 3)
    assert nothing["pixels"] == 0 and all(math.isnan(nothing[k]) for k in ("pixel_accuracy", "mean_iou"))


def test_binary_case_agrees():
    rng = np.random.default_rng(3)
    truth = (rng.random((3, 16, 16)) < 0.3).astype(np.uint8)
    pred = (rng.random((3, 16, 16)) < 0.4).astype(np.uint8)
    s, binary = class_scores(pred, truth, 2), pixel_scores(pred, truth)
    assert s["iou"][1] == pytest.approx(iou(pred, truth)) and s["iou"][0] == pytest.approx(binary["iou_cell"])
    assert s["pixel_accuracy"] == pytest.approx(binary["accuracy"])
    assert s["mean_iou"] == pytest.approx(binary["mean_iou"])
    assert s["precision"][1] == pytest.approx(binary["membrane_precision"])
    assert s["recall"][1] == pytest.approx(binary["membrane_recall"])


def test_bad_inputs_are_named():
    with pytest.raises(MetricInputError, match=r"pred: 1 pixels hold values \[3\] outside 0..2"):
        confusion_matrix(np.array([[0, 3]]), np.array([[0, 1]]), 3)
    with pytest.raises(MetricInputError, match=r"target: 1 pixels hold values \[7\] outside 0..2 or the ignore value"):
        confusion_matrix(np.array([[0, 1]]), np.array([[0, 7]]), 3)
    with pytest.raises(MetricInputError, match="argmax"):
        confusion_matrix(np.zeros((2, 2), np.float32), np.zeros((2, 2), int), 3)
    with pytest.raises(MetricInputError, match="must match pixel for pixel"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(MetricInputError, match="classes must be a whole number >= 2"):
        class_scores(np.zeros((2, 2), int), np.zeros((2, 2), int), 1)
    with pytest.raises(MetricInputError, match="3 classes but 2 class names"):
        class_scores(np.zeros((2, 2), int), np.zeros((2, 2), int), 3, class_names=["a", "b"])


def test_class_report_table():
    s = class_scores(PRED, TRUTH, 3, class_names=["cyto", "memb", "mito"])
    table = class_report_table([("model", s), ("majority", class_scores(majority_baseline(TRUTH), TRUTH, 3))])
    lines = table.splitlines()
    assert "IoU cyto" in lines[0] and "fwIoU" in lines[0] and len(lines) == 4
    assert f"{s['mean_iou']:8.4f}" in lines[2] and lines[3].startswith("majority")
    absent = class_scores(np.array([[0, 0]]), np.array([[0, 0]]), 3)
    assert class_report_table(absent).splitlines()[2].split()[-2:] == ["-", "-"]     # NaN shows as "-"


# ------------------------------------------------------------------------------------ baselines

def test_kmeans_finds_separated_levels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (40, 40))
    image = np.array([0.2, 0.5, 0.8])[truth] + rng.normal(0, 0.03, truth.shape)
    image = np.clip(image, 0, 1).astype(np.float32)
    clusters, centres = kmeans_intensity(image, 3)
    np.testing.assert_array_equal(clusters, truth)                  # darkest cluster first
    assert centres == pytest.approx([0.2, 0.5, 0.8], abs=0.01)
    np.testing.assert_array_equal(kmeans_baseline(image, 3, seed=5), clusters)    # deterministic
    # Lloyd's fixed point: each centre is the mean of its pixels, each pixel at its nearest centre.
    clusters, centres = kmeans_intensity(image, 5)
    for k in range(5):
        assert centres[k] == pytest.approx(image[clusters == k].astype(np.float64).mean(), rel=1e-9)
    assert (np.abs(image[..., None] - centres).argmin(-1) == clusters).all()


def test_match_clusters_exact_assignment():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (12, 12))
    truth[0, :5] = 255
    permutation = np.array([2, 0, 3, 1])                           # cluster = permutation[class]
    clusters = permutation[np.where(truth == 255, 0, truth)]
    np.testing.assert_array_equal(match_clusters(clusters, truth, 4)[truth != 255], truth[truth != 255])
    # Noisy clusters: the chosen map scores the best of all 4! one-to-one maps (brute force here).
    noisy = rng.integers(0, 4, truth.shape)
    mapping = cluster_assignment(noisy, truth, 4)
    scored = truth != 255

    def agreement(m):
        return int((np.asarray(m)[noisy][scored] == truth[scored]).sum())

    assert agreement(mapping) == max(agreement(p) for p in itertools.permutations(range(4)))
    # Above 8 classes the Hungarian method gives the same optimum.
    big = rng.integers(0, 9, (30, 30))
    big_clusters = np.where(rng.random(big.shape) < 0.7, (big + 4) % 9, rng.integers(0, 9, big.shape))
    np.testing.assert_array_equal(cluster_assignment(big_clusters, big, 9), (np.arange(9) - 4) % 9)


def test_majority_baseline():
    truth = np.array([[1, 1, 2], [255, 255, 255]])
    np.testing.assert_array_equal(majority_baseline(truth), np.ones((2, 3)))
    np.testing.assert_array_equal(majority_baseline(np.array([[0, 1]])), np.zeros((1, 2)))       # ties: lowest
    with pytest.raises(MetricInputError, match="integer class map"):
        majority_baseline(np.zeros((2, 2), np.float32))


def test_evaluate_classes():
    truth = np.array([[0, 0, 1, 1], [2, 2, 0, 0]])
    image = np.array([0.7, 0.2, 0.4])[truth].astype(np.float32)
    result = evaluate_classes(PRED, TRUTH, 3, image=np.where(TRUTH == 255, 0.5, image).astype(np.float32))
    assert result["mean_iou"] == class_scores(PRED, TRUTH, 3)["mean_iou"]
    assert result["kmeans"]["pixel_accuracy"] == 1.0               # three clean grey levels
    assert result["majority"]["pixel_accuracy"] == pytest.approx(3 / 7)


# ------------------------------------------------------------------------------- colour outputs

def test_palette_colorize_overlay():
    palette = default_palette(21)
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]                  # VOC's "person"
    assert len({tuple(c) for c in default_palette(256)}) == 256                   # all distinct
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    colours = colorize(labels, palette[:3])
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert colours[1, 0].tolist() == [0, 128, 0] and tuple(colours[1, 1]) == IGNORE_COLOR
    over = overlay_classes(np.full((2, 2), 0.5, np.float32), labels, palette[:3], alpha=0.5)
    assert over[0, 1].tolist() == [128, 64, 64] and over[1, 1].tolist() == [128, 128, 128]   # ignore: grey only
    with pytest.raises(ClassError, match=r"1 pixels hold values \[5\] outside the 3 classes"):
        colorize(np.array([[5]]), palette[:3])
    with pytest.raises(ClassError, match="alpha"):
        overlay_classes(np.zeros((2, 2)), labels, palette[:3], alpha=2)


def test_palette_png_and_confusion_png(tmp_path):
    labels = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
    palette = np.array([[1, 2, 3], [40, 50, 60], [200, 100, 0]], np.uint8)
    path = save_label_png(labels, tmp_path / "label.png", palette)
    with Image.open(path) as picture:
        assert picture.mode == "P"
        np.testing.assert_array_equal(np.asarray(picture), labels)
        assert picture.getpalette()[:9] == palette.ravel().tolist()
    assert label_png(labels, palette).getpalette()[3 * 255:3 * 256] == list(IGNORE_COLOR)
    matrix = confusion_matrix(PRED, TRUTH, 3)
    target = save_confusion_png(matrix, ["cyto", "memb", "mito"], tmp_path / "confusion.png")
    with Image.open(target) as picture:
        assert picture.mode == "RGB" and picture.size[0] > 3 * 64
        pixels = np.asarray(picture)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "label.png"]     # no temporary left
    assert pixels.min() < 60                                      # the strongest cell is dark, the text drawn
    with pytest.raises(ClassError, match="3 classes in the matrix but 2 class names"):
        save_confusion_png(matrix, ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
