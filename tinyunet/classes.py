"""K classes in colour: palettes, class tables, colour label maps, overlays, confusion PNGs.

Conventions (shared with tinyunet/data.py and tinyunet/metrics.py):

    labels   (H, W) integers: a class index 0..K-1 per pixel, or the ignore value (255 by
             default: a pixel that is not scored, as FCN's "void")
    palette  (K, 3) uint8: the RGB colour of each class, row k for class k
    image    (H, W) float in [0, 1] (or uint8), grey

default_palette(K) is the PASCAL VOC colour map (class 0 black, then 128-level primaries and
their mixtures, each index's bits spread over the three channels), so the palette PNGs written
here open with the colours VOC tools expect; the ignore value is drawn in VOC's void colour
IGNORE_COLOR. A class table (classes.json) lists the classes in order:

    [{"name": "cytoplasm", "color": [0, 0, 0]}, {"name": "membrane", "color": [128, 0, 0]}, ...]

and may hold one entry with "ignore": true, whose colour marks unscored pixels in RGB label
files (it is not a class). Proofs: tests/test_multiclass_data.py, tests/test_multiclass_metrics.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tinyunet.files import atomic_write

IGNORE_COLOR = (224, 224, 192)      # PASCAL VOC's colour for the void label 255


class ClassError(ValueError):
    """A class table, palette or label map that cannot be used; the message says the fix."""


# ---------------------------------------------------------------------------------- palettes

def default_palette(classes: int) -> np.ndarray:
    """The PASCAL VOC colour map for K classes: (K, 3) uint8, class 0 black, all rows distinct.

    Colour of index i: its bits (b0 b1 b2 | b3 b4 b5 | ...) go, three at a time, to the high
    bits of (R, G, B): bit 3j + c sets bit 7 - j of channel c. So 1 = (128, 0, 0),
    2 = (0, 128, 0), 3 = (128, 128, 0), 4 = (0, 0, 128), ... Distinct for K <= 256.
    """
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 1 <= classes <= 256:
        raise ClassError(f"a palette has 1 to 256 classes, got {classes!r}")
    palette = np.zeros((int(classes), 3), np.uint8)
    for index in range(int(classes)):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


def check_palette(palette, classes: int, source: str = "palette") -> np.ndarray:
    """palette as (K, 3) uint8, refusing another shape or values outside 0..255."""
    array = np.asarray(palette)
    if array.shape != (classes, 3) or array.dtype.kind not in "ui" or (array.size and
                                                                     (array.min() < 0 or array.max() > 255)):
        raise ClassError(f"{source} must be ({classes}, 3) integers in 0..255 (one RGB colour per class), "
                         f"got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.uint8)


def _check_labels(labels, classes: int, ignore_index: int, source: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise ClassError(f"{source} must be one (H, W) map of integer class indices, got shape {labels.shape} "
                         f"dtype {labels.dtype} (take argmax over the class axis of the scores first)")
    bad = (labels >= classes) & (labels != ignore_index) | (labels < 0)
    if bad.any():
        values = np.unique(labels[bad])
        raise ClassError(f"{source}: {int(bad.sum())} pixels hold values {values[:8].tolist()} outside the "
                         f"{classes} classes 0..{classes - 1} and the ignore value {ignore_index}")
    return labels


def colorize(labels, palette, ignore_index: int = 255) -> np.ndarray:
    """Class map (H, W) -> colour image (H, W, 3) uint8: pixel = palette[label]; ignore pixels
    get IGNORE_COLOR. palette: (K, 3). Refuses label values outside 0..K-1 and the ignore value."""
    palette = np.asarray(palette)
    palette = check_palette(palette, len(palette))
    labels = _check_labels(labels, len(palette), ignore_index)
    lookup = np.zeros((max(len(palette), int(ignore_index) + 1), 3), np.uint8)
    lookup[:len(palette)] = palette
    lookup[ignore_index] = IGNORE_COLOR
    return lookup[labels]


def overlay_classes(image, labels, palette, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """The grey image with each class's colour laid over it: (H, W, 3) uint8.

        out = (1 - alpha) * grey + alpha * palette[label]     (ignore pixels: grey only)

    image: (H, W) float in [0, 1] or uint8; labels: (H, W) class map; alpha in [0, 1].
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        grey = image.astype(np.float64)
    elif image.dtype.kind == "f" and image.size and np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1:
        grey = image.astype(np.float64) * 255
    else:
        raise ClassError(f"overlay_classes: the image must be (H, W) float in [0, 1] or uint8, got dtype {image.dtype}")
    if not 0 <= alpha <= 1:
        raise ClassError(f"overlay_classes: alpha must lie in [0, 1], got {alpha}")
    colours = colorize(labels, palette, ignore_index).astype(np.float64)
    if grey.shape != colours.shape[:2]:
        raise ClassError(f"overlay_classes: image {grey.shape} and labels {colours.shape[:2]} differ in shape")
    weight = np.where(np.asarray(labels) == ignore_index, 0.0, alpha)[..., None]
    out = (1 - weight) * grey[..., None] + weight * colours
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def label_png(labels, palette, ignore_index: int = 255) -> Image.Image:
    """A palette ("P" mode) Pillow image of a class map: index = class, palette rows = colours,
    entry ignore_index = IGNORE_COLOR. Opened again, np.asarray(image) gives the labels back."""
    palette = np.asarray(palette)
    palette = check_palette(palette, len(palette))
    labels = _check_labels(labels, len(palette), ignore_index)
    if len(palette) > 256 or not 0 <= ignore_index <= 255:
        raise ClassError("a palette PNG holds at most 256 indices: K <= 255 classes and an ignore value in 0..255")
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = palette
    table[ignore_index] = IGNORE_COLOR
    picture = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
    picture.putpalette(table.ravel().tolist())
    return picture


def save_label_png(labels, path, palette, ignore_index: int = 255) -> Path:
    """Write a class map as a palette PNG (see label_png), atomically; returns the path."""
    picture = label_png(labels, palette, ignore_index)
    return atomic_write(Path(path), lambda stream: picture.save(stream, format="PNG"))


# ------------------------------------------------------------------------------- class tables

def read_class_table(path, classes: int | None = None) -> tuple[tuple[str, ...], np.ndarray, tuple | None]:
    """A classes.json as (names, palette (K, 3) uint8, ignore colour or None).

    The file is a list, in class order, of {"name": str, "color": [r, g, b]}; at most one
    entry may carry "ignore": true (the colour of unscored pixels; not a class). With classes
    given, the table must list exactly that many classes.
    """
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClassError(f"cannot read the class table {path} ({type(error).__name__}: {error}); it must be JSON: "
                         '[{"name": "cytoplasm", "color": [0, 0, 0]}, ...]') from None
    if not isinstance(table, list) or not table:
        raise ClassError(f"the class table {path} must be a non-empty JSON list of "
                         '{"name": ..., "color": [r, g, b]}, one per class in order')
    names, colours, ignore = [], [], None
    for position, entry in enumerate(table):
        colour = entry.get("color") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("name", ""), str) or not isinstance(colour, list)
                or len(colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in colour)):
            raise ClassError(f"entry {position} of the class table {path} must be "
                             f'{{"name": str, "color": [r, g, b]}} with integers 0..255, got {entry!r}')
        if entry.get("ignore", False):
            if ignore is not None:
                raise ClassError(f"the class table {path} marks two entries as ignore; keep one")
            ignore = tuple(colour)
            continue
        names.append(entry.get("name") or f"class {len(names)}")
        colours.append(colour)
    palette = np.array(colours, np.uint8).reshape(-1, 3)
    duplicates = {tuple(c) for c in colours if colours.count(c) > 1} | ({ignore} & {tuple(c) for c in colours})
    if duplicates:
        raise ClassError(f"the class table {path} gives the colour(s) {sorted(duplicates)} to more than one entry; "
                         "each class needs its own colour")
    if classes is not None and len(names) != classes:
        raise ClassError(f"the class table {path} lists {len(names)} classes ({', '.join(names)}) but "
                         f"{classes} were asked for; pass --classes {len(names)} or fix the table")
    return tuple(names), palette, ignore


def write_class_table(path, names: Sequence[str], palette, ignore_color=None) -> Path:
    """Write a classes.json (the format read_class_table reads), atomically."""
    palette = check_palette(np.asarray(palette), len(names))
    entries = [{"name": str(name), "color": [int(c) for c in colour]} for name, colour in zip(names, palette)]
    if ignore_color is not None:
        entries.append({"name": "ignore", "color": [int(c) for c in ignore_color], "ignore": True})
    text = json.dumps(entries, indent=1).encode()
    return atomic_write(Path(path), lambda stream: stream.write(text))


def labels_from_colors(rgb, palette, ignore_color=None, ignore_index: int = 255,
                       source: str = "label") -> np.ndarray:
    """An RGB label map (H, W, 3) -> class map (H, W) uint8 through the class table's colours.

    Pixel colour palette[k] -> k; ignore_color -> ignore_index. Any other colour is refused,
    naming the colour(s), how many pixels, and source (a JPEG-saved or resized colour map
    blends colours at the edges)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ClassError(f"{source}: expected an RGB label map (H, W, 3), got shape {rgb.shape}")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    palette = np.asarray(palette, np.int64)
    keys = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    values = np.arange(len(keys))
    if ignore_color is not None:
        keys = np.append(keys, (ignore_color[0] << 16) | (ignore_color[1] << 8) | ignore_color[2])
        values = np.append(values, ignore_index)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    at = np.minimum(np.searchsorted(keys, code), len(keys) - 1)
    known = keys[at] == code
    if not known.all():
        unknown, counts = np.unique(code[~known], return_counts=True)
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}" for c, n in zip(unknown[:5], counts[:5]))
        raise ClassError(f"{source}: {int((~known).sum())} pixels have colours that are not in the class table "
                         f"({len(unknown)} distinct: {shown}{', ...' if len(unknown) > 5 else ''}); add them to "
                         "classes.json, or re-export the label without anti-aliasing or JPEG compression")
    return values[at].astype(np.uint8)


# ------------------------------------------------------------------------------ confusion PNG

def confusion_image(matrix, class_names: Sequence[str], cell: int = 64) -> Image.Image:
    """A picture of a (K, K) confusion matrix (rows = truth, columns = prediction): each cell
    coloured by its row-normalised share (white 0 .. dark blue 1) and labelled with its count
    and that share in per cent; class names along both axes."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.dtype.kind not in "ui":
        raise ClassError(f"a confusion matrix is (K, K) integer counts, got shape {matrix.shape} dtype {matrix.dtype}")
    if matrix.size and matrix.min() < 0:
        raise ClassError("a confusion matrix holds counts, which cannot be negative")
    k = matrix.shape[0]
    names = [str(name) for name in class_names]
    if len(names) != k:
        raise ClassError(f"{k} classes in the matrix but {len(names)} class names")
    font = ImageFont.load_default()
    margin = 8 + 7 * max([len(n) for n in names] + [5])
    width, height = margin + k * cell + 8, margin + k * cell + 24
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    for i in range(k):
        draw.text((4, margin + i * cell + cell // 2 - 5), names[i], fill="black", font=font)
        draw.text((margin + i * cell + 4, margin - 16), names[i][:cell // 7], fill="black", font=font)
        for j in range(k):
            s = share[i, j]
            colour = tuple(int(round(255 - s * (255 - c))) for c in (8, 48, 107))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour, outline="grey")
            ink = "white" if s > 0.5 else "black"
            draw.text((box[0] + 4, box[1] + cell // 2 - 12), f"{int(matrix[i, j])}", fill=ink, font=font)
            draw.text((box[0] + 4, box[1] + cell // 2 + 2), f"{100 * s:.1f}%", fill=ink, font=font)
    draw.text((margin, height - 16), "rows: truth, columns: prediction", fill="black", font=font)
    return picture


def save_confusion_png(matrix, class_names: Sequence[str], path, cell: int = 64) -> Path:
    """Write confusion_image(matrix, class_names) as a PNG, atomically; returns the path."""
    picture = confusion_image(matrix, class_names, cell)
    return atomic_write(Path(path), lambda stream: picture.save(stream, format="PNG"))
