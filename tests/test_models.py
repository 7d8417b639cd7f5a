"""tinyunet.models: the five networks built one way, with one interface; the K-class U-Net
(its head, its count, its softmax, its gradients); the sizes each network takes."""
import dataclasses
import json

import numpy as np
import pytest
from netcheck import joint_directional_errors, randomize

from tinyunet import checkpoint as checkpoint_module
from tinyunet.layers import sigmoid
from tinyunet.losses import log_softmax
from tinyunet.models import (FCN_CPU_INPUT_PAD, MODELS, build_model, check_input_size, input_multiple,
                             model_kind)
from tinyunet.unet import UNet, UNetConfig

TINY = {"unet": dict(base_width=2, depth=2, dropout=0.0), "fcn32s": dict(base_width=2, fc_width=4),
        "fcn16s": dict(base_width=2, fc_width=4), "fcn8s": dict(base_width=2, fc_width=4),
        "segnet": dict(base_width=2)}
INTERFACE = ("forward", "backward", "predict_proba", "parameters", "trainable_parameters", "gradients",
             "buffers", "load_parameters", "random_generators", "to", "astype", "train", "eval",
             "layer_shapes", "summary", "num_parameters", "output_shape", "inference_bytes")


@pytest.mark.parametrize("kind", MODELS)
def test_every_model_has_the_one_interface(kind):
    model = build_model(kind, classes=3, seed=1, **TINY[kind])
    assert model_kind(model) == kind
    assert model.config.classes == 3 and model.config.in_channels == 1
    assert json.loads(model.config.to_json())["classes"] == 3
    missing = [name for name in INTERFACE if not callable(getattr(model, name, None))]
    assert not missing, missing
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    assert model.output_shape(x.shape) == (2, 3, 64, 64)
    logits = model.forward(x)
    assert logits.shape == (2, 3, 64, 64)
    assert model.backward(np.ones_like(logits)).shape == x.shape
    assert set(model.gradients()) == set(model.parameters())
    assert set(model.trainable_parameters()) <= set(model.parameters())
    p = model.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert input_multiple(model) == (4 if kind == "unet" else 32)
    assert model.inference_bytes((1, 1, 64, 64)) > model.num_parameters() * 4


def test_bad_kind_and_class_counts_are_one_clear_line():
    with pytest.raises(ValueError, match=r"^unknown model 'vgg': choose one of unet, fcn32s, fcn16s, fcn8s, segnet$"):
        build_model("vgg", classes=3)
    for kind in ("fcn8s", "segnet"):
        with pytest.raises(ValueError, match=rf"{kind} needs classes >= 2 .* use --model unet for one class "
                                             r"\(sigmoid\), or --classes 2$"):
            build_model(kind, classes=1)
    with pytest.raises(ValueError, match="classes must be >= 1"):
        build_model("unet", classes=0)
    with pytest.raises(ValueError, match="segnet has no option fc_width; its options: base_width, eps, momentum"):
        build_model("segnet", classes=3, fc_width=8)
    with pytest.raises(ValueError, match="variant='16s' contradicts kind 'fcn8s'"):
        build_model("fcn8s", classes=3, variant="16s")
    with pytest.raises(TypeError, match="not a tinyunet model: dict"):
        model_kind({})


def test_defaults_are_each_references_and_options_pass_through():
    """base_width None keeps 64 (nothing allocated: the config alone); options reach the config."""
    assert build_model("unet", classes=1).num_parameters() == 31_031_685       # the Keras model
    fcn = build_model("fcn8s", classes=3, base_width=2, fc_width=4, input_pad=FCN_CPU_INPUT_PAD["8s"],
                      learn_upsampling=True)
    assert (fcn.config.input_pad, fcn.config.learn_upsampling, fcn.config.in_channels) == (69, True, 1)
    assert build_model("unet", classes=2, base_width=2, depth=1, padding="valid").config.padding == "valid"


def test_fcn_cpu_input_pad_is_the_smallest_that_aligns():
    for variant in ("32s", "16s", "8s"):
        pad = FCN_CPU_INPUT_PAD[variant]
        assert build_model(f"fcn{variant}", classes=2, base_width=1, fc_width=1, input_pad=pad).offsets["score"] == 0
        with pytest.raises(ValueError, match="cannot align"):
            build_model(f"fcn{variant}", classes=2, base_width=1, fc_width=1, input_pad=pad - 1)


def test_input_sizes_name_the_nearest_valid_ones():
    segnet = build_model("segnet", classes=3, base_width=2)
    assert check_input_size(segnet, 96) == 96
    with pytest.raises(ValueError, match=r"^crop size 100 does not fit a segnet \(sides must be multiples of 32\); "
                                         r"nearest valid sizes: 96 or 128$"):
        check_input_size(segnet, 100)
    unet = build_model("unet", classes=1, base_width=2, depth=3)
    with pytest.raises(ValueError, match="multiples of 8.*nearest valid sizes: 96 or 104"):
        check_input_size(unet, 100)
    # an FCN with the small pad needs pool5 >= fc6's 7x7: 32 is too small, 64 the first that fits
    fcn = build_model("fcn8s", classes=3, base_width=2, fc_width=4, input_pad=FCN_CPU_INPUT_PAD["8s"])
    with pytest.raises(ValueError, match=r"^crop size 32 is too small for a fcn8s .* the smallest valid size: 64$"):
        check_input_size(fcn, 32)
    with pytest.raises(ValueError, match="must be a whole number"):
        check_input_size(fcn, 64.0)


# ------------------------------------------------------------------ the K-class U-Net

def test_k_class_unet_head_and_count():
    """K >= 2: one 1x1 conv from the 64-channel map to K (no head.conv, no head.relu):
    31,031,685 - (3*3*64*2 + 2) - (2*1 + 1) + (64 K + K) parameters."""
    for k in (2, 3, 5):
        config = UNetConfig(classes=k)
        shapes = checkpoint_module.parameter_shapes(config)          # the count without allocating
        assert sum(int(np.prod(s)) for s in shapes.values()) == 31_031_685 - 1_154 - 3 + 65 * k
        assert shapes["head.out.weight"] == (k, 64, 1, 1) and "head.conv.weight" not in shapes
    model = UNet(classes=3)
    assert model.num_parameters() == 31_030_723 and model.head_relu is None
    assert "head.conv" not in model.layers and model.layers["head.out"].params["weight"].shape == (3, 64, 1, 1)


def test_one_class_unet_is_todays_model_and_old_json_reads_as_one_class():
    binary = UNet(base_width=2, depth=2, seed=3)
    assert list(binary.layers)[-3:] == ["head.conv", "head.relu", "head.out"]
    old = {k: v for k, v in json.loads(binary.config.to_json()).items() if k != "classes"}
    assert UNetConfig.from_json(json.dumps(old)) == binary.config
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    binary.eval()
    p = binary.predict_proba(x)
    assert p.shape == (1, 1, 16, 16)
    np.testing.assert_array_equal(p, sigmoid(binary.forward(x)))        # the sigmoid, as before


@pytest.mark.parametrize("padding,size", [("same", 16), ("valid", 44)])
def test_k_class_unet_softmax_and_shapes(padding, size):
    model = UNet(base_width=2, depth=2, classes=3, padding=padding, dropout=0.0, seed=2, dtype="float64")
    x = np.random.default_rng(1).random((2, 1, size, size))
    logits = model.forward(x)
    assert logits.shape == model.output_shape(x.shape) and logits.shape[1] == 3
    p = model.predict_proba(x)
    np.testing.assert_allclose(p, np.exp(log_softmax(logits, axis=1)), rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    assert model.buffers() == {} and model.trainable_parameters().keys() == model.parameters().keys()


def test_k_class_unet_softmax_is_stable_for_huge_logits():
    model = UNet(base_width=2, depth=1, classes=3, dropout=0.0, seed=0, dtype="float64")
    model.layers["head.out"].params["bias"][...] = [800.0, 0.0, -800.0]
    p = model.predict_proba(np.zeros((1, 1, 4, 4)))
    assert np.isfinite(p).all() and np.allclose(p[:, 0], 1)


@pytest.mark.parametrize("padding,shape,dropout", [("same", (2, 1, 16, 12), 0.5), ("valid", (1, 1, 44, 44), 0.0)])
def test_k_class_unet_whole_network_directional_float64(padding, shape, dropout):
    """<grad, u> against the central difference of the softmax cross-entropy along random
    directions over the input and every parameter at once (dropout masks rewound)."""
    rng = np.random.default_rng(5)
    model = UNet(base_width=2, depth=2, classes=3, padding=padding, dropout=dropout, seed=4, dtype="float64")
    randomize(model, rng)
    x = rng.standard_normal(shape)
    out = model.output_shape(shape)
    labels = rng.integers(0, 3, (out[0],) + out[2:])
    errors = joint_directional_errors(model, x, labels, rng, directions=3, eps=1e-5)
    assert max(errors) < 1e-6, errors


# ------------------------------------------------------------------ shapes, memory

@pytest.mark.parametrize("kind", MODELS)
def test_parameter_and_buffer_shapes_match_every_model(kind):
    """checkpoint.parameter_shapes / buffer_shapes / trainable_shapes from the config alone
    agree with the built model (what the checkpoint's header checks rely on)."""
    for options in (TINY[kind], {**TINY[kind], "in_channels": 3}):
        model = build_model(kind, classes=4, **options)
        assert checkpoint_module.parameter_shapes(model.config) == {
            k: tuple(v.shape) for k, v in model.parameters().items()}
        assert checkpoint_module.buffer_shapes(model.config) == {k: tuple(v.shape) for k, v in model.buffers().items()}
        assert checkpoint_module.trainable_shapes(model.config) == {
            k: tuple(v.shape) for k, v in model.trainable_parameters().items()}


@pytest.mark.parametrize("kind", ["fcn8s", "segnet"])
def test_inference_bytes_bound_what_numpy_allocates(kind):
    """The conservative estimate of FCN and SegNet is an upper bound on tracemalloc's peak of a
    forward inside no_grad() (plus the conv workspace, grown beforehand), and not absurdly loose."""
    import tracemalloc

    import tinyunet
    from tinyunet.layers import conv
    model = build_model(kind, classes=3, **TINY[kind]).eval()
    shape = (2, 1, 96, 96)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    conv.release_workspace()
    with tinyunet.no_grad():
        model.forward(x)
    workspace = sum(block.nbytes for block in conv._workspace.values())
    tracemalloc.start()
    try:
        with tinyunet.no_grad():
            model.forward(x)
        measured = tracemalloc.get_traced_memory()[1] + workspace + x.nbytes
    finally:
        tracemalloc.stop()
    estimate = model.inference_bytes(shape, parts=True)
    bound = estimate["activations"] + estimate["workspace"]
    assert measured <= bound + 2 ** 18 and bound < 4 * measured, (measured, estimate)


def test_astype_keeps_the_kind_and_classes():
    model = build_model("segnet", classes=3, base_width=2).astype("float64")
    assert model.config.dtype == "float64" and model.config.classes == 3
    assert all(b.dtype == np.float64 for b in model.buffers().values())
    assert dataclasses.replace(model.config, classes=4).classes == 4
