"""Keras HDF5 files of the U-Net, both ways: the only module that imports h5py (lazily).

    model = load_keras("unet_membrane.hdf5")         # zhixuhao/unet's ModelCheckpoint file
    load_keras("unet_membrane.hdf5", model)          # into an existing model
    save_keras("for_keras.h5", model)                # then in Keras: model.load_weights("for_keras.h5")

What Keras writes, and what is read here (the Keras 3 layouts as Keras 3.15's own writers
produce them; Keras 2's differ in a ':0' after each weight's name and in the graph's inbound
nodes, written as [name, node, tensor, kwargs] lists, which the tests reproduce)::

    model.save("x.hdf5" / "x.h5")       legacy HDF5 model (Keras 2's ModelCheckpoint and
                                         Keras 3's model.save to .h5/.hdf5):
        attrs  model_config              JSON: the layers and their graph
        model_weights/                   attrs layer_names: every layer, in model.layers order
          <layer>/                       attrs weight_names: ['<layer>/kernel:0', '<layer>/bias:0']
            <layer>/kernel:0  (kh, kw, in, out)     (Keras 3: 'kernel', 'bias')
            <layer>/bias:0    (out,)
    Keras 2 model.save_weights("x.h5")   the same as model_weights/ above, at the file's root
    Keras 3 model.save_weights("x.weights.h5"):
        layers/conv2d/vars/0, vars/1     the k-th Conv2D of model.layers is conv2d_k (named by
        layers/conv2d_1/vars/0, ...      class and position, never by the layer's own name)
    Keras 3 model.save("x.keras")        a zip: config.json (the graph) + model.weights.h5 (as above)

Mapping by topology. tinyunet's convolutions are matched to the file's Conv2D layers by their
position in the graph, never by name: a file whose layers were renamed, or built in another
order, maps the same. Where the file holds the model's graph (every file but a bare weights
file), that graph is checked against tinyunet's wiring conv by conv: which convs feed each one
through which pools, upsamplings and concatenations, its activation, padding and strides. A
concat written [up, skip] instead of the reference model's [skip, up] is recognised and the
kernel's input channels are swapped to match. Without a graph (a weights-only file), the order
of the layers in the file (Keras writes them in graph order) and the shapes decide, and the
head is taken to have its ReLU, as the Keras model's does. The first layer that does not fit
is named in the error, and nothing is changed before every shape has been checked.

Kernels: Keras (kh, kw, in, out) <-> tinyunet (out, in, kh, kw), both cross-correlations with
TensorFlow's 'same' padding (the extra zero of an even kernel after): weight = kernel.transpose(3, 2, 0, 1).

Writing: ``save_keras(path, model)`` writes the weights-only layout that Keras 2's save_weights
writes (layer_names at the root, 'kernel:0' and 'bias:0'), which ``model.load_weights(path)``
reads by layer order, whatever the Keras model's names (Keras 3 tested; Keras 2's loader reads
the same attributes, untested here: it needs TensorFlow). A path ending in '.weights.h5' gets
Keras 3's own layout instead, since Keras 3's load_weights picks the reader by that suffix.
Atomic (temporary file + rename). Proof against Keras itself: tests/test_keras_oracle.py.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyunet.backend import to_numpy
from tinyunet.formats.common import FormatError, atomic_target, require
from tinyunet.formats.graph import walk
from tinyunet.layers import Concat, Conv2d, Dropout, MaxPool2d, ReLU, UpConv2d
from tinyunet.unet import UNet, UNetConfig

class KerasFileError(FormatError):
    """The file is not a Keras HDF5 file of this U-Net, or it does not fit the model."""


def _h5py():
    return require("h5py", "keras", "reading and writing Keras HDF5 files")


# ---------------------------------------------------------------------------------------------
# Reading: the file's convolutions, in graph order
# ---------------------------------------------------------------------------------------------
@dataclass
class KerasConv:
    """One Conv2D of the file: its name there, kernel (kh, kw, in, out), bias (out,) or None,
    and, where the file holds the graph, its config and the expression of its input."""
    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    config: dict | None = None
    source: tuple | None = None            # ('conv', i) / ('pool', e) / ('up', e) / ('concat', e, e) / ('input',)


@dataclass
class KerasWeights:
    """What a Keras file holds, read into memory: its convs in graph order."""
    path: str
    layout: str                             # 'model' (legacy .h5/.hdf5 model), 'weights' (legacy
                                            # weights-only), 'keras3-weights', 'keras3-zip'
    convs: list
    has_graph: bool


def _text_list(group, name) -> list[str]:
    """An attribute list of names (Keras splits long ones into name0, name1, ...)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _array(dataset, where: str) -> np.ndarray:
    h5py = _h5py()
    if not isinstance(dataset, h5py.Dataset):
        raise KerasFileError(f"{where} is not a dataset (the file is not laid out as Keras writes weights)")
    if dataset.dtype.kind != "f":
        raise KerasFileError(f"{where} is {dataset.dtype}, not floating point: these are not Keras weights "
                             f"of a float model")
    try:
        return np.asarray(dataset[()])
    except OSError as error:
        raise KerasFileError(f"{where} cannot be read ({error}): the file is truncated or corrupt") from None


def _conv_from_arrays(name: str, arrays: list[np.ndarray], where: str) -> KerasConv:
    kernels = [a for a in arrays if a.ndim == 4]
    biases = [a for a in arrays if a.ndim == 1]
    if len(kernels) != 1 or len(biases) > 1 or len(kernels) + len(biases) != len(arrays):
        shapes = [tuple(a.shape) for a in arrays]
        raise KerasFileError(f"layer {name!r} ({where}) holds weights of shapes {shapes}; a Conv2D holds a "
                             f"(kh, kw, in, out) kernel and an (out,) bias: this file is another architecture")
    return KerasConv(name, kernels[0], biases[0] if biases else None)


def _legacy_layers(group, path: str) -> list[KerasConv]:
    """Layers with weights of a legacy group (model_weights/ or a weights file's root), in the
    order of its layer_names attribute (model.layers order, which Keras keeps topological)."""
    convs = []
    for name in _text_list(group, "layer_names"):
        if name not in group:
            raise KerasFileError(f"{path!r}: layer {name!r} is listed in layer_names but has no group: the file "
                                 f"is truncated or was not written by Keras")
        layer = group[name]
        weight_names = _text_list(layer, "weight_names")
        if not weight_names:
            continue
        arrays = []
        for weight in weight_names:
            if weight not in layer:
                raise KerasFileError(f"{path!r}: weight {weight!r} of layer {name!r} is missing: the file is "
                                     f"truncated or corrupt")
            arrays.append(_array(layer[weight], f"{path!r}: {name}/{weight}"))
        convs.append(_conv_from_arrays(name, arrays, f"{path!r}"))
    return convs


def _keras3_layers(group, path: str) -> list[KerasConv]:
    """Keras 3's .weights.h5: layers/<class>_<k>/vars/<i>, ordered by k (model.layers order)."""
    layers = group["layers"]
    convs = []
    for key in layers:
        entry = layers[key]
        if "vars" not in entry or not len(entry["vars"]):
            continue
        match = re.fullmatch(r"conv2d(?:_(\d+))?", key)
        if match is None:
            raise KerasFileError(f"{path!r}: layer {key!r} holds weights but is not a Conv2D; tinyunet's U-Net "
                                 f"has only Conv2D layers with weights: this file is another architecture")
        variables = entry["vars"]
        arrays = [_array(variables[str(i)], f"{path!r}: layers/{key}/vars/{i}") for i in range(len(variables))]
        conv = _conv_from_arrays(key, arrays, path)
        convs.append((int(match.group(1) or 0), conv))
    return [conv for _, conv in sorted(convs, key=lambda item: item[0])]


def read_keras_weights(path) -> KerasWeights:
    """Every Conv2D of a Keras file, in graph order, with the graph where the file has one.

    Raises FileNotFoundError, or KerasFileError for a file that is not a readable Keras file.
    """
    h5py = _h5py()
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Keras file at {path!r}")
    model_config, source, layout = None, path, None
    if zipfile.is_zipfile(path):                            # a Keras 3 .keras archive
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "model.weights.h5" not in names:
                    raise KerasFileError(f"{path!r} is a zip but not a .keras model (no model.weights.h5 in it)")
                source = io.BytesIO(archive.read("model.weights.h5"))
                if "config.json" in names:
                    model_config = json.loads(archive.read("config.json"))
        except (zipfile.BadZipFile, OSError, EOFError, json.JSONDecodeError) as error:
            raise KerasFileError(f"{path!r} is a truncated or corrupt .keras archive ({error})") from None
        layout = "keras3-zip"
    try:
        handle = h5py.File(source, "r")
    except OSError as error:
        raise KerasFileError(f"{path!r} cannot be opened as HDF5 ({error}): it is truncated, corrupt, or not a "
                             f"Keras file") from None
    try:
        with handle as f:
            if "model_config" in f.attrs:
                text = f.attrs["model_config"]
                model_config = json.loads(text.decode("utf8") if isinstance(text, bytes) else text)
            if model_config is not None:
                _known_layers(model_config, path)     # another architecture: say so before reading weights
            if "model_weights" in f and "layer_names" not in f.attrs:
                layout = layout or "model"
                convs = _legacy_layers(f["model_weights"], path)
            elif "layer_names" in f.attrs or "layer_names0" in f.attrs:
                layout = layout or "weights"
                convs = _legacy_layers(f, path)
            elif "layers" in f:
                layout = layout or "keras3-weights"
                convs = _keras3_layers(f, path)
            else:
                raise KerasFileError(f"{path!r} is an HDF5 file but not one Keras wrote (no model_weights group, "
                                     f"no layer_names attribute, no layers group; top level: {list(f)[:6]})")
    except KerasFileError:
        raise
    except (OSError, KeyError, ValueError) as error:      # h5py reports damage as these
        raise KerasFileError(f"{path!r} is truncated or corrupt ({type(error).__name__}: {error})") from None
    if not convs:
        raise KerasFileError(f"{path!r} holds no Conv2D weights: it is not a U-Net's file")
    weights = KerasWeights(path, layout, convs, has_graph=model_config is not None)
    if model_config is not None:
        _attach_graph(weights, model_config)
    return weights


# ---------------------------------------------------------------------------------------------
# The file's graph, as expressions of each conv's input
# ---------------------------------------------------------------------------------------------
# The layers of zhixuhao/unet's model.py (its convs carry their ReLU as activation='relu').
_KNOWN = ("InputLayer", "Conv2D", "MaxPooling2D", "UpSampling2D", "Concatenate", "Dropout")


def _inbound_names(layer: dict) -> list[str]:
    """Names of the layers feeding ``layer``, in argument order: Keras 3 writes
    {'keras_history': [name, node, tensor]} dicts, Keras 2 [name, node, tensor, kwargs] lists."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise KerasFileError(f"layer {layer.get('name')!r} is called {len(nodes)} times (shared): the U-Net calls "
                             f"every layer once")
    names = []

    def collect(value):
        if isinstance(value, dict):
            inner = value.get("config")
            history = inner.get("keras_history") if isinstance(inner, dict) else None
            history = history if history is not None else value.get("keras_history")
            if history is not None:
                names.append(history[0])
                return
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                names.append(value[0])
                return
            for item in value:
                collect(item)

    if nodes:
        node = nodes[0]
        collect(node.get("args", node) if isinstance(node, dict) else node)
    return names


def _known_layers(model_config: dict, path: str) -> list[dict]:
    """The config's layer list, every layer of a kind the U-Net has (else: another architecture)."""
    config = model_config.get("config", model_config) if isinstance(model_config, dict) else None
    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list):
        kind = model_config.get("class_name") if isinstance(model_config, dict) else type(model_config).__name__
        raise KerasFileError(f"{path!r}: the model config has no layer list (class {kind!r}); tinyunet reads "
                             f"Functional models")
    for layer in layers:
        kind = layer.get("class_name")
        if kind not in _KNOWN:
            name = layer.get("name") or layer.get("config", {}).get("name")
            raise KerasFileError(f"{path!r}: layer {name!r} is a {kind}; tinyunet's U-Net has only "
                                 f"{', '.join(_KNOWN)}: this file is another architecture")
    return layers


def _attach_graph(weights: KerasWeights, model_config: dict) -> None:
    """Order the convs by the graph and give each its config and input expression."""
    by_name = {}
    for layer in _known_layers(model_config, weights.path):
        name = layer.get("name") or layer.get("config", {}).get("name")
        by_name[name] = (layer.get("class_name"), layer.get("config", {}), _inbound_names(layer))
    conv_names = [name for name, (kind, _, _) in by_name.items() if kind == "Conv2D"]
    if len(conv_names) != len(weights.convs):
        raise KerasFileError(f"{weights.path!r}: the graph has {len(conv_names)} Conv2D layers but the weights "
                             f"hold {len(weights.convs)}: the file is inconsistent")
    # Topological order, ties broken by the config's own order (Kahn's algorithm).
    order, placed = [], set()
    pending = list(by_name)
    while pending:
        ready = next((n for n in pending if all(i in placed for i in by_name[n][2])), None)
        if ready is None:
            missing = sorted({i for n in pending for i in by_name[n][2] if i not in by_name})
            raise KerasFileError(f"{weights.path!r}: the graph is not a DAG of its own layers "
                                 f"(unknown inputs {missing[:3]})")
        order.append(ready)
        placed.add(ready)
        pending.remove(ready)
    graph_convs = [n for n in order if by_name[n][0] == "Conv2D"]
    # The weights came in model.layers order (legacy: by name; Keras 3: conv2d_k = k-th Conv2D
    # in the config's list); re-key them by layer name, then put them in graph order.
    if weights.layout in ("keras3-zip", "keras3-weights"):
        file_names = dict(zip(conv_names, weights.convs))
    else:
        file_names = {conv.name: conv for conv in weights.convs}
        unknown = [n for n in graph_convs if n not in file_names]
        if unknown:
            raise KerasFileError(f"{weights.path!r}: Conv2D {unknown[0]!r} of the graph has no weights in the file")
    index = {name: i for i, name in enumerate(graph_convs)}

    def expression(name):
        """The input of a layer, traced back to the nearest convs."""
        kind, cfg, inputs = by_name[name]
        if kind == "InputLayer":
            return ("input",)
        if kind == "Conv2D":
            return ("conv", index[name])
        if kind == "Dropout":
            return expression(inputs[0])
        if kind == "MaxPooling2D":
            if tuple(cfg.get("pool_size", (2, 2))) != (2, 2) or tuple(cfg.get("strides") or (2, 2)) != (2, 2):
                raise KerasFileError(f"{weights.path!r}: MaxPooling2D {name!r} pools {cfg.get('pool_size')} with "
                                     f"strides {cfg.get('strides')}; the U-Net pools 2x2 with stride 2")
            return ("pool", expression(inputs[0]))
        if kind == "UpSampling2D":
            if tuple(cfg.get("size", (2, 2))) != (2, 2) or cfg.get("interpolation", "nearest") != "nearest":
                raise KerasFileError(f"{weights.path!r}: UpSampling2D {name!r} is {cfg.get('size')} "
                                     f"{cfg.get('interpolation')}; the U-Net upsamples 2x, nearest")
            return ("up", expression(inputs[0]))
        if kind == "Concatenate":
            if cfg.get("axis", -1) not in (-1, 3):
                raise KerasFileError(f"{weights.path!r}: Concatenate {name!r} joins axis {cfg.get('axis')}; the "
                                     f"U-Net joins channels (axis 3, channels_last)")
            return ("concat",) + tuple(expression(i) for i in inputs)
        raise AssertionError(kind)

    ordered = []
    for name in graph_convs:
        conv = file_names[name]
        kind, cfg, inputs = by_name[name]
        if len(inputs) != 1:
            raise KerasFileError(f"{weights.path!r}: Conv2D {name!r} has {len(inputs)} inputs")
        conv.name, conv.config, conv.source = name, cfg, expression(inputs[0])
        ordered.append(conv)
    weights.convs = ordered


# ---------------------------------------------------------------------------------------------
# Mapping onto tinyunet: the expected graph, walked from the model's own wiring
# ---------------------------------------------------------------------------------------------
def expected_convs(model: UNet) -> list[dict]:
    """tinyunet's convs in forward order: name, the input expression (convs as indices, as in
    the file), whether a ReLU follows (Keras fuses it into the conv as activation='relu')."""
    convs, index = [], {}

    def visit(name, layer, inputs):
        if isinstance(layer, (Conv2d, UpConv2d)):
            source = inputs[0]
            if isinstance(layer, UpConv2d):
                source = ("up", source)
            index[name] = len(convs)
            convs.append({"name": name, "source": source, "relu": False, "layer": layer})
            return ("conv", index[name])
        if isinstance(layer, ReLU):
            kind, position = inputs[0][0], inputs[0][-1]
            if kind != "conv":
                raise KerasFileError(f"tinyunet layer {name!r}: a ReLU that does not follow a conv has no Keras "
                                     f"counterpart here")
            convs[position]["relu"] = True
            return inputs[0]
        if isinstance(layer, Dropout):
            return inputs[0]
        if isinstance(layer, MaxPool2d):
            return ("pool", inputs[0])
        if isinstance(layer, Concat):
            return ("concat",) + tuple(inputs)
        raise KerasFileError(f"tinyunet layer {name!r} ({type(layer).__name__}) has no Keras counterpart here: "
                             f"only the 'same' U-Net (the Keras model) maps to a Keras file")

    walk(model, visit, input_value=("input",))
    return convs


def _describe(expression, names) -> str:
    kind = expression[0]
    if kind == "input":
        return "the input"
    if kind == "conv":
        return names[expression[1]] if expression[1] < len(names) else f"conv #{expression[1] + 1}"
    if kind == "concat":
        return "concat[" + ", ".join(_describe(e, names) for e in expression[1:]) + "]"
    return f"{kind}({_describe(expression[1], names)})"


def config_from_keras(weights: KerasWeights) -> UNetConfig:
    """The UNetConfig a file's shapes and activations describe (depth from the number of convs:
    2 per level down, 2 at the bottom, 3 per level up, 2 in the head = 5 * depth + 4; or
    5 * depth + 3 ending in a 1x1 conv to K >= 2 channels: the K-class U-Net, classes=K).
    A weights-only file has no activations: it gets the Keras head (head_relu=True); load one
    saved without the head's ReLU into UNet(head_relu=False, ...) yourself."""
    n = len(weights.convs)
    first, last = weights.convs[0].kernel, weights.convs[-1].kernel
    if n >= 8 and (n - 3) % 5 == 0 and tuple(last.shape[:2]) == (1, 1) and last.shape[3] >= 2:
        # K classes: the U-Net paper's head, one 1x1 conv to K (tinyunet.unet, classes >= 2)
        return UNetConfig(in_channels=int(first.shape[2]), base_width=int(first.shape[3]), depth=(n - 3) // 5,
                          classes=int(last.shape[3]))
    if n < 9 or (n - 4) % 5:
        raise KerasFileError(f"{weights.path!r} holds {n} Conv2D layers; a 'same' U-Net of depth d has 5 * d + 4 "
                             f"(24 at depth 4), or 5 * d + 3 with K >= 2 classes: this file is another architecture")
    head = weights.convs[-2]
    head_relu = True
    if head.config is not None:
        head_relu = head.config.get("activation", "linear") == "relu"
    return UNetConfig(in_channels=int(first.shape[2]), base_width=int(first.shape[3]), depth=(n - 4) // 5,
                      head_relu=head_relu)


def keras_to_parameters(weights: KerasWeights, model: UNet) -> dict:
    """{tinyunet parameter name: array} from the file's convs, checked against ``model``
    (graph, activations, shapes) before anything is returned. Raises KerasFileError naming
    the first Keras layer that does not fit."""
    if model.config.padding != "same":
        raise KerasFileError(f"the model has padding={model.config.padding!r}; Keras files hold the 'same' U-Net "
                             f"(zhixuhao/unet): build UNet(padding='same')")
    expected = expected_convs(model)
    names = [e["name"] for e in expected]
    path = weights.path
    if len(weights.convs) != len(expected):
        raise KerasFileError(f"{path!r} holds {len(weights.convs)} Conv2D layers, this U-Net has {len(expected)} "
                             f"(depth {model.config.depth}): another architecture or another depth")
    params = model.parameters()
    values = {}
    for position, (conv, want) in enumerate(zip(weights.convs, expected)):
        where = (f"{path!r}: Keras layer {conv.name!r} (conv #{position + 1} in graph order) -> "
                 f"tinyunet {want['name']!r}")
        kernel = conv.kernel
        if conv.source is not None:                  # the file has its graph: check the wiring
            source = conv.source
            if source != want["source"]:
                swapped = (source[0] == "concat" and len(source) == 3 and want["source"][0] == "concat"
                           and (source[0], source[2], source[1]) == want["source"])
                if not swapped:
                    keras_names = [c.name for c in weights.convs]
                    raise KerasFileError(f"{where}: it takes {_describe(conv.source, keras_names)}, where tinyunet's "
                                         f"layer takes {_describe(want['source'], names)} (here: "
                                         f"{_describe(want['source'], keras_names)}): the graphs differ")
                # concat[up, skip]: the kernel's input channels come in the other order
                first = kernel.shape[2] // 2
                kernel = np.concatenate([kernel[:, :, first:], kernel[:, :, :first]], axis=2)
            _check_conv_config(conv, want, where, last=position == len(expected) - 1)
        weight = params[f"{want['name']}.weight"]
        f, c, kh, kw = weight.shape
        if kernel.shape != (kh, kw, c, f):
            raise KerasFileError(f"{where}: kernel shape {tuple(kernel.shape)}, expected {(kh, kw, c, f)} "
                                 f"(kh, kw, in, out) for tinyunet's {(f, c, kh, kw)}")
        values[f"{want['name']}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)).astype(weight.dtype)
        if f"{want['name']}.bias" in params:
            if conv.bias is None:
                raise KerasFileError(f"{where}: the file has no bias (use_bias=False), tinyunet's conv has one")
            if conv.bias.shape != (f,):
                raise KerasFileError(f"{where}: bias shape {tuple(conv.bias.shape)}, expected {(f,)}")
            values[f"{want['name']}.bias"] = conv.bias.astype(weight.dtype)
        elif conv.bias is not None:
            raise KerasFileError(f"{where}: the file has a bias, tinyunet's conv has none")
    return values


def _check_conv_config(conv: KerasConv, want: dict, where: str, last: bool) -> None:
    """The conv's Keras config against tinyunet's layer: strides, dilation, padding, activation."""
    cfg = conv.config
    for key, good in (("strides", (1, 1)), ("dilation_rate", (1, 1))):
        value = cfg.get(key, good)
        value = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
        if value != good:
            raise KerasFileError(f"{where}: {key}={value}, the U-Net uses {good}")
    if cfg.get("padding", "valid") != "same" and conv.kernel.shape[:2] != (1, 1):   # 1x1: both the same
        raise KerasFileError(f"{where}: padding={cfg.get('padding', 'valid')!r}, the Keras U-Net pads 'same'")
    if cfg.get("data_format", "channels_last") not in (None, "channels_last"):
        raise KerasFileError(f"{where}: data_format={cfg.get('data_format')!r}; tinyunet reads channels_last models")
    if cfg.get("groups", 1) != 1:
        raise KerasFileError(f"{where}: groups={cfg.get('groups')}, the U-Net's convs are not grouped")
    activation = cfg.get("activation", "linear")
    if last:
        allowed = ("linear", "sigmoid", "softmax") if conv.kernel.shape[3] >= 2 else ("linear", "sigmoid")
    elif want["relu"]:
        allowed = ("relu",)
    else:
        allowed = ("linear",)
    if activation not in allowed:
        fix = (" (a file without the head's ReLU loads into UNet(head_relu=False))"
               if want["name"] == "head.conv" else "")
        expects = " or ".join(map(repr, allowed))
        raise KerasFileError(f"{where}: activation {activation!r}, tinyunet's layer expects {expects}{fix}")


def load_keras(path, model: UNet | None = None) -> UNet:
    """A U-Net with the weights of a Keras file (built from the file's shapes when ``model`` is
    None); every layer is checked before any weight is copied. Returns the model."""
    weights = read_keras_weights(path)
    if model is None:
        model = UNet(config_from_keras(weights))
    values = keras_to_parameters(weights, model)
    model.load_parameters(values)
    return model


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def save_keras(path, model: UNet) -> Path:
    """Write ``model``'s weights as a Keras weights file that ``model.load_weights(path)`` reads.

    '.weights.h5': Keras 3's layout (layers/conv2d_k/vars/0 and 1); any other name: the legacy
    layout Keras 2's save_weights writes (read by Keras 2 and 3 alike, by layer order).
    A '.weights.h5' file holds no optimizer state, and Keras 3.15 refuses to load it into a
    compiled model (its optimizer has variables from compile() on): load it before compile(),
    or write the legacy layout (any other name), which Keras loads into any model.
    """
    h5py = _h5py()
    path = Path(path)
    expected = expected_convs(model)            # also refuses a network without a Keras counterpart
    params = {k: to_numpy(v) for k, v in model.parameters().items()}
    with atomic_target(path, "save_keras") as temporary, h5py.File(temporary, "w") as f:
        if path.name.endswith(".weights.h5"):
            layers = f.create_group("layers")
            for k, conv in enumerate(expected):
                group = layers.create_group("conv2d" if k == 0 else f"conv2d_{k}").create_group("vars")
                group.attrs["name"] = "conv2d" if k == 0 else f"conv2d_{k}"
                group.create_dataset("0", data=params[f"{conv['name']}.weight"].transpose(2, 3, 1, 0))
                if f"{conv['name']}.bias" in params:
                    group.create_dataset("1", data=params[f"{conv['name']}.bias"])
        else:
            names = [conv["name"].replace(".", "_") for conv in expected]
            f.attrs["layer_names"] = np.array([n.encode("utf8") for n in names])
            f.attrs["backend"] = b"tinyunet"
            f.attrs["keras_version"] = b"2.15.0"      # the layout's version: Keras 2's save_weights
            for name, conv in zip(names, expected):
                group = f.create_group(name)
                weight_names = [f"{name}/kernel:0"]
                inner = group.create_group(name)
                inner.create_dataset("kernel:0", data=params[f"{conv['name']}.weight"].transpose(2, 3, 1, 0))
                if f"{conv['name']}.bias" in params:
                    inner.create_dataset("bias:0", data=params[f"{conv['name']}.bias"])
                    weight_names.append(f"{name}/bias:0")
                group.attrs["weight_names"] = np.array([w.encode("utf8") for w in weight_names])
    return path
