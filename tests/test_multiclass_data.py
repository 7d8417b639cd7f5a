"""Proofs for K-class data: Dataset fields and checks, label formats, the synthetic 3-class set,
crops and augmentation of class maps (tinyunet/data.py, tinyunet/augment.py, tinyunet/classes.py)."""
import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tinyunet.augment import PRESETS, Augmenter
from tinyunet.classes import colorize, default_palette, save_label_png, write_class_table
from tinyunet.data import (CELL_CLASS_NAMES, DataError, Dataset, binary_as_classes, load_folder, load_tiff_stack,
                           random_crops, read_class_target, resolve_data, save_folder, save_png, synthetic_cells,
                           synthetic_membranes)
from tinyunet.metrics import class_scores, kmeans_baseline, match_clusters


def _sha(dataset):
    digest = hashlib.sha256()
    for image, target in zip(dataset.images, dataset.targets):
        digest.update(image.tobytes())
        digest.update(target.tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def cells():
    return synthetic_cells(2, size=96, seed=0)


def _folder(root, dataset, write_label):
    """image/<name>.png from the dataset's images, label/<name>.png by write_label(target, path)."""
    save_folder(Dataset(dataset.images, [], dataset.names), root)
    (root / "label").mkdir()
    for name, target in zip(dataset.names, dataset.targets):
        write_label(target, root / "label" / f"{name}.png")
    return root


# ------------------------------------------------------------------------------- synthetic sets

def test_synthetic_binary_generator_unchanged():
    # sha256 taken on main (7bd10ea) before the K-class generator was added beside it.
    small = "a08d6922a5056d23afc8368521b8deb7906815d238d8ce153f99d9c8ca5d04cb"
    large = "63284659f70e4047686d9c38216a47761ab7d0c31c73d0018f406758b5856b94"
    assert _sha(synthetic_membranes(2, 64, seed=3)) == small
    assert _sha(synthetic_membranes(1, 256, seed=0)) == large


def test_synthetic_cells_classes_and_shapes():
    dataset = synthetic_cells(3, size=128, seed=1)
    again = synthetic_cells(1, size=128, seed=1)
    assert dataset.classes == 3
    assert dataset.class_names == CELL_CLASS_NAMES == ("cytoplasm", "membrane", "mitochondrion")
    assert dataset.palette.shape == (3, 3) and dataset.palette.dtype == np.uint8
    np.testing.assert_array_equal(dataset.targets[0], again.targets[0])
    np.testing.assert_array_equal(dataset.images[0], again.images[0])
    binary = synthetic_membranes(1, size=128, seed=1)
    assert not np.array_equal(dataset.images[0], binary.images[0])
    for image, target in zip(dataset.images, dataset.targets):
        assert image.dtype == np.float32 and target.dtype == np.uint8 and target.shape == (128, 128)
        share = np.bincount(target.ravel(), minlength=3) / target.size
        assert 0.15 <= share[1] <= 0.26 and 0.04 <= share[2] <= 0.14, share
        mito, membrane = target == 2, target == 1
        # Inside cells: never touching a membrane (at least 3 px away).
        assert ndimage.distance_transform_edt(~membrane)[mito].min() >= 3
        # Dark: mitochondria are darker than the cytoplasm around them, and textured.
        assert image[mito].mean() < image[target == 0].mean() - 0.15
        labels, count = ndimage.label(mito)
        inside_std = np.mean([image[labels == k].std() for k in range(1, count + 1)])
        assert count >= 5 and inside_std > 0.04


def test_synthetic_cells_beat_intensity_clustering():
    dataset = synthetic_cells(2, size=128, seed=0)
    image, target = np.stack(dataset.images), np.stack(dataset.targets)
    clusters = np.stack([kmeans_baseline(s, 3) for s in image])
    scores = class_scores(match_clusters(clusters, target, 3), target, 3)
    assert scores["mean_iou"] < 0.5          # dark vesicles and dark cells defeat a grey threshold


def test_binary_as_classes():
    binary = synthetic_membranes(2, size=64, seed=0)
    two = binary_as_classes(binary)
    assert two.classes == 2 and two.class_names == ("cell", "membrane") and two.names == binary.names
    for t, b in zip(two.targets, binary.targets):
        assert t.dtype == np.uint8
        np.testing.assert_array_equal(t, b.astype(np.uint8))
    with pytest.raises(DataError, match="binary membrane dataset"):
        binary_as_classes(two)


def test_split_keeps_the_classes(cells):
    palette = default_palette(3)[::-1].copy()
    dataset = Dataset(cells.images, cells.targets, cells.names, classes=3, class_names=("a", "b", "c"),
                      palette=palette, ignore_index=200)
    part = dataset.split([1])
    assert (part.classes, part.class_names, part.ignore_index) == (3, ("a", "b", "c"), 200)
    np.testing.assert_array_equal(part.palette, palette)
    assert part.names == [cells.names[1]]
    binary = synthetic_membranes(1, 32).split([0])
    assert binary.classes == 1 and binary.targets[0].dtype == np.float32 and binary.class_names == ("cell", "membrane")


def test_class_targets_out_of_range_are_named():
    image = np.zeros((4, 5), np.float32)
    target = np.zeros((4, 5), np.uint8)
    target[0, :3] = 7
    with pytest.raises(DataError, match=r"item 'x': 3 pixels hold values \[7\] outside the 3 classes 0..2 and the "
                                        r"ignore value 255; pass --classes 8"):
        Dataset([image], [target], ["x"], classes=3)
    target[0, :3] = 255                                   # the ignore value is allowed
    assert Dataset([image], [target.astype(np.int64)], ["x"], classes=3).targets[0].dtype == np.uint8
    with pytest.raises(DataError, match="integer class map"):
        Dataset([image], [target.astype(np.float32)], ["x"], classes=3)
    with pytest.raises(DataError, match="classes must be a whole number from 1"):
        Dataset([image], [], ["x"], classes=0)
    with pytest.raises(DataError, match="ignore_index must be a whole number in 3..255"):
        Dataset([image], [], ["x"], classes=3, ignore_index=2)
    with pytest.raises(DataError, match="3 class names expected"):
        Dataset([image], [], ["x"], classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match=r"must be \(3, 3\)"):
        Dataset([image], [], ["x"], classes=3, palette=np.zeros((2, 3), np.uint8))
    with pytest.raises(DataError, match="pass --classes K"):               # binary path: names the K option
        Dataset([image], [target.astype(np.float32)], ["x"])


# --------------------------------------------------------------------------------- label files

def test_label_formats_read_the_same(tmp_path, cells):
    targets = [t.copy() for t in cells.targets]
    targets[0][:3, :] = 255                                                 # ignore pixels pass through
    source = Dataset(cells.images, targets, cells.names, classes=3, class_names=cells.class_names)
    palette = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 50]], np.uint8)
    index = load_folder(_folder(tmp_path / "index", source, save_png), classes=3)
    paletted = load_folder(_folder(tmp_path / "palette", source,
                                   lambda t, p: save_label_png(t, p, palette)), classes=3)
    write_class_table(tmp_path / "rgb" / "classes.json", cells.class_names, palette, ignore_color=(255, 255, 255))
    rgb = load_folder(_folder(tmp_path / "rgb", source, lambda t, p: save_png(
        np.where((t == 255)[..., None], np.uint8(255), colorize(np.where(t == 255, 0, t), palette)), p)), classes=3)
    sixteen = tmp_path / "sixteen"
    _folder(sixteen, source, lambda t, p: Image.fromarray(t.astype(np.uint16)).save(p))
    stack = tmp_path / "labels.tif"
    Image.fromarray(targets[0]).save(stack, save_all=True, append_images=[Image.fromarray(targets[1])])
    pages = [Image.fromarray(np.round(image * 255).astype(np.uint8)) for image in cells.images]
    pages[0].save(tmp_path / "images.tif", save_all=True, append_images=pages[1:])
    tiff = load_tiff_stack(tmp_path / "images.tif", stack, classes=3)
    for dataset in (index, paletted, rgb, load_folder(sixteen, classes=3), tiff):
        assert dataset.classes == 3 and dataset.ignore_index == 255
        for got, want in zip(dataset.targets, targets):
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(paletted.palette, palette)               # the palette PNG's colours kept
    np.testing.assert_array_equal(rgb.palette, palette)
    assert rgb.class_names == cells.class_names and index.class_names == ("class 0", "class 1", "class 2")
    np.testing.assert_array_equal(index.palette, default_palette(3))
    np.testing.assert_array_equal(read_class_target(tmp_path / "palette" / "label" / f"{cells.names[0]}.png", 3),
                                  targets[0])


def test_save_folder_of_class_maps_round_trips(tmp_path, cells):
    names = ("c", "m", "o")
    dataset = Dataset(cells.images, cells.targets, cells.names, classes=3, class_names=names,
                      palette=np.array([[9, 9, 9], [200, 0, 0], [0, 0, 200]], np.uint8))
    back = load_folder(save_folder(dataset, tmp_path / "saved"), classes=3)
    assert back.class_names == names and (tmp_path / "saved" / "classes.json").is_file()
    np.testing.assert_array_equal(back.palette, dataset.palette)
    for got, want in zip(back.targets + back.images, dataset.targets + dataset.images):
        np.testing.assert_array_equal(got, want)


def test_label_errors_are_named(tmp_path, cells):
    source = Dataset(cells.images, cells.targets, cells.names, classes=3)
    root = _folder(tmp_path / "index", source, save_png)
    bad = cells.targets[1].copy()
    bad[:2, :4] = 9
    save_png(bad, root / "label" / f"{cells.names[1]}.png")
    with pytest.raises(DataError, match=rf"{cells.names[1]}.png: 8 pixels hold values \[9\] outside the 3 classes "
                                        r"0..2 and the ignore value 255; pass --classes 10"):
        load_folder(root, classes=3)
    # An RGB map without a class table, then with a table that lacks a colour.
    rgb = _folder(tmp_path / "rgb", source, lambda t, p: save_png(colorize(t, default_palette(3)), p))
    with pytest.raises(DataError, match="RGB colour map but there is no class table: write classes.json"):
        load_folder(rgb, classes=3)
    write_class_table(rgb / "classes.json", ["a", "b", "c"], [[0, 0, 0], [128, 0, 0], [1, 2, 3]])
    count = int((cells.targets[0] == 2).sum())
    with pytest.raises(DataError, match=rf"{cells.names[0]}.png: {count} pixels have colours that are not in the class "
                                        rf"table \(1 distinct: \(0, 128, 0\) x{count}\)"):
        load_folder(rgb, classes=3)
    with pytest.raises(DataError, match="lists 3 classes .* but 4 were asked for; pass --classes 3"):
        load_folder(rgb, classes=4)
    (rgb / "classes.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the class table"):
        load_folder(rgb, classes=3)
    # ISBI-style 0/255 membrane labels read with K classes: explained, not silently ignored.
    binary = save_folder(synthetic_membranes(2, 32), tmp_path / "binary")
    with pytest.raises(DataError, match="hold only 0 and 255: binary membrane maps .* --classes 1"):
        load_folder(binary, classes=3)
    two = load_folder(binary, classes=2)                 # K = 2: cell (0) and membrane (1)
    assert two.classes == 2 and two.class_names == ("cell", "membrane")
    np.testing.assert_array_equal(two.targets[0], synthetic_membranes(2, 32).targets[0] > 0.5)
    assert load_folder(binary).targets[0].dtype == np.float32                 # classes=1: as always
    with pytest.raises(DataError, match="classes must be a whole number from 2 to 255"):
        load_folder(binary, classes=0)


def test_resolve_data_classes(tmp_path, cells):
    assert resolve_data("synthetic", count=1, size=32).classes == 1
    two = resolve_data("synthetic", classes=2, count=1, size=32)
    np.testing.assert_array_equal(two.targets[0], synthetic_membranes(1, 32).targets[0].astype(np.uint8))
    three = resolve_data("synthetic", classes=3, count=1, size=64)
    np.testing.assert_array_equal(three.targets[0], synthetic_cells(1, 64).targets[0])
    with pytest.raises(DataError, match="'synthetic' data has classes 1 .* 3 .*, not 4"):
        resolve_data("synthetic", classes=4)
    with pytest.raises(DataError, match="'isbi2012' data has classes 1 .* or 2 .*, not 3"):
        resolve_data("isbi2012", classes=3, cache_dir=tmp_path)              # refused before any download
    folder = _folder(tmp_path / "f", Dataset(cells.images, cells.targets, cells.names, classes=3), save_png)
    assert resolve_data(str(folder), classes=3).classes == 3


# ------------------------------------------------------------------------- crops and augmenting

def test_random_crops_of_class_maps(cells):
    images, targets = random_crops(cells, 32, 5, np.random.default_rng(0))
    assert images.shape == (5, 1, 32, 32) and images.dtype == np.float32
    assert targets.shape == (5, 32, 32) and targets.dtype == np.int64
    assert set(np.unique(targets)) <= {0, 1, 2}
    binary_images, binary_targets = random_crops(synthetic_membranes(1, 64), 32, 2, np.random.default_rng(0))
    assert binary_targets.shape == (2, 1, 32, 32) and binary_targets.dtype == np.float32


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_class_maps_keep_their_values(preset):
    # Labels {0, 3, 5, 255} on a grid of blocks: every warp copies values, never blends them.
    rng = np.random.default_rng(1)
    mask = np.kron(rng.choice(np.array([0, 3, 5, 255], np.uint8), (6, 6)), np.ones((8, 8), np.uint8))
    image = mask.astype(np.float32) / 255
    exact = preset in ("none", "flips")                     # index permutations only
    augmenter = Augmenter(preset) if exact else Augmenter(preset, rotation_degrees=15.0, zoom=0.2)
    for seed in range(4):
        warped_image, warped = augmenter(image, mask, np.random.default_rng(seed), ignore_index=255)
        assert warped.dtype == np.uint8 and warped.shape == mask.shape
        assert set(np.unique(warped)) <= {0, 3, 5, 255}
        # Image and labels moved together: where the labels are exact, so is the image (before grey changes).
        if exact:
            np.testing.assert_array_equal(warped_image, warped.astype(np.float32) / 255)


def test_constant_fill_marks_outside_as_ignore():
    mask = np.ones((32, 32), np.uint8)
    augmenter = Augmenter("none", rotation_degrees=45.0, fill_mode="constant")
    draws = [augmenter(np.ones((32, 32), np.float32), mask, np.random.default_rng(s), ignore_index=255)
             for s in range(3)]
    for image, warped in draws:
        outside = warped == 255
        assert outside.any() and outside[0, 0] and not outside[16, 16]     # corners come from outside
        assert set(np.unique(warped)) == {1, 255}
        assert (image[outside] < 0.5).all()                                 # image reads 0 there
    # Through random_crops, an Augmenter is given the dataset's ignore value.
    dataset = Dataset([np.ones((32, 32), np.float32)], [mask], ["m"], classes=2, ignore_index=77)
    _, targets = random_crops(dataset, 32, 2, np.random.default_rng(0), augmenter)
    assert set(np.unique(targets)) == {1, 77}
