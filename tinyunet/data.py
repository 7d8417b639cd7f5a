"""Membrane data: synthetic slices, ISBI 2012 files, border weights and random training crops.

Conventions (every function here returns them):

    image   (H, W) float32 in [0, 1]   (8-bit files / 255, 16-bit files / 65535)
    target  (H, W) float32 in {0, 1}   1 = MEMBRANE, the class the model predicts

Label FILES follow the ISBI 2012 challenge: 255 = cell, 0 = membrane. So a label file L
becomes the target t = (L == 0). Files with {0, 1} values are read the same way (1 = cell,
0 = membrane); any other value is refused, since it means a JPEG-compressed or resized label.

K classes (classes = K >= 2, everywhere a classes= argument is taken):

    target  (H, W) uint8 class map, values 0..K-1, or ignore_index (255: a pixel not scored)
    batches of random_crops: targets (B, H, W) int64 (softmax_cross_entropy's labels form)

label files are index PNG/TIFFs (value = class), palette PNGs (index = class, the palette kept
as Dataset.palette) or RGB colour maps with a classes.json class table (tinyunet/classes.py);
synthetic_cells(count) is the 3-class EM set (cytoplasm, membrane, mitochondrion) and
binary_as_classes turns a binary dataset into a 2-class one (cell, membrane).

A Dataset holds images, targets (empty for unlabelled images) and names. Sources:
    synthetic_membranes(count)           EM-like slices generated here, no files needed (the default)
    synthetic_cells(count)               the same with 3 classes: cytoplasm, membrane, mitochondrion
    load_folder(path)                    path/image/N.png + path/label/N.png (zhixuhao/unet's layout)
    load_image_folder(path)              images only, for prediction
    load_tiff_stack(images, labels)      multi-page TIFFs (the challenge's train-volume.tif)
    download_isbi2012(cache_dir)         the public slices, verified by sha256, cached
    resolve_data(spec)                   one entry point: "synthetic", "isbi2012", a folder, TIFFs
Training helpers: border_weight_map (the U-Net paper's weights) and random_crops / batches.

Proofs: tests/test_data.py, tests/test_multiclass_data.py (K classes).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError
from scipy import ndimage
from tqdm import tqdm

from tinyunet.augment import Augmenter
from tinyunet.classes import (ClassError, check_palette, default_palette, labels_from_colors,
                              read_class_table, save_label_png, write_class_table)
from tinyunet.files import atomic_write

DEFAULT_ISBI_URL = "https://raw.githubusercontent.com/zhixuhao/unet/master/data/membrane"
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
CACHE_ENV = "TINYUNET_CACHE"


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the file and the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A path that was asked for does not exist."""


class DownloadError(DataError, ConnectionError):
    """A file could not be fetched (HTTP error, no network, timeout)."""


class ChecksumError(DataError):
    """A downloaded file does not match its expected sha256; it has been deleted."""


# ------------------------------------------------------------------------------------ datasets

@dataclass
class Dataset:
    """Images with their targets and names; targets is empty for unlabelled data.

    images[i]: (H_i, W_i) float32 in [0, 1]; names[i]: a file stem such as "7". Sizes may
    differ between items. The targets depend on classes:

        classes = 1 (binary, the default): targets[i] float32 {0, 1}, 1 = membrane
        classes = K >= 2: targets[i] uint8 class maps, values 0..K-1 or ignore_index
                          (pixels not scored; 255 by default, as FCN's "void")

    class_names: K names (for classes = 1 the two target values: ("cell", "membrane")).
    palette: (K, 3) uint8 colours for outputs (kept from palette PNGs or classes.json;
    default tinyunet.classes.default_palette). Integer targets of another dtype are stored
    as uint8; values outside the classes are refused (check_target).
    """
    images: list[np.ndarray]
    targets: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    classes: int = 1
    class_names: tuple[str, ...] = ()
    palette: np.ndarray | None = field(default=None, compare=False)
    ignore_index: int = 255

    def __post_init__(self):
        if not self.names:
            self.names = [str(i) for i in range(len(self.images))]
        if len(self.names) != len(self.images) or len(self.targets) not in (0, len(self.images)):
            raise DataError(f"a Dataset needs one name (and one target, if any) per image: got "
                            f"{len(self.images)} images, {len(self.targets)} targets, {len(self.names)} names")
        self._check_classes()
        for image, name in zip(self.images, self.names):
            check_image(image, f"item {name!r}")
        for index, (image, target, name) in enumerate(zip(self.images, self.targets, self.names)):
            check_target(target, f"item {name!r}", self.classes, self.ignore_index)
            if image.shape != target.shape:
                raise DataError(f"item {name!r}: image {image.shape} and target {target.shape} differ in shape")
            if self.classes >= 2 and target.dtype != np.uint8:
                self.targets[index] = target.astype(np.uint8)

    def _check_classes(self) -> None:
        k = self.classes
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= 255:
            raise DataError(f"classes must be a whole number from 1 (binary membrane) to 255, got {k!r}")
        self.classes = int(k)
        ignore = self.ignore_index
        if isinstance(ignore, bool) or not isinstance(ignore, (int, np.integer)) or not k <= ignore <= 255:
            raise DataError(f"ignore_index must be a whole number in {k}..255 (not a class index, and it must "
                            f"fit the uint8 class maps), got {ignore!r}")
        self.ignore_index = int(ignore)
        values = 2 if k == 1 else k
        if not self.class_names:
            self.class_names = ("cell", "membrane") if k == 1 else tuple(f"class {c}" for c in range(k))
        self.class_names = tuple(str(name) for name in self.class_names)
        if len(self.class_names) != values:
            raise DataError(f"{values} class names expected for classes={k}, got {len(self.class_names)}: "
                            f"{list(self.class_names)}")
        self.palette = default_palette(values) if self.palette is None else \
            check_palette(self.palette, values, "Dataset palette")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        return bool(self.targets)

    def split(self, indices: Sequence[int]) -> "Dataset":
        """The items at indices, in that order, e.g. dataset.split(range(20)); classes, class names,
        palette and ignore value are kept. Proof: test_split_picks_items, test_split_keeps_the_classes."""
        indices = list(indices)
        return Dataset(images=[self.images[i] for i in indices],
                       targets=[self.targets[i] for i in indices] if self.targets else [],
                       names=[self.names[i] for i in indices], classes=self.classes,
                       class_names=self.class_names, palette=self.palette, ignore_index=self.ignore_index)


def binary_as_classes(dataset: Dataset) -> Dataset:
    """A binary membrane dataset (classes = 1) as a 2-class one for softmax models (FCN, SegNet):
    targets uint8 with 0 = cell (cytoplasm, background), 1 = membrane. Images and names are
    shared, not copied. Proof: test_binary_as_classes."""
    if dataset.classes != 1:
        raise DataError(f"binary_as_classes takes a binary membrane dataset (classes=1), got classes="
                        f"{dataset.classes}; it already holds class maps")
    return Dataset(dataset.images, [(t > 0.5).astype(np.uint8) for t in dataset.targets], list(dataset.names),
                   classes=2, class_names=("cell", "membrane"), ignore_index=dataset.ignore_index)


def refuse_values_outside_classes(labels, classes: int, ignore_index: int, source: str) -> None:
    """DataError naming ``source``, the pixels and values of an integer class map that are
    neither a class 0..K-1 nor ``ignore_index``, and the fix. Proof: test_multiclass_data.py
    (test_class_targets_out_of_range_are_named, test_label_errors_are_named)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= classes))
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(f"{source}: {int(bad.sum())} pixels hold values [{shown}] outside the {classes} classes "
                        f"0..{classes - 1} and the ignore value {ignore_index}; pass --classes "
                        f"{int(values.max()) + 1} (classes={int(values.max()) + 1}) if those are classes, or "
                        f"set them to the ignore value {ignore_index} if they are unlabelled")


def check_image(image, source: str = "image") -> None:
    """Refuse, naming ``source``, anything but an (H, W) float array, finite, in [0, 1]:
    the convention every function here returns. Proof: test_bad_images_and_targets_are_named."""
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        what = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"{source}: expected one (H, W) grey image as a NumPy array, got {what}")
    if image.dtype.kind != "f":
        hint = " (8-bit values 0..255: divide by 255)" if image.dtype.kind in "ui" else ""
        raise DataError(f"{source}: expected a float image in [0, 1], got dtype {image.dtype}{hint}; "
                        f"read_image returns the right form")
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(f"{source}: {int(image.size - finite.sum())} pixels are NaN or infinite; "
                        f"fix or drop the image (a model cannot learn from or predict on them)")
    low, high = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if low < 0 or high > 1:
        hint = " (it looks like 0..255: divide by 255)" if high > 1.5 else ""
        raise DataError(f"{source}: values run from {low:g} to {high:g}, outside [0, 1]{hint}")


def check_target(target, source: str = "target", classes: int = 1, ignore_index: int = 255) -> None:
    """Refuse, naming ``source``, a target that is not (H, W) with the values of its kind:
    classes = 1: {0, 1} only (1 = membrane); classes = K >= 2: integers 0..K-1 or ignore_index.
    Proof: test_bad_images_and_targets_are_named, test_class_targets_out_of_range_are_named."""
    if not isinstance(target, np.ndarray) or target.ndim != 2:
        what = f"shape {target.shape}" if isinstance(target, np.ndarray) else type(target).__name__
        raise DataError(f"{source}: expected one (H, W) target as a NumPy array, got {what}")
    if classes >= 2:
        if target.dtype.kind not in "ui":
            raise DataError(f"{source}: with classes={classes} a target is an integer class map (uint8), got dtype "
                            f"{target.dtype}; for a binary 0/1 membrane target use classes=1 or binary_as_classes")
        refuse_values_outside_classes(target, classes, ignore_index, source)
        return
    if target.dtype.kind not in "fuib":
        raise DataError(f"{source}: a target must be numeric, got dtype {target.dtype}")
    if not np.isin(target, (0, 1)).all():
        odd = target[~np.isin(target, (0, 1))]
        shown = ", ".join(f"{v:g}" for v in np.unique(odd)[:5])
        raise DataError(f"{source}: a target holds 1 (membrane) and 0 (cell) only, found [{shown}]; convert "
                        f"label files with target_from_label (255 = cell, 0 = membrane), or pass --classes K "
                        f"for class maps")


def target_from_label(label: np.ndarray, source: str = "label") -> np.ndarray:
    """Membrane target t = (label == 0) as float32, after checking label values.

    label: (H, W) integers, exactly {0, 255} or {0, 1} (or a subset), where 0 = membrane.
    source names the file in the error. Proof: test_label_values_are_checked.
    """
    label = np.asarray(label)
    if label.dtype.kind not in "fuib":
        raise DataError(f"label {source} has dtype {label.dtype}; a label holds the integers {{0, 255}} or {{0, 1}}")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"label {source} holds NaN or infinite values; a label holds only {{0, 255}} "
                            "(255 = cell, 0 = membrane) or {0, 1}. Re-export it as an 8-bit PNG.")
        fractional = np.unique(label[label != np.round(label)])
        if fractional.size:
            shown = ", ".join(f"{v:g}" for v in fractional[:5])
            raise DataError(f"label {source} holds fractional values [{shown}]; a label holds only the integers "
                            "{0, 255} (255 = cell, 0 = membrane) or {0, 1}. Binarize it (255 * (label > 0.5) "
                            "for a 0..1 float label) and save it as an 8-bit PNG.")
    values = np.unique(label)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise DataError(
            f"label {source} holds the values [{shown}] ({values.size} distinct); a label must hold "
            "only {0, 255} (255 = cell, 0 = membrane) or {0, 1}. In-between values come from JPEG "
            "compression or resizing with interpolation: binarize it (255 * (label > 127)) and save it as PNG.")
    return (label == 0).astype(np.float32)


def label_from_target(target: np.ndarray) -> np.ndarray:
    """The ISBI label file for a target: uint8, 255 = cell, 0 = membrane.

    Proof: test_load_folder_roundtrip_natural_order (save_folder, then load_folder).
    """
    return np.where(target > 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- synthetic slices

def _smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field, values mostly in [-2, 2]: unit normals on a lattice with spacing
    about `scale` pixels, interpolated by cubic splines."""
    nodes = [max(2, int(np.ceil(n / scale)) + 1) for n in shape]
    coarse = rng.standard_normal(nodes)
    at = np.meshgrid(np.linspace(0, nodes[0] - 1, shape[0]), np.linspace(0, nodes[1] - 1, shape[1]), indexing="ij")
    return ndimage.map_coordinates(coarse, at, order=3, mode="nearest")


def _voronoi_cells(size: int, rng: np.random.Generator) -> np.ndarray:
    """Cell ids (size, size) int32: a Voronoi tessellation of jittered grid points whose
    borders are bent by a smooth displacement, so cells are not straight-edged polygons."""
    spacing = rng.uniform(30, 42)                       # cell diameter in pixels
    pad = int(spacing) + 8                              # seeds beyond the border, so edge cells look cut
    canvas = size + 2 * pad
    per_side = int(np.ceil(canvas / spacing))
    grid = (np.indices((per_side, per_side)).reshape(2, -1).T + 0.5) * spacing
    seeds = grid + rng.uniform(-0.42, 0.42, grid.shape) * spacing
    seeds = np.clip(seeds.round().astype(int), 0, canvas - 1)
    seed_ids = np.zeros((canvas, canvas), np.int32)
    seed_ids[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
    # The nearest seed of every pixel, in one Euclidean distance transform.
    _, (rows, cols) = ndimage.distance_transform_edt(seed_ids == 0, return_indices=True)
    cells = seed_ids[rows, cols]
    bend = [np.arange(size)[:, None] + pad + 5 * _smooth_noise((size, size), 40, rng),
            np.arange(size)[None, :] + pad + 5 * _smooth_noise((size, size), 40, rng)]
    return ndimage.map_coordinates(cells, bend, order=0, mode="nearest")


def _membranes(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Membrane mask: a closed band around cell borders, at least 3 px wide, whose thickness
    varies smoothly along it, covering about a share drawn from [0.17, 0.23] of the pixels."""
    border = np.zeros(cells.shape, bool)
    border[:, 1:] |= cells[:, 1:] != cells[:, :-1]
    border[1:, :] |= cells[1:, :] != cells[:-1, :]
    distance = ndimage.distance_transform_edt(~border)
    # Dividing by a smooth positive field thickens some stretches and thins others; the
    # quantile then sets the overall share (the field is continuous, so no ties at the cut).
    score = distance * np.exp(-0.35 * _smooth_noise(cells.shape, 30, rng))
    band = score <= np.quantile(score, rng.uniform(0.17, 0.23))
    return band | (distance <= 1)  # never thinner than 3 px, so every cell stays closed


def _organelles(membrane: np.ndarray, rng: np.random.Generator, share=(0.10, 0.15)) -> np.ndarray:
    """Dark ellipses inside cells (vesicles, mitochondria) covering a share drawn from
    ``share`` (10-15 %) of the pixels, each kept at least 2.5 px from any pixel of ``membrane``
    (any mask to keep clear of) so the label stays unambiguous."""
    height, width = membrane.shape
    clearance = ndimage.distance_transform_edt(~membrane)
    room = np.flatnonzero(clearance >= 5.0)            # centres where a 2.5-px blob fits
    blobs = np.zeros(membrane.shape, bool)
    covered, wanted = 0, rng.uniform(*share) * membrane.size
    while covered < wanted and room.size:
        row, col = divmod(int(room[rng.integers(room.size)]), width)
        major = rng.uniform(2.5, min(9.0, clearance[row, col] - 2.5))
        minor = major * rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, np.pi)
        r0, r1 = max(0, int(row - major) - 1), min(height, int(row + major) + 2)
        c0, c1 = max(0, int(col - major) - 1), min(width, int(col + major) + 2)
        dr, dc = np.ogrid[r0 - row:r1 - row, c0 - col:c1 - col]
        along = (dr * np.cos(angle) + dc * np.sin(angle)) / major
        across = (-dr * np.sin(angle) + dc * np.cos(angle)) / minor
        patch = blobs[r0:r1, c0:c1]
        before = int(patch.sum())
        patch |= along ** 2 + across ** 2 <= 1
        covered += int(patch.sum()) - before
    return blobs


RIM_TONE = 0.18


def _mitochondria(membrane: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mitochondria-like organelles inside cells: (mask (H, W) bool, texture (H, W) float64).

    Elongated ellipses (semi-axes 6-13 px by 3.5-6.5 px, any orientation) covering about a
    share drawn from [0.08, 0.12] of the pixels, each kept at least 3 px from every membrane
    and 2 px from every other mitochondrion, so each lies inside one cell and touches nothing.
    texture is a grey level over each one: a dark matrix (0.36-0.48) crossed by darker cristae
    (stripes across the long axis, 5-7 px apart) inside a dark rim (the double outer membrane).
    """
    height, width = membrane.shape
    clearance = ndimage.distance_transform_edt(~membrane)
    room = np.flatnonzero(clearance >= 7.0)              # centres where at least a small one fits
    mask = np.zeros(membrane.shape, bool)
    texture = np.full(membrane.shape, RIM_TONE)          # so soft edges blend towards the rim
    covered, wanted = 0, rng.uniform(0.08, 0.12) * membrane.size
    for _ in range(400):                                  # attempts; most succeed
        if covered >= wanted or not room.size:
            break
        row, col = divmod(int(room[rng.integers(room.size)]), width)
        major, minor = rng.uniform(6.0, 13.0), rng.uniform(3.5, 6.5)
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(5.0, 7.0), rng.uniform(0, 2 * np.pi)
        tone = rng.uniform(0.36, 0.48)
        reach = int(major) + 4                            # the ellipse grown by 2 px fits in this box
        r0, r1 = max(0, row - reach), min(height, row + reach + 1)
        c0, c1 = max(0, col - reach), min(width, col + reach + 1)
        dr, dc = np.ogrid[r0 - row:r1 - row, c0 - col:c1 - col]
        along = dr * np.cos(angle) + dc * np.sin(angle)
        across = -dr * np.sin(angle) + dc * np.cos(angle)
        radius = np.sqrt((along / major) ** 2 + (across / minor) ** 2)
        shape = radius <= 1
        grown = (along / (major + 2)) ** 2 + (across / (minor + 2)) ** 2 <= 1     # 2 px around it
        if mask[r0:r1, c0:c1][grown].any() or clearance[r0:r1, c0:c1][shape].min(initial=99) < 3:
            continue
        cristae = 0.5 + 0.5 * np.cos(2 * np.pi * along / period + phase)      # 1 on a crista
        grey = np.where(radius > 0.7, RIM_TONE, tone - 0.22 * cristae)
        texture[r0:r1, c0:c1][shape] = grey[shape]
        mask[r0:r1, c0:c1] |= shape
        covered += int(shape.sum())
    return mask, texture


def _synthetic_slice(size: int, rng: np.random.Generator, with_mitochondria: bool = False):
    """One slice: (image (H, W) float32, membrane (H, W) float32) or, with_mitochondria, (image,
    class map uint8: 0 cytoplasm, 1 membrane, 2 mitochondrion). Without mitochondria the random
    draws are exactly those of the binary generator, so its slices never change."""
    cells = _voronoi_cells(size, rng)
    membrane = _membranes(cells, rng)
    if with_mitochondria:
        mitochondria, texture = _mitochondria(membrane, rng)
        blobs = _organelles(membrane | mitochondria, rng, share=(0.02, 0.04))   # small dark vesicles
    else:
        blobs = _organelles(membrane, rng)
    # Cells: one grey level each plus fine texture; some cells are as dark as faint membrane.
    image = rng.uniform(0.55, 0.8, cells.max() + 1)[cells]
    image = image + 0.15 * ndimage.gaussian_filter(rng.standard_normal(cells.shape), 2)
    # Membranes and organelles darken the cells, with soft edges.
    soft_membrane = ndimage.gaussian_filter(membrane.astype(np.float64), 0.7)
    membrane_tone = 0.22 + 0.06 * _smooth_noise(cells.shape, 20, rng)
    image = image * (1 - soft_membrane) + membrane_tone * soft_membrane
    soft_blobs = ndimage.gaussian_filter(blobs.astype(np.float64), 0.8)
    image = image * (1 - soft_blobs) + rng.uniform(0.12, 0.32) * soft_blobs
    if with_mitochondria:
        soft_mito = ndimage.gaussian_filter(mitochondria.astype(np.float64), 0.7)
        image = image * (1 - soft_mito) + texture * soft_mito
    # Uneven illumination over the whole slice, then the microscope's blur and noise.
    image = image * (1 + 0.2 * _smooth_noise(cells.shape, size / 1.5, rng))
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.05, cells.shape)
    # Quantised to 8 bits, so saving as PNG and loading back gives the same numbers.
    image = np.round(np.clip(image, 0, 1) * 255) / 255
    if with_mitochondria:
        labels = membrane.astype(np.uint8) + 2 * mitochondria.astype(np.uint8)
        return image.astype(np.float32), labels
    return image.astype(np.float32), membrane.astype(np.float32)


def synthetic_membranes(count: int, size: int = 256, seed: int = 0) -> Dataset:
    """count EM-like slices (size, size) with their membrane targets, generated here.

    Cells are a bent Voronoi tessellation of jittered points; membranes are dark bands of
    varying thickness between cells (17-23 % of pixels); dark organelles inside cells (10-15 %)
    are NOT membrane; uneven illumination, blur and noise follow. A global threshold (Otsu)
    therefore marks organelles and dark cells as membrane, while the membranes' shape is what
    a U-Net can learn. Slice i depends only on (seed, i), so a longer run extends a shorter one.
    About 0.05 s per 256x256 slice. Proofs: test_synthetic_is_reproducible,
    test_synthetic_fools_otsu_and_has_membrane_share.
    """
    if int(count) < 1 or int(size) < 32:
        raise DataError(f"synthetic_membranes needs count >= 1 and size >= 32, got count={count}, size={size}")
    images, targets = [], []
    for index in range(int(count)):
        image, target = _synthetic_slice(int(size), np.random.default_rng([int(seed), index]))
        images.append(image)
        targets.append(target)
    return Dataset(images, targets, [f"synthetic_{index:03d}" for index in range(int(count))])


CELL_CLASS_NAMES = ("cytoplasm", "membrane", "mitochondrion")


def synthetic_cells(count: int, size: int = 256, seed: int = 0) -> Dataset:
    """count EM-like slices (size, size) with 3-class targets, generated here (no download):

        0 cytoplasm (everything inside cells, small dark vesicles included)
        1 membrane (as in synthetic_membranes)
        2 mitochondrion: elongated, dark, textured with cristae-like stripes and a dark rim,
          inside cells and at least 3 px from any membrane (see _mitochondria)

    The cells, membranes, tones, illumination, blur and noise are those of synthetic_membranes;
    vesicles (2-4 % of pixels, dark like mitochondria but small, round and plain) keep a grey
    threshold from finding the mitochondria. Targets uint8 (H, W); classes=3, class_names
    CELL_CLASS_NAMES, default palette. Slice i depends only on (seed, i); the random stream
    differs from synthetic_membranes' (seeded with an extra 3), so the slices differ from it.
    Proof: test_synthetic_cells_classes_and_shapes, test_synthetic_binary_generator_unchanged.
    """
    if int(count) < 1 or int(size) < 32:
        raise DataError(f"synthetic_cells needs count >= 1 and size >= 32, got count={count}, size={size}")
    images, targets = [], []
    for index in range(int(count)):
        image, target = _synthetic_slice(int(size), np.random.default_rng([int(seed), index, 3]), True)
        images.append(image)
        targets.append(target)
    return Dataset(images, targets, [f"cells_{index:03d}" for index in range(int(count))], classes=3,
                   class_names=CELL_CLASS_NAMES)


# -------------------------------------------------------------------------------- image files

def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: 0, 1, 2, ..., 10 (not 0, 1, 10, 2).

    Proof: test_load_folder_roundtrip_natural_order, test_load_image_folder_without_labels.
    """
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", name)]


def _too_many_pixels(path: Path, error: Exception) -> DataError:
    return DataError(f"{path} is larger than Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} "
                     f"pixels ({error}); cut it into smaller images, or if you trust the file raise "
                     "PIL.Image.MAX_IMAGE_PIXELS before loading it.")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            opened.load()
            pages = getattr(opened, "n_frames", 1)
            page = opened.copy()
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(path, error) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read the image {path} ({type(error).__name__}: {error}). "
                        "Check that it is a complete PNG/TIFF file; re-export or re-download it.") from None
    if pages > 1:
        raise DataError(f"{path} is a stack of {pages} pages, not one image; read it with "
                        f"load_tiff_stack({str(path)!r}).")
    return page


def _unit_grey(page: Image.Image, source: str) -> np.ndarray:
    """One Pillow image as (H, W) float32 in [0, 1]."""
    if page.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(page, dtype=np.float64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise DataError(f"image {source} is a 32-bit integer image with values outside [0, 65535]; "
                            "save it as 8- or 16-bit greyscale.")
        return (values / 65535).astype(np.float32)
    if page.mode == "F":
        values = np.asarray(page, dtype=np.float32)
        if not np.all(np.isfinite(values)):
            raise DataError(f"image {source} holds {int((~np.isfinite(values)).sum())} NaN or infinite pixels; "
                            "fix or drop the image (a model cannot learn from or predict on them).")
        if values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise DataError(f"image {source} is a float image with values outside [0, 1]; "
                            "rescale it to [0, 1] or save it as 8-bit greyscale.")
        return values.copy()
    # 1-bit, palette, RGB(A): Pillow's luminance conversion gives 8-bit grey.
    return np.asarray(page.convert("L"), dtype=np.float32) / 255


def _label_values(page: Image.Image) -> np.ndarray:
    if page.mode == "F":                     # target_from_label refuses fractions and NaN
        return np.asarray(page, dtype=np.float64)
    if page.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(page).astype(np.int64)
    return np.asarray(page.convert("L"))


def read_image(path) -> np.ndarray:
    """An image file as (H, W) float32 in [0, 1] (8-bit / 255, 16-bit / 65535, colour to grey).

    Proof: test_sixteen_bit_and_rgb_images_read_to_unit_range, test_unreadable_image_is_named.
    """
    path = Path(path)
    return _unit_grey(_open(path), str(path))


def read_target(path) -> np.ndarray:
    """A label file (255 = cell, 0 = membrane) as the target (H, W) float32, 1 = membrane.

    Proof: test_label_values_are_checked.
    """
    path = Path(path)
    return target_from_label(_label_values(_open(path)), str(path))


CLASS_TABLE = "classes.json"


@dataclass
class ClassLabels:
    """How K-class label files are read: classes K, the ignore value, and the class table
    (names, palette, ignore colour) of a classes.json when there is one."""
    classes: int
    ignore_index: int = 255
    names: tuple[str, ...] = ()
    palette: np.ndarray | None = None
    ignore_color: tuple | None = None
    table_path: Path | None = None
    kinds: set = field(default_factory=set)          # "grey", "palette", "rgb": what was read
    file_palette: np.ndarray | None = None           # the first palette PNG's first K colours

    @classmethod
    def beside(cls, folder: Path, classes: int, ignore_index: int = 255, tables=None) -> "ClassLabels":
        """The reading rules for labels in folder: the first class table found among tables
        (default: folder/../classes.json, then folder/classes.json)."""
        if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 2 <= classes <= 255:
            raise DataError(f"classes must be a whole number from 2 to 255 for class maps (1 = binary membrane), "
                            f"got {classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)) or \
                not classes <= ignore_index <= 255:
            raise DataError(f"ignore_index must be a whole number in {classes}..255 (not a class), "
                            f"got {ignore_index!r}")
        rules = cls(int(classes), int(ignore_index))
        for candidate in tables or (folder.parent / CLASS_TABLE, folder / CLASS_TABLE):
            if candidate.is_file():
                try:
                    rules.names, rules.palette, rules.ignore_color = read_class_table(candidate, classes)
                except ClassError as error:
                    raise DataError(str(error)) from None
                rules.table_path = candidate
                break
        return rules

    def read(self, page: Image.Image, source: str) -> np.ndarray:
        """One label page -> (H, W) uint8 class map, values checked against the classes."""
        if page.mode == "P":
            self.kinds.add("palette")
            values = np.asarray(page)
            if self.file_palette is None:
                colours = np.array(page.getpalette() or [], np.uint8).reshape(-1, 3)
                if len(colours) >= self.classes:
                    self.file_palette = colours[:self.classes]
        elif page.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            rgb = np.asarray(page.convert("RGB"))
            if self.palette is not None:
                self.kinds.add("rgb")
                try:
                    return labels_from_colors(rgb, self.palette, self.ignore_color, self.ignore_index, source)
                except ClassError as error:
                    raise DataError(str(error)) from None
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise DataError(f"label {source} is an RGB colour map but there is no class table: write "
                                f"{CLASS_TABLE} beside the label folder, listing the classes in order as "
                                '[{"name": "cytoplasm", "color": [0, 0, 0]}, ...], or save the labels as index '
                                "or palette PNGs (pixel value = class)")
            self.kinds.add("grey")
            values = rgb[..., 0]
        else:
            self.kinds.add("grey")
            values = _label_values(page)
            if values.dtype.kind == "f":
                if not np.isfinite(values).all() or (values != np.round(values)).any():
                    raise DataError(f"label {source} holds fractional or NaN values; a class map holds the integers "
                                    f"0..{self.classes - 1} (and {self.ignore_index} for unlabelled pixels)")
                values = values.astype(np.int64)
        refuse_values_outside_classes(values, self.classes, self.ignore_index, f"label {source}")
        return values.astype(np.uint8)

    def membrane_maps(self, images, targets: list[np.ndarray], names, where) -> Dataset | None:
        """Grey labels that hold only 0 and 255 are ISBI-style binary membrane maps (255 = cell,
        0 = membrane), which read as class maps would be class 0 and "ignore": with K = 2 they
        become the classes cell (0) and membrane (1) (binary_as_classes); with another K they are
        refused. None for class maps."""
        if self.kinds != {"grey"} or self.ignore_index != 255 or not targets:
            return None
        values = set()
        for target in targets:
            values |= set(np.unique(target).tolist())
        if values != {0, 255}:
            return None
        if self.classes == 2:
            return binary_as_classes(Dataset(images, [(t == 0).astype(np.float32) for t in targets], names))
        raise DataError(f"the labels of {where} hold only 0 and 255: binary membrane maps (ISBI: 255 = cell, "
                        f"0 = membrane), not class maps of {self.classes} classes. Train them with --classes 1 "
                        "(binary) or --classes 2 (cell and membrane); or write class maps with values 0..K-1.")

    def dataset(self, images, targets, names) -> Dataset:
        palette = self.palette if self.palette is not None else self.file_palette
        return Dataset(images, targets, names, classes=self.classes, class_names=self.names, palette=palette,
                       ignore_index=self.ignore_index)


def read_class_target(path, classes: int, ignore_index: int = 255) -> np.ndarray:
    """A K-class label file (index PNG/TIFF, palette PNG, or RGB with a classes.json beside its
    folder) as (H, W) uint8, values 0..K-1 or ignore_index. Proof: test_label_formats_read_the_same."""
    path = Path(path)
    return ClassLabels.beside(path.parent, classes, ignore_index).read(_open(path), str(path))


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem, hidden files and other suffixes ignored."""
    by_stem: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in by_stem:
                raise DataError(f"{folder} holds two images named {path.stem!r}: {by_stem[path.stem].name} and "
                                f"{path.name}; keep one.")
            by_stem[path.stem] = path
    return by_stem


def _existing_folder(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(f"{what} {path.resolve()} {state}. Pass a folder (e.g. data/isbi2012/train).")
    return path


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_folder(path, classes: int = 1, ignore_index: int = 255) -> Dataset:
    """A labelled folder in zhixuhao/unet's layout: path/image/<name>.png, path/label/<name>.png.

    Images and labels pair by file stem and are sorted naturally (0, 1, 2, ..., 10).
    classes = 1: binary membrane labels (255 = cell, 0 = membrane, or {0, 1}), as always.
    classes = K >= 2: class maps, each label file one of
        an index PNG/TIFF (8 or 16 bit grey): pixel value = class;
        a palette ("P" mode) PNG: palette index = class; the palette's first K colours become
            the dataset's palette (unless a class table gives one);
        an RGB PNG: colours mapped through path/classes.json (or label/classes.json), see
            tinyunet.classes.read_class_table; the table also gives the class names;
    ignore_index (255) marks unscored pixels and passes through.
    Refuses, naming the files: images without labels and the reverse, image/label size
    mismatches, label values other than {0, 255} / {0, 1} (binary) or outside 0..K-1 and the
    ignore value (K classes), colours not in the class table, RGB labels without one, and
    0/255 membrane labels read with K classes, and unreadable files.
    Proofs: test_load_folder_roundtrip_natural_order, test_unpaired_files_are_listed,
    test_size_mismatch_is_named, test_load_real_isbi_folder; K classes: test_label_formats_read_the_same,
    test_label_errors_are_named.
    """
    root = _existing_folder(path, "data folder")
    image_dir, label_dir = root / "image", root / "label"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise DataNotFoundError(
            f"{root} needs the subfolders image/ and label/ (zhixuhao/unet's layout: image/0.png with "
            f"label/0.png, ...). For images without labels use load_image_folder({str(root)!r}).")
    images, labels = _image_files(image_dir), _image_files(label_dir)
    unlabelled = sorted(set(images) - set(labels), key=natural_key)
    orphans = sorted(set(labels) - set(images), key=natural_key)
    if unlabelled or orphans:
        problems = ([f"images without a label in {label_dir}: {_listing(unlabelled)}"] if unlabelled else []) + \
                   ([f"labels without an image in {image_dir}: {_listing(orphans)}"] if orphans else [])
        raise DataError("; ".join(problems) + ". Images and labels pair by file name; add or remove the odd ones.")
    if not images:
        raise DataError(f"{image_dir} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    rules = ClassLabels.beside(label_dir, classes, ignore_index) if classes != 1 else None
    dataset = Dataset([], [], [])
    for name in sorted(images, key=natural_key):
        image = read_image(images[name])
        target = read_target(labels[name]) if rules is None else rules.read(_open(labels[name]), str(labels[name]))
        if image.shape != target.shape:
            raise DataError(f"image {images[name]} is {image.shape[0]}x{image.shape[1]} (height x width) but "
                            f"its label {labels[name]} is {target.shape[0]}x{target.shape[1]}; they must match "
                            "pixel for pixel. Re-export the label at the image's size.")
        dataset.images.append(image)
        dataset.targets.append(target)
        dataset.names.append(name)
    if rules is None:
        return dataset
    membranes = rules.membrane_maps(dataset.images, dataset.targets, dataset.names, label_dir)
    return membranes if membranes is not None else rules.dataset(dataset.images, dataset.targets, dataset.names)


def load_image_folder(path) -> Dataset:
    """Every image of a folder, without labels (for prediction), sorted naturally.

    Proof: test_load_image_folder_without_labels.
    """
    folder = _existing_folder(path, "image folder")
    images = _image_files(folder)
    if not images:
        raise DataError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    names = sorted(images, key=natural_key)
    return Dataset([read_image(images[name]) for name in names], [], names)


def save_png(array: np.ndarray, path) -> None:
    """Write a (H, W) uint8 array as a greyscale PNG, atomically (temporary file, then os.replace).

    Proof: test_load_folder_roundtrip_natural_order (no temporary file is left behind).
    """
    atomic_write(Path(path), lambda stream: Image.fromarray(array).save(stream, format="PNG"))


def save_folder(dataset: Dataset, path) -> Path:
    """Write a labelled dataset in zhixuhao/unet's layout: path/image/<name>.png and
    path/label/<name>.png: binary (classes = 1) as 255 = cell, 0 = membrane; K classes as
    palette PNGs (index = class, the dataset's palette) with path/classes.json (names and
    colours). load_folder(path, classes=dataset.classes) reads it back exactly when images are
    multiples of 1/255 (synthetic ones are). Proof: test_load_folder_roundtrip_natural_order,
    test_save_folder_of_class_maps_round_trips.
    """
    root = Path(path)
    for index, name in enumerate(dataset.names):
        save_png(np.round(dataset.images[index] * 255).astype(np.uint8), root / "image" / f"{name}.png")
        if dataset.labelled and dataset.classes == 1:
            save_png(label_from_target(dataset.targets[index]), root / "label" / f"{name}.png")
        elif dataset.labelled:
            save_label_png(dataset.targets[index], root / "label" / f"{name}.png", dataset.palette,
                           dataset.ignore_index)
    if dataset.labelled and dataset.classes >= 2:
        write_class_table(root / CLASS_TABLE, dataset.class_names, dataset.palette)
    return root


# --------------------------------------------------------------------------------- TIFF stacks

def _tiff_pages(path: Path) -> list[Image.Image]:
    if not path.is_file():
        raise DataNotFoundError(f"TIFF stack {path.resolve()} does not exist.")
    try:
        with Image.open(path) as stack:
            return [page.copy() for page in ImageSequence.Iterator(stack)]
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(path, error) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read the TIFF stack {path} ({type(error).__name__}: {error}).") from None


def load_tiff_stack(image_path, label_path=None, classes: int = 1, ignore_index: int = 255) -> Dataset:
    """Multi-page TIFF stacks (the challenge's train-volume.tif / train-labels.tif): one
    item per page, named <stem>_<page>. Labels optional; page counts and sizes must agree.
    classes = 1: binary membrane labels as in load_folder; K >= 2: label pages are class
    maps (index values 0..K-1, or ignore_index; palette pages and a classes.json beside the
    label file are read as in load_folder).
    Proof: test_tiff_stack_roundtrip_and_mismatch.
    """
    image_path = Path(image_path)
    pages = _tiff_pages(image_path)
    names = [f"{image_path.stem}_{index}" for index in range(len(pages))]
    images = [_unit_grey(page, f"{image_path} page {index}") for index, page in enumerate(pages)]
    targets = []
    if label_path is not None:
        label_path = Path(label_path)
        rules = ClassLabels.beside(label_path.parent, classes, ignore_index, tables=[label_path.parent / CLASS_TABLE]) \
            if classes != 1 else None
        label_pages = _tiff_pages(label_path)
        if len(label_pages) != len(pages):
            raise DataError(f"{image_path} has {len(pages)} pages but {label_path} has {len(label_pages)}; "
                            "each image page needs its label page.")
        for index, (image, page) in enumerate(zip(images, label_pages)):
            source = f"{label_path} page {index}"
            target = target_from_label(_label_values(page), source) if rules is None else rules.read(page, source)
            if target.shape != image.shape:
                raise DataError(f"{image_path} page {index} is {image.shape[0]}x{image.shape[1]} (height x width) "
                                f"but {source} is {target.shape[0]}x{target.shape[1]}; they must match.")
            targets.append(target)
        if rules is not None:
            membranes = rules.membrane_maps(images, targets, names, label_path)
            return membranes if membranes is not None else rules.dataset(images, targets, names)
    return Dataset(images, targets, names)


# ------------------------------------------------------------------------ downloading ISBI 2012

def default_cache_dir() -> Path:
    """$TINYUNET_CACHE/isbi2012 when that variable is set, else ~/.cache/tinyunet/isbi2012.

    Proof: test_shipped_sums_and_default_cache.
    """
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "tinyunet") / "isbi2012"


def isbi2012_sha256() -> dict[str, str]:
    """The shipped sha256 of the 90 upstream files, by path relative to data/membrane/
    (tinyunet/isbi2012_sha256.txt, package data). Proof: test_shipped_sums_verify_the_shared_copy.
    """
    text = resources.files("tinyunet").joinpath("isbi2012_sha256.txt").read_text()
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().removeprefix("./")] = digest.lower()
    return sums


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MAX_DOWNLOAD_BYTES = 64 << 20      # per file; the ISBI slices are about 0.3 MB each


def cache_path(cache: Path, name: str) -> Path:
    """cache/name for a name such as 'train/image/0.png', refusing any name that would land
    outside the cache folder (absolute, '..', a drive or backslashes).
    Proof: test_download_names_stay_inside_the_cache."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or ":" in name or "\0" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise DataError(f"download name {name!r} must be a relative path inside the cache folder, such as "
                        "'train/image/0.png' (no leading '/', no '..', no empty parts, no backslashes)")
    return cache.joinpath(*parts)


def _download_verified(url: str, cache: Path, name: str, expected: str, timeout: float,
                       max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """Fetch url into a temporary file beside cache/name, check its size (at most max_bytes)
    and sha256, then rename it (tinyunet/files.py: a failed download or check leaves no file)."""

    def too_large(size):
        return DownloadError(f"{name} from {url} is larger than {max_bytes:,} bytes ({size}); that is not an "
                             f"ISBI slice: check base_url, or pass a larger max_bytes")

    def fetch_and_verify(stream):
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise too_large(f"Content-Length {int(declared):,}")
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    received += len(chunk)
                    if received > max_bytes:
                        raise too_large("the transfer went past it")
                    digest.update(chunk)
                    stream.write(chunk)
        except urllib.error.HTTPError as error:
            error.close()
            raise DownloadError(f"could not download {name} from {url}: HTTP {error.code} {error.reason}. "
                                "The file may have moved upstream: pass another base_url, or copy the "
                                f"files by hand into {cache}.") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)  # a timeout, refused connection, unknown host...
            raise DownloadError(f"could not download {name} from {url}: {reason}. Without network access, "
                                "train on the synthetic data (spec 'synthetic') or a local folder.") from None
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(f"{name} downloaded from {url} failed verification: expected sha256 {expected}, "
                                f"got {actual}. The file was deleted; try again, or check base_url.")

    atomic_write(cache_path(cache, name), fetch_and_verify, suffix=".part")


def download_isbi2012(cache_dir=None, base_url: str = DEFAULT_ISBI_URL, expected_sha256: dict[str, str] | None = None,
                      timeout: float = 30.0, progress: bool = True, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Download the public ISBI 2012 slices (zhixuhao/unet's data/membrane) into cache_dir.

    Fetches every name in expected_sha256 (default: the 90 shipped sums, train/image/N.png,
    train/label/N.png, test/N.png for N in 0..29) from base_url/<name>. A cached file whose
    sha256 matches is reused without a request. Each download goes to a temporary file, is
    verified, then renamed into place; a mismatch deletes it and raises ChecksumError naming
    the file, the expected and the actual hash. HTTP errors and timeouts raise DownloadError.
    Names must stay inside cache_dir (no '..', no absolute paths) and each file may be at most
    max_bytes: both are checked, the names before any request.
    Returns cache_dir, which then holds train/image, train/label and test (load_folder ready).
    Proof: test_download_verifies_and_reuses_the_cache, test_download_errors_are_named,
    test_download_names_stay_inside_the_cache.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sums = isbi2012_sha256() if expected_sha256 is None else dict(expected_sha256)
    for name, digest in sums.items():
        cache_path(cache, name)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise DataError(f"the expected sha256 of {name!r} must be 64 hexadecimal digits, got {digest!r}")
    if not (isinstance(max_bytes, int) and max_bytes > 0):
        raise DataError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    for name in tqdm(sorted(sums, key=natural_key), desc="ISBI 2012", unit="file", disable=not progress):
        cached = cache_path(cache, name)
        if cached.is_file() and _sha256(cached) == sums[name].lower():
            continue
        _download_verified(f"{base_url.rstrip('/')}/{name}", cache, name, sums[name].lower(), timeout, max_bytes)
    return cache


# ------------------------------------------------------------------------------ one entry point

def resolve_data(spec="synthetic", *, labelled: bool = True, count: int = 30, size: int = 256, seed: int = 0,
                 cache_dir=None, classes: int = 1, ignore_index: int = 255) -> Dataset:
    """A Dataset from a spec, for scripts:

        "synthetic"                    synthetic_membranes(count, size, seed)  (the default);
                                       classes=2: binary_as_classes of it; classes=3:
                                       synthetic_cells(count, size, seed); other K refused
        "isbi2012"                     download_isbi2012(cache_dir), then its train/ folder (30 slices);
                                       classes=2: binary_as_classes of it
        a folder                       load_folder, or with labelled=False load_image_folder
                                       (of its image/ subfolder when there is one)
        (images.tif, labels.tif)       load_tiff_stack; also as one string "images.tif,labels.tif"
        images.tif with labelled=False load_tiff_stack without labels
    classes and ignore_index go to load_folder / load_tiff_stack (K-class label files).
    Proof: test_resolve_data_specs, test_resolve_data_classes.
    """
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 1 <= classes <= 255:
        raise DataError(f"classes must be a whole number from 1 (binary membrane) to 255, got {classes!r}")
    if isinstance(spec, str) and "," in spec:
        spec = tuple(part.strip() for part in spec.split(","))
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise DataError(f"a pair of TIFF stacks means (images.tif, labels.tif); got {len(spec)} paths: {spec}")
        return load_tiff_stack(*spec, classes=classes, ignore_index=ignore_index)
    text = str(spec)
    if text in ("synthetic", "isbi2012"):
        if classes not in ((1, 2, 3) if text == "synthetic" else (1, 2)):
            offered = "1 (binary membrane), 2 (cell, membrane) or 3 (cytoplasm, membrane, mitochondrion)" \
                if text == "synthetic" else "1 (binary membrane) or 2 (cell, membrane)"
            raise DataError(f"the {text!r} data has classes {offered}, not {classes}; for other classes pass a "
                            "folder of class maps (image/ and label/, with classes.json for RGB labels)")
        if text == "synthetic" and classes == 3:
            return synthetic_cells(count, size, seed)
        binary = synthetic_membranes(count, size, seed) if text == "synthetic" else \
            load_folder(download_isbi2012(cache_dir) / "train")
        return binary_as_classes(binary) if classes == 2 else binary
    path = Path(text).expanduser()
    if not path.exists():
        raise DataNotFoundError(f"data {text!r} is not 'synthetic' or 'isbi2012', and {path.resolve()} does not "
                                "exist. Pass one of those names, a folder with image/ and label/, or "
                                "'images.tif,labels.tif'.")
    if path.is_file():
        if labelled:
            raise DataError(f"{path} is a single file, so it has no labels; pass 'images.tif,labels.tif' "
                            "for training, or labelled=False to predict on it.")
        return load_tiff_stack(path)
    if labelled:
        return load_folder(path, classes, ignore_index)
    return load_image_folder(path / "image" if (path / "image").is_dir() else path)


# ------------------------------------------------------------------------------ border weights

def border_weight_map(target: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                      class_balance: bool = True) -> np.ndarray:
    """The U-Net paper's pixel weights: (H, W) target (1 = membrane) -> (H, W) float32.

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    d1, d2: distances to the nearest and second-nearest cell, a cell being a 4-connected
    component of non-membrane pixels (as in tinyunet.metrics). Narrow membranes between two
    cells get the largest weights, so the loss insists on separating touching cells.
    w_c: with class_balance, N / (2 N_c) for a pixel of class c (each class carries half the
    total weight); otherwise 1 (also when only one class is present).
    Fast: distances to cell k are computed only inside cell k's bounding box grown by
    margin = sigma * sqrt(2 ln 1e6); a pixel farther than that from its second-nearest cell
    has a border term below w0 * 1e-6, which is dropped.
    Proofs: test_border_weights_two_cells_by_hand, test_border_weights_match_brute_force.
    """
    target = np.asarray(target)
    if target.ndim != 2 or not np.isin(target, (0, 1)).all():
        raise DataError(f"border_weight_map takes one (H, W) target with values {{0, 1}} (1 = membrane), got "
                        f"shape {target.shape}; convert label files with target_from_label first.")
    membrane = target == 1
    height, width = target.shape
    cells, count = ndimage.label(~membrane)
    margin = int(np.ceil(sigma * np.sqrt(2 * np.log(1e6))))
    nearest = np.full(target.shape, np.inf)
    second = np.full(target.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        rows = slice(max(box[0].start - margin, 0), min(box[0].stop + margin, height))
        cols = slice(max(box[1].start - margin, 0), min(box[1].stop + margin, width))
        distance = ndimage.distance_transform_edt(cells[rows, cols] != index)
        near, far = nearest[rows, cols], second[rows, cols]  # views: updated in place
        np.minimum(far, np.maximum(near, distance), out=far)
        np.minimum(near, distance, out=near)
    border = w0 * np.exp(-((nearest + second) ** 2) / (2 * sigma ** 2))
    class_weight = np.ones(target.shape)
    membrane_pixels = int(membrane.sum())
    if class_balance and 0 < membrane_pixels < target.size:
        class_weight = np.where(membrane, target.size / (2 * membrane_pixels),
                                target.size / (2 * (target.size - membrane_pixels)))
    return (class_weight + border).astype(np.float32)


# ------------------------------------------------------------------------------ training crops

def random_crops(dataset: Dataset, size: int, batch: int, rng: np.random.Generator,
                 augment: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch of random (size, size) crops, images (B, 1, s, s) float32, and targets:

        classes = 1:       (B, 1, s, s) float32 {0, 1}  (bce_with_logits' form, as always)
        classes = K >= 2:  (B, s, s) int64 class indices 0..K-1 or dataset.ignore_index
                           (softmax_cross_entropy's labels form: no channel axis)

    Each crop picks an item uniformly, then a corner uniformly among those that fit; augment,
    when given, is called as augment(image, target, rng) -> (image, target) per crop (e.g.
    tinyunet.augment.Augmenter, which reads class maps by nearest neighbour; an Augmenter is
    also given ignore_index for K classes, so pixels a "constant" warp brings in from outside
    are ignored). Everything random comes from rng.
    Proof: test_random_crops_shapes_and_errors, test_random_crops_of_class_maps.
    """
    if not dataset.labelled:
        raise DataError("random_crops needs a labelled dataset (targets); this one has images only.")
    if not isinstance(rng, np.random.Generator):
        raise DataError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    for name, value in (("crop size", size), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"random_crops: the {name} must be a whole number >= 1, got {value!r}")
    smallest = min(range(len(dataset)), key=lambda i: min(dataset.images[i].shape))
    if size > min(dataset.images[smallest].shape):
        h, w = dataset.images[smallest].shape
        raise DataError(f"crop size {size} is larger than image {dataset.names[smallest]!r} ({h}x{w}, height x width); "
                        f"choose a crop size <= {min(h, w)} (divisible by 16 for the U-Net).")
    many = dataset.classes >= 2
    images = np.empty((batch, 1, size, size), np.float32)
    targets = np.empty((batch, size, size), np.int64) if many else np.empty((batch, 1, size, size), np.float32)
    for b in range(batch):
        index = int(rng.integers(len(dataset)))
        height, width = dataset.images[index].shape
        top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
        image = dataset.images[index][top:top + size, left:left + size]
        target = dataset.targets[index][top:top + size, left:left + size]
        if augment is not None:
            if many and isinstance(augment, Augmenter):
                image, target = augment(image, target, rng, ignore_index=dataset.ignore_index)
            else:
                image, target = augment(image, target, rng)
        images[b, 0] = image
        if many:
            targets[b] = target
        else:
            targets[b, 0] = target
    return images, targets


def batches(dataset: Dataset, size: int, batch: int, rng: np.random.Generator,
            augment: Callable | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An endless stream of random_crops(dataset, size, batch, rng, augment): (images, targets)
    with the shapes and dtypes random_crops gives for dataset.classes.

    Proof: test_random_crops_shapes_and_errors.
    """
    while True:
        yield random_crops(dataset, size, batch, rng, augment)
