"""Keras itself as the oracle: zhixuhao/unet's model in real Keras, its file loaded here, the
same logits and probabilities; tinyunet's weights written, loaded by Keras, the same outputs.

The Keras model below is written in this file from the reference structure of zhixuhao/unet's
model.py (not copied): two 3x3 'same' convs with ReLU and he_normal per level, 2x2 max-pools,
Dropout(0.5) after the fourth level and the bottom, UpSampling2D(2) + a 2x2 'same' conv + ReLU
on the way up, concatenate([skip, up], axis=3), then a 2-channel 3x3 conv + ReLU and a 1x1
sigmoid conv. Keras 3 runs on the PyTorch backend (no TensorFlow needed). The input is
(None, None, 1) instead of the script's (256, 256, 1), so that one model runs both sizes; the
graph and the weights are the same.

The file is written as the script writes it: ModelCheckpoint(..., monitor='loss',
save_best_only=True) at the end of an epoch, which calls model.save. (Keras 3's ModelCheckpoint
takes '.h5' where the script names '.hdf5'; model.save writes both the same way, which
test_model_save_hdf5_and_weights_files checks.) Passing these proves the kernel layout, TF's
'same' padding of the even 2x2 kernel (the extra zero after) and the concat order against the
framework the model comes from. float32, relative error (Euclidean norms) below 1e-5.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("h5py")
pytest.importorskip("torch")
os.environ["KERAS_BACKEND"] = "torch"           # before keras is first imported
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"keras was imported earlier with the {keras.backend.backend()} backend", allow_module_level=True)

from tinyunet.formats import load_model  # noqa: E402
from tinyunet.formats.keras_hdf5 import KerasFileError, load_keras, read_keras_weights, save_keras  # noqa: E402
from tinyunet.gradcheck import relative_error  # noqa: E402
from tinyunet.unet import UNet  # noqa: E402

L = keras.layers
TOLERANCE = 1e-5

# Keras 3.15 saves its optimizer's variables with np.array(variable), which NumPy 2 warns about
# (Keras' own code, keras/src/backend/common/variables.py); nothing of tinyunet's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def keras_unet(base=64, names=None, creation_order=None, concat_up_first=False, head_relu=True, kernels=None,
               compile=True, first_skip_from_conv1=False):
    """zhixuhao/unet's model.py in Keras 3 (base width 64 = the exact model).

    names: {position: name} renames the k-th conv (graph order); creation_order: the order in
    which the Conv2D objects are created (a permutation of range(24)), to prove that neither
    names nor creation order matter; concat_up_first: concatenate([up, skip]) instead;
    kernels: {position: kernel size} replaces the k-th conv's kernel size (another
    architecture); first_skip_from_conv1: the first level's skip taken after its first conv
    (the same shapes, another graph); compile: as the script does (Adam 1e-4, binary
    cross-entropy, accuracy).
    """
    widths = [base * 2 ** i for i in range(5)]
    specs = []                                         # (filters, kernel, activation) in graph order
    for w in widths[:4]:
        specs += [(w, 3, "relu"), (w, 3, "relu")]
    specs += [(widths[4], 3, "relu")] * 2
    for w in reversed(widths[:4]):
        specs += [(w, 2, "relu"), (w, 3, "relu"), (w, 3, "relu")]
    specs += [(2, 3, "relu" if head_relu else None), (1, 1, "sigmoid")]
    order = creation_order or range(len(specs))
    convs = {}
    for k in order:
        filters, kernel, activation = specs[k]
        kernel = (kernels or {}).get(k, kernel)
        kwargs = {"name": names[k]} if names and k in names else {}
        if k == len(specs) - 1:                        # the 1x1 head: Keras' defaults (glorot_uniform)
            convs[k] = L.Conv2D(filters, kernel, activation=activation, **kwargs)
        else:
            convs[k] = L.Conv2D(filters, kernel, activation=activation, padding="same",
                                kernel_initializer="he_normal", **kwargs)
    inputs = keras.Input((None, None, 1))
    k, x, skips = 0, inputs, []
    for level in range(4):
        first = convs[k](x)
        x = convs[k + 1](first)
        k += 2
        if level == 3:
            x = L.Dropout(0.5)(x)
        skips.append(first if level == 0 and first_skip_from_conv1 else x)
        x = L.MaxPooling2D(pool_size=(2, 2))(x)
    x = L.Dropout(0.5)(convs[k + 1](convs[k](x)))
    k += 2
    for level in reversed(range(4)):
        up = convs[k](L.UpSampling2D(size=(2, 2))(x))
        x = L.concatenate([up, skips[level]] if concat_up_first else [skips[level], up], axis=3)
        x = convs[k + 2](convs[k + 1](x))
        k += 3
    x = convs[k](x)
    outputs = convs[k + 1](x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4), loss="binary_crossentropy",
                      metrics=["accuracy"])
    return model


def randomize_biases(model, seed=0):
    """Keras starts biases at zero; random ones prove that they map too."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.Conv2D):
            layer.bias.assign(0.1 * rng.standard_normal(layer.bias.shape).astype(np.float32))


def keras_outputs(model, x_nhwc):
    """(logits, probabilities) from Keras: a sub-model gives the head's features and the
    probabilities, and Keras' own conv op applies the last layer without its sigmoid."""
    last = model.layers[-1]
    features_and_probability = keras.Model(model.input, [last.input, model.output])
    features, probability = features_and_probability(x_nhwc, training=False)
    logits = keras.ops.conv(features, last.kernel, padding="valid") + last.bias
    return keras.ops.convert_to_numpy(logits), keras.ops.convert_to_numpy(probability)


def tinyunet_outputs(model, x_nhwc):
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    logits = model.eval().forward(x)
    return logits.transpose(0, 2, 3, 1), (1 / (1 + np.exp(-logits.astype(np.float64)))).transpose(0, 2, 3, 1)


def save_like_the_script(model, path):
    """zhixuhao/unet's main.py: ModelCheckpoint('unet_membrane.hdf5', monitor='loss',
    verbose=1, save_best_only=True), which saves at the end of an epoch whose loss improved."""
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), monitor="loss", verbose=0, save_best_only=True)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, logs={"loss": 0.5})
    assert path.is_file()


@pytest.fixture(scope="module")
def exact_keras():
    keras.utils.set_random_seed(0)
    model = keras_unet()
    randomize_biases(model)
    return model


@pytest.mark.slow
def test_exact_model_from_keras_file(exact_keras, tmp_path):
    """The Keras file of the exact model (31,031,685 parameters) in tinyunet: the same logits and
    probabilities at 256x256 and, batch 2, at 64x96 (small, to keep the suite fast)."""
    path = tmp_path / "unet_membrane.h5"
    save_like_the_script(exact_keras, path)
    model = load_model(path)                      # dispatches by content: a Keras HDF5 file
    assert model.num_parameters() == exact_keras.count_params() == 31_031_685
    assert model.config.head_relu
    rng = np.random.default_rng(1)
    for shape in [(1, 256, 256, 1), (2, 64, 96, 1)]:
        x = rng.random(shape, dtype=np.float32)
        keras_logits, keras_probability = keras_outputs(exact_keras, x)
        logits, probability = tinyunet_outputs(model, x)
        assert logits.shape == keras_logits.shape
        assert relative_error(logits, keras_logits) < TOLERANCE, shape
        assert relative_error(probability, keras_probability) < TOLERANCE, shape


@pytest.mark.slow
def test_exact_model_to_keras(exact_keras, tmp_path):
    """tinyunet's own weights (its he_normal draw, random biases) written here, loaded by
    Keras with load_weights, the same outputs."""
    model = UNet(seed=3).eval()
    rng = np.random.default_rng(4)
    for name, value in model.parameters().items():
        if name.endswith(".bias"):
            value[...] = 0.1 * rng.standard_normal(value.shape)
    path = save_keras(tmp_path / "from_tinyunet.h5", model)
    exact_keras.load_weights(str(path))
    x = rng.random((1, 96, 64, 1), dtype=np.float32)
    keras_logits, keras_probability = keras_outputs(exact_keras, x)
    logits, probability = tinyunet_outputs(model, x)
    assert relative_error(logits, keras_logits) < TOLERANCE
    assert relative_error(probability, keras_probability) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Small models (base width 4): every layout Keras writes, names, order, concat, head
# ---------------------------------------------------------------------------------------------
def assert_same(keras_model, model, shape=(2, 32, 48, 1), seed=5):
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    keras_logits, keras_probability = keras_outputs(keras_model, x)
    logits, probability = tinyunet_outputs(model, x)
    assert relative_error(logits, keras_logits) < TOLERANCE
    assert relative_error(probability, keras_probability) < TOLERANCE


@pytest.fixture(scope="module")
def small_keras():
    keras.utils.set_random_seed(1)
    model = keras_unet(base=4)
    randomize_biases(model, seed=1)
    return model


def test_model_save_hdf5_and_weights_files(small_keras, tmp_path):
    """model.save('.hdf5'), Keras 3's save_weights('.weights.h5') and model.save('.keras'):
    each read with its layout, each the same network."""
    paths = {"model": tmp_path / "unet.hdf5", "keras3-weights": tmp_path / "unet.weights.h5",
             "keras3-zip": tmp_path / "unet.keras"}
    small_keras.save(str(paths["model"]))
    small_keras.save_weights(str(paths["keras3-weights"]))
    small_keras.save(str(paths["keras3-zip"]))
    for layout, path in paths.items():
        weights = read_keras_weights(path)
        assert weights.layout == layout
        assert weights.has_graph == (layout != "keras3-weights")
        assert_same(small_keras, load_model(path))


def as_keras2_file(path):
    """Rewrite a Keras 3 legacy .h5 file as Keras 2 writes it: datasets 'kernel:0', 'bias:0',
    and the graph's inbound nodes as [[[name, node, tensor, kwargs], ...]] lists."""
    import json

    import h5py
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])

        def histories(value):
            if isinstance(value, dict):
                if "keras_history" in value.get("config", {}):
                    return [list(value["config"]["keras_history"]) + [{}]]
                return [h for item in value.values() for h in histories(item)]
            if isinstance(value, list):
                return [h for item in value for h in histories(item)]
            return []
        for layer in config["config"]["layers"]:
            layer["inbound_nodes"] = [histories(node["args"]) for node in layer["inbound_nodes"]]
        f.attrs["model_config"] = json.dumps(config)
        f.attrs["keras_version"] = "2.15.0"
        group = f["model_weights"]
        for name in group:
            names = [n.decode() if isinstance(n, bytes) else n for n in group[name].attrs["weight_names"]]
            for weight in names:
                group[name].move(weight, weight + ":0")
            group[name].attrs["weight_names"] = np.array([(w + ":0").encode() for w in names])


def test_keras2_model_file(small_keras, tmp_path):
    """The layout Keras 2's ModelCheckpoint wrote (zhixuhao's own unet_membrane.hdf5)."""
    path = tmp_path / "unet_membrane.hdf5"
    small_keras.save(str(path))
    as_keras2_file(path)
    weights = read_keras_weights(path)
    assert weights.layout == "model" and weights.has_graph
    assert weights.convs[0].source == ("input",) and weights.convs[-4].source[0] == "concat"
    assert_same(small_keras, load_model(path))


def test_renamed_and_reordered_layers_still_map(tmp_path):
    """Layers renamed (names sorting in another order than the graph) and created in reverse
    order: the graph decides, not the names."""
    keras.utils.set_random_seed(2)
    names = {k: f"layer_{23 - k:02d}_x" for k in range(24)}
    model = keras_unet(base=4, names=names, creation_order=list(reversed(range(24))))
    randomize_biases(model, seed=2)
    for name in ("renamed.h5", "renamed.weights.h5", "renamed.keras"):
        path = tmp_path / name
        (model.save_weights if name.endswith(".weights.h5") else model.save)(str(path))
        assert_same(model, load_keras(path))


def test_concat_up_first_is_recognised(tmp_path):
    """concatenate([up, skip]): the kernel's input halves are swapped, the outputs agree."""
    keras.utils.set_random_seed(3)
    model = keras_unet(base=4, concat_up_first=True)
    randomize_biases(model, seed=3)
    model.save(str(tmp_path / "up_first.h5"))
    assert_same(model, load_keras(tmp_path / "up_first.h5"))


def test_head_without_relu(tmp_path):
    """A file whose head conv has no ReLU loads as UNet(head_relu=False); into the exact head
    it is refused, naming the layer."""
    keras.utils.set_random_seed(4)
    model = keras_unet(base=4, head_relu=False)
    randomize_biases(model, seed=4)
    model.save(str(tmp_path / "no_head_relu.h5"))
    loaded = load_keras(tmp_path / "no_head_relu.h5")
    assert loaded.config.head_relu is False
    assert_same(model, loaded)
    with pytest.raises(KerasFileError, match="head.conv.*activation 'linear'.*head_relu=False"):
        load_keras(tmp_path / "no_head_relu.h5", UNet(base_width=4))


def test_tinyunet_files_load_in_keras(tmp_path):
    """Both layouts save_keras writes load with Keras' load_weights and give Keras tinyunet's
    outputs: the legacy .h5 into the script's unet() (compiled), Keras 3's .weights.h5 into an
    uncompiled one (it holds no optimizer state, which a compiled Keras 3 model insists on)."""
    model = UNet(base_width=4, seed=7).eval()
    rng = np.random.default_rng(7)
    for name, value in model.parameters().items():
        if name.endswith(".bias"):
            value[...] = 0.1 * rng.standard_normal(value.shape)
    for name, compiled in (("tiny.h5", True), ("tiny.weights.h5", False)):
        keras_model = keras_unet(base=4, compile=compiled)
        keras_model.load_weights(str(save_keras(tmp_path / name, model)))
        assert_same(keras_model, model)


def test_another_keras_architecture_is_refused(tmp_path):
    """A Keras model with a BatchNormalization, a dense network, a U-Net with a 5x5 conv, one
    whose first skip leaves after the first conv (same shapes, another graph), and files of
    another depth or width: each refused with the layer named, the model left as it was."""
    inputs = keras.Input((None, None, 1))
    x = L.BatchNormalization(name="bn_here")(L.Conv2D(4, 3, padding="same")(inputs))
    keras.Model(inputs, L.Conv2D(1, 1)(x)).save(str(tmp_path / "bn.h5"))
    with pytest.raises(KerasFileError, match="'bn_here' is a BatchNormalization.*another architecture"):
        load_keras(tmp_path / "bn.h5")

    dense_inputs = keras.Input((8,))
    keras.Model(dense_inputs, L.Dense(2)(dense_inputs)).save(str(tmp_path / "dense.h5"))
    with pytest.raises(KerasFileError, match="Dense.*another architecture"):
        load_keras(tmp_path / "dense.h5")

    keras_unet(base=4, kernels={6: 5}).save(str(tmp_path / "five.h5"))
    with pytest.raises(KerasFileError, match=r"\(conv #7 in graph order\) -> tinyunet 'down4.conv1': kernel shape "
                                             r"\(5, 5, 16, 32\), expected \(3, 3, 16, 32\)"):
        load_keras(tmp_path / "five.h5")

    keras_unet(base=4, first_skip_from_conv1=True).save(str(tmp_path / "wired.h5"))
    with pytest.raises(KerasFileError, match=r"-> tinyunet 'up1.conv1': it takes concat\[conv2d(_\d+)?, "
                                             r"conv2d_\d+\], where .* the graphs differ"):
        load_keras(tmp_path / "wired.h5")

    model = keras_unet(base=4)
    model.save(str(tmp_path / "ok.h5"))
    with pytest.raises(KerasFileError, match="24 Conv2D layers, this U-Net has 19"):
        load_keras(tmp_path / "ok.h5", UNet(base_width=4, depth=3))
    target = UNet(base_width=8)
    before = {k: v.copy() for k, v in target.parameters().items()}
    with pytest.raises(KerasFileError, match=r"'conv2d(_\d+)?' \(conv #1 in graph order\) -> tinyunet 'down1.conv1'"):
        load_keras(tmp_path / "ok.h5", target)
    assert all(np.array_equal(before[k], v) for k, v in target.parameters().items())
