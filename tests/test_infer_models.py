"""Prediction for every model of tinyunet.models and K classes: overlap-tile for FCN and SegNet,
(K, H, W) softmax probabilities, TTA over the eight views per class, and label maps."""
import numpy as np
import pytest
from netcheck import randomize

import tinyunet
from tinyunet.infer import (_dihedral, _tiling, _undo_dihedral, auto_tile, labels_from_probability,
                            predict_logits_tiled, predict_labels, predict_probability)
from tinyunet.losses import log_softmax
from tinyunet.models import build_model


@pytest.mark.parametrize("kind, options, margin", [
    # receptive radius: SegNet's encoder to pool5 reaches 106 pixels, its decoder 90 more: 224 covers it;
    # FCN-8s: fc6 (7x7 on pool5) 202, upscore2 48, upscore_pool4 24, upscore8 60: 352 covers it
    ("segnet", dict(base_width=1), 224),
    ("fcn8s", dict(base_width=1, fc_width=2, score_init="he_normal"), 352),
])
def test_tiles_equal_one_pass_over_the_mirror_padded_image(kind, options, margin):
    """With a margin of at least the receptive radius every kept pixel sees, in its tile, what
    it sees in one pass over the whole mirror-padded image: the same logits everywhere. Tiles
    start on the 32-pixel grid of the five pools, so they also pool the same windows. A margin
    below the radius (the control) does not give them."""
    model = build_model(kind, classes=3, dtype="float64", seed=1, **options).eval()
    randomize(model, np.random.default_rng(2))
    image = np.random.default_rng(0).random((40, 90))
    tile = 2 * margin + 64
    pad, corners, _, _ = _tiling(model.config, image.shape, tile, margin)
    assert len(corners) == 2                                          # a seam at column 64
    padded = np.pad(image, pad, mode="symmetric")
    with tinyunet.no_grad():
        whole = model.forward(padded[None, None])[0][:, margin:margin + 40, margin:margin + 90]
    # margin - 16 is rounded up to the pools' 32-pixel grid: margin (16 would shift the pool windows)
    tiled = predict_logits_tiled(model, image, tile=tile, margin=margin - 16, batch=2)
    assert tiled.shape == (3, 40, 90)
    np.testing.assert_allclose(tiled, whole, rtol=1e-10, atol=1e-12)
    control = predict_logits_tiled(model, image, tile=128, margin=32)
    assert np.abs(control - whole).max() > 1e-6


@pytest.mark.parametrize("kind", ["fcn32s", "segnet", "unet"])
def test_k_class_probabilities_any_size(kind):
    options = dict(base_width=2, fc_width=4) if kind.startswith("fcn") else dict(base_width=2)
    model = build_model(kind, classes=3, seed=3, **options)
    image = np.random.default_rng(1).random((37, 53))
    p = predict_probability(model, image, tile=64, margin=0 if kind != "unet" else 8)
    assert p.shape == (3, 37, 53) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=0), 1, rtol=1e-5)
    labels = predict_labels(model, image, tile=64, margin=0 if kind != "unet" else 8)
    assert labels.shape == (37, 53) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, p.argmax(axis=0))
    assert model.training                                             # the mode came back


def test_k_class_tta_averages_the_eight_views_per_class():
    """TTA with K = 3: the mean over the eight flips/rotations of each view's softmax, each view
    mapped back, equals eight separate passes; and the TTA of the flipped image is the flipped TTA."""
    model = build_model("unet", classes=3, base_width=2, depth=2, seed=5, dtype="float64").eval()
    image = np.random.default_rng(6).random((24, 20)).astype(np.float32)
    separate = np.zeros((3, 24, 20))
    for flip in (False, True):
        for k in range(4):
            view = np.ascontiguousarray(_dihedral(image, k, flip))
            logits = predict_logits_tiled(model, view, 32, 8, batch=1)            # (3, h, w)
            separate += _undo_dihedral(np.exp(log_softmax(logits, axis=0)), k, flip)
    separate /= 8
    tta = predict_probability(model, image, tile=32, margin=8, tta=True)
    assert tta.shape == (3, 24, 20)
    np.testing.assert_allclose(tta, separate, rtol=1e-6, atol=1e-7)
    plain = predict_probability(model, image, tile=32, margin=8)
    assert not np.allclose(tta, plain)
    flipped = predict_probability(model, image[:, ::-1].copy(), tile=32, margin=8, tta=True)
    np.testing.assert_allclose(flipped, tta[:, :, ::-1], rtol=1e-5, atol=1e-6)


def test_one_class_labels_threshold_the_probability():
    model = build_model("unet", classes=1, base_width=2, depth=2, seed=0)
    image = np.random.default_rng(3).random((20, 20))
    p = predict_probability(model, image, tile=32, margin=8)
    assert p.shape == (20, 20)
    for threshold in (0.3, 0.5):
        np.testing.assert_array_equal(predict_labels(model, image, tile=32, margin=8, threshold=threshold),
                                      (p >= threshold).astype(np.int64))
    with pytest.raises(ValueError, match="threshold must lie strictly between 0 and 1, got 1.5"):
        predict_labels(model, image, threshold=1.5)
    with pytest.raises(ValueError, match=r"expected an \(H, W\) or \(K, H, W\) probability map"):
        labels_from_probability(np.zeros(5))


def test_fcn_and_segnet_tiles_are_multiples_of_32_within_the_budget():
    model = build_model("segnet", classes=3, base_width=2)
    assert auto_tile(model, (70, 90), margin=32) == 160                       # 90 + 64, up to 32's multiple
    budget = model.inference_bytes((1, 1, 96, 96))
    tile = auto_tile(model, (300, 300), margin=32, memory_budget=budget)
    assert tile == 96 and model.inference_bytes((1, 1, 128, 128)) > budget
    with pytest.raises(ValueError, match="tile size 100 is not a valid input size for this SegNet: use a multiple of 32"):
        predict_probability(model, np.zeros((8, 8)), tile=100)
    p = predict_probability(model, np.random.default_rng(0).random((50, 41)), margin=32, memory_budget=budget)
    assert p.shape == (3, 50, 41)


def test_class_prediction_files(tmp_path):
    from PIL import Image

    from tinyunet.classes import ClassError, default_palette
    from tinyunet.infer import labels_from_probability, save_class_prediction
    image = np.full((4, 6), 0.5)
    probability = np.zeros((3, 4, 6), np.float32)
    probability[0] = 1
    probability[:, 1, :] = [[0.2], [0.7], [0.1]]                         # row 1: class 1
    probability[:, 2, :] = [[0.1], [0.2], [0.7]]                         # row 2: class 2
    palette = default_palette(3)
    paths = save_class_prediction(image, labels_from_probability(probability), palette, tmp_path, "slice")
    with Image.open(paths["labels"]) as picture:
        assert picture.mode == "P"                                        # the class colours travel with it
        labels = np.array(picture)
        assert np.array(picture.getpalette()[:9]).reshape(3, 3).tolist() == palette.tolist()
    assert labels.dtype == np.uint8 and labels[:, 0].tolist() == [0, 1, 2, 0]
    rgb = np.array(Image.open(paths["overlay"]))
    assert rgb[1, 0].tolist() == np.round(0.5 * 127.5 + 0.5 * palette[1]).astype(int).tolist()
    assert rgb[1, 0].tolist() != rgb[2, 0].tolist()
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ClassError):
        save_class_prediction(image, np.full((4, 6), 3), palette, tmp_path, "x")     # class 3 of 3
