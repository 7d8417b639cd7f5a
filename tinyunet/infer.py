"""Prediction on images of any size: overlap-tile with mirror padding, optional test-time
augmentation, and the files a person looks at (probability, mask, overlay).

Overlap-tile (Ronneberger et al. 2015, fig. 2): the network sees a tile of ``tile`` pixels but
only the central ``tile - 2*margin`` of its output is kept, so every kept pixel had at least
``margin`` pixels of real context on each side. The image is mirror-padded first, so pixels
at the image border get mirrored context instead of zeros. For the unpadded ('valid')
network the network itself cuts the border away: its output is the center of its input.

Shapes: image (H, W) float in [0, 1] -> probability (H, W) float32 in [0, 1], the membrane
probability sigmoid(logit). Any H and W work; nothing is resized.

Test-time augmentation averages the predictions of the 8 flips/rotations of the image, each
mapped back. Proofs: tests/test_infer.py (tiling equals one whole-image pass where the
receptive field allows it; any size; TTA of a symmetric model).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tinyunet.backend import to_device, to_numpy
from tinyunet.files import atomic_write
from tinyunet.layers.activation import sigmoid
from tinyunet.unet import output_size


def tile_geometry(config, tile: int, margin: int):
    """(input tile, kept output size, offset of the kept part inside the network's output)."""
    out = output_size(tile, config.depth, config.padding)
    if out is None:
        raise ValueError(f"tile size {tile} is not a valid input size for this U-Net "
                         f"(padding={config.padding!r}, depth={config.depth}); "
                         f"for 'same' use a multiple of {2 ** config.depth}")
    if config.padding == "same":
        # Every tile must start on the pooling grid of the whole image (a multiple of
        # 2**depth), or its max-pool windows would group other pixels than one whole pass
        # would: the U-Net is not shift-invariant. So the margin is rounded up to that grid.
        step = 2 ** config.depth
        margin = -(-margin // step) * step
        keep = tile - 2 * margin
        if keep <= 0:
            raise ValueError(f"margin {margin} leaves nothing of a {tile}-pixel tile")
        return tile, keep, margin
    return tile, out, 0   # the unpadded network already returns only the well-seen center


def predict_logits_tiled(model, image, tile: int = 256, margin: int = 32, batch: int = 2):
    """Overlap-tile prediction of one (H, W) image -> logits (H, W) on the host."""
    config = model.config
    tile, keep, offset = tile_geometry(config, tile, margin)
    h, w = image.shape
    context = (tile - keep) // 2 if config.padding != "same" else offset
    rows = -(-h // keep)
    cols = -(-w // keep)
    # mirror-pad: `context` before, enough after that every tile is whole
    pad_after_h = rows * keep - h + (tile - keep - context)
    pad_after_w = cols * keep - w + (tile - keep - context)
    # numpy mirrors repeatedly where the padding is wider than the image itself
    padded = np.pad(image, ((context, pad_after_h), (context, pad_after_w)), mode="symmetric")
    corners = [(r * keep, c * keep) for r in range(rows) for c in range(cols)]
    dtype, device = np.dtype(config.dtype), model.device
    logits = np.zeros((rows * keep, cols * keep), dtype=dtype)
    for start in range(0, len(corners), batch):
        chunk = corners[start:start + batch]
        tiles = np.stack([padded[r:r + tile, c:c + tile] for r, c in chunk])[:, None].astype(dtype)
        out = to_numpy(model.forward(to_device(tiles, device)))    # (B, 1, out, out)
        for (r, c), o in zip(chunk, out):
            logits[r:r + keep, c:c + keep] = o[0, offset:offset + keep, offset:offset + keep]
    return logits[:h, :w]


def _dihedral(a, k: int, flip: bool):
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a


def _undo_dihedral(a, k: int, flip: bool):
    a = a[:, ::-1] if flip else a
    return np.rot90(a, -k)


def auto_tile(config, shape, margin: int, largest: int = 1024) -> int:
    """The smallest valid tile that covers the whole image and its margins in one pass, or a
    512 tile when that would exceed ``largest`` (memory grows with the tile's area)."""
    need = max(shape) + 2 * margin
    for size in range(16, largest + 1):
        out = output_size(size, config.depth, config.padding)
        if out is not None and (out >= max(shape) if config.padding == "valid" else size >= need):
            return size
    return next(s for s in range(512, 16, -1) if output_size(s, config.depth, config.padding))


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
        if value is None and name == "tile":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            refuse(f"{name} must be a whole number >= {low}, got {value!r}")
    return array


def predict_probability(model, image, tile: int | None = None, margin: int = 32, tta: bool = False,
                        batch: int = 2) -> np.ndarray:
    """Membrane probability (H, W) float32 of an (H, W) image in [0, 1], any size.

    tile None: one tile for the whole image where that fits (see auto_tile), else 512.
    """
    image = check_prediction_input(image, tile, margin, batch)
    if tile is None:
        tile = auto_tile(model.config, image.shape, margin)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
        total = np.zeros(image.shape, dtype=np.float64)
        for k, flip in views:
            logits = predict_logits_tiled(model, np.ascontiguousarray(_dihedral(image, k, flip)),
                                          tile, margin, batch)
            total += _undo_dihedral(to_numpy(sigmoid(logits)), k, flip)
        return (total / len(views)).astype(np.float32)
    finally:
        if was_training:
            model.train()


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
