"""Data augmentation: one random transform applied to an image and its mask together.

The classic U-Net bug is an image and its mask augmented by two generators that drift apart.
Here every sample draws its parameters ONCE from one generator, builds ONE sampling-coordinate
map, and both arrays are read through that same map: the image with linear (or cubic)
interpolation, the mask with nearest neighbour so it stays binary (or, for K classes, holds
only the class indices and ignore value it held: labels are copied, never blended).

    image: (H, W) float in [0, 1]      mask: (H, W) {0, 1}, or an integer class map      rng: np.random.Generator
    Augmenter("elastic")(image, mask, rng) -> (image', mask'), same shapes and dtypes

What a sample goes through, in this order:
  1. flips and 90-degree rotations: exact index permutations (np.flip / np.rot90) of both arrays;
  2. one continuous warp: output pixel q = (row, col) reads the input at
         centre + A (q - centre) - shift + elastic(q)
     where A composes rotation, shear and zoom (see affine_coordinates) and elastic is the
     U-Net paper's smooth random displacement (see elastic_displacement); scipy's
     map_coordinates reads both arrays there;
  3. grey values, image only: contrast about the mean, brightness, then gamma, clipped to [0, 1].

Presets (PRESETS): "none"; "flips" (flips + 90-degree rotations); "keras" (zhixuhao/unet's
ImageDataGenerator ranges: rotation_range=0.2, width/height_shift_range=0.05,
shear_range=0.05, zoom_range=0.05, horizontal_flip=True, fill_mode='nearest'; Keras reads
rotation and shear in DEGREES, so these warps are tiny); "elastic" (flips + 90-degree
rotations + elastic deformation with 10 px on a 3x3 grid + grey values, the U-Net paper's recipe).

Proofs: tests/test_augment.py (mask == image through every preset, exact rot90 and shifts
from the coordinate map, binary masks and [0, 1] images, reproducibility).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from scipy import ndimage

FILL_MODES = ("reflect", "mirror", "nearest", "wrap", "constant")


class AugmentError(ValueError):
    """An augmentation was configured or called with something it cannot use."""


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of every random change; 0 / False switches a change off.

    Uniform draws: rotation in [-rotation_degrees, +rotation_degrees], shifts in
    [-height_shift, +height_shift] * H (and width), shear angle in [-shear_degrees, ...],
    a zoom factor per axis in [1 - zoom, 1 + zoom], brightness offset in [-brightness, ...],
    contrast factor in [1 - contrast, 1 + contrast], gamma = exp(u), u in [-gamma, gamma].
    elastic_sigma: standard deviation in pixels of the displacements on an
    elastic_grid x elastic_grid grid. image_order: 0, 1 or 3 (the mask is always 0).
    """
    horizontal_flip: bool = False
    vertical_flip: bool = False
    rotate90: bool = False
    rotation_degrees: float = 0.0
    height_shift: float = 0.0
    width_shift: float = 0.0
    shear_degrees: float = 0.0
    zoom: float = 0.0
    elastic_sigma: float = 0.0
    elastic_grid: int = 3
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    image_order: int = 1
    fill_mode: str = "reflect"

    def __post_init__(self):
        if self.image_order not in (0, 1, 3):
            raise AugmentError(f"image_order must be 0, 1 or 3, got {self.image_order}")
        if self.fill_mode not in FILL_MODES:
            raise AugmentError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.elastic_grid < 2:
            raise AugmentError(f"elastic_grid must be at least 2 (nodes per side), got {self.elastic_grid}")
        if not 0 <= self.zoom < 1 or not 0 <= self.contrast < 1:
            raise AugmentError("zoom and contrast must lie in [0, 1): the factors are 1 -+ the range")

    @property
    def warps(self) -> bool:
        """True when a continuous warp (and so map_coordinates) is needed."""
        return any((self.rotation_degrees, self.height_shift, self.width_shift, self.shear_degrees,
                    self.zoom, self.elastic_sigma))


PRESETS = {
    "none": AugmentConfig(),
    "flips": AugmentConfig(horizontal_flip=True, vertical_flip=True, rotate90=True),
    "keras": AugmentConfig(rotation_degrees=0.2, width_shift=0.05, height_shift=0.05, shear_degrees=0.05,
                           zoom=0.05, horizontal_flip=True, fill_mode="nearest"),
    "elastic": AugmentConfig(horizontal_flip=True, vertical_flip=True, rotate90=True, elastic_sigma=10.0,
                             elastic_grid=3, brightness=0.1, contrast=0.2, gamma=0.3),
}


# ------------------------------------------------------------------- the sampling-coordinate map

def affine_coordinates(shape: tuple[int, int], rotation_degrees: float = 0.0, shift=(0.0, 0.0),
                       shear_degrees: float = 0.0, zoom=(1.0, 1.0)) -> np.ndarray:
    """Where each output pixel reads the input: (2, H, W) float64 (row, col) coordinates.

    With q the output pixel and c = ((H - 1) / 2, (W - 1) / 2) the centre, the read position is
    c + R Sh Z^-1 (q - c) - shift, in (row, col) order, where
        R  = [[cos t, sin t], [-sin t, cos t]]  turns the content by t counter-clockwise as shown
                                                (rows downwards), like np.rot90 for t = 90;
        Sh = [[1, 0], [-tan s, 1]]              slants the columns by the shear angle s;
        Z  = diag(zoom_rows, zoom_cols)         scales the content (zoom > 1 enlarges);
    and shift = (rows, cols) moves the content down and right, in pixels.
    Proof: test_affine_rotation_90_is_rot90, test_affine_shift_moves_content.
    """
    height, width = shape
    theta, shear = np.deg2rad(rotation_degrees), np.deg2rad(shear_degrees)
    rotate = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    slant = np.array([[1.0, 0.0], [-np.tan(shear), 1.0]])
    unzoom = np.diag([1.0 / zoom[0], 1.0 / zoom[1]])
    matrix = rotate @ slant @ unzoom
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64) - centre[0],
                             np.arange(width, dtype=np.float64) - centre[1], indexing="ij")
    read_rows = matrix[0, 0] * rows + matrix[0, 1] * cols + centre[0] - shift[0]
    read_cols = matrix[1, 0] * rows + matrix[1, 1] * cols + centre[1] - shift[1]
    return np.stack([read_rows, read_cols])


def elastic_displacement(shape: tuple[int, int], sigma: float, rng: np.random.Generator,
                         grid: int = 3) -> np.ndarray:
    """The U-Net paper's smooth random displacement field: (2, H, W) float64, in pixels.

    Displacement vectors are drawn on a coarse grid x grid lattice from N(0, sigma^2) per
    component (rng.normal, rows then cols), the lattice is laid over the image corner to
    corner (node k of n at pixel k (H - 1) / (grid - 1)), and a cubic spline through the nodes
    gives every pixel its displacement. Proof: test_elastic_field_passes_through_the_grid.
    """
    height, width = shape
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    rows, cols = np.meshgrid(np.linspace(0, grid - 1, height), np.linspace(0, grid - 1, width), indexing="ij")
    at = np.stack([rows, cols])
    return np.stack([ndimage.map_coordinates(component, at, order=3, mode="nearest") for component in coarse])


def warp(image: np.ndarray, mask: np.ndarray, coordinates: np.ndarray, image_order: int = 1,
         fill_mode: str = "reflect", mask_fill: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read image and mask through the same coordinates (2, H, W): image with spline order
    image_order (values clipped to [0, 1], cubic splines overshoot), mask with order 0, i.e.
    nearest neighbour, so a class map only ever holds values it held before: labels are
    copied, never blended. fill_mode "constant" reads 0 for the image and mask_fill for the
    mask outside the input (the ignore value for class maps); the other modes never read
    outside. Proof: test_every_preset_moves_image_and_mask_together,
    test_class_maps_keep_their_values, test_constant_fill_marks_outside_as_ignore.
    """
    warped_image = ndimage.map_coordinates(image, coordinates, order=image_order, mode=fill_mode)
    warped_mask = ndimage.map_coordinates(mask, coordinates, order=0, mode=fill_mode, cval=mask_fill)
    return np.clip(warped_image, 0, 1, out=warped_image), warped_mask


# ---------------------------------------------------------------------------------- the sampler

@dataclass(frozen=True)
class Draw:
    """The random parameters of one sample, drawn once and used for image and mask alike."""
    flip_rows: bool
    flip_cols: bool
    quarter_turns: int
    rotation_degrees: float
    shift: tuple[float, float]
    shear_degrees: float
    zoom: tuple[float, float]
    elastic: np.ndarray | None
    brightness: float
    contrast: float
    gamma: float


class Augmenter:
    """A seeded image-and-mask transform: Augmenter(preset, **overrides)(image, mask, rng).

    preset: a name in PRESETS or an AugmentConfig; overrides replace its fields, e.g.
    Augmenter("elastic", elastic_sigma=6). The same rng state gives the same output.
    Proof: tests/test_augment.py.
    """

    def __init__(self, preset: str | AugmentConfig = "elastic", **overrides):
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise AugmentError(f"unknown augmentation preset {preset!r}; choose one of {sorted(PRESETS)}")
            preset = PRESETS[preset]
        known = {f.name for f in fields(AugmentConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise AugmentError(f"unknown augmentation setting(s) {unknown}; known: {sorted(known)}")
        self.config = replace(preset, **overrides)

    def __repr__(self):
        return f"Augmenter({self.config})"

    def draw(self, shape: tuple[int, int], rng: np.random.Generator) -> Draw:
        """Every parameter of one sample, always drawn in the same order (so seeds are stable)."""
        c = self.config
        height, width = shape
        flips = rng.random(2) < 0.5
        turns = int(rng.integers(4))
        if height != width:  # a quarter turn would change the shape: keep half turns only
            turns = 2 * (turns // 2)
        uniform = rng.uniform(-1.0, 1.0, size=8)
        elastic = elastic_displacement(shape, c.elastic_sigma, rng, c.elastic_grid) if c.elastic_sigma else None
        return Draw(
            flip_rows=bool(flips[0] and c.vertical_flip),
            flip_cols=bool(flips[1] and c.horizontal_flip),
            quarter_turns=turns if c.rotate90 else 0,
            rotation_degrees=uniform[0] * c.rotation_degrees,
            shift=(uniform[1] * c.height_shift * height, uniform[2] * c.width_shift * width),
            shear_degrees=uniform[3] * c.shear_degrees,
            zoom=(1 + uniform[4] * c.zoom, 1 + uniform[5] * c.zoom),
            elastic=elastic,
            brightness=uniform[6] * c.brightness,
            contrast=1 + uniform[7] * c.contrast,
            gamma=float(np.exp(rng.uniform(-c.gamma, c.gamma))),
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 ignore_index: int | None = None):
        """image (H, W) float, mask (H, W): a {0, 1} membrane mask or an integer class map.
        ignore_index: for class maps, the value given to pixels that fill_mode "constant"
        brings in from outside the input (default 0, the binary mask's cell)."""
        _check_pair(image, mask, rng)
        d = self.draw(image.shape, rng)
        if d.flip_rows:
            image, mask = image[::-1], mask[::-1]
        if d.flip_cols:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if d.quarter_turns:
            image, mask = np.rot90(image, d.quarter_turns), np.rot90(mask, d.quarter_turns)
        if self.config.warps:
            coordinates = affine_coordinates(image.shape, d.rotation_degrees, d.shift, d.shear_degrees, d.zoom)
            if d.elastic is not None:
                coordinates += d.elastic
            image, mask = warp(image, mask, coordinates, self.config.image_order, self.config.fill_mode,
                               0 if ignore_index is None else ignore_index)
        image = np.ascontiguousarray(image)
        if d.contrast != 1 or d.brightness or d.gamma != 1:
            image = _grey_values(image, d)
        return image, np.ascontiguousarray(mask)


def _grey_values(image: np.ndarray, d: Draw) -> np.ndarray:
    mean = image.mean()
    changed = np.clip((image - mean) * d.contrast + mean + d.brightness, 0, 1)
    return (changed ** d.gamma).astype(image.dtype, copy=False)


def _check_pair(image, mask, rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise AugmentError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                           f"got {type(rng).__name__}")
    for name, a in (("image", image), ("mask", mask)):
        if not isinstance(a, np.ndarray) or a.ndim != 2:
            raise AugmentError(f"{name} must be a 2-D numpy array (H, W), got "
                               f"{getattr(a, 'shape', type(a).__name__)}; augment one slice at a time")
    if image.shape != mask.shape:
        raise AugmentError(f"image {image.shape} and mask {mask.shape} must have the same shape")
