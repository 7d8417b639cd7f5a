"""Inference mode (tinyunet/grad_mode.py): inside no_grad() no layer keeps anything, the outputs
are the training-mode forward's, a backward afterwards says why it cannot run, and training
outside the block is untouched."""
import threading

import numpy as np
import pytest

import tinyunet
from tinyunet.kernels import forced as forced_kernels
from tinyunet.kernels import use as use_kernels
from tinyunet.layers import (CenterCrop2d, Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid, UpConv2d,
                             Upsample2d, conv)
from tinyunet.unet import UNet


def arrays_kept(layer):
    """Names of the layer's attributes that hold an array (params, grads and batch norm's running
    statistics aside: state, not kept for a backward), looking inside tuples, lists and dicts too."""
    def holds_array(value):
        if isinstance(value, np.ndarray):
            return True
        if isinstance(value, (tuple, list)):
            return any(holds_array(v) for v in value)
        if isinstance(value, dict):
            return any(holds_array(v) for v in value.values())
        return False
    return [name for name, value in vars(layer).items()
            if name not in ("params", "grads", "buffers") and holds_array(value)]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_an_inference_pass_keeps_no_array_on_any_layer(padding):
    model = UNet(base_width=4, depth=2, padding=padding, seed=1)
    size = 16 if padding == "same" else 44
    x = np.random.default_rng(0).random((2, 1, size, size), dtype=np.float32)
    model.forward(x)                                   # a training forward: the layers keep arrays
    assert arrays_kept(model.layers["down1.conv1"]) and arrays_kept(model.layers["down1.pool"])
    with tinyunet.no_grad():
        model.forward(x)                               # training mode, dropout on: still nothing kept
    assert {name: arrays_kept(layer) for name, layer in model.layers.items() if arrays_kept(layer)} == {}


def test_inference_output_equals_the_training_forward_without_dropout():
    model = UNet(base_width=8, depth=3, seed=2, dtype="float64").eval()     # eval: dropout off
    x = np.random.default_rng(1).random((2, 1, 32, 32))
    trained = model.forward(x)
    with tinyunet.no_grad():
        inferred = model.forward(x)
    np.testing.assert_array_equal(inferred, trained)
    # a model without dropout in training mode, and float32 with the up-convs in several bands
    model = UNet(base_width=8, depth=2, dropout=0.0, seed=3)
    x = np.random.default_rng(2).random((1, 1, 64, 64), dtype=np.float32)
    trained = model.forward(x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv, "WORKSPACE_BYTES", 4096)
        with tinyunet.no_grad():
            inferred = model.forward(x)
    np.testing.assert_allclose(inferred, trained, rtol=1e-4, atol=1e-5 * np.abs(trained).max())   # float32 rounding


def test_a_backward_after_an_inference_pass_says_why_it_cannot_run():
    model = UNet(base_width=4, depth=2, seed=0)
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    with tinyunet.no_grad():
        y = model.forward(x)
    with pytest.raises(RuntimeError, match=r"Conv2d 'head.out': backward\(\) after a forward that ran inside "
                                           r"tinyunet.no_grad\(\), which keeps nothing for a backward"):
        model.backward(np.ones_like(y))
    # a forward outside the block makes it differentiable again
    y = model.forward(x)
    assert model.backward(np.ones_like(y)).shape == x.shape


@pytest.mark.parametrize("make, x, dy", [
    (lambda: Conv2d(2, 3, 3, seed=0), (1, 2, 6, 6), (1, 3, 6, 6)),
    (lambda: UpConv2d(2, 3, seed=0), (1, 2, 3, 3), (1, 3, 6, 6)),
    (lambda: MaxPool2d(2), (1, 2, 6, 6), (1, 2, 3, 3)),
    (lambda: ReLU(), (1, 2, 6, 6), (1, 2, 6, 6)),
    (lambda: Sigmoid(), (1, 2, 6, 6), (1, 2, 6, 6)),
    (lambda: Dropout(0.5, seed=0), (1, 2, 6, 6), (1, 2, 6, 6)),
    (lambda: Upsample2d(2), (1, 2, 3, 3), (1, 2, 6, 6)),
])
def test_every_layer_keeps_nothing_and_refuses_a_backward_inside_no_grad(make, x, dy):
    layer = make()
    if isinstance(layer, Conv2d):                      # UpConv2d too: float64 weights for a float64 x
        layer.astype(np.float64)
    x = np.random.default_rng(0).standard_normal(x)
    y = layer.forward(x)
    with tinyunet.no_grad():
        y_inferred = layer.forward(x)
    if not isinstance(layer, Dropout):                 # a training Dropout draws a fresh mask
        np.testing.assert_array_equal(y_inferred, y)
    assert arrays_kept(layer) == []
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(np.ones(dy))


def test_concat_and_crop_refuse_a_backward_after_no_grad():
    with tinyunet.no_grad():
        Concat().forward((np.ones((1, 1, 2, 2)), np.ones((1, 2, 2, 2))))
        crop = CenterCrop2d()
        crop.forward(np.ones((1, 1, 6, 6)), (2, 2))
    with pytest.raises(RuntimeError, match="no_grad"):
        crop.backward(np.ones((1, 1, 2, 2)))


@pytest.mark.parametrize("kernels", [None, "reference"])       # None: the Numba kernels where they serve
def test_pool_without_argmax_and_relu_in_place_equal_the_training_forward(kernels):
    """The values-only paths (Numba kernels and NumPy), ties and NaN included."""
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, (2, 8, 128, 96)).astype(np.float32)     # many ties; >= 2**17 elements
    x[0, 0, 0, 0] = np.nan
    previous = forced_kernels()
    use_kernels(kernels)
    try:
        pool, relu = MaxPool2d(2), ReLU()
        y_pool, y_relu = pool.forward(x), relu.forward(x)
        with tinyunet.no_grad():
            np.testing.assert_array_equal(pool.forward(x), y_pool)
            inplace = x.copy()
            assert relu.forward(inplace, out=inplace) is inplace
        np.testing.assert_array_equal(inplace, y_relu)
    finally:
        use_kernels(previous)


@pytest.mark.parametrize("kernels", [None, "reference"])       # None: the Numba kernels where they serve
def test_upconv_bands_equal_the_whole_forward(kernels):
    """UpConv2d inside no_grad() runs in bands of rows (one row each here, and one band): the
    same output as the training forward's whole column matrix, to rounding."""
    layer = UpConv2d(8, 5, seed=0, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((2, 8, 64, 48))
    previous = forced_kernels()
    use_kernels(kernels)
    try:
        whole = layer.forward(x)
        for workspace in (1, 10 ** 5, 64 * 2 ** 20):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(conv, "WORKSPACE_BYTES", workspace)
                with tinyunet.no_grad():
                    banded = layer.forward(x)
            np.testing.assert_allclose(banded, whole, rtol=1e-12, atol=1e-12)
    finally:
        use_kernels(previous)


def test_training_after_an_inference_pass_is_bit_identical():
    x = np.random.default_rng(6).random((2, 1, 16, 16), dtype=np.float32)

    def step(model):
        y = model.forward(x)
        dx = model.backward(np.ones_like(y))
        return y, dx, model.gradients()

    reference = step(UNet(base_width=4, depth=2, seed=5))
    model = UNet(base_width=4, depth=2, seed=5)
    with tinyunet.no_grad():
        model.eval().forward(x)
    y, dx, grads = step(model.train())
    # eval() and no_grad() drew no dropout mask: the generators are where they were
    np.testing.assert_array_equal(y, reference[0])
    np.testing.assert_array_equal(dx, reference[1])
    for name, value in reference[2].items():
        np.testing.assert_array_equal(grads[name], value)


def test_no_grad_nests_restores_on_error_and_is_per_thread():
    assert tinyunet.is_grad_enabled()
    with pytest.raises(KeyError):
        with tinyunet.no_grad():
            with tinyunet.enable_grad():
                assert tinyunet.is_grad_enabled()
            assert not tinyunet.is_grad_enabled()
            raise KeyError
    assert tinyunet.is_grad_enabled()
    seen = []
    with tinyunet.no_grad():
        thread = threading.Thread(target=lambda: seen.append(tinyunet.is_grad_enabled()))
        thread.start()
        thread.join()
    assert seen == [True]

    @tinyunet.no_grad()
    def predict():
        return tinyunet.is_grad_enabled()
    assert predict() is False and tinyunet.is_grad_enabled()


def test_predict_proba_runs_inside_no_grad():
    model = UNet(base_width=4, depth=2, seed=0).eval()
    x = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)
    probability = model.predict_proba(x)
    assert probability.shape == (1, 1, 16, 16)
    assert all(arrays_kept(layer) == [] for layer in model.layers.values())


# ---------------------------------------------------------------------------------------------
# FCN's and SegNet's layers (issue 15's ConvTranspose2d, BatchNorm2d, pools with indices,
# MaxUnpool2d, Crop2d, Add), and the two networks
# ---------------------------------------------------------------------------------------------
def _indices_of(x):
    return MaxPool2d(2, return_indices=True).forward(x)[1]


@pytest.mark.parametrize("kind", ["convtranspose", "bn_train", "bn_eval", "pool_indices", "ceil_pool_indices",
                                  "unpool", "crop", "add"])
def test_the_fcn_and_segnet_layers_keep_nothing_inside_no_grad(kind):
    from tinyunet.layers import Add, BatchNorm2d, CeilMaxPool2d, ConvTranspose2d, Crop2d, MaxUnpool2d
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 7, 7))
    small = rng.standard_normal((2, 3, 3, 3))
    layer, args = {
        "convtranspose": lambda: (ConvTranspose2d(3, 3, 4, stride=2, cropping=1, output_padding=1,
                                                  weight_init="he_normal", seed=0, dtype=np.float64), (x,)),
        "bn_train": lambda: (BatchNorm2d(3, dtype=np.float64), (x,)),
        "bn_eval": lambda: (BatchNorm2d(3, dtype=np.float64).eval(), (x,)),
        "pool_indices": lambda: (MaxPool2d(2, return_indices=True), (x,)),
        "ceil_pool_indices": lambda: (CeilMaxPool2d(2, return_indices=True), (x,)),
        "unpool": lambda: (MaxUnpool2d(2), (small, _indices_of(x[:, :, :6, :6]), (6, 6))),
        "crop": lambda: (Crop2d((1, 2)), (x, small)),
        "add": lambda: (Add(), ((x, x * 2),)),
    }[kind]()
    if isinstance(layer, BatchNorm2d):
        layer.buffers["running_mean"][...] = [0.1, -0.2, 0.3]
        layer.buffers["running_var"][...] = [0.5, 2.0, 1.5]
        layer.params["weight"][...] = [1.5, 0.5, -1.0]
    state = {k: v.copy() for k, v in getattr(layer, "buffers", {}).items()}
    y = layer.forward(*args)                               # outside: keeps what backward needs
    kept_outside = arrays_kept(layer)
    if isinstance(layer, BatchNorm2d):                     # the same running statistics for both calls
        layer.buffers = {k: v.copy() for k, v in state.items()}
    with tinyunet.no_grad():
        y_inferred = layer.forward(*args)
    for a, b in zip(y if isinstance(y, tuple) else (y,), y_inferred if isinstance(y, tuple) else (y_inferred,)):
        np.testing.assert_array_equal(b, a)               # bit-identical, indices included
    if kind not in ("crop", "add"):                        # those keep shapes only, never arrays
        assert kept_outside
    assert arrays_kept(layer) == []
    dy = y[0] if isinstance(y, tuple) else y
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.backward(np.ones_like(dy))
    layer.forward(*args)                                   # outside again: differentiable
    assert layer.backward(np.ones_like(dy)) is not None


@pytest.mark.parametrize("network", ["fcn8s", "fcn16s", "fcn32s", "segnet"])
def test_fcn_and_segnet_keep_no_array_after_a_no_grad_forward(network):
    from tinyunet.fcn import FCN
    from tinyunet.segnet import SegNet
    if network == "segnet":
        model = SegNet(classes=3, base_width=2, seed=1)
    else:
        model = FCN(variant=network[3:], classes=3, base_width=2, fc_width=8, score_init="he_normal", seed=1)
    x = np.random.default_rng(3).random((2, 3, 20, 24), dtype=np.float32)
    model.forward(x)                                        # training forward: batch norm moves
    model.eval()
    expected = model.forward(x)                             # the normal evaluation forward
    assert any(arrays_kept(layer) for layer in model.layers.values())
    with tinyunet.no_grad():
        inferred = model.forward(x)
    np.testing.assert_array_equal(inferred, expected)
    assert {name: arrays_kept(layer) for name, layer in model.layers.items() if arrays_kept(layer)} == {}
    with pytest.raises(RuntimeError, match="no_grad"):
        model.backward(np.ones_like(expected))


# ---------------------------------------------------------------------------------------------
# Memory the process holds (issue 18): gradients never written, and freed activations
# ---------------------------------------------------------------------------------------------
_PROBE_START = r"""
import json, sys
import numpy as np
import tinyunet

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
"""
_RESIDENT_PROBE = _PROBE_START + r"""
from tinyunet.unet import UNet

def held_after_freeing_a_hole():
    # 64 MB written, then 1 MB above it, then the 64 MB freed: a hole below a live block,
    # which glibc's heap keeps resident, and a mapping given back when it was mapped.
    before = resident()
    hole = np.ones(2 ** 24, dtype=np.float32)
    above = np.ones(2 ** 18, dtype=np.float32)
    del hole
    held = resident() - before
    del above
    return held

before = resident()
model = UNet()
built = resident() - before
parameters = sum(v.nbytes for v in model.parameters().values())
outside = held_after_freeing_a_hole()
with tinyunet.no_grad():
    inside = held_after_freeing_a_hole()
after = held_after_freeing_a_hole()
print(json.dumps(dict(built=built, parameters=parameters, outside=outside, inside=inside, after=after,
                      applied=tinyunet.MALLOPT_APPLIED)))
"""


def test_unwritten_gradients_and_freed_activations_are_not_resident():
    """Measured in a fresh process (/proc/self/statm): building the exact U-Net makes its
    parameters resident, not also its zero gradients, which only a backward writes (zeros by
    calloc: the kernel maps the pages on first write); and inside no_grad() a freed 64 MB array
    goes back to the kernel, where outside (tinyunet's heap setting for training) and again
    after the block it stays in the process (tinyunet/grad_mode.py)."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    # zeros_like gradients made 2x the parameters resident (248 MB for 124 MB)
    assert seen["parameters"] <= seen["built"] < 1.3 * seen["parameters"], seen
    if not seen["applied"]:
        pytest.skip("tinyunet did not set glibc's malloc threshold here (not glibc, or the user tuned malloc)")
    assert seen["outside"] > 60 * mb and seen["after"] > 60 * mb, seen       # training's heap keeps it
    assert seen["inside"] < 8 * mb, seen                                      # no_grad() gives it back


_TRIM_PROBE = _PROBE_START + r"""
from tinyunet.segnet import SegNet

def held_after_freeing_the_top():
    # 16 MB written at the top of the heap, then freed: above the trim threshold glibc gives
    # it back to the kernel, below it the process keeps it
    before = resident()
    top = np.ones(2 ** 22, dtype=np.float32)
    del top
    return resident() - before

model = SegNet(classes=2, in_channels=1, base_width=2)
seen = {"built": held_after_freeing_the_top()}
model.backward(np.ones_like(model.forward(np.ones((1, 1, 32, 32), np.float32))))
seen["trained"] = held_after_freeing_the_top()
with tinyunet.no_grad():
    seen["inside"] = held_after_freeing_the_top()
seen["after"] = held_after_freeing_the_top()
seen["applied"] = tinyunet.MALLOPT_APPLIED
print(json.dumps(seen))
"""


def test_the_first_backward_keeps_freed_memory_and_no_grad_gives_it_back():
    """Fresh process: before any backward a 16 MB block freed at the top of the heap goes back
    to the kernel (a built model's zero gradients stay unwritten: the test above); from the
    first backward on the process keeps it for the next step; inside no_grad() it goes back
    again, and after the block it is kept (tinyunet/grad_mode.py, keep_freed_memory)."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if not seen["applied"]:
        pytest.skip("tinyunet did not set glibc's malloc thresholds here (not glibc, or the user tuned malloc)")
    mb = 2 ** 20
    assert seen["built"] < 2 * mb and seen["inside"] < 2 * mb, seen
    assert seen["trained"] > 15 * mb and seen["after"] > 15 * mb, seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shifted_forward_in_bands_equals_one_pass(dtype):
    """The shifted conv (few output channels: the U-Net's head) runs its forward in bands of
    output rows once x's padded copy exceeds WORKSPACE_BYTES (one row, one image, several
    rows per band here): each output is the same sum over the same taps in the same order, so
    the numbers are the one pass's, bit for bit, in training mode as in no_grad()."""
    x = np.random.default_rng(8).standard_normal((2, 6, 20, 13)).astype(dtype)
    layer = Conv2d(6, 2, 3, seed=0, dtype=dtype)
    assert conv._resolve_method(layer.params["weight"], ((1, 1), (1, 1)), (1, 1), x.shape) == "shifted"
    whole = layer.forward(x)
    for workspace, bands in ((1, 40), (6 * 15 * dtype().itemsize * 4, 10), (10 ** 5, 1)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(conv, "WORKSPACE_BYTES", workspace)
            assert len(conv._shifted_pieces(x.shape, (3, 3), ((1, 1), (1, 1)), x.itemsize)) == bands
            np.testing.assert_array_equal(layer.forward(x), whole)
            with tinyunet.no_grad():
                np.testing.assert_array_equal(layer.forward(x), whole)
