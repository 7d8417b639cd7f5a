"""UpConv2d, the fused nearest 2x upsampling + 2x2 'same' conv, against the two layers it fuses
(Upsample2d then Conv2d), and its own gradients by central differences (float64)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paths import PATHS, layer_path
from strategies import image_shapes, seeds

from tinyunet.gradcheck import check_layer
from tinyunet.layers import Conv2d, Upsample2d
from tinyunet.layers.upconv import UpConv2d


def pair(c, f, seed, dtype, bias):
    """The fused layer and the unfused Conv2d with the same weights and bias."""
    rng = np.random.default_rng(seed)
    fused = UpConv2d(c, f, bias=bias, seed=seed, dtype=dtype)
    plain = Conv2d(c, f, 2, padding="same", bias=bias, seed=seed, dtype=dtype)
    plain.params["weight"][...] = fused.params["weight"]
    if bias:
        fused.params["bias"][...] = plain.params["bias"][...] = rng.standard_normal(f)
    return fused, plain


@given(image_shapes(max_size=7, max_channels=4), st.integers(1, 5), st.booleans(), seeds)
def test_equals_upsample_then_conv(shape, f, bias, seed):
    rng = np.random.default_rng(seed)
    fused, plain = pair(shape[1], f, seed, np.float64, bias)
    up = Upsample2d(2)
    x = rng.standard_normal(shape)
    y = fused.forward(x)
    y_ref = plain.forward(up.forward(x))
    assert y.shape == y_ref.shape == (shape[0], f, 2 * shape[2], 2 * shape[3])
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = fused.backward(dy)
    dx_ref = up.backward(plain.backward(dy))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    for name in plain.grads:
        np.testing.assert_allclose(fused.grads[name], plain.grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@given(image_shapes(max_size=4, max_channels=3), st.integers(1, 3), seeds)
def test_gradients_by_central_differences(path, shape, f, seed):
    """On the NumPy path and through the four Numba data-movement kernels."""
    rng = np.random.default_rng(seed)
    layer = UpConv2d(shape[1], f, seed=seed, dtype=np.float64)
    layer.params["bias"][...] = rng.standard_normal(f)
    with layer_path(path):
        errors = check_layer(layer, rng.standard_normal(shape), rng=rng)
    assert errors and max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("c, f, size", [(64, 32, 16), (32, 16, 9)])
def test_float32_at_u_net_widths_stays_within_rounding(c, f, size):
    rng = np.random.default_rng(0)
    fused, plain = pair(c, f, 0, np.float32, True)
    x = rng.standard_normal((2, c, size, size), dtype=np.float32)
    dy = rng.standard_normal((2, f, 2 * size, 2 * size), dtype=np.float32)
    up = Upsample2d(2)
    y, y_ref = fused.forward(x), plain.forward(up.forward(x))
    dx, dx_ref = fused.backward(dy), up.backward(plain.backward(dy))
    for got, want in [(y, y_ref), (dx, dx_ref), (fused.grads["weight"], plain.grads["weight"])]:
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_keeps_only_its_columns_until_backward_and_releases_them():
    layer = UpConv2d(3, 2, seed=0, dtype=np.float64)
    x = np.ones((1, 3, 4, 5))
    layer.forward(x)
    assert layer._cols.shape == (4 * 3, 1 * 4 * 5)
    assert layer._x is None                          # x itself is not kept: cols has it all
    assert layer.kept_bytes(x.shape) == layer._cols.nbytes
    layer.backward(np.ones((1, 2, 8, 10)))
    layer.release()
    assert layer._cols is None
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 2, 8, 10)))


def test_bad_input_and_gradient_say_what_was_expected():
    from tinyunet.layers import LayerInputError
    layer = UpConv2d(3, 2, seed=0, dtype=np.float64)
    with pytest.raises(LayerInputError, match="expected 3 channels"):
        layer.forward(np.ones((1, 4, 2, 2)))
    with pytest.raises(TypeError, match="input is float32 but the parameters are float64"):
        layer.forward(np.ones((1, 3, 2, 2), dtype=np.float32))
    with pytest.raises(LayerInputError, match=r"add the batch axis with x\[None\]"):
        layer.forward(np.ones((3, 2, 2)))
    layer.forward(np.ones((1, 3, 2, 2)))
    with pytest.raises(LayerInputError, match=r"output's shape \(1, 2, 4, 4\)"):
        layer.backward(np.ones((1, 2, 2, 2)))
