"""ONNX out: the only module that imports onnx (lazily).

    export_onnx(model, "unet.onnx")                      # or examples/export_model.py CHECKPOINT unet.onnx
    # elsewhere: onnxruntime.InferenceSession("unet.onnx").run(None, {"image": x})  -> [logits, probability]

Any tinyunet network exports from Python: the U-Net, FCN-32s/16s/8s (tinyunet/fcn.py) and
SegNet (tinyunet/segnet.py). ``examples/export_model.py`` reads tinyunet checkpoints, which
hold U-Nets only today, so FCN and SegNet export through ``export_onnx(model, path)`` alone.

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
    CeilMaxPool2d        MaxPool with ceil_mode=1 (Caffe's rounding up; every window starts inside
                         the input, so no window is all padding)
      return_indices     MaxPool's second output, Indices (see MaxUnpool2d); a ceil pool then
                         pools an explicitly padded tensor instead (Shape, Sub, Mod, Max, Concat,
                         Pad with -inf to (OH - 1) * s + k, as CeilMaxPool2d itself does), because
                         onnxruntime's MaxUnpool refuses an output_shape below (OH - 1) * s + k
    MaxUnpool2d          MaxUnpool to the Shape of the tensor the pool read (at run time), then,
                         after a padded ceil pool, Slice back to the unpadded size.
                         The indices never leave the graph: ONNX numbers them over the WHOLE
                         tensor ((n * C + c) * H + h) * W + w, tinyunet (and PyTorch) within each
                         (n, c) plane, h * W + w. Both ONNX ops use ONNX's numbering, so the pair
                         needs no conversion; batch 2 with 3 classes in the tests proves it
    ConvTranspose2d      ConvTranspose, weight (C, F, kh, kw) as is (ONNX's layout too); the
                         cropping is ONNX's pads [top, left, bottom, right], output_padding the same
    BatchNorm2d          BatchNormalization with the RUNNING statistics (evaluation mode)
    Concat               Concat on axis 1 (channels), in the order the wiring gives: [skip, up]
    CenterCrop2d         Shape, Sub, Div, Add, Slice: the center, from the sizes at run time
    Crop2d               Shape, Add, Slice: FCN's fixed offset (it does not depend on the input
                         size, tinyunet/fcn.py derives it), the size of the reference at run time
    Add                  Add (FCN's sum fusion)
    Dropout              nothing: the export is for inference

The export is always the EVALUATION forward, whatever mode the model is in: dropout off,
batch norm with its running statistics. Compare it with ``model.eval()``'s forward.

The graph has one input, ``image`` (batch, C, height, width), and two outputs, ``logits`` and
``probability``: the Sigmoid of a one-channel U-Net's logits, the Softmax over the K classes
(axis 1) of FCN's and SegNet's, as their ``predict_proba``. Batch and size are dynamic for all
three networks: any size the model accepts (the U-Net 'valid' crops, FCN's crops and SegNet's
unpool sizes are all computed from Shape at run time). Weights are
float32 initializers, whatever the model's dtype (onnxruntime has no float64 Conv on the CPU).
Opset 17. The model is checked with ``onnx.checker`` before it is written (atomically).
Proof: tests/test_formats.py runs the file in onnxruntime against tinyunet's forward at two
sizes and two batch sizes, for the 'same' and the 'valid' U-Net, FCN-32s/16s/8s and SegNet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyunet.backend import to_numpy
from tinyunet.formats.common import require, write_atomically
from tinyunet.formats.graph import Outputs, walk
from tinyunet.layers import (Add, BatchNorm2d, CeilMaxPool2d, CenterCrop2d, Concat, Conv2d, ConvTranspose2d,
                             Crop2d, Dropout, MaxPool2d, MaxUnpool2d, ReLU, Sigmoid, UpConv2d, Upsample2d)
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
        self.pooled = {}                 # a pool's indices -> the tensor it pooled (for MaxUnpool)

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
        return self.nodes_with_outputs(op, inputs, [stem], **attributes)[0]

    def nodes_with_outputs(self, op: str, inputs, stems, **attributes) -> list:
        outputs = [self.fresh(stem) for stem in stems]
        self.nodes.append(self.helper.make_node(op, list(inputs), outputs, name=outputs[0], **attributes))
        return outputs

    def array(self, stem: str, value) -> str:
        """A parameter or buffer of the model, as a float32 initializer."""
        return self.constant(stem, to_numpy(value).astype(self.dtype))


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


def _conv_transpose(b: _Builder, name, layer, inputs):
    args = [inputs[0], b.array(f"{name}.weight", layer.params["weight"])]       # (C, F, kh, kw) in both
    if "bias" in layer.params:
        args.append(b.array(f"{name}.bias", layer.params["bias"]))
    (top, bottom), (left, right) = layer.cropping
    return b.node("ConvTranspose", args, name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                  pads=[top, left, bottom, right], output_padding=list(layer.output_padding))


def _batchnorm(b: _Builder, name, layer, inputs):
    args = [inputs[0], b.array(f"{name}.weight", layer.params["weight"]), b.array(f"{name}.bias", layer.params["bias"]),
            b.array(f"{name}.running_mean", layer.buffers["running_mean"]),
            b.array(f"{name}.running_var", layer.buffers["running_var"])]
    return b.node("BatchNormalization", args, name, epsilon=layer.eps)


def _pad_for_ceil(b: _Builder, name, layer, x):
    """x padded at the bottom/right with -inf to (OH - 1) * s + k rows and columns, the sizes
    from Shape at run time: rows = max(k - H, (k - H) mod s) (the first when a single window
    overhangs, H < k), as CeilMaxPool2d itself pads."""
    k, s = layer.kernel_size, layer.stride
    hw = b.node("Shape", [x], f"{name}.hw", start=2, end=4)
    short = b.node("Sub", [b.constant(f"{name}.k", np.array([k, k], dtype=np.int64)), hw], f"{name}.short")
    rest = b.node("Mod", [short, b.constant(f"{name}.s", np.array([s, s], dtype=np.int64))], f"{name}.rest")
    extra = b.node("Max", [short, rest], f"{name}.extra")
    pads = b.node("Concat", [b.constant(f"{name}.before", np.zeros(6, dtype=np.int64)), extra], f"{name}.pads", axis=0)
    minus_inf = b.constant(f"{name}.minus_inf", np.array(-np.inf, dtype=b.dtype))
    return b.node("Pad", [x, pads, minus_inf], f"{name}.padded", mode="constant")


def _maxpool(b: _Builder, name, layer, inputs):
    attributes = dict(kernel_shape=[layer.kernel_size] * 2, strides=[layer.stride] * 2)
    if not layer.return_indices:
        if isinstance(layer, CeilMaxPool2d):
            attributes["ceil_mode"] = 1
        return b.node("MaxPool", inputs, name, **attributes)
    # With indices, a ceil pool pools an explicitly padded tensor instead: onnxruntime's
    # MaxUnpool cannot write an output smaller than (OH - 1) * s + k, so the unpool writes the
    # padded size and cuts it back (below). The Indices are ONNX's numbering over the whole
    # (padded) tensor, read only by that MaxUnpool.
    x = _pad_for_ceil(b, name, layer, inputs[0]) if isinstance(layer, CeilMaxPool2d) else inputs[0]
    y, indices = b.nodes_with_outputs("MaxPool", [x], [name, f"{name}.indices"], **attributes)
    b.pooled[indices] = x
    return Outputs((y, indices))


def _unpool(b: _Builder, name, layer, inputs):
    x, indices, pooled_input = inputs            # pooled_input: the tensor whose size comes back
    pooled = b.pooled.get(indices, pooled_input)                             # padded, for a ceil pool
    shape = b.node("Shape", [pooled], f"{name}.output_shape")                # (N, C, H', W') at run time
    y = b.node("MaxUnpool", [x, indices, shape], f"{name}.unpooled", kernel_shape=[layer.kernel_size] * 2,
               strides=[layer.stride] * 2)
    if pooled == pooled_input:
        return b.node("Identity", [y], name)
    size = b.node("Shape", [pooled_input], f"{name}.size", start=2, end=4)  # drop the padding's rows
    zeros = b.constant(f"{name}.zeros", np.zeros(2, dtype=np.int64))
    axes = b.constant(f"{name}.axes", np.array([2, 3], dtype=np.int64))
    return b.node("Slice", [y, zeros, size, axes], name)


def _offset_crop(b: _Builder, name, layer, inputs):
    x, reference = inputs                       # x[:, :, oy:oy + h, ox:ox + w], (h, w) the reference's
    size = b.node("Shape", [reference], f"{name}.size", start=2, end=4)
    start = b.constant(f"{name}.offset", np.array(layer.offset, dtype=np.int64))
    end = b.node("Add", [start, size], f"{name}.end")
    axes = b.constant(f"{name}.axes", np.array([2, 3], dtype=np.int64))
    return b.node("Slice", [x, start, end, axes], name)


LAYER_TO_ONNX = {
    UpConv2d: _upconv,                          # before Conv2d: UpConv2d is a Conv2d subclass
    Conv2d: _conv,
    Upsample2d: lambda b, name, layer, inputs: _resize(b, name, inputs[0], layer.scale),
    ReLU: lambda b, name, layer, inputs: b.node("Relu", inputs, name),
    Sigmoid: lambda b, name, layer, inputs: b.node("Sigmoid", inputs, name),
    MaxPool2d: _maxpool,                        # CeilMaxPool2d too (a subclass): ceil_mode
    MaxUnpool2d: _unpool,
    ConvTranspose2d: _conv_transpose,
    BatchNorm2d: _batchnorm,
    Concat: lambda b, name, layer, inputs: b.node("Concat", inputs, name, axis=1),
    Add: lambda b, name, layer, inputs: b.node("Add", inputs, name),
    CenterCrop2d: _crop,
    Crop2d: _offset_crop,
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
    classes = int(getattr(model.config, "classes", 1))     # the U-Net: one channel, the foreground's
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits"))
    if classes == 1:
        b.nodes.append(onnx.helper.make_node("Sigmoid", ["logits"], ["probability"], name="probability"))
    else:                                                  # over the class axis only (opset >= 13)
        b.nodes.append(onnx.helper.make_node("Softmax", ["logits"], ["probability"], name="probability", axis=1))
    element = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    channels = getattr(model.config, "in_channels", None)
    graph = onnx.helper.make_graph(
        b.nodes, type(model).__name__.lower(),
        [onnx.helper.make_tensor_value_info("image", element, ["batch", channels, "height", "width"])],
        [onnx.helper.make_tensor_value_info("logits", element, ["batch", classes, "out_height", "out_width"]),
         onnx.helper.make_tensor_value_info("probability", element, ["batch", classes, "out_height", "out_width"])],
        initializer=b.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="tinyunet")
    proto.ir_version = min(proto.ir_version, 8)      # readable by older onnxruntime releases too
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically); returns the path."""
    return write_atomically(path, to_onnx(model).SerializeToString(), "export_onnx")
