"""Weights in and out without Keras: ONNX against onnxruntime, safetensors and Keras-layout HDF5
round trips, load_model's dispatch, bad files refused before anything changes, the missing
extras named, and the command lines. (Keras itself is the oracle in test_keras_oracle.py.)"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from tinyunet.checkpoint import save_checkpoint
from tinyunet.formats import FormatError, MissingExtraError, detect_format, load_model
from tinyunet.gradcheck import relative_error
from tinyunet.unet import UNet

from scripts import load_example

TOLERANCE = 1e-5


def random_model(seed=0, **config) -> UNet:
    """A small U-Net with random weights AND biases (zero biases would hide a bias mix-up)."""
    model = UNet(seed=seed, **{"base_width": 4, **config}).eval()
    rng = np.random.default_rng(seed + 100)
    for name, value in model.parameters().items():
        if name.endswith(".bias"):
            value[...] = 0.1 * rng.standard_normal(value.shape)
    return model


def same_parameters(a: UNet, b: UNet) -> bool:
    pa, pb = a.parameters(), b.parameters()
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def snapshot(model: UNet) -> dict:
    return {k: v.copy() for k, v in model.parameters().items()}


def unchanged(model: UNet, before: dict) -> bool:
    return all(np.array_equal(before[k], v) for k, v in model.parameters().items())


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, shapes", [
    ({}, [(1, 1, 32, 32), (3, 1, 48, 64)]),
    ({"head_relu": False, "in_channels": 3}, [(2, 3, 16, 32), (1, 3, 64, 48)]),
    ({"padding": "valid"}, [(1, 1, 188, 188), (2, 1, 204, 188)]),      # the paper's net: crops
])
def test_onnx_matches_tinyunet(tmp_path, config, shapes):
    """onnx.checker passes, and onnxruntime gives tinyunet's logits and probabilities at two
    sizes and two batch sizes from one file (batch and size are dynamic)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from tinyunet.formats.onnx_export import export_onnx
    model = random_model(**config)
    path = export_onnx(model, tmp_path / "unet.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probability"]
    rng = np.random.default_rng(1)
    for shape in shapes:
        x = rng.random(shape, dtype=np.float32)
        logits, probability = session.run(None, {"image": x})
        expected = model.forward(x)
        assert logits.shape == expected.shape
        assert relative_error(logits, expected) < TOLERANCE, shape
        assert relative_error(probability, model.predict_proba(x)) < TOLERANCE, shape


def random_fcn_or_segnet(network: str, seed=0):
    """FCN-32s/16s/8s or SegNet at width 2, with random biases and batch-norm statistics."""
    from tinyunet.fcn import FCN
    from tinyunet.segnet import SegNet
    if network == "segnet":
        model = SegNet(classes=3, base_width=2, seed=seed)
    else:                                               # score layers drawn: zeros would hide them
        model = FCN(variant=network[3:], classes=3, base_width=2, fc_width=8, score_init="he_normal", seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, value in {**model.parameters(), **model.buffers()}.items():
        if name.endswith(".running_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
        elif name.endswith((".bias", ".running_mean")) or (name.endswith(".weight") and value.ndim == 1):
            value[...] = 0.1 * rng.standard_normal(value.shape) + (1.0 if value.ndim == 1
                                                                    and name.endswith(".weight") else 0.0)
    return model.eval()


@pytest.mark.parametrize("network", ["fcn32s", "fcn16s", "fcn8s", "segnet"])
def test_onnx_matches_fcn_and_segnet(tmp_path, network):
    """The same proof for FCN (ConvTranspose, Crop2d's Slice, Add, ceil MaxPool) and SegNet
    (BatchNormalization, MaxPool's Indices into MaxUnpool): two sizes (odd ones, where the ceil
    pools overhang), two batch sizes, one file; Softmax over the K = 3 classes."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from tinyunet.formats.onnx_export import export_onnx
    model = random_fcn_or_segnet(network)
    path = export_onnx(model, tmp_path / f"{network}.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= (
        {"BatchNormalization", "MaxUnpool", "Softmax"} if network == "segnet" else {"ConvTranspose", "Add", "Softmax"}
        if network != "fcn32s" else {"ConvTranspose", "Slice", "Softmax"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 20, 24), (2, 3, 33, 17)]:
        x = rng.random(shape, dtype=np.float32)
        logits, probability = session.run(None, {"image": x})
        expected = model.forward(x)
        assert logits.shape == expected.shape == (shape[0], 3) + shape[2:]
        assert relative_error(logits, expected) < TOLERANCE, shape
        assert relative_error(probability, model.predict_proba(x)) < TOLERANCE, shape


def test_onnx_conv_transpose_cropping_and_output_padding(tmp_path):
    """A transposed conv with asymmetric cropping, output padding and a bias (FCN's have none):
    ONNX's pads and output_padding say the same as tinyunet's."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from types import SimpleNamespace

    from tinyunet.formats.onnx_export import export_onnx
    from tinyunet.layers import ConvTranspose2d
    layer = ConvTranspose2d(2, 3, (4, 3), stride=(2, 3), cropping=((1, 2), (0, 1)), output_padding=(1, 2),
                            weight_init="he_normal", seed=0)
    layer.params["bias"][...] = [0.5, -0.25, 1.0]
    model = SimpleNamespace(config=SimpleNamespace(in_channels=2, classes=3), layers={"up": layer},
                            _graph=lambda x, run: run("up", x))
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "up.onnx")), providers=["CPUExecutionProvider"])
    for shape in [(1, 2, 5, 4), (2, 2, 3, 6)]:
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        logits = session.run(["logits"], {"image": x})[0]
        assert relative_error(logits, layer.forward(x)) < TOLERANCE, shape


@pytest.mark.slow
def test_onnx_exact_model(tmp_path):
    """The exact model (31,031,685 parameters) once, at 32x32."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from tinyunet.formats.onnx_export import export_onnx
    model = random_model(base_width=64)
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "exact.onnx")),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((1, 1, 32, 32), dtype=np.float32)
    assert relative_error(session.run(["logits"], {"image": x})[0], model.forward(x)) < TOLERANCE


def test_onnx_refuses_a_layer_it_cannot_translate(tmp_path):
    pytest.importorskip("onnx")
    from tinyunet.formats.onnx_export import export_onnx
    from tinyunet.layers import Layer
    model = random_model(depth=1)

    class Mystery(Layer):
        pass
    model.layers["down1.relu1"] = Mystery()
    with pytest.raises(TypeError, match="'down1.relu1' is a Mystery.*LAYER_TO_ONNX"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------
def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from tinyunet.formats.safetensors_io import load_safetensors, save_safetensors
    model = random_model(seed=3, head_relu=False, depth=3)
    path = save_safetensors(tmp_path / "unet.safetensors", model)
    loaded = load_model(path)                            # built from the saved config
    assert loaded.config == model.config and same_parameters(loaded, model)
    target = random_model(seed=4, head_relu=False, depth=3)
    assert load_safetensors(path, target) is target and same_parameters(target, model)
    # float64 tensors cast into a float32 model
    save_safetensors(tmp_path / "f64.safetensors", random_model(seed=3, dtype="float64"))
    assert load_model(tmp_path / "f64.safetensors", random_model(seed=9)).dtype == np.float32


@pytest.mark.parametrize("network", ["fcn8s", "segnet"])
def test_safetensors_round_trip_of_fcn_and_segnet(tmp_path, network, capsys):
    """A checkpoint of FCN or SegNet through export_model.py to safetensors and back with
    load_model: the same kind and config, parameters and batch-norm statistics (which SegNet's
    evaluation forward uses), so the same logits; a U-Net built by hand cannot take it."""
    pytest.importorskip("safetensors")
    from tinyunet.formats.safetensors_io import SafetensorsFileError, load_safetensors
    model = random_fcn_or_segnet(network, seed=3).eval()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.npz", model)
    assert load_example("export_model").main([str(checkpoint), str(tmp_path / "model.safetensors")]) == 0
    assert f"(safetensors, {model.num_parameters():,} parameters)" in capsys.readouterr().out
    loaded = load_model(tmp_path / "model.safetensors").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    for name, value in {**model.parameters(), **model.buffers()}.items():
        np.testing.assert_array_equal({**loaded.parameters(), **loaded.buffers()}[name], value, err_msg=name)
    assert (network == "segnet") == bool(model.buffers())
    x = np.random.default_rng(0).random((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    with pytest.raises(SafetensorsFileError, match="mismatches"):
        load_safetensors(tmp_path / "model.safetensors", random_model())


def test_safetensors_bad_files(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    import safetensors.numpy
    from tinyunet.formats.safetensors_io import SafetensorsFileError, load_safetensors, save_safetensors
    path = save_safetensors(tmp_path / "unet.safetensors", random_model(seed=3))
    data = path.read_bytes()
    target = random_model(seed=5)
    before = snapshot(target)

    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsFileError, match="truncated, corrupt"):
        load_safetensors(tmp_path / "truncated.safetensors", target)
    # another architecture: a wider network; every mismatch listed, nothing changed
    save_safetensors(tmp_path / "wide.safetensors", random_model(base_width=8))
    with pytest.raises(SafetensorsFileError, match=r"(?s)mismatches.*\n  down1.conv1.weight: expected \(4, 1, 3, 3\), "
                                                   r"found \(8, 1, 3, 3\)"):
        load_safetensors(tmp_path / "wide.safetensors", target)
    # the wrong dtype
    tensors = {k: np.ascontiguousarray(v).astype(np.int32) for k, v in target.parameters().items()}
    (tmp_path / "int.safetensors").write_bytes(safetensors.numpy.save(tensors))
    with pytest.raises(SafetensorsFileError, match="int32, not floating point"):
        load_safetensors(tmp_path / "int.safetensors", target)
    # a file from elsewhere (no config): needs the model
    tensors = {k: np.ascontiguousarray(v) for k, v in target.parameters().items()}
    (tmp_path / "foreign.safetensors").write_bytes(safetensors.numpy.save(tensors))
    with pytest.raises(SafetensorsFileError, match="no 'tinyunet.config' metadata.*pass it"):
        load_safetensors(tmp_path / "foreign.safetensors")
    # a kind that is not tinyunet's, or one that does not match its config: named, and the way round it
    config = target.config.to_json()
    for kind, problem in (("resnet", r"unknown model 'resnet'"), ("segnet", r"SegNetConfig: unknown fields")):
        (tmp_path / "kind.safetensors").write_bytes(safetensors.numpy.save(
            tensors, metadata={"tinyunet.kind": kind, "tinyunet.config": config}))
        with pytest.raises(SafetensorsFileError, match=rf"the saved config cannot be read \({problem}.*\); build the "
                                                       r"model yourself and pass it"):
            load_safetensors(tmp_path / "kind.safetensors")
    assert unchanged(target, before)
    assert load_safetensors(tmp_path / "foreign.safetensors", random_model(seed=6)) is not None


# ---------------------------------------------------------------------------------------------
# Keras HDF5 layout, written and read here (Keras itself: test_keras_oracle.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet.h5", "unet.weights.h5"])
def test_keras_layout_round_trip(tmp_path, name):
    pytest.importorskip("h5py")
    from tinyunet.formats.keras_hdf5 import read_keras_weights, save_keras
    model = random_model(seed=7, depth=2)
    path = save_keras(tmp_path / name, model)
    weights = read_keras_weights(path)
    assert weights.layout == ("keras3-weights" if name.endswith(".weights.h5") else "weights")
    assert weights.convs[0].kernel.shape == (3, 3, 1, 4)                     # (kh, kw, in, out)
    assert np.array_equal(weights.convs[0].kernel[:, :, 0, 2], model.parameters()["down1.conv1.weight"][2, 0])
    loaded = load_model(path)
    assert loaded.config.depth == 2 and same_parameters(loaded, model)


@pytest.mark.parametrize("name", ["unet3.h5", "unet3.weights.h5"])
def test_k_class_unet_keras_layout_and_safetensors_round_trip(tmp_path, name):
    """K = 3: the paper's head (5 * depth + 3 convs, the last a 1x1 to 3) is read back as classes=3."""
    pytest.importorskip("h5py")
    pytest.importorskip("safetensors")
    from tinyunet.formats.keras_hdf5 import save_keras
    from tinyunet.formats.safetensors_io import save_safetensors
    model = random_model(seed=8, depth=2, classes=3)
    for path in (save_keras(tmp_path / name, model), save_safetensors(tmp_path / "unet3.safetensors", model)):
        loaded = load_model(path)
        assert loaded.config.classes == 3 and loaded.config.depth == 2 and same_parameters(loaded, model)


def test_keras_weights_file_with_renamed_layers_maps_by_order(tmp_path):
    """A weights-only file (no graph) whose layers carry names sorting in another order: the
    file's layer order decides, not the names."""
    h5py = pytest.importorskip("h5py")
    from tinyunet.formats.keras_hdf5 import save_keras
    model = random_model(seed=8, depth=2)
    path = save_keras(tmp_path / "unet.h5", model)
    with h5py.File(path, "r+") as f:
        old = [n.decode() for n in f.attrs["layer_names"]]
        new = [f"z{len(old) - i:02d}" for i in range(len(old))]          # z14, z13, ...: reversed sort
        for a, b in zip(old, new):
            f.move(a, b)
            f[b].move(a, b)
            f[b].attrs["weight_names"] = np.array([w.replace(a, b).encode() for w in
                                                   (x.decode() for x in f[b].attrs["weight_names"])])
        f.attrs["layer_names"] = np.array([n.encode() for n in new])
    assert same_parameters(load_model(path), model)


def test_keras_bad_files(tmp_path):
    """Truncated, another model's HDF5, the wrong dtype, another architecture: each a clear
    KerasFileError, raised before the model changes."""
    h5py = pytest.importorskip("h5py")
    from tinyunet.formats.keras_hdf5 import KerasFileError, load_keras, save_keras
    good = save_keras(tmp_path / "good.h5", random_model(seed=9, depth=2))
    target = random_model(seed=10, depth=2)
    before = snapshot(target)

    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(KerasFileError, match="truncated"):
        load_keras(tmp_path / "truncated.h5", target)

    with h5py.File(tmp_path / "other.h5", "w") as f:                      # an HDF5 file of something else
        f.create_dataset("images", data=np.zeros((4, 4)))
    with pytest.raises(KerasFileError, match="not one Keras wrote"):
        load_keras(tmp_path / "other.h5", target)

    with h5py.File(tmp_path / "dense.h5", "w") as f:                      # a Keras file of a dense network
        f.attrs["layer_names"] = np.array([b"dense"])
        f.create_group("dense").attrs["weight_names"] = np.array([b"dense/kernel:0", b"dense/bias:0"])
        f["dense"].create_dataset("dense/kernel:0", data=np.zeros((8, 2), np.float32))
        f["dense"].create_dataset("dense/bias:0", data=np.zeros(2, np.float32))
    with pytest.raises(KerasFileError, match=r"'dense'.*\(8, 2\).*another architecture"):
        load_keras(tmp_path / "dense.h5", target)

    wrong = tmp_path / "int.h5"
    wrong.write_bytes(data)
    with h5py.File(wrong, "r+") as f:
        name = f.attrs["layer_names"][3].decode()
        kernel = f[name][name]["kernel:0"]
        shape = kernel.shape
        del f[name][name]["kernel:0"]
        f[name][name].create_dataset("kernel:0", data=np.zeros(shape, np.int32))
    with pytest.raises(KerasFileError, match=r"kernel:0 is int32, not floating point"):
        load_keras(wrong, target)

    deeper = save_keras(tmp_path / "deeper.h5", random_model(depth=3))
    with pytest.raises(KerasFileError, match="19 Conv2D layers, this U-Net has 14"):
        load_keras(deeper, target)
    wider = save_keras(tmp_path / "wider.h5", random_model(depth=2, base_width=8))
    with pytest.raises(KerasFileError, match=r"'down1_conv1' \(conv #1 in graph order\) -> tinyunet 'down1.conv1': "
                                             r"kernel shape \(3, 3, 1, 8\), expected \(3, 3, 1, 4\)"):
        load_keras(wider, target)
    with pytest.raises(KerasFileError, match="padding='valid'.*build UNet\\(padding='same'\\)"):
        load_keras(good, UNet(base_width=4, depth=2, padding="valid"))
    assert unchanged(target, before)


# ---------------------------------------------------------------------------------------------
# load_model's dispatch, and the missing extras
# ---------------------------------------------------------------------------------------------
def test_load_model_reads_every_format_by_content(tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("safetensors")
    from tinyunet.formats.keras_hdf5 import save_keras
    from tinyunet.formats.safetensors_io import save_safetensors
    model = random_model(seed=11, depth=2)
    paths = {"checkpoint": save_checkpoint(tmp_path / "a.npz", model),
             "keras": save_keras(tmp_path / "b.h5", model),
             "safetensors": save_safetensors(tmp_path / "c.safetensors", model)}
    for kind, path in paths.items():
        renamed = path.rename(tmp_path / f"{kind}.bin")                # the name does not decide
        assert detect_format(renamed) == kind
        assert same_parameters(load_model(renamed), model)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FormatError, match="is not a tinyunet checkpoint .* nor a model file tinyunet reads"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no checkpoint or model file"):
        load_model(tmp_path / "missing.h5")


@pytest.mark.parametrize("module, extra, call", [
    ("h5py", "keras", lambda p, m: __import__("tinyunet.formats.keras_hdf5", fromlist=["x"]).save_keras(p, m)),
    ("onnx", "onnx", lambda p, m: __import__("tinyunet.formats.onnx_export", fromlist=["x"]).export_onnx(m, p)),
    ("safetensors", "safetensors",
     lambda p, m: __import__("tinyunet.formats.safetensors_io", fromlist=["x"]).save_safetensors(p, m)),
])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)                       # import now fails
    with pytest.raises(MissingExtraError, match=rf"needs the '{module}' package: pip install -e \"\.\[{extra}\]\""):
        call(tmp_path / "out", random_model(depth=1))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The command lines
# ---------------------------------------------------------------------------------------------
def test_export_model_and_predict_from_a_keras_file(tmp_path, capsys):
    """checkpoint.npz -> .onnx, .h5, .safetensors with export_model.py; then predict_membranes.py
    straight from the Keras file gives the checkpoint's own prediction."""
    pytest.importorskip("h5py")
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    model = random_model(seed=12, depth=2, dropout=0.0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.npz", model)
    export = load_example("export_model")
    for name in ("model.onnx", "unet_membrane.hdf5", "model.safetensors"):
        assert export.main([str(checkpoint), str(tmp_path / name)]) == 0
        assert (tmp_path / name).is_file()
    assert "wrote" in capsys.readouterr().out
    assert export.main([str(checkpoint), str(tmp_path / "model.pt")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert export.main([str(tmp_path / "missing.npz"), str(tmp_path / "x.onnx")]) == 2

    image = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "slice.png")
    predict = load_example("predict_membranes")
    for source, out in ((checkpoint, "from_npz"), (tmp_path / "unet_membrane.hdf5", "from_keras")):
        assert predict.main([str(source), str(tmp_path / "slice.png"), "--out", str(tmp_path / out)]) == 0
    a = np.asarray(Image.open(tmp_path / "from_npz" / "slice_prob.png"))
    b = np.asarray(Image.open(tmp_path / "from_keras" / "slice_prob.png"))
    assert a.shape == (40, 56) and np.array_equal(a, b)
