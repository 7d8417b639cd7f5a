"""Bad input gets an error that names the layer, what it expected and what it got."""
import numpy as np
import pytest

from tinyunet.layers import (Concat, Conv2d, Dropout, LayerInputError, MaxPool2d, ReLU, Sigmoid,
                             Upsample2d)


def x4(c=2, dtype=np.float32, size=6):
    return np.zeros((1, c, size, size), dtype=dtype)


def test_conv_wrong_channels():
    with pytest.raises(LayerInputError, match=r"Conv2d 'enc': expected 3 channels.*got shape \(1, 2, 6, 6\)"):
        Conv2d(3, 4, 3, name="enc").forward(x4(2))


def test_conv_missing_batch_axis_suggests_the_fix():
    with pytest.raises(LayerInputError, match=r"must be \(N, C, H, W\).*add the batch axis with x\[None\]"):
        Conv2d(2, 4, 3).forward(np.zeros((2, 6, 6), np.float32))


@pytest.mark.parametrize("layer", [Conv2d(2, 2, 3), MaxPool2d(), Upsample2d(), ReLU(), Sigmoid(), Dropout(0.1)])
def test_integer_input_is_refused_with_the_conversion(layer):
    with pytest.raises(TypeError, match=r"must be float32 or float64, got uint8.*astype\(np.float32\)"):
        layer.forward(np.zeros((1, 2, 4, 4), np.uint8))


@pytest.mark.parametrize("layer", [Conv2d(2, 2, 3), MaxPool2d(), Upsample2d(), ReLU()])
def test_non_array_input_is_refused(layer):
    with pytest.raises(TypeError, match="numpy or cupy array, got list"):
        layer.forward([[1.0, 2.0]])


def test_concat_wants_a_tuple_of_arrays():
    with pytest.raises(TypeError, match="expected a tuple of arrays, got str"):
        Concat().forward("xy")
    with pytest.raises(TypeError, match="input 1 must be a numpy or cupy array, got list"):
        Concat().forward((x4(), [1.0]))


def test_conv_dtype_must_match_the_weights():
    with pytest.raises(TypeError, match=r"input is float64 but the parameters are float32.*layer.astype"):
        Conv2d(2, 2, 3).forward(x4(dtype=np.float64))


def test_conv_kernel_larger_than_input():
    with pytest.raises(ValueError, match="does not fit"):
        Conv2d(2, 2, 5, padding="valid").forward(x4(size=3))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="padding 'full' is not known"):
        Conv2d(1, 1, 3, padding="full")
    with pytest.raises(ValueError, match="must not be negative"):
        Conv2d(1, 1, 3, padding=-1)
    with pytest.raises(ValueError, match="channel counts must be >= 1"):
        Conv2d(0, 1, 3)
    with pytest.raises(ValueError, match="drop probability p must be in"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="unknown initializer"):
        Conv2d(1, 1, 3, weight_init="zeros")
    with pytest.raises(TypeError, match="float32 or float64"):
        Conv2d(1, 1, 3).astype(np.int32)


def test_maxpool_window_larger_than_input():
    with pytest.raises(LayerInputError, match="window does not fit"):
        MaxPool2d(3).forward(x4(size=2))


@pytest.mark.parametrize("layer", [Conv2d(2, 2, 3), MaxPool2d(), Upsample2d(), ReLU(), Sigmoid(), Dropout(0.5)])
def test_backward_before_forward_and_wrong_gradient_shape(layer):
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward\\(\\)"):
        layer.backward(x4())
    y = layer.forward(x4())
    with pytest.raises(LayerInputError, match="gradient must have the output's shape"):
        layer.backward(np.zeros((1,) + y.shape, np.float32))


def test_concat_of_mismatched_sizes_points_at_the_unet_cause():
    with pytest.raises(LayerInputError, match=r"agree in N, H and W.*divisible by 2\*\*depth"):
        Concat().forward((x4(size=6), x4(size=5)))
    with pytest.raises(TypeError, match="share one dtype"):
        Concat().forward((x4(), x4(dtype=np.float64)))
