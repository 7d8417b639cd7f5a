"""ONNX out: the only module that imports onnx (lazily).

    export_onnx(model, "unet.onnx")                      # or examples/export_model.py CHECKPOINT unet.onnx
    # elsewhere: onnxruntime.InferenceSession("unet.onnx").run(None, {"image": x})  -> [logits, probability]

The exporter walks the model's own wiring (tinyunet/formats/graph.py: ``model._graph`` run on
symbols) and writes, for each layer it meets, the ONNX operators that compute it. Nothing here
knows the U-Net: a new network exports as soon as it writes its forward as ``_graph(x, run)``
and each layer class it uses has an entry in ``LAYER_TO_ONNX`` below (a function that adds the
layer's nodes and returns its output's name).

    tinyunet layer       ONNX operators
    Conv2d               Conv (explicit pads: TensorFlow's 'same' puts an even kernel's extra zero
                         after, which ONNX's pads [top, left, bottom, right] say exactly)
    UpConv2d             Resize (nearest, scale 2) then Conv 2x2 with pads [0, 0, 1, 1]
    Upsample2d           Resize (nearest, asymmetric coordinates, floor: each pixel repeated)
    ReLU, Sigmoid        Relu, Sigmoid
    MaxPool2d            MaxPool
    Concat               Concat on axis 1 (channels), in the order the wiring gives: [skip, up]
    CenterCrop2d         Shape, Sub, Div, Add, Slice: the center, from the sizes at run time
    Dropout              nothing: the export is for inference

The graph has one input, ``image`` (batch, C, height, width), and two outputs, ``logits`` and
``probability`` (its Sigmoid), batch and size dynamic (any size the model accepts). Weights are
float32 initializers, whatever the model's dtype (onnxruntime has no float64 Conv on the CPU).
Opset 17. The model is checked with ``onnx.checker`` before it is written (atomically).
Proof: tests/test_formats.py runs the file in onnxruntime against tinyunet's forward at two
sizes and two batch sizes, for the 'same' and the 'valid' network.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyunet.backend import to_numpy
from tinyunet.formats.common import require, write_atomically
from tinyunet.formats.graph import walk
from tinyunet.layers import CenterCrop2d, Concat, Conv2d, Dropout, MaxPool2d, ReLU, Sigmoid, UpConv2d, Upsample2d
from tinyunet.layers.conv import resolve_padding

OPSET = 17


def _onnx():
    return require("onnx", "onnx", "exporting to ONNX")


class _Builder:
    """Collects nodes and initializers; ``fresh(stem)`` gives unique tensor names."""

    def __init__(self, onnx, dtype):
        self.onnx, self.helper, self.numpy_helper = onnx, onnx.helper, onnx.numpy_helper
        self.dtype = np.dtype(dtype)
        self.nodes, self.initializers, self.used = [], [], set()

    def fresh(self, stem: str) -> str:
        name, k = stem, 1
        while name in self.used:
            k += 1
            name = f"{stem}_{k}"
        self.used.add(name)
        return name

    def constant(self, stem: str, value) -> str:
        name = self.fresh(stem)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs, stem: str, **attributes) -> str:
        output = self.fresh(stem)
        self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output


# ---------------------------------------------------------------------------------------------
# One function per layer class: (builder, name, layer, input names) -> output name
# ---------------------------------------------------------------------------------------------
def _conv(b: _Builder, name, layer, inputs, pads=None):
    weight = b.constant(f"{name}.weight", to_numpy(layer.params["weight"]).astype(b.dtype))
    args = [inputs[0], weight]
    if "bias" in layer.params:
        args.append(b.constant(f"{name}.bias", to_numpy(layer.params["bias"]).astype(b.dtype)))
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    attributes = {"kernel_shape": [kh, kw], "strides": [sh, sw]}
    if pads is None and layer.padding == "same" and (sh, sw) != (1, 1):
        attributes["auto_pad"] = "SAME_UPPER"      # depends on the size: TensorFlow's rule, extra after
    else:
        if pads is None:                           # at stride 1 'same' does not depend on the size
            (top, bottom), (left, right) = resolve_padding(layer.padding, (kh, kw), (sh, sw), (kh, kw))
            pads = [top, left, bottom, right]
        attributes["pads"] = list(pads)
    return b.node("Conv", args, name, **attributes)


def _resize(b: _Builder, name, x, scale):
    scales = b.constant(f"{name}.scales", np.array([1, 1, scale, scale], dtype=np.float32))
    return b.node("Resize", [x, "", scales], f"{name}.upsampled", mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _upconv(b: _Builder, name, layer, inputs):
    # nearest 2x, then the 2x2 'same' conv: no zero before, one after (rows and columns)
    return _conv(b, name, layer, [_resize(b, name, inputs[0], 2)], pads=[0, 0, 1, 1])


def _crop(b: _Builder, name, layer, inputs):
    x, reference = inputs                       # cut x's center to reference's (height, width)
    x_hw = b.node("Shape", [x], f"{name}.x_hw", start=2, end=4)
    size = b.node("Shape", [reference], f"{name}.size", start=2, end=4)
    two = b.constant(f"{name}.two", np.array([2, 2], dtype=np.int64))
    start = b.node("Div", [b.node("Sub", [x_hw, size], f"{name}.excess"), two], f"{name}.start")
    end = b.node("Add", [start, size], f"{name}.end")
    axes = b.constant(f"{name}.axes", np.array([2, 3], dtype=np.int64))
    return b.node("Slice", [x, start, end, axes], name)


LAYER_TO_ONNX = {
    UpConv2d: _upconv,                          # before Conv2d: UpConv2d is a Conv2d subclass
    Conv2d: _conv,
    Upsample2d: lambda b, name, layer, inputs: _resize(b, name, inputs[0], layer.scale),
    ReLU: lambda b, name, layer, inputs: b.node("Relu", inputs, name),
    Sigmoid: lambda b, name, layer, inputs: b.node("Sigmoid", inputs, name),
    MaxPool2d: lambda b, name, layer, inputs: b.node(
        "MaxPool", inputs, name, kernel_shape=[layer.kernel_size] * 2, strides=[layer.stride] * 2),
    Concat: lambda b, name, layer, inputs: b.node("Concat", inputs, name, axis=1),
    CenterCrop2d: _crop,
    Dropout: lambda b, name, layer, inputs: inputs[0],
}


def to_onnx(model):
    """The ONNX ModelProto of ``model`` (checked with onnx.checker)."""
    onnx = _onnx()
    dtype = np.dtype(np.float32)
    b = _Builder(onnx, dtype)
    b.used.add("image")

    def visit(name, layer, inputs):
        for kind, emit in LAYER_TO_ONNX.items():
            if isinstance(layer, kind):
                return emit(b, name, layer, inputs)
        raise TypeError(f"export_onnx: layer {name!r} is a {type(layer).__name__}, which has no ONNX translation "
                        f"yet; add one to tinyunet.formats.onnx_export.LAYER_TO_ONNX")

    logits = walk(model, visit, input_value="image")
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits"))
    b.nodes.append(onnx.helper.make_node("Sigmoid", ["logits"], ["probability"], name="probability"))
    element = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    channels = getattr(model.config, "in_channels", None)
    graph = onnx.helper.make_graph(
        b.nodes, type(model).__name__.lower(),
        [onnx.helper.make_tensor_value_info("image", element, ["batch", channels, "height", "width"])],
        [onnx.helper.make_tensor_value_info("logits", element, ["batch", 1, "out_height", "out_width"]),
         onnx.helper.make_tensor_value_info("probability", element, ["batch", 1, "out_height", "out_width"])],
        initializer=b.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="tinyunet")
    proto.ir_version = min(proto.ir_version, 8)      # readable by older onnxruntime releases too
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path."""
    return write_atomically(path, to_onnx(model).SerializeToString(), "export_onnx")
