"""Prediction on images of any size: overlap-tile with mirror padding, optional test-time
augmentation, and the files a person looks at (probability, mask, overlay).

Overlap-tile (Ronneberger et al. 2015, fig. 2): the network sees a tile of ``tile`` pixels but
only the central ``tile - 2*margin`` of its output is kept, so every kept pixel had at least
``margin`` pixels of real context on each side. The image is mirror-padded first, so pixels
at the image border get mirrored context instead of zeros. For the unpadded ('valid')
network the network itself cuts the border away: its output is the center of its input.

Shapes: image (H, W) float in [0, 1] -> probability (H, W) float32 in [0, 1], the membrane
probability sigmoid(logit), for a one-class model (the binary U-Net); (K, H, W) float32, the
softmax over the K logits of each pixel, for a K-class model (any of tinyunet.models.MODELS).
``predict_labels`` turns either into an (H, W) label map. Any H and W work; nothing is resized.

Every model of tinyunet.models works: tiles are multiples of ``input_multiple(model)`` (2**depth
for the U-Net, 32 for FCN and SegNet, whose five pools then group the same pixels as one
whole-image pass: tiles agree with it away from their borders), and ``model.inference_bytes``
(UNet's liveness model; FCN's and SegNet's conservative estimate, tinyunet/network.py) sizes them.

Test-time augmentation averages the predictions of the 8 flips/rotations of the image, each
mapped back; the tiles of the eight views share forwards (predict_logits_many), as many per
forward as the memory budget allows.

Memory: every forward runs inside tinyunet.no_grad() (nothing kept for a backward). The tile
and the batch are chosen from ``memory_budget`` (DEFAULT_MEMORY_BUDGET, 0.9 GB) by the memory
model UNet.inference_bytes: the largest tile whose forward fits, or one tile for the whole
image where that fits, so a 4096x4096 slice predicts without the caller choosing a tile.
Proofs: tests/test_infer.py (tiling equals one whole-image pass where the receptive field
allows it; any size; TTA in batches equals eight separate passes; tiles within a budget; the
memory model against tracemalloc).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tinyunet.backend import to_device, to_numpy
from tinyunet.files import atomic_write
from tinyunet.grad_mode import no_grad
from tinyunet.layers.activation import sigmoid
from tinyunet.losses import log_softmax
from tinyunet.unet import UNetConfig, output_size

POOLING_MULTIPLE = 32          # FCN and SegNet: five 2x2 pools (tinyunet.models.input_multiple)


def _padding(config) -> str:
    """'valid' for the unpadded U-Net; 'same' (output the size of the input) for every other model."""
    return config.padding if isinstance(config, UNetConfig) else "same"


def _multiple(config) -> int:
    return 2 ** config.depth if isinstance(config, UNetConfig) else POOLING_MULTIPLE


def _output_size(config, size: int):
    """The output side for an input side, or None when it does not fit (by the config alone)."""
    if isinstance(config, UNetConfig):
        return output_size(size, config.depth, config.padding)
    return size if size >= POOLING_MULTIPLE and size % POOLING_MULTIPLE == 0 else None


def tile_geometry(config, tile: int, margin: int):
    """(input tile, kept output size, offset of the kept part inside the network's output)."""
    out = _output_size(config, tile)
    if out is None:
        what = (f"this U-Net (padding={config.padding!r}, depth={config.depth}); for 'same' use"
                if isinstance(config, UNetConfig) else f"this {type(config).__name__[:-6]}: use")
        raise ValueError(f"tile size {tile} is not a valid input size for {what} a multiple of {_multiple(config)}")
    if _padding(config) == "same":
        # Every tile must start on the pooling grid of the whole image (a multiple of
        # 2**depth, or 32), or its max-pool windows would group other pixels than one whole
        # pass would: the networks are not shift-invariant. So the margin is rounded up to that grid.
        step = _multiple(config)
        margin = -(-margin // step) * step
        keep = tile - 2 * margin
        if keep <= 0:
            raise ValueError(f"margin {margin} leaves nothing of a {tile}-pixel tile")
        return tile, keep, margin
    return tile, out, 0   # the unpadded network already returns only the well-seen center


# The default memory budget of a prediction: the model's parameters plus the activations and
# workspaces of one batch of tiles, as UNet.inference_bytes estimates them. Resident memory
# measured 1.2-1.25x that estimate plus the process's 0.10 GB baseline (examples/RESULTS.md:
# TTA of a 512x512 slice, two 576x576 views per forward, estimated 0.87 GB, peaked at 1.19 GB),
# so 0.9 GB keeps a whole prediction, TTA included, under 1.5 GB.
DEFAULT_MEMORY_BUDGET = 900 * 10 ** 6
MAX_BATCH = 8                      # the eight TTA views of a small image fit in one batch


def _tiling(config, shape, tile: int, margin: int):
    """For an (H, W) image: (padding of the mirror-padded image, tile corners, keep, offset)."""
    tile, keep, offset = tile_geometry(config, tile, margin)
    h, w = shape
    context = (tile - keep) // 2 if _padding(config) != "same" else offset
    rows, cols = -(-h // keep), -(-w // keep)
    # mirror-pad: `context` before, enough after that every tile is whole
    pad = ((context, rows * keep - h + (tile - keep - context)), (context, cols * keep - w + (tile - keep - context)))
    corners = [(r * keep, c * keep) for r in range(rows) for c in range(cols)]
    return pad, corners, keep, offset


def predict_logits_many(model, images, tile: int, margin: int = 32, batch: int = 2):
    """Overlap-tile logits of each (H, W) image of the iterable ``images``, yielded in order:
    (H, W) for a one-class model, (K, H, W) for K classes.

    The tiles of consecutive images share batches: ``batch`` tiles per forward, across image
    boundaries, so the eight small TTA views run as one batch of eight where memory allows
    (one forward does the work of eight with the weights read once: Winograd's transformed
    weights are computed once instead of eight times, and the deep layers' products are 8x
    wider). Each forward runs inside no_grad(). An image is read when its first tile is
    needed and its logits are yielded once its last tile is done, so at most ``batch`` + 1
    images are in flight."""
    config = model.config
    classes = config.classes
    dtype, device = np.dtype(config.dtype), model.device
    in_flight = []                               # [padded image, logits, tiles still to run, shape]
    jobs = []                                    # (record, corner)

    def run_batch():
        tile_images = np.stack([record[0][r:r + tile, c:c + tile] for record, (r, c) in jobs])[:, None]
        with no_grad():                          # keeps nothing for a backward (tinyunet/grad_mode.py)
            out = to_numpy(model.forward(to_device(tile_images.astype(dtype, copy=False), device)))
        for (record, (r, c)), o in zip(jobs, out):
            record[1][:, r:r + keep, c:c + keep] = o[:, offset:offset + keep, offset:offset + keep]
            record[2] -= 1
        jobs.clear()
        while in_flight and in_flight[0][2] == 0:
            padded, logits, _, (h, w) = in_flight.pop(0)
            yield logits[0, :h, :w] if classes == 1 else logits[:, :h, :w]

    for image in images:
        pad, corners, keep, offset = _tiling(config, image.shape, tile, margin)
        # numpy mirrors repeatedly where the padding is wider than the image itself
        padded = np.pad(image, pad, mode="symmetric")
        record = [padded, np.zeros((classes, pad[0][0] + image.shape[0] + pad[0][1] - (tile - keep),
                                    pad[1][0] + image.shape[1] + pad[1][1] - (tile - keep)), dtype=dtype),
                  len(corners), image.shape]
        in_flight.append(record)
        for corner in corners:
            jobs.append((record, corner))
            if len(jobs) == batch:
                yield from run_batch()
    if jobs:
        yield from run_batch()


def predict_logits_tiled(model, image, tile: int = 256, margin: int = 32, batch: int = 2):
    """Overlap-tile prediction of one (H, W) image -> logits (H, W) (one class) or (K, H, W) on the host."""
    return next(predict_logits_many(model, [image], tile, margin, batch))


def _dihedral(a, k: int, flip: bool):
    """One of the 8 flips/rotations of the last two axes of (H, W) or (K, H, W)."""
    a = np.rot90(a, k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


def _undo_dihedral(a, k: int, flip: bool):
    a = a[..., ::-1] if flip else a
    return np.rot90(a, -k, axes=(-2, -1))


def _fits(model, size: int) -> bool:
    """A valid tile side for ``model``; FCN with a small input_pad also needs room for fc6."""
    if _output_size(model.config, size) is None:
        return False
    if isinstance(model.config, UNetConfig):
        return True
    from tinyunet.models import is_valid_input_size
    return is_valid_input_size(model, size)


def _valid_sizes(model, largest: int):
    return [s for s in range(1, largest + 1) if _fits(model, s)]


def batch_for_budget(model, tile: int, memory_budget: int = DEFAULT_MEMORY_BUDGET, most: int = MAX_BATCH) -> int:
    """The largest batch of ``tile``-sized tiles (at most ``most``) whose forward inside
    no_grad() fits ``memory_budget`` bytes by UNet.inference_bytes; 1 when none does."""
    c = model.config.in_channels
    fitting = [b for b in range(1, most + 1) if model.inference_bytes((b, c, tile, tile)) <= memory_budget]
    return max(fitting, default=1)


def auto_tile(model, shape, margin: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The tile for an (H, W) image: the smallest valid tile that covers the whole image and its
    margins in one pass, when its forward fits ``memory_budget``; else the largest valid tile
    whose forward (batch 1) fits it, by UNet.inference_bytes (the memory model: parameters,
    the largest workspace, and the peak of what is alive plus what each layer allocates).

    Memory grows with the tile's area (about 1.0 kB per pixel for the exact U-Net in float32,
    plus 0.19 GB of parameters and workspace), so the default 0.9 GB picks a 576-pixel
    tile for a 512x512 slice (one pass) and 816-pixel tiles for a 4096x4096 one. Raises
    ValueError when not even the smallest valid tile fits."""
    config, c = model.config, model.config.in_channels
    padding = _padding(config)
    need = max(shape) + 2 * margin
    covering = next(s for s in range(max(1, need if padding == "same" else 1), 10 * need + 64 + 16 * POOLING_MULTIPLE)
                    if _fits(model, s) and (padding == "same" or _output_size(config, s) >= max(shape)))

    def fits(size):
        return model.inference_bytes((1, c, size, size)) <= memory_budget

    if fits(covering):
        return covering
    step = _multiple(config)                      # tile_geometry rounds the margin up to it
    sizes = [s for s in _valid_sizes(model, covering) if padding != "same" or s > 2 * (-(-margin // step) * step)]
    lo, hi = 0, len(sizes) - 1                    # memory grows with the size: bisect the largest fit
    if not sizes or not fits(sizes[0]):
        raise ValueError(f"no tile fits a memory budget of {memory_budget / 1e9:.2f} GB for this model "
                         f"(the parameters alone take {sum(v.nbytes for v in model.parameters().values()) / 1e9:.2f} "
                         f"GB); raise memory_budget")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(sizes[mid]) else (lo, mid - 1)
    return sizes[lo]


def check_prediction_input(image, tile, margin, batch) -> np.ndarray:
    """The image as float32, after refusing what would predict garbage: not (H, W), not numbers,
    integers (0..255 is not [0, 1]), NaN or inf, values outside [0, 1]; and tile, margin and
    batch that are not whole numbers in range. Proof: tests/test_examples.py::test_predict_probability_refuses_bad_input."""
    def refuse(what):
        raise ValueError(f"predict_probability: {what}")

    array = np.asarray(image)
    if array.ndim != 2:
        refuse(f"expected one (H, W) grey image, got shape {array.shape}")
    if array.dtype.kind in "ui":
        refuse(f"the image is {array.dtype} (0..{np.iinfo(array.dtype).max}); give floats in [0, 1]: divide by "
               f"{np.iinfo(array.dtype).max} (tinyunet.data.read_image does)")
    if array.dtype.kind not in "fb":
        refuse(f"the image must hold numbers in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        refuse(f"{int((~np.isfinite(array)).sum())} pixels of the image are NaN or infinite; fix or drop the image")
    if array.size and (array.min() < 0 or array.max() > 1):
        refuse(f"image values run from {array.min():g} to {array.max():g}; give values in [0, 1]")
    for name, value, low in (("tile", tile, 1), ("margin", margin, 0), ("batch", batch, 1)):
        if value is None and name in ("tile", "batch"):      # None: chosen within the memory budget
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            refuse(f"{name} must be a whole number >= {low}, got {value!r}")
    return array


def _probabilities(logits, classes: int) -> np.ndarray:
    """sigmoid of (H, W) logits (one class), or the softmax over axis 0 of (K, H, W) logits."""
    if classes == 1:
        return to_numpy(sigmoid(logits))
    return np.exp(log_softmax(to_numpy(logits), axis=0))


def predict_probability(model, image, tile: int | None = None, margin: int = 32, tta: bool = False,
                        batch: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> np.ndarray:
    """Probabilities of an (H, W) image in [0, 1], any size, for any model of tinyunet.models:
    (H, W) float32, the membrane (foreground) probability, for one class (sigmoid); (K, H, W)
    float32, the softmax over K classes (each pixel's K sum to 1), for K >= 2.

    tile None: chosen by auto_tile within ``memory_budget`` bytes (one tile for the whole image
    where that fits). batch None: as many tiles per forward as fit the budget (batch_for_budget).
    ``tta``: the mean of the probabilities (per class) of the 8 flips/rotations, each mapped back; their
    tiles share batches (predict_logits_many), which gives the same numbers as eight separate
    passes to float32 rounding (tests/test_infer.py). Runs in evaluation mode (dropout off) and
    inside no_grad(): no layer keeps anything, and the model's mode is put back afterwards.
    """
    image = check_prediction_input(image, tile, margin, batch)
    if tile is None:
        tile = auto_tile(model, image.shape, margin, memory_budget)
    tile_geometry(model.config, tile, margin)     # a bad tile or margin fails before any work
    views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    if batch is None:
        tiles_per_view = len(_tiling(model.config, image.shape, tile, margin)[1])
        batch = batch_for_budget(model, tile, memory_budget, most=min(MAX_BATCH, tiles_per_view * len(views)))
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        classes = model.config.classes
        total = np.zeros(image.shape if classes == 1 else (classes,) + image.shape, dtype=np.float64)
        images = (np.ascontiguousarray(_dihedral(image, k, flip)) for k, flip in views)
        for (k, flip), logits in zip(views, predict_logits_many(model, images, tile, margin, batch)):
            total += _undo_dihedral(_probabilities(logits, classes), k, flip)
        return (total / len(views)).astype(np.float32)
    finally:
        if was_training:
            model.train()


def labels_from_probability(probability, threshold: float = 0.5) -> np.ndarray:
    """(H, W) int64 labels: probability >= threshold (1 = foreground) for an (H, W) map of one
    class; the argmax over axis 0 (ties: the lower class) for a (K, H, W) map."""
    probability = np.asarray(probability)
    if probability.ndim == 2:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        return (probability >= threshold).astype(np.int64)
    if probability.ndim != 3:
        raise ValueError(f"expected an (H, W) or (K, H, W) probability map, got shape {probability.shape}")
    return probability.argmax(axis=0).astype(np.int64)


def predict_labels(model, image, tile: int | None = None, margin: int = 32, tta: bool = False,
                   batch: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                   threshold: float = 0.5) -> np.ndarray:
    """(H, W) int64 class labels of an (H, W) image: argmax of predict_probability over the K
    classes (K >= 2), or probability >= ``threshold`` (K = 1: 1 = foreground, e.g. membrane).
    The other arguments are predict_probability's."""
    if model.config.classes == 1 and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    probability = predict_probability(model, image, tile=tile, margin=margin, tta=tta, batch=batch,
                                      memory_budget=memory_budget)
    return labels_from_probability(probability, threshold)


# ------------------------------------------------------------------------------ output files

def _save_png_atomic(array, path: Path) -> None:
    """A PNG written all or nothing (tinyunet/files.py)."""
    atomic_write(path, lambda stream: Image.fromarray(array).save(stream, format="PNG"))


def overlay(image, membrane_mask, color=(255, 40, 40), alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8: the grey image with predicted membrane pixels tinted ``color``."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.float32)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    tint = np.array(color, dtype=np.float32)
    rgb[membrane_mask] = (1 - alpha) * rgb[membrane_mask] + alpha * tint
    return rgb.round().astype(np.uint8)


def save_prediction(image, probability, out_dir, name: str, threshold: float = 0.5) -> dict:
    """Write <name>_prob.png (16-bit: probability * 65535), <name>_mask.png (ISBI convention:
    0 = membrane, 255 = cell) and <name>_overlay.png. Returns {kind: path}."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    out_dir = Path(out_dir)
    membrane = probability >= threshold
    paths = {"probability": out_dir / f"{name}_prob.png", "mask": out_dir / f"{name}_mask.png",
             "overlay": out_dir / f"{name}_overlay.png"}
    _save_png_atomic(np.round(np.clip(probability, 0, 1) * 65535).astype(np.uint16), paths["probability"])
    _save_png_atomic(np.where(membrane, 0, 255).astype(np.uint8), paths["mask"])
    _save_png_atomic(overlay(image, membrane), paths["overlay"])
    return paths


def save_class_prediction(image, labels, palette, out_dir, name: str) -> dict:
    """K classes: write <name>_labels.png (a palette PNG: pixel value = class, shown in the
    class colours) and <name>_overlay.png (the colours over the grey image). Returns {kind: path}."""
    from tinyunet.classes import overlay_classes, save_label_png
    out_dir = Path(out_dir)
    paths = {"labels": out_dir / f"{name}_labels.png", "overlay": out_dir / f"{name}_overlay.png"}
    save_label_png(labels, paths["labels"], palette)
    _save_png_atomic(overlay_classes(image, labels, palette), paths["overlay"])
    return paths
