"""Proofs for tinyunet/augment.py: image and mask always move together, and the maps are right."""
import numpy as np
import pytest

from tinyunet.augment import (PRESETS, AugmentConfig, AugmentError, Augmenter, affine_coordinates,
                              elastic_displacement, warp)


def _binary_image(seed, shape=(48, 48)):
    """A label-like image of blocky 0/1 regions, so any wrong move shows up."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // 6, shape[1] // 6)) < 0.4
    return np.kron(coarse, np.ones((6, 6))).astype(np.float32)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_moves_image_and_mask_together(preset):
    # With the image read by nearest neighbour too and grey values off, image and mask go
    # through identical operations, so feeding mask := image must give identical outputs.
    # Were the mask given its own random draw, the outputs would differ (checked below).
    augment = Augmenter(preset, image_order=0, brightness=0, contrast=0, gamma=0)
    changed = 0
    for seed in range(6):
        image = _binary_image(seed)
        out_image, out_mask = augment(image, image.copy(), np.random.default_rng(seed))
        np.testing.assert_array_equal(out_image, out_mask)
        changed += not np.array_equal(out_image, image)
    assert changed >= (0 if preset == "none" else 4), "the transform should change most samples"


def test_separate_draws_for_image_and_mask_would_be_caught():
    # The same check as above, against a deliberately wrong pipeline (two draws).
    augment = Augmenter("keras", image_order=0)
    image = _binary_image(0)
    rng = np.random.default_rng(0)
    wrong_image, _ = augment(image, image, rng)
    _, wrong_mask = augment(image, image, rng)
    assert not np.array_equal(wrong_image, wrong_mask)


def test_flips_and_rot90_are_exact_for_any_image():
    rng = np.random.default_rng(3)
    image = rng.random((16, 16)).astype(np.float32)
    mask = (image > 0.5).astype(np.float32)
    dihedral = [np.rot90(f, k) for f in (image, image[::-1]) for k in range(4)]
    seen = set()
    for seed in range(20):
        out_image, out_mask = Augmenter("flips")(image, mask, np.random.default_rng(seed))
        index = next(i for i, candidate in enumerate(dihedral) if np.array_equal(candidate, out_image))
        np.testing.assert_array_equal(out_mask, (out_image > 0.5).astype(np.float32))
        seen.add(index)
    assert len(seen) >= 5  # the draws reach most of the 8 symmetries


def test_affine_rotation_90_is_rot90():
    image = np.arange(25, dtype=np.float32).reshape(5, 5) / 24
    coordinates = affine_coordinates(image.shape, rotation_degrees=90)
    turned, _ = warp(image, image, coordinates, image_order=1)
    np.testing.assert_allclose(turned, np.rot90(image), atol=1e-6)


def test_affine_shift_moves_content():
    image = np.zeros((9, 9), np.float32)
    image[4, 4] = 1
    moved, _ = warp(image, image, affine_coordinates(image.shape, shift=(2, -1)), fill_mode="nearest")
    assert np.argwhere(moved > 0.5).tolist() == [[6, 3]]  # 2 rows down, 1 column left


def test_affine_zoom_enlarges_and_identity_is_identity():
    np.testing.assert_allclose(affine_coordinates((4, 6)), np.indices((4, 6)))
    image = np.zeros((21, 21), np.float32)
    image[8:13, 8:13] = 1  # a 5x5 square in the middle
    zoomed, _ = warp(image, image, affine_coordinates(image.shape, zoom=(2.0, 2.0)), image_order=0)
    assert 81 <= zoomed.sum() <= 121  # about (2 * 5)^2 pixels


def test_elastic_field_passes_through_the_grid():
    shape, sigma = (65, 33), 10.0   # nodes of a 3x3 grid at rows 0, 32, 64 and cols 0, 16, 32
    field = elastic_displacement(shape, sigma, np.random.default_rng(7), grid=3)
    coarse = np.random.default_rng(7).normal(0.0, sigma, size=(2, 3, 3))
    np.testing.assert_allclose(field[:, ::32, ::16], coarse, atol=1e-9)
    # Smooth: neighbouring pixels move almost alike (a 20-px swing spread over 32 px).
    assert np.abs(np.diff(field, axis=1)).max() < 3 and np.abs(np.diff(field, axis=2)).max() < 5


@pytest.mark.parametrize("order", [1, 3])
def test_mask_stays_binary_and_image_in_unit_range(order):
    augment = Augmenter("elastic", image_order=order, brightness=0.3, contrast=0.5, gamma=0.7)
    rng = np.random.default_rng(1)
    for seed in range(5):
        image = np.clip(_binary_image(seed) * 0.9 + rng.random((48, 48)) * 0.1, 0, 1).astype(np.float32)
        out_image, out_mask = augment(image, _binary_image(seed), rng)
        assert out_image.dtype == np.float32 and out_mask.dtype == np.float32
        assert 0 <= out_image.min() and out_image.max() <= 1
        assert set(np.unique(out_mask)) <= {0.0, 1.0}


def test_same_seed_same_output_other_seed_differs():
    image = _binary_image(2)
    augment = Augmenter("elastic")
    first = augment(image, image, np.random.default_rng(11))
    again = augment(image, image, np.random.default_rng(11))
    other = augment(image, image, np.random.default_rng(12))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_grey_values_change_the_image_only():
    image = _binary_image(4) * 0.5 + 0.25
    mask = _binary_image(4)
    out_image, out_mask = Augmenter("none", brightness=0.2, contrast=0.3, gamma=0.5)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out_mask, mask)
    assert not np.allclose(out_image, image)


def test_non_square_images_keep_their_shape():
    image = _binary_image(5, shape=(24, 48))
    for seed in range(8):
        out_image, out_mask = Augmenter("elastic")(image, image, np.random.default_rng(seed))
        assert out_image.shape == out_mask.shape == (24, 48)


def test_bad_configuration_and_inputs_are_named():
    with pytest.raises(AugmentError, match="unknown augmentation preset 'elastik'"):
        Augmenter("elastik")
    with pytest.raises(AugmentError, match="rotaton"):
        Augmenter("keras", rotaton=3)
    with pytest.raises(AugmentError, match="image_order"):
        AugmentConfig(image_order=2)
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(AugmentError, match="Generator"):
        Augmenter()(image, image, 0)
    with pytest.raises(AugmentError, match=r"\(8, 8\).*\(8, 9\)"):
        Augmenter()(image, np.zeros((8, 9), np.float32), np.random.default_rng())
