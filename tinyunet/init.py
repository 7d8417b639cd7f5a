"""Weight initializers, as Keras defines them, from a seeded generator.

For a conv weight of shape (F, C, kh, kw): fan_in = C*kh*kw, fan_out = F*kh*kw.

he_normal       truncated normal, std sqrt(2 / fan_in), values beyond 2 std redrawn.
                Keras divides the std by 0.8796... (the std of a standard normal truncated at
                +-2) so that the *truncated* distribution has std sqrt(2 / fan_in).
glorot_uniform  uniform on [-limit, limit], limit = sqrt(6 / (fan_in + fan_out)).

Both return float64 NumPy arrays; the layer casts them. Tested in tests/test_init.py.
"""
from __future__ import annotations

import numpy as np

TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a (F, C, kh, kw) conv weight or an (out, in) matrix."""
    if len(shape) == 2:
        return shape[1], shape[0]
    receptive = int(np.prod(shape[2:]))
    return shape[1] * receptive, shape[0] * receptive


def truncated_normal(shape, std: float, rng: np.random.Generator) -> np.ndarray:
    """N(0, std^2) restricted to [-2 std, 2 std] by redrawing what falls outside."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return values * std


def he_normal(shape, rng: np.random.Generator) -> np.ndarray:
    fan_in, _ = fans(shape)
    return truncated_normal(shape, np.sqrt(2.0 / fan_in) / TRUNCATED_NORMAL_STD, rng)


def glorot_uniform(shape, rng: np.random.Generator) -> np.ndarray:
    fan_in, fan_out = fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


INITIALIZERS = {"he_normal": he_normal, "glorot_uniform": glorot_uniform}


def initialize(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    if name not in INITIALIZERS:
        raise ValueError(f"unknown initializer {name!r}: expected one of {sorted(INITIALIZERS)}")
    return INITIALIZERS[name](shape, rng)
