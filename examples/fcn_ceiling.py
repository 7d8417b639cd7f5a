"""How well can FCN-32s, -16s and -8s express a labelling at all? Their ceiling, measured.

Every FCN's logits are a bilinear upsampling of a K-channel score map on a coarse grid:

    FCN-32s  logits = crop(upscore(score_fr))                      a stride-32 map, x32
    FCN-16s  logits = crop(upscore16(upscore2(score_fr) + score_pool4c))
    FCN-8s   logits = crop(upscore8(... + score_pool3c))

The upsamplers are frozen bilinear ConvTranspose2d (kernel 2s, stride s, as in the reference),
and the last sum of FCN-16s (-8s) can be any stride-16 (-8) map, since score_pool4 (score_pool3)
alone can be anything. So whatever the encoder learns, FCN-32s/16s/8s can only output
bilinear x32/x16/x8 of some score map: a field with no detail finer than the grid. A membrane
a few pixels wide, between grid points 32 pixels apart, is not in that set at all.

This script measures how close such fields come to the labels: for each held-out label map it
fits free scores z (K, ceil(H/s) + 3, ceil(W/s) + 3) through tinyunet's own frozen upsampler
(the FCN's ConvTranspose2d, bilinear, kernel 2s, stride s), centre-cropped to the image, by softmax
cross-entropy and Adam (tinyunet.losses, tinyunet.optim), then scores argmax(logits) with the
FCN paper's metrics (tinyunet.metrics.class_scores), pooled over the images as the training
runs score them. ``--learn-upsampling`` fits the (K, K, 2s, 2s) kernel too, one for all
images (as FCNConfig(learn_upsampling=True) would learn it).

What the figure is: the mean IoU of the best score map the loss finds, given the labels. A
network must produce those scores from the image, so it does no better in practice; the scores
that minimise cross-entropy need not maximise IoU, so this is an estimate of the ceiling, not
a proof of it (a larger --steps moves it by the figure printed beside it).

    python examples/fcn_ceiling.py                    # synthetic 3 classes, the 4 held-out slices
    python examples/fcn_ceiling.py --learn-upsampling --steps 1500
    python examples/fcn_ceiling.py --data ../shared/data/isbi2012/train --val 20-23 --classes 2

Figures: README, "Many classes, and the other two networks"; examples/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinyunet.data import DataError, resolve_data  # noqa: E402
from tinyunet.fcn import UPSAMPLERS, VARIANTS  # noqa: E402
from tinyunet.layers import CenterCrop2d, ConvTranspose2d  # noqa: E402
from tinyunet.losses import softmax_cross_entropy  # noqa: E402
from tinyunet.metrics import class_scores  # noqa: E402
from tinyunet.optim import Adam  # noqa: E402
from tinyunet.train import OptionError, split_data  # noqa: E402

# each variant's last upsampler sets its grid: upscore (x32), upscore16 (x16), upscore8 (x8)
STRIDES = {f"fcn{variant}": UPSAMPLERS[variant][-1][2] for variant in VARIANTS}


def best_scores(labels: np.ndarray, classes: int, stride: int, *, steps: int = 400, lr: float = 0.3,
                learn_upsampling: bool = False, ignore_index: int = 255, record=None) -> np.ndarray:
    """labels (N, H, W) -> the predicted classes (N, H, W) of the score map, stride ``stride``,
    that best fits them through a bilinear upsampler (see the module docstring).

    z: (N, K, ceil(H/s) + 3, ceil(W/s) + 3), zeros at the start; logits = the centre (H, W) of
    upsample(z), upsample = ConvTranspose2d(K, K, 2s, stride s), bilinear. Each Adam step moves
    z (and, with learn_upsampling, the kernel) down the mean cross-entropy's gradient, which
    flows back through the crop (zeros around it) and the transposed conv (a strided conv).
    ``record(step, loss)`` is called every step, if given.
    Proof: tests/test_fcn_ceiling.py (a boundary between grid points fitted exactly, lines finer
    than the grid out of reach, the ceiling falling with the stride)."""
    n, h, w = labels.shape
    upsample = ConvTranspose2d(classes, classes, 2 * stride, stride=stride, bias=False, weight_init="bilinear",
                               frozen=not learn_upsampling, dtype=np.float64)
    grid = np.zeros((n, classes, -(-h // stride) + 3, -(-w // stride) + 3))
    params = {"scores": grid}
    if learn_upsampling:
        params["kernel"] = upsample.params["weight"]          # the layer's own array: Adam moves it in place
    optimizer = Adam(params, lr=lr)
    crop = CenterCrop2d()
    for step in range(steps):
        logits = crop.forward(upsample.forward(grid), (h, w))
        loss, dlogits = softmax_cross_entropy(logits, labels, ignore_index=ignore_index)
        grads = {"scores": upsample.backward(crop.backward(dlogits))}
        if learn_upsampling:
            grads["kernel"] = upsample.grads["weight"]
        optimizer.step(grads)
        if record is not None:
            record(step, loss)
    return crop.forward(upsample.forward(grid), (h, w)).argmax(axis=1).astype(np.uint8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", default="synthetic", help="'synthetic', 'isbi2012' or a folder with image/ and label/")
    add("--classes", type=int, default=3)
    add("--val", default="", help="the held-out items, as train_membranes.py takes them (default: the last 4)")
    add("--models", nargs="+", default=list(STRIDES), choices=list(STRIDES))
    add("--steps", type=int, default=400, help="Adam steps of the fit")
    add("--lr", type=float, default=0.3)
    add("--learn-upsampling", action="store_true", help="fit the upsampling kernel as well")
    add("--synthetic-count", type=int, default=24)
    add("--synthetic-size", type=int, default=256)
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lr <= 0:
        parser.error(f"--steps must be >= 1 and --lr > 0, got --steps {args.steps} --lr {args.lr}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dataset = resolve_data(args.data, count=args.synthetic_count, size=args.synthetic_size, seed=args.seed,
                               classes=args.classes)
        _, held_out = split_data(dataset, args.val)
    except (DataError, OptionError) as error:
        print(f"fcn_ceiling.py: {error}", file=sys.stderr)
        return 2
    if dataset.classes < 2:
        print("fcn_ceiling.py: FCN needs --classes 2 or more (a softmax over K classes)", file=sys.stderr)
        return 2
    labels = np.stack(held_out.targets)
    print(f"# the best mean IoU of a bilinear upsampling of a stride-s score map, fitted to {len(labels)} "
          f"held-out label maps {labels.shape[1]}x{labels.shape[2]} ({args.data}, {dataset.classes} classes); "
          f"{args.steps} Adam steps, lr {args.lr}, upsampler {'learned' if args.learn_upsampling else 'bilinear, frozen'}")
    print("| model | stride | mean IoU | pixel acc. | " + " | ".join(f"IoU {c}" for c in held_out.class_names)
          + " | loss | loss at 3/4 of the steps |")
    print("|---|---:|---:|---:|" + "---:|" * (len(held_out.class_names) + 2))
    for model in args.models:
        losses = []
        predicted = best_scores(labels, dataset.classes, STRIDES[model], steps=args.steps, lr=args.lr,
                                learn_upsampling=args.learn_upsampling, ignore_index=held_out.ignore_index,
                                record=lambda step, loss: losses.append(loss))
        scores = class_scores(predicted, labels, dataset.classes, held_out.ignore_index, held_out.class_names)
        print(f"| {model} | {STRIDES[model]} | {scores['mean_iou']:.3f} | {scores['pixel_accuracy']:.3f} | "
              + " | ".join(f"{v:.3f}" for v in scores["iou"])
              + f" | {losses[-1]:.4f} | {losses[3 * len(losses) // 4]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
