"""he_normal and glorot_uniform follow Keras: scale, truncation, bounds, seeding."""
import numpy as np

from tinyunet.init import glorot_uniform, he_normal


def test_he_normal_has_std_sqrt_2_over_fan_in_and_is_truncated_at_two_std():
    shape = (64, 32, 3, 3)                                 # fan_in = 288
    w = he_normal(shape, np.random.default_rng(0))
    target = np.sqrt(2 / 288)
    assert abs(w.std() / target - 1) < 0.02                # 18,432 draws
    raw_std = target / 0.87962566103423978
    assert np.abs(w).max() <= 2 * raw_std
    assert np.abs(w).max() > 1.9 * raw_std                 # truncated, not clipped far inside


def test_glorot_uniform_bounds():
    shape = (1, 2, 1, 1)                                    # fan_in 2, fan_out 1
    w = glorot_uniform((1, 200, 1, 1), np.random.default_rng(0))
    limit = np.sqrt(6 / 201)
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit
    assert glorot_uniform(shape, np.random.default_rng(1)).shape == shape


def test_initializers_are_seeded():
    a = he_normal((4, 3, 3, 3), np.random.default_rng(5))
    b = he_normal((4, 3, 3, 3), np.random.default_rng(5))
    c = he_normal((4, 3, 3, 3), np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
