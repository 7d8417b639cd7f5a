"""Pictures of a training run: loss and metric curves, and a montage of predictions.

Drawn with matplotlib's Agg backend (no screen needed) and written atomically (a temporary
file, then a rename). Proof: tests/test_train.py checks that a run writes both as PNGs.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from tinyunet.files import atomic_write  # noqa: E402
from tinyunet.infer import overlay  # noqa: E402


def save_figure_atomic(figure, path) -> None:
    """A figure written as PNG all or nothing (tinyunet/files.py), then closed."""
    try:
        atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(figure)


def save_curves(history: list[dict], path) -> None:
    """Training loss (left) and validation membrane IoU, Dice, V_Rand (right) against the step."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    losses = [h["train_loss"] for h in history]
    left.plot(steps, losses, marker="o")
    left.set(xlabel="step", ylabel="training loss (BCE)",
             title="loss")
    curves = (("iou_membrane", "membrane IoU"), ("dice", "membrane Dice"), ("best_v_rand", "best V_Rand"),
              ("accuracy", "pixel accuracy"))
    if history and "mean_iou" in history[-1]:            # K classes
        left.set(ylabel="training loss (softmax cross-entropy)")
        curves = (("mean_iou", "mean IoU"), ("pixel_accuracy", "pixel accuracy"),
                  ("mean_accuracy", "mean class accuracy"), ("frequency_weighted_iou", "frequency-weighted IoU"))
    for key, label in curves:
        right.plot(steps, [h.get(key, np.nan) for h in history], marker="o", label=label)
    if history and "majority_accuracy" in history[-1]:
        right.axhline(history[-1]["majority_accuracy"], color="grey", linestyle=":",
                      label="majority-class accuracy")
    right.set(xlabel="step", ylim=(0, 1), title="validation")
    right.legend(loc="lower right", fontsize=8)
    save_figure_atomic(figure, path)


def _save_rows(rows, titles, names, path) -> None:
    """One row of pictures per image (grey (H, W) in [0, 1] or RGB), titled by ``titles``, the
    first panel also by the image's name."""
    figure, axes = plt.subplots(len(rows), len(titles), figsize=(3 * len(titles), 3 * len(rows)), squeeze=False)
    for row, (panels, name) in enumerate(zip(rows, names)):
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap=None if panel.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(f"{titles[col]}" + (f"  [{name}]" if col == 0 else ""), fontsize=9)
    save_figure_atomic(figure, path)


def save_montage(images, targets, probabilities, names, path, threshold: float = 0.5) -> None:
    """One row per image: image, truth, probability, thresholded overlay."""
    titles = ("image", "truth (membrane white)", "membrane probability", f"prediction > {threshold}")
    rows = [(image, target, probability, overlay(image, probability >= threshold))
            for image, target, probability in zip(images, targets, probabilities)]
    _save_rows(rows, titles, names, path)


def save_class_montage(images, truths, predictions, names, palette, path) -> None:
    """K classes, one row per image: image, truth and prediction in the class colours, and the
    prediction over the image. truths/predictions: (N, H, W) class indices (ignored pixels of the
    truth: black)."""
    from tinyunet.classes import colorize, overlay_classes
    titles = ("image", "truth", "prediction", "prediction over the image")
    rows = [(image, colorize(truth, palette), colorize(prediction, palette),
             overlay_classes(image, prediction, palette))
            for image, truth, prediction in zip(images, truths, predictions)]
    _save_rows(rows, titles, names, path)
