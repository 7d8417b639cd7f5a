"""Overlap-tile prediction: any size, the same answer as one whole pass where context allows,
TTA that maps every view back, and the three output files."""
import numpy as np
import pytest
from PIL import Image

from tinyunet.infer import predict_logits_tiled, predict_probability, save_prediction, tile_geometry
from tinyunet.unet import UNet


@pytest.fixture(scope="module")
def tiny_same():
    return UNet(base_width=4, depth=2, dropout=0.0, seed=3, dtype="float64").eval()


def test_tiles_agree_with_one_whole_pass_away_from_the_border():
    # depth 1 sees 11 pixels around each output pixel (3x3 convs 2+2, pool, 2x2 up-conv, head)
    model = UNet(base_width=4, depth=1, dropout=0.0, seed=3, head_relu=False, dtype="float64")
    image = np.random.default_rng(0).random((64, 64))
    whole = model.forward(image[None, None])[0, 0]
    # 32-pixel tiles keeping their central 8: 12 pixels of context on every side
    tiled = predict_logits_tiled(model, image, tile=32, margin=12)
    with pytest.raises(ValueError, match="margin 16 leaves nothing"):   # 15 rounds up to the grid: 16
        predict_logits_tiled(model, image, tile=32, margin=15)
    assert tiled.shape == (64, 64)
    # far from the image border (where the whole pass sees zero padding, the tiles a mirror)
    # a pixel's receptive field lies inside both, so both compute the same number
    inner = slice(14, 50)
    np.testing.assert_allclose(tiled[inner, inner], whole[inner, inner], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(37, 53), (16, 16), (5, 90)])
def test_any_size_gives_a_probability_of_that_size(tiny_same, shape):
    image = np.random.default_rng(1).random(shape)
    probability = predict_probability(tiny_same, image, tile=32, margin=8)
    assert probability.shape == shape and probability.dtype == np.float32
    assert np.all((probability >= 0) & (probability <= 1))


def test_tta_of_a_rotation_symmetric_input_equals_plain_average(tiny_same):
    image = np.random.default_rng(2).random((32, 32))
    plain = predict_probability(tiny_same, image, tile=32, margin=8)
    tta = predict_probability(tiny_same, image, tile=32, margin=8, tta=True)
    assert tta.shape == plain.shape
    # averaging 8 views of a non-symmetric network differs from one view, but stays close
    assert not np.allclose(tta, plain) and np.abs(tta - plain).max() < 0.5
    # each view is mapped back: TTA of the flipped image is the flipped TTA
    flipped = predict_probability(tiny_same, image[:, ::-1].copy(), tile=32, margin=8, tta=True)
    np.testing.assert_allclose(flipped, tta[:, ::-1], rtol=1e-5, atol=1e-6)


def test_valid_network_tiles_without_a_margin():
    model = UNet(base_width=2, depth=1, dropout=0.0, padding="valid", seed=0, dtype="float64")
    tile, keep, offset = tile_geometry(model.config, 32, 0)
    assert (tile, offset) == (32, 0) and keep == 32 - 16      # depth 1: 32 -> 28/2=14 -> 10 -> 20 -> 16
    probability = predict_probability(model, np.random.default_rng(3).random((41, 23)), tile=32)
    assert probability.shape == (41, 23)


def test_bad_tile_and_threshold_are_refused(tiny_same, tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        predict_probability(tiny_same, np.zeros((8, 8)), tile=30)
    with pytest.raises(ValueError, match="expected one \\(H, W\\) grey image"):
        predict_probability(tiny_same, np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        save_prediction(np.zeros((4, 4)), np.zeros((4, 4)), tmp_path, "x", threshold=1.0)


def test_saved_files(tmp_path):
    image = np.linspace(0, 1, 16).reshape(4, 4)
    probability = np.linspace(0, 1, 16).reshape(4, 4).astype(np.float32)
    paths = save_prediction(image, probability, tmp_path, "slice", threshold=0.5)
    prob = np.array(Image.open(paths["probability"]))
    assert prob.dtype == np.uint16 and prob.max() == 65535 and prob.min() == 0
    mask = np.array(Image.open(paths["mask"]))
    np.testing.assert_array_equal(mask == 0, probability >= 0.5)        # 0 = membrane, as ISBI labels
    rgb = np.array(Image.open(paths["overlay"]))
    assert rgb.shape == (4, 4, 3)
    assert rgb[3, 3, 0] > rgb[3, 3, 1]                                   # membrane tinted red
    assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]                  # cell stays grey
    assert not list(tmp_path.glob(".*.tmp"))                             # no temporary left behind


def test_auto_tile_covers_the_image_in_one_pass(tiny_same):
    from tinyunet.infer import auto_tile
    assert auto_tile(tiny_same.config, (256, 256), margin=32) == 320      # 256 + 2*32, divisible by 4
    assert auto_tile(tiny_same.config, (30, 7), margin=8) == 48
    assert auto_tile(tiny_same.config, (5000, 5000), margin=32) == 512    # too large: tiles of 512
    probability = predict_probability(tiny_same, np.random.default_rng(4).random((30, 7)))
    assert probability.shape == (30, 7)
