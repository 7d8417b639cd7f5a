"""The U-Net as a whole: its exact architecture, sizes, checks, and whole-network gradients.

The per-layer gradients are proved in tests/test_layers.py; here the question is whether the
wiring is right: every skip, every concat order, the sum of a skip's two gradients, the crop.
The strongest proof is numerical: a float64 directional check of the exact-width network
(depth 4, base 64) for the input and every parameter, and a full central-difference check of
tiny networks in both paddings.
"""
from __future__ import annotations

import numpy as np
import pytest

from tinyunet.backend import DeviceError, gpu_available
from tinyunet.gradcheck import check_gradients, numerical_gradient, relative_error
from tinyunet.layers import CenterCrop2d, Conv2d, Dropout, ReLU
from tinyunet.losses import bce_with_logits
from tinyunet.unet import UNet, UNetConfig, UNetInputError, nearest_valid_sizes, output_size


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def frozen_dropout(model):
    """A function that rewinds every Dropout generator, so each forward draws the same masks."""
    states = {name: rng.bit_generator.state for name, rng in model.random_generators().items()}

    def rewind():
        for name, rng in model.random_generators().items():
            rng.bit_generator.state = states[name]
    return rewind


def network_gradient_errors(model, x, target, mode, rng, eps=1e-6):
    """Relative errors of dL/dx and dL/dparam against numerical ones, L = BCE(model(x), target).

    The analytic gradients come from one forward/backward; the dropout masks are rewound
    before every forward so the numerical loss is the same function.
    """
    rewind = frozen_dropout(model)
    rewind()
    logits = model.forward(x)
    _, dlogits = bce_with_logits(logits, target)
    dx = model.backward(dlogits)
    analytic = {"x": dx}
    analytic.update({name: g.copy() for name, g in model.gradients().items()})

    def loss_fn():
        rewind()
        return bce_with_logits(model.forward(x), target)[0]

    arrays = {"x": x}
    arrays.update(model.parameters())
    return check_gradients(loss_fn, arrays, analytic, mode=mode, rng=rng, eps=eps), analytic


def randomize_biases(model, rng, scale=0.05):
    """Keras starts biases at zero; nonzero ones make the check see bias/weight mix-ups."""
    for name, p in model.parameters().items():
        if name.endswith(".bias"):
            p[...] = rng.normal(0, scale, p.shape)


# ---------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------
def test_exact_parameter_count():
    """The Keras reference model (zhixuhao/unet) has 31,031,685 parameters for 1 input channel."""
    model = UNet()
    assert model.num_parameters() == 31_031_685
    widths = {name: layer.out_channels for name, layer in model.layers.items() if isinstance(layer, Conv2d)}
    assert [widths[f"down{i}.conv2"] for i in range(1, 5)] == [64, 128, 256, 512]
    assert widths["bottom.conv2"] == 1024
    assert [widths[f"up{i}.upconv"] for i in range(4, 0, -1)] == [512, 256, 128, 64]
    assert widths["head.conv"] == 2 and widths["head.out"] == 1
    assert model.layers["up1.upconv"].kernel_size == (2, 2)
    assert model.layers["head.out"].kernel_size == (1, 1)


def test_keras_initialization():
    """he_normal weights (truncated, std sqrt(2 / fan_in)) and zero biases; glorot_uniform last."""
    model = UNet(base_width=16)
    params = model.parameters()
    assert all(not p.any() for name, p in params.items() if name.endswith(".bias"))
    w = params["up2.conv1.weight"]                                  # fan_in = 64 * 9
    assert abs(w.std() - np.sqrt(2 / (64 * 9))) < 0.05 * np.sqrt(2 / (64 * 9))
    assert np.abs(w).max() <= 2 * np.sqrt(2 / (64 * 9)) / 0.8796 + 1e-6   # truncated at 2 std
    head = params["head.out.weight"]                                # glorot: |w| <= sqrt(6 / (2 + 1))
    assert np.abs(head).max() <= np.sqrt(6 / 3)
    assert all(p.dtype == np.float32 for p in params.values())


def test_dropout_placement_and_names():
    model = UNet(base_width=4)
    names = list(model.named_layers())
    assert names[:5] == ["down1.conv1", "down1.relu1", "down1.conv2", "down1.relu2", "down1.pool"]
    # the dropped tensor feeds the pool (and the skip): dropout sits right before down4.pool
    assert names.index("down4.dropout") == names.index("down4.pool") - 1
    assert names.index("bottom.dropout") == names.index("up4.upconv") - 1
    assert [n for n, layer in model.layers.items() if isinstance(layer, Dropout)] == ["down4.dropout", "bottom.dropout"]
    assert names[-3:] == ["head.conv", "head.relu", "head.out"]
    assert "down1.conv1.weight" in model.parameters() and "head.out.bias" in model.parameters()
    assert set(model.parameters()) == set(model.gradients())
    assert isinstance(model.head_relu, ReLU)
    assert UNet(base_width=4, dropout=0.0).random_generators() == {}


def test_head_relu_false_removes_only_that_relu():
    with_relu, without = UNet(base_width=4), UNet(base_width=4, head_relu=False)
    assert without.head_relu is None and "head.relu" not in without.layers
    assert set(with_relu.layers) - set(without.layers) == {"head.relu"}
    assert with_relu.num_parameters() == without.num_parameters()


def test_parameters_are_the_layers_arrays():
    """Adam updates parameters() in place: that must update the model itself."""
    model = UNet(base_width=4, depth=2)
    params = model.parameters()
    params["down1.conv1.weight"] += 1.0
    assert model.layers["down1.conv1"].params["weight"] is params["down1.conv1.weight"]
    x = np.zeros((1, 1, 8, 8), np.float32)
    model.backward(np.ones_like(model.forward(x)))
    grads = model.gradients()
    assert grads["up1.conv2.weight"] is model.layers["up1.conv2"].grads["weight"]


def test_same_seed_same_model_and_config_round_trip():
    a, b = UNet(base_width=4, seed=3), UNet(base_width=4, seed=3)
    assert all(np.array_equal(a.parameters()[k], b.parameters()[k]) for k in a.parameters())
    c = UNet(base_width=4, seed=4)
    assert not np.array_equal(a.parameters()["down1.conv1.weight"], c.parameters()["down1.conv1.weight"])
    assert UNetConfig.from_json(a.config.to_json()) == a.config
    assert UNetConfig(dtype=np.float64).dtype == "float64"


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def test_valid_paper_geometry():
    """The U-Net paper: 572x572 in, 388x388 out, the 64x64 skip at the bottom cropped to 56x56."""
    assert output_size(572, 4, "valid") == 388
    model = UNet(padding="valid")                        # full width: shapes only, no arithmetic
    records = {name: (in_shape, out) for name, _, in_shape, out in model.layer_shapes((1, 1, 572, 572))}
    assert records["head.out"][1] == (1, 1, 388, 388)
    assert records["down1.relu2"][1] == (1, 64, 568, 568)
    assert records["down4.relu2"][1] == (1, 512, 64, 64)
    assert records["bottom.relu2"][1] == (1, 1024, 28, 28)
    assert records["up4.crop"][1] == (1, 512, 56, 56)
    assert records["up1.crop"] == ((1, 64, 568, 568), (1, 64, 392, 392))
    assert "head.conv" not in model.layers                # the paper's head: one 1x1 conv
    assert model.layers["up4.upconv"].padding == "same"


def test_same_output_keeps_size_and_batch():
    model = UNet(base_width=4, depth=2)
    y = model.forward(np.zeros((3, 1, 12, 8), np.float32))
    assert y.shape == (3, 1, 12, 8) and y.dtype == np.float32


def test_valid_forward_shapes_small():
    model = UNet(base_width=2, depth=2, padding="valid")
    size = nearest_valid_sizes(40, 2, "valid")[1]
    y = model.forward(np.zeros((1, 1, size, size), np.float32))
    assert y.shape == (1, 1, output_size(size, 2, "valid"), output_size(size, 2, "valid"))


def test_size_error_names_nearest_sizes_and_overlap_tile():
    model = UNet(base_width=2)
    with pytest.raises(UNetInputError, match=r"250.*divisible by 2\*\*depth = 16.*240 or 256.*overlap-tile"):
        model.forward(np.zeros((1, 1, 250, 256), np.float32))
    with pytest.raises(UNetInputError, match="width 100"):
        model.forward(np.zeros((1, 1, 96, 100), np.float32))
    valid = UNet(base_width=2, padding="valid")
    below, above = nearest_valid_sizes(570, 4, "valid")
    assert (below, above) == (556, 572)
    with pytest.raises(UNetInputError, match="556 or 572.*overlap-tile"):
        valid.forward(np.zeros((1, 1, 570, 572), np.float32))


def test_channel_dtype_and_rank_errors_say_what_was_expected():
    model = UNet(base_width=2, depth=2)
    with pytest.raises(UNetInputError, match=r"expected 1 input channel.*\(1, 3, 8, 8\).*in_channels=3"):
        model.forward(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(TypeError, match=r"float64 but the model is float32.*astype\(np.float32\)"):
        model.forward(np.zeros((1, 1, 8, 8), np.float64))
    with pytest.raises(TypeError, match=r"uint8.*scaled to \[0, 1\]"):
        model.forward(np.zeros((1, 1, 8, 8), np.uint8))
    with pytest.raises(UNetInputError, match=r"\(N, C, H, W\).*x\[None\]"):
        model.forward(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(TypeError, match="numpy or cupy array"):
        model.forward([[0.0]])


def test_config_errors():
    with pytest.raises(ValueError, match="padding must be one of"):
        UNetConfig(padding="full")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        UNetConfig(dtype="float16")
    with pytest.raises(ValueError, match="dropout is a drop probability"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="depth must be"):
        UNetConfig(depth=0)


def test_load_parameters_lists_every_mismatch():
    model = UNet(base_width=4, depth=2)
    values = {k: v.copy() for k, v in model.parameters().items()}
    values["down1.conv1.weight"] = np.zeros((4, 3, 3, 3), np.float32)
    del values["head.out.bias"]
    values["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as info:
        model.load_parameters(values)
    text = str(info.value)
    assert "down1.conv1.weight: expected shape (4, 1, 3, 3), found (4, 3, 3, 3)" in text
    assert "head.out.bias: missing" in text and "extra.weight: not a parameter" in text


# ---------------------------------------------------------------------------------------------
# modes, devices, tracer, summary
# ---------------------------------------------------------------------------------------------
def test_train_eval_switch_dropout():
    model = UNet(base_width=4, depth=2, dropout=0.5)
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    model.eval()
    assert np.array_equal(model.forward(x), model.forward(x))
    assert all(not layer.training for layer in model.layers.values())
    model.train()
    assert not np.array_equal(model.forward(x), model.forward(x))   # fresh masks each step


def test_to_gpu_without_gpu_says_why():
    if gpu_available():
        pytest.skip("a GPU is present; tests/test_unet.py::test_gpu_forward_matches_cpu covers it")
    with pytest.raises(DeviceError, match="cannot be used"):
        UNet(base_width=2, depth=1).to("gpu")


@pytest.mark.gpu
def test_gpu_forward_matches_cpu():
    if not gpu_available():
        pytest.skip("needs a CUDA GPU with CuPy")
    from tinyunet.backend import to_device, to_numpy
    model = UNet(base_width=4, depth=2, dtype="float64").eval()
    x = np.random.default_rng(0).random((1, 1, 16, 16))
    y_cpu = model.forward(x)
    dx_cpu = model.backward(np.ones_like(y_cpu))
    model.to("gpu")
    y_gpu = model.forward(to_device(x, "gpu"))
    dx_gpu = model.backward(to_device(np.ones_like(y_cpu), "gpu"))
    assert model.device == "gpu"
    assert relative_error(to_numpy(y_gpu), y_cpu) < 1e-12 and relative_error(to_numpy(dx_gpu), dx_cpu) < 1e-12


def test_tracer_sees_every_layer_forward_and_backward():
    class Recorder:
        def __init__(self):
            self.forward, self.backward = [], []

        def on_forward(self, name, layer, output):
            self.forward.append((name, output.shape if hasattr(output, "shape") else None))

        def on_backward(self, name, layer, grad_input):
            self.backward.append(name)

    model = UNet(base_width=2, depth=2, padding="valid")
    model.tracer = recorder = Recorder()
    size = nearest_valid_sizes(40, 2, "valid")[1]
    y = model.forward(np.zeros((1, 1, size, size), np.float32))
    model.backward(np.ones_like(y))
    names = list(model.layers)
    assert [n for n, _ in recorder.forward] == names
    assert recorder.forward[-1][1] == y.shape
    # backward visits every layer once; each conv after the layer that consumed its output
    assert sorted(recorder.backward) == sorted(names)
    assert recorder.backward[0] == "head.out" and recorder.backward[-1] == "down1.conv1"


def test_backward_frees_what_each_layer_kept_for_it():
    """After model.backward no layer holds an activation (PyTorch frees its saved tensors the
    same way); a second backward without a forward says forward must come first."""
    model = UNet(base_width=4, depth=2)
    y = model.forward(np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32))
    kept = [name for name, layer in model.layers.items() if any(getattr(layer, a) is not None for a in layer._saved)]
    assert "down1.conv1" in kept and "down1.relu1" in kept and "down1.pool" in kept
    model.backward(np.ones_like(y))
    assert [name for name, layer in model.layers.items()
            if any(getattr(layer, a) is not None for a in layer._saved)] == []
    with pytest.raises(RuntimeError, match="backward\\(\\) called before forward\\(\\)"):
        model.backward(np.ones_like(y))


def test_summary_table_and_totals():
    model = UNet()
    lines = []
    text = model.summary((2, 1, 256, 256), print_fn=lines.append)
    assert lines == [text]
    assert "Total params: 31,031,685" in text
    assert "down1.conv1 (Conv2d)" in text and "(2, 64, 256, 256)" in text and "(2, 1, 256, 256)" in text
    # down1.conv2: 2 * 64 * 256 * 256 outputs, each 64 * 3 * 3 multiply-accumulates
    assert f"{2 * 64 * 256 * 256 * 64 * 9:,}" in text
    assert "Training-step memory (estimate)" in text
    assert len([r for r in text.splitlines() if "(Conv2d)" in r]) == 20
    assert len([r for r in text.splitlines() if "(UpConv2d)" in r]) == 4   # upsample + 2x2 conv
    with pytest.raises(UNetInputError, match="240 or 256"):
        model.summary((1, 250, 256))


# ---------------------------------------------------------------------------------------------
# the crop layer
# ---------------------------------------------------------------------------------------------
def test_center_crop_forward_backward():
    rng = np.random.default_rng(1)
    crop = CenterCrop2d()
    x = rng.standard_normal((2, 3, 9, 8))
    y = crop.forward(x, (5, 4))
    assert np.array_equal(y, x[:, :, 2:7, 2:6])
    r = rng.standard_normal(y.shape)
    dx = crop.backward(r)
    numeric = numerical_gradient(lambda: float((crop.forward(x, (5, 4)) * r).sum()), x)
    assert relative_error(dx, numeric) < 1e-9
    assert not dx[:, :, :2].any() and not dx[:, :, 7:].any()        # the border gets nothing
    with pytest.raises(ValueError, match="cannot cut a 10x4 center"):
        crop.forward(x, (10, 4))


def test_center_crop_with_an_odd_difference():
    """An odd difference drops the extra row at the bottom and the extra column at the right
    (the documented rule); non-square sizes, so rows and columns cannot stand in for each other."""
    rng = np.random.default_rng(2)
    crop = CenterCrop2d()
    x = rng.standard_normal((1, 2, 6, 9))
    y = crop.forward(x, (3, 4))                               # top (6-3)//2 = 1, left (9-4)//2 = 2
    assert np.array_equal(y, x[:, :, 1:4, 2:6])
    r = rng.standard_normal(y.shape)
    dx = crop.backward(r)
    assert np.array_equal(dx[:, :, 1:4, 2:6], r) and np.count_nonzero(dx) == np.count_nonzero(r)
    numeric = numerical_gradient(lambda: float((crop.forward(x, (3, 4)) * r).sum()), x)
    assert relative_error(dx, numeric) < 1e-9


# ---------------------------------------------------------------------------------------------
# whole-network gradient proofs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding,head_relu,depth", [("same", True, 2), ("same", False, 2), ("valid", True, 1)])
def test_tiny_network_full_central_differences(padding, head_relu, depth):
    """Every element of the input and of every parameter, by central differences, dropout on.
    (The valid network at depth 1 takes an 18x18 input; depth 2 needs 44x44, checked below.)"""
    rng = np.random.default_rng(7)
    model = UNet(base_width=2, depth=depth, padding=padding, head_relu=head_relu, dtype="float64", seed=1)
    randomize_biases(model, rng, scale=0.1)
    size = 8 if padding == "same" else nearest_valid_sizes(1, depth, "valid")[1]
    x = rng.random((2, 1, size, size))
    target = (rng.random(model.output_shape(x.shape)) > 0.5).astype(np.float64)
    errors, analytic = network_gradient_errors(model, x, target, "full", rng)
    assert set(errors) == {"x"} | set(model.parameters())
    assert max(errors.values()) < 1e-6, {k: v for k, v in errors.items() if v >= 1e-6}
    # a gradient of zero would pass trivially: the deepest layers must see one
    assert np.abs(analytic["down1.conv1.weight"]).max() > 0 and np.abs(analytic["x"]).max() > 0


NUMBA_LAYER_KERNELS = ["relu_forward", "relu_backward", "maxpool_forward", "maxpool_backward",
                       "upconv_columns", "upconv_interleave", "upconv_split", "upconv_gather"]


def test_tiny_network_full_central_differences_through_the_numba_layer_kernels(monkeypatch):
    """The same full check with the Numba size threshold lowered to one element, so that every
    layer kernel of kernels/cpu_layers.py the U-Net uses runs inside it (at training sizes they
    serve every step; at gradient-check sizes they never would). Each one is counted."""
    from tinyunet.kernels import cpu_layers
    if cpu_layers.njit is None:
        pytest.skip("Numba is not installed")
    monkeypatch.setattr(cpu_layers, "PARALLEL_MIN_SIZE", 1)
    import numba
    threads = numba.get_num_threads()
    numba.set_num_threads(1)      # thousands of tiny forwards: waking threads would cost more than the work
    calls = dict.fromkeys(NUMBA_LAYER_KERNELS, 0)
    for name in NUMBA_LAYER_KERNELS:
        def counted(*args, _kernel=getattr(cpu_layers, name), _name=name):
            calls[_name] += 1
            return _kernel(*args)
        monkeypatch.setattr(cpu_layers, name, counted)
    rng = np.random.default_rng(8)
    model = UNet(base_width=2, depth=2, dtype="float64", seed=3)
    randomize_biases(model, rng, scale=0.1)
    x = rng.random((2, 1, 8, 8))
    target = (rng.random(x.shape) > 0.5).astype(np.float64)
    try:
        errors, analytic = network_gradient_errors(model, x, target, "full", rng)
    finally:
        numba.set_num_threads(threads)
    assert max(errors.values()) < 1e-6, {k: v for k, v in errors.items() if v >= 1e-6}
    assert np.abs(analytic["down1.conv1.weight"]).max() > 0
    assert all(calls.values()), f"Numba kernels that never ran: {[k for k, v in calls.items() if not v]}"


def test_exact_network_directional_float64():
    """The exact network (depth 4, base 64) at 16x16: the input and all 48 parameter arrays,
    each along one random direction, dropout on and seeded."""
    rng = np.random.default_rng(0)
    model = UNet(dtype="float64", seed=0)
    randomize_biases(model, rng, scale=0.01)
    x = rng.random((1, 1, 16, 16))
    target = (rng.random((1, 1, 16, 16)) > 0.5).astype(np.float64)
    # eps 3e-5, not 1e-6: a unit direction over 9.4 million weights gives a directional
    # derivative near 1e-6, and the loss's rounding (1e-16 / eps) would swamp it (worst
    # error 2e-7 at 3e-5). Not 1e-4 either: a 64-element bias then moves ~1e-5 per element,
    # enough to cross a ReLU kink (with the dropout masks of 2026-11-30, up1.conv1.bias
    # scored 1.2e-4 at 1e-4 and 1.8e-10 at 3e-5: a kink, not a wrong gradient).
    errors, analytic = network_gradient_errors(model, x, target, "directional", rng, eps=3e-5)
    assert len(errors) == 1 + 48 == 1 + len(model.parameters())     # 24 convs: weight, bias
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-6, (worst, errors[worst])
    assert model.head_relu.dead_fraction() < 1.0      # a dead head would zero every gradient
    assert all(np.abs(g).max() > 0 for g in analytic.values())


def test_valid_depth2_directional():
    """The unpadded network at depth 2 (44x44 in, 4x4 out): crops at two levels."""
    rng = np.random.default_rng(5)
    model = UNet(base_width=3, depth=2, padding="valid", dtype="float64", seed=2)
    randomize_biases(model, rng, scale=0.1)
    size = nearest_valid_sizes(1, 2, "valid")[1]
    assert (size, output_size(size, 2, "valid")) == (44, 4)
    x = rng.random((2, 1, size, size))
    target = (rng.random(model.output_shape(x.shape)) > 0.5).astype(np.float64)
    errors, _ = network_gradient_errors(model, x, target, "directional", rng)
    assert max(errors.values()) < 1e-6, max(errors.items(), key=lambda kv: kv[1])


def test_skip_gradient_is_the_sum_of_both_paths():
    """Cut one of the two paths and the check must fail: the sum is what makes it pass."""
    rng = np.random.default_rng(3)
    model = UNet(base_width=2, depth=2, dtype="float64", dropout=0.0)
    randomize_biases(model, rng)
    x = rng.random((1, 1, 8, 8))
    target = (rng.random((1, 1, 8, 8)) > 0.5).astype(np.float64)
    errors, _ = network_gradient_errors(model, x, target, "directional", rng)
    assert errors["down1.conv1.weight"] < 1e-6

    concat = model.layers["up1.concat"]
    original = concat.backward
    concat.backward = lambda dy: (np.zeros_like(original(dy)[0]), original(dy)[1])   # drop the skip path
    broken, _ = network_gradient_errors(model, x, target, "directional", np.random.default_rng(3))
    assert broken["down1.conv1.weight"] > 1e-3
