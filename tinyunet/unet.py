"""The U-Net, read top to bottom: its config, its layers, the forward and the backward.

This is the Keras reference model (zhixuhao/unet, model.py) exactly, for images of
``in_channels`` channels, at base width 64 and depth 4::

    down1..down4   two 3x3 'same' convs + ReLU at 64, 128, 256, 512 channels, each level
                   followed by a 2x2 max-pool; Dropout(0.5) after down4's second conv (the
                   dropped tensor is both the skip and the pool's input)
    bottom         two 3x3 convs + ReLU at 1024, then Dropout(0.5)
    up4..up1       nearest 2x upsampling, a 2x2 'same' conv + ReLU that halves the channels,
                   concat [skip, up] on channels, two 3x3 convs + ReLU
    head           a 3x3 conv to 2 channels + ReLU, then a 1x1 conv to 1 channel: the logits

K classes (``classes=K >= 2``): the head is the U-Net paper's instead, ONE 1x1 conv from the
last base-width feature map to K logits (no 2-channel conv and ReLU: those exist only for the
Keras sigmoid head), so the network is the binary one minus head.conv (3*3*64*2 + 2 = 1,154)
and with head.out (64*K + K) in place of (2*1 + 1): 31,031,685 - 1,154 - 3 + 65 K parameters,
31,030,723 at K = 3 (tests/test_models.py derives it). The output is (N, K, H, W) logits: the
loss is tinyunet.losses.softmax_cross_entropy, ``predict_proba`` the softmax over axis 1.
K = 1 is exactly the binary model above (sigmoid, same names, same count); ``head_relu``
applies to it only.

Level i has width base * 2**(i-1); ``up{i}`` works at the size of ``down{i}`` and joins its
skip, so the names pair up across the U. Every weight is he_normal and every bias zero,
except the last 1x1 conv (glorot_uniform), as Keras builds them: 31,031,685 parameters for
one input channel (tests/test_unet.py::test_exact_parameter_count).

The model returns logits: take the loss from them (tinyunet.losses.bce_with_logits, stable)
and probabilities with ``predict_proba`` (a sigmoid).

Prediction: ``with tinyunet.no_grad(): model.forward(x)`` keeps nothing for a backward, frees
each activation once its reader has run (the skips at their concat) and skips the masks and
argmaxes only a backward reads; ``eval()`` separately switches dropout off (both, and why they
are two switches: tinyunet/grad_mode.py). ``inference_bytes`` estimates the peak memory of
such a forward from the shapes; tinyunet.infer sizes its tiles with it.

``padding="valid"`` builds the U-Net paper's unpadded network instead: every 3x3 conv loses a
one-pixel border, the skips are center-cropped before the concat (CenterCrop2d), the head is
the paper's single 1x1 conv, and the 2x2 up-convs keep 'same' padding so that each exactly
doubles the size. A 572x572 input gives a 388x388 output
(tests/test_unet.py::test_valid_paper_geometry).

Shapes below are for 'same' padding, base width 64, depth 4, an (N, 1, H, W) input.
Proofs: tests/test_unet.py (whole-network gradient checks: float64 directional for the exact
network, central differences for a tiny one), tests/test_unet_torch.py (same logits and
gradients as a PyTorch U-Net with the same weights, to 1e-8).
"""
from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass

import numpy as np

from tinyunet.backend import device_of, get_array_module, is_array, to_device
from tinyunet.grad_mode import is_grad_enabled, keep_freed_memory, no_grad
from tinyunet.layers import CenterCrop2d, Concat, Conv2d, Dropout, MaxPool2d, ReLU, UpConv2d, sigmoid
from tinyunet.layers.base import LayerInputError
from tinyunet.losses import log_softmax

PADDINGS = ("same", "valid")


class UNetInputError(LayerInputError):
    """The U-Net was given an input it cannot take (shape, size, channels)."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines the network; saved as JSON in every checkpoint.

    in_channels  channels of the input image (1 for grayscale)
    base_width   channels of the first level; level i has base_width * 2**(i-1)
    depth        number of pooling steps (4: 16x16 input -> 1x1 at the bottom)
    dropout      drop probability after the deepest down level and the bottom (0: no dropout)
    padding      'same' (the Keras model) or 'valid' (the U-Net paper)
    head_relu    True: the Keras head, ReLU after the 2-channel conv. False drops that ReLU,
                 the fix for a dead head (all outputs 0, constant prediction) reported in
                 zhixuhao/unet's issues. Ignored for 'valid', whose head is a single 1x1 conv,
                 and for classes >= 2 (the same single 1x1 conv).
    classes      1: one logit per pixel, sigmoid (the Keras model, binary); K >= 2: K logits
                 per pixel, softmax, from one 1x1 conv (the U-Net paper's head)
    dtype        'float32' for training, 'float64' for gradient checks
    seed         seeds the weights and the dropout generators
    """
    in_channels: int = 1
    base_width: int = 64
    depth: int = 4
    dropout: float = 0.5
    padding: str = "same"
    head_relu: bool = True
    dtype: str = "float32"
    seed: int = 0
    classes: int = 1

    def __post_init__(self):
        def bad(what):
            raise ValueError(f"UNetConfig: {what}")
        for field in ("in_channels", "base_width", "depth", "seed", "classes"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                bad(f"{field} must be an int, got {value!r}")
        if self.in_channels < 1 or self.base_width < 1 or self.depth < 1:
            bad(f"in_channels, base_width and depth must be >= 1, got {self.in_channels}, "
                f"{self.base_width}, {self.depth}")
        if self.classes < 1:
            bad(f"classes must be >= 1 (1: sigmoid, binary; K >= 2: softmax over K classes), got {self.classes}")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad(f"dropout is a drop probability in [0, 1), got {self.dropout}")
        if self.padding not in PADDINGS:
            bad(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in (np.float32, np.float64):
            bad(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype.name)  # np.float32 -> 'float32', for JSON

    @property
    def widths(self) -> list[int]:
        """Channels per level, the bottom last: [64, 128, 256, 512, 1024]."""
        return [self.base_width * 2 ** i for i in range(self.depth + 1)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {unknown} (written by a newer tinyunet?)")
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Sizes: which inputs fit, and what comes out
# ---------------------------------------------------------------------------------------------
def output_size(size: int, depth: int, padding: str) -> int | None:
    """The output side for an input side ``size``, or None when ``size`` does not fit.

    'same': size must be divisible by 2**depth; the output has the input's size.
    'valid': each 3x3 conv loses 2 pixels, so a level's two convs lose 4; every pool needs an
    even size; on the way up each level doubles, then loses 4. 572 -> 388 at depth 4.
    """
    if padding == "same":
        return size if size >= 2 ** depth and size % 2 ** depth == 0 else None
    s = size
    for _ in range(depth):                  # down: two convs, then a 2x2 pool
        s -= 4
        if s < 2 or s % 2:
            return None
        s //= 2
    s -= 4                                  # bottom: two convs
    if s < 1:
        return None
    for _ in range(depth):                  # up: double, then two convs
        s = 2 * s - 4
        if s < 1:
            return None
    return s


def nearest_valid_sizes(size: int, depth: int, padding: str) -> tuple[int | None, int]:
    """(the largest valid side <= size or None, the smallest valid side >= size)."""
    below = next((s for s in range(size, 0, -1) if output_size(s, depth, padding)), None)
    above = next(s for s in range(max(size, 1), size + 2 ** (depth + 3) + 200)
                 if output_size(s, depth, padding))
    return below, above


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class UNet:
    """The U-Net. ``forward(x)`` -> logits; ``backward(dlogits)`` -> dx, filling every grad.

    Layers live in ``self.layers``, an ordered dict from dotted name (``down1.conv1``) to
    layer, in the order the forward runs them. Every call goes through ``_run`` / ``_back``,
    which also call ``self.tracer.on_forward(name, layer, output)`` and
    ``self.tracer.on_backward(name, layer, grad_input)`` when a tracer is set (None by
    default, then it costs one attribute test per layer).
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.tracer = None
        self.training = True
        c, dtype = config, np.dtype(config.dtype)
        # Weights from one generator, in layer order; every Dropout gets its own generator
        # (saved by checkpoints) so that its masks do not depend on the weight draws.
        weight_seed, dropout_seed = np.random.SeedSequence(c.seed).spawn(2)
        weight_rng = np.random.default_rng(weight_seed)
        dropout_seeds = iter(dropout_seed.spawn(2))
        pad = c.padding
        self.layers: dict = {}

        def add(name, layer):
            layer.name = name
            self.layers[name] = layer

        def conv(name, cin, cout, k, padding=pad, init="he_normal"):
            add(name, Conv2d(cin, cout, k, padding=padding, weight_init=init, rng=weight_rng, dtype=dtype))

        def double_conv(prefix, cin, cout):           # conv 3x3 + ReLU, twice
            conv(f"{prefix}.conv1", cin, cout, 3)
            add(f"{prefix}.relu1", ReLU())
            conv(f"{prefix}.conv2", cout, cout, 3)
            add(f"{prefix}.relu2", ReLU())

        widths, cin = c.widths, c.in_channels
        for i in range(1, c.depth + 1):                # the contracting path
            double_conv(f"down{i}", cin, widths[i - 1])
            if i == c.depth and c.dropout > 0:
                add(f"down{i}.dropout", Dropout(c.dropout, rng=np.random.default_rng(next(dropout_seeds))))
            add(f"down{i}.pool", MaxPool2d(2))
            cin = widths[i - 1]
        double_conv("bottom", cin, widths[c.depth])
        if c.dropout > 0:
            add("bottom.dropout", Dropout(c.dropout, rng=np.random.default_rng(next(dropout_seeds))))
        for i in range(c.depth, 0, -1):                # the expanding path
            # nearest 2x upsampling and a 2x2 conv, 'same' even in the valid network (a 2x2
            # 'valid' conv would lose a pixel), as one layer that never builds the upsampled
            # tensor (tinyunet/layers/upconv.py: 9 of the 16 multiply-adds per pixel)
            add(f"up{i}.upconv", UpConv2d(widths[i], widths[i - 1], rng=weight_rng, dtype=dtype))
            add(f"up{i}.uprelu", ReLU())
            if pad == "valid":
                add(f"up{i}.crop", CenterCrop2d())
            add(f"up{i}.concat", Concat())
            double_conv(f"up{i}", 2 * widths[i - 1], widths[i - 1])
        if pad == "same" and c.classes == 1:           # the Keras head
            conv("head.conv", widths[0], 2, 3)
            if c.head_relu:
                add("head.relu", ReLU())
            conv("head.out", 2, 1, 1, init="glorot_uniform")
        else:                                          # the paper's head: one 1x1 conv to K
            conv("head.out", widths[0], c.classes, 1, init="glorot_uniform")

    # -- running one layer: the single place every forward and backward goes through ---------
    def _run(self, name, *inputs):
        layer = self.layers[name]
        if isinstance(layer, ReLU) and self.tracer is None and not is_grad_enabled():
            # Inside no_grad() a ReLU's input (always a conv's fresh output here) has no other
            # reader, so it is rectified in place: one array less, no new pages to fault in.
            output = layer.forward(inputs[0], out=inputs[0])
        else:
            output = layer.forward(*inputs)
        if self.tracer is not None:
            self.tracer.on_forward(name, layer, output)
        return output

    def _back(self, name, grad_output):
        layer = self.layers[name]
        grad_input = layer.backward(grad_output)
        if self.tracer is not None:
            self.tracer.on_backward(name, layer, grad_input)
        layer.release()          # its saved activations have served: free them now, not next step
        return grad_input

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x):
        """x: (N, C_in, H, W) -> logits: (N, K, H, W) ('same') or (N, K, H', W') ('valid'), K = classes.

        Checks x first (type, dtype, channels, size) and says what to do when it does not fit.
        """
        self._check_input(x)
        return self._graph(x, self._run)

    def _graph(self, x, run):
        """The wiring, written once: ``forward`` runs it on arrays, ``summary`` on shapes.

        One layer a line, h rebound at once: a layer's input is then held only by what the
        layer kept for backward, so inside no_grad() (which keeps nothing) each activation is
        freed as soon as the layer that reads it has run. Only the skips h_i wait, each until
        its concat."""
        c = self.config
        h = x                                                        # (N, 1, H, W)
        skips = {}
        for i in range(1, c.depth + 1):
            h = run(f"down{i}.conv1", h)                             # (N, 64 * 2**(i-1), H_i, W_i)
            h = run(f"down{i}.relu1", h)
            h = run(f"down{i}.conv2", h)                             # same
            h = run(f"down{i}.relu2", h)
            if f"down{i}.dropout" in self.layers:
                h = run(f"down{i}.dropout", h)                       # dropped: skip AND pool input
            skips[i] = h
            h = run(f"down{i}.pool", h)                              # (N, same, H_i / 2, W_i / 2)
        h = run("bottom.conv1", h)                                   # (N, 1024, H / 16, W / 16)
        h = run("bottom.relu1", h)
        h = run("bottom.conv2", h)                                   # same
        h = run("bottom.relu2", h)
        if "bottom.dropout" in self.layers:
            h = run("bottom.dropout", h)
        for i in range(c.depth, 0, -1):
            h = run(f"up{i}.upconv", h)                              # (N, w, H_i, W_i): upsampled, halved
            h = run(f"up{i}.uprelu", h)                              # (w = 64 * 2**(i-1))
            skip = skips.pop(i)                                      # (N, w, H_i, W_i)
            if c.padding == "valid":                                 # the skip is larger: cut its center
                skip = run(f"up{i}.crop", skip, h.shape[2:])
            h = run(f"up{i}.concat", (skip, h))                      # (N, 2w, H_i, W_i): [skip, up]
            del skip                                                 # h_i has served its two readers
            h = run(f"up{i}.conv1", h)                               # (N, w, H_i, W_i)
            h = run(f"up{i}.relu1", h)
            h = run(f"up{i}.conv2", h)                               # same
            h = run(f"up{i}.relu2", h)
        if "head.conv" in self.layers:
            h = run("head.conv", h)                                  # (N, 2, H, W)
            if "head.relu" in self.layers:
                h = run("head.relu", h)
        return run("head.out", h)                                    # (N, K, H, W): the logits

    # -- backward -----------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits = dL/dlogits: (N, K, H', W') -> dL/dx: (N, C_in, H, W).

        Runs the layers in reverse and fills every layer's ``grads`` (read them with
        ``gradients()``). Must follow the forward whose logits it differentiates.
        """
        c = self.config
        # The previous step's gradients have served (the optimizer used them): drop them before
        # the new ones arrive, so that two sets never coexist (124 MB at the exact width). From
        # the first backward on, the process keeps what a step frees (tinyunet/grad_mode.py).
        keep_freed_memory()
        for layer in self.layers.values():
            layer.grads.clear()
        g = self._back("head.out", dlogits)                         # (N, 2, H, W)
        if "head.relu" in self.layers:
            g = self._back("head.relu", g)
        if "head.conv" in self.layers:
            g = self._back("head.conv", g)                          # (N, 64, H, W)
        dskips = {}
        for i in range(1, c.depth + 1):
            g = self._back(f"up{i}.conv2", self._back(f"up{i}.relu2", g))
            g = self._back(f"up{i}.conv1", self._back(f"up{i}.relu1", g))   # (N, 2w, H_i, W_i)
            dskip, g = self._back(f"up{i}.concat", g)               # split: (N, w, ...) each
            if c.padding == "valid":
                dskip = self._back(f"up{i}.crop", dskip)            # zero on the cropped border
            dskips[i] = dskip
            g = self._back(f"up{i}.upconv", self._back(f"up{i}.uprelu", g))  # (N, 2w, H_i / 2, W_i / 2)
        if "bottom.dropout" in self.layers:
            g = self._back("bottom.dropout", g)
        g = self._back("bottom.conv2", self._back("bottom.relu2", g))
        g = self._back("bottom.conv1", self._back("bottom.relu1", g))       # (N, 512, H / 16, W / 16)
        for i in range(c.depth, 0, -1):
            g = self._back(f"down{i}.pool", g)                      # (N, w, H_i, W_i)
            # The level's output went two ways, into the pool and across the skip to up{i}'s
            # concat; L depends on it through both, so its gradient is the SUM of the two.
            # (In place: g is the pool's fresh output, and a new array would cost a copy.)
            g += dskips[i]
            if f"down{i}.dropout" in self.layers:
                g = self._back(f"down{i}.dropout", g)
            g = self._back(f"down{i}.conv2", self._back(f"down{i}.relu2", g))
            g = self._back(f"down{i}.conv1", self._back(f"down{i}.relu1", g))
        return g                                                     # (N, C_in, H, W)

    def predict_proba(self, x):
        """K = 1: sigmoid(forward(x)), the probability of the foreground class, (N, 1, H', W').
        K >= 2: softmax over axis 1, p_k = exp(z_k - lse(z)) (stable: losses.log_softmax),
        (N, K, H', W'), each pixel's K sum to 1.
        A prediction: runs inside no_grad(), so no layer keeps anything (no backward follows).
        Set the mode yourself (``eval()`` for dropout off)."""
        with no_grad():
            logits = self.forward(x)
        if self.config.classes == 1:
            return sigmoid(logits)
        xp = get_array_module(logits)
        return xp.exp(log_softmax(logits, axis=1))

    __call__ = forward

    # -- inputs -------------------------------------------------------------------------------
    def output_shape(self, input_shape):
        """(N, C_in, H, W) -> (N, K, H', W'); raises UNetInputError for a size that does not fit."""
        n, _, h, w = self._check_shape(tuple(input_shape))
        return (n, self.config.classes, output_size(h, self.config.depth, self.config.padding),
                output_size(w, self.config.depth, self.config.padding))

    def _check_shape(self, shape):
        c = self.config
        if len(shape) != 4:
            hint = "; add the batch axis with x[None]" if len(shape) == 3 else ""
            raise UNetInputError(f"UNet: the input must be (N, C, H, W), got shape {shape}{hint}")
        if shape[1] != c.in_channels:
            hint = (" (a grayscale image needs its channel axis: x[:, None])"
                    if c.in_channels == 1 and len(shape) == 4 and shape[1] != 1 else "")
            raise UNetInputError(f"UNet: expected {c.in_channels} input channel(s) (axis 1 of N, C, H, W), "
                                 f"got shape {shape}{hint}; or build the model with "
                                 f"UNetConfig(in_channels={shape[1]})")
        for axis, size in (("height", shape[2]), ("width", shape[3])):
            if output_size(size, c.depth, c.padding) is None:
                below, above = nearest_valid_sizes(size, c.depth, c.padding)
                rule = (f"divisible by 2**depth = {2 ** c.depth}" if c.padding == "same" else
                        "a size whose every level stays whole under unpadded 3x3 convs and 2x2 pools")
                nearest = f"{below} or {above}" if below else f"{above}"
                raise UNetInputError(
                    f"UNet: input {axis} {size} does not fit a depth-{c.depth} '{c.padding}' U-Net: it "
                    f"must be {rule}. Nearest valid sizes: {nearest}. Resize or crop to one of those, "
                    f"or predict any size by overlap-tile: mirror-pad the image and predict tiles of a "
                    f"valid size")
        return shape

    def _check_input(self, x):
        if not is_array(x):
            raise TypeError(f"UNet: the input must be a numpy or cupy array, got {type(x).__name__}")
        expected = np.dtype(self.config.dtype)
        if x.dtype != expected:
            hint = " scaled to [0, 1] (e.g. x.astype(np.float32) / 255)" if x.dtype.kind in "ui" else ""
            raise TypeError(f"UNet: the input is {x.dtype} but the model is {expected}; pass "
                            f"x.astype(np.{expected.name}){hint}")
        device = self.device
        if device_of(x) != device:
            raise TypeError(f"UNet: the input is on the {device_of(x).upper()} but the model is on the "
                            f"{device.upper()}; move one of them (model.to('{device_of(x)}') or "
                            f"tinyunet.backend.to_device(x, '{device}'))")
        self._check_shape(tuple(x.shape))

    # -- parameters, gradients, modes, devices ------------------------------------------------
    def named_layers(self) -> dict:
        """{dotted name: layer} in forward order."""
        return dict(self.layers)

    def parameters(self) -> dict:
        """{'down1.conv1.weight': array, ...}: the layers' own arrays (updating them in place
        updates the model). Take it again after ``to()`` or ``astype()``, which replace them."""
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.params.items()}

    def trainable_parameters(self) -> dict:
        """parameters(): every U-Net parameter learns (the interface of tinyunet/network.py)."""
        return self.parameters()

    def buffers(self) -> dict:
        """{}: the U-Net has no state outside its parameters (no batch norm)."""
        return {}

    def gradients(self) -> dict:
        """{'down1.conv1.weight': dL/dweight, ...} from the last backward (same names as parameters)."""
        return {f"{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.grads.items()}

    def num_parameters(self) -> int:
        return int(sum(value.size for value in self.parameters().values()))

    def load_parameters(self, values: dict) -> None:
        """Copy ``values`` ({dotted name: array}) INTO the parameters, so that an optimizer
        holding them keeps working. Every name must be there with its shape; each mismatch
        is listed."""
        own = self.parameters()
        problems = [f"  {name}: missing" for name in own if name not in values]
        problems += [f"  {name}: not a parameter of this model" for name in values if name not in own]
        problems += [f"  {name}: expected shape {tuple(own[name].shape)}, found {tuple(values[name].shape)}"
                     for name in own if name in values and tuple(values[name].shape) != tuple(own[name].shape)]
        if problems:
            raise ValueError("UNet.load_parameters: the values do not fit this model:\n" + "\n".join(problems))
        for name, target in own.items():
            target[...] = to_device(values[name], device_of(target))

    def random_generators(self) -> dict:
        """{layer name: numpy Generator} of every Dropout: their states belong in a checkpoint."""
        return {name: layer.rng for name, layer in self.layers.items() if isinstance(layer, Dropout)}

    @property
    def head_relu(self):
        """The ReLU after the 2-channel head conv (read its dead_fraction()), or None without one."""
        return self.layers.get("head.relu")

    @property
    def device(self) -> str:
        return device_of(next(iter(self.parameters().values())))

    @property
    def dtype(self):
        return np.dtype(self.config.dtype)

    def to(self, device: str):
        """Move every parameter and gradient to 'cpu' or 'gpu' (returns self). Create the
        optimizer after moving: it updates the arrays it was given."""
        for layer in self.layers.values():
            layer.to(device)
        return self

    def astype(self, dtype):
        """Cast every parameter to float32 or float64 (returns self); inputs must follow."""
        for layer in self.layers.values():
            layer.astype(dtype)
        self.config = dataclasses.replace(self.config, dtype=np.dtype(dtype).name)
        return self

    def train(self, mode: bool = True):
        """Training mode: dropout drops. ``eval()`` switches it off."""
        self.training = mode
        for layer in self.layers.values():
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # -- summary ------------------------------------------------------------------------------
    def layer_shapes(self, input_shape) -> list[tuple[str, object, tuple, tuple]]:
        """[(name, layer, input shape(s), output shape)] in forward order, computed from shapes
        alone (no arithmetic), by running ``_graph`` on zero-stride placeholder arrays."""
        records = []
        self._walk_shapes(input_shape, lambda name, layer, inputs, out: records.append(
            (name, layer, tuple(a.shape for a in inputs[0]) if isinstance(layer, Concat) else inputs[0].shape,
             out)))
        return records

    def _walk_shapes(self, input_shape, visit, made=None):
        """Run ``_graph`` on placeholders (arrays of the right shape that own one element),
        calling ``visit(name, layer, inputs, output shape)`` before each layer's output exists
        and ``made(placeholder)`` for each placeholder made (the input's first).
        A ReLU or an evaluation Dropout returns its input placeholder itself, as the forward
        inside no_grad() returns the same array (in place, or the identity)."""
        shape = tuple(input_shape)
        if len(shape) == 3:
            shape = (1,) + shape
        self._check_shape(shape)
        dtype = self.dtype

        def placeholder(s):       # an ndarray of shape s that owns one element
            a = np.broadcast_to(np.zeros((), dtype), s)
            if made is not None:
                made(a)
            return a

        def shape_run(name, *inputs):
            layer, x = self.layers[name], inputs[0]
            if isinstance(layer, Concat):
                first = x[0].shape
                out = (first[0], sum(a.shape[1] for a in x)) + tuple(first[2:])
            elif isinstance(layer, CenterCrop2d):
                out = layer.output_shape(x.shape, inputs[1])
            elif hasattr(layer, "output_shape"):
                out = layer.output_shape(x.shape)
            else:                  # element-wise: ReLU, Dropout
                out = x.shape
            visit(name, layer, inputs, tuple(out))
            if isinstance(layer, ReLU) or (isinstance(layer, Dropout) and not layer.training):
                return x
            return placeholder(out)

        self._graph(placeholder(shape), shape_run)

    def inference_bytes(self, input_shape, parts: bool = False):
        """Peak bytes of one forward inside no_grad() for an (N, C, H, W) input, from the layer
        shapes alone (tinyunet.infer sizes its tiles and batches with it):

            parameters                    every weight and bias
          + workspace                     the largest 'cols' slot of the convs (one grow-only
                                          buffer kept between calls, see conv._scratch)
          + max over the layers of        what is alive when the layer runs (its input, the
            alive + output + temporary    skips waiting for their concat, the input x) plus what
                                          it allocates: its output (none for a ReLU, run in
                                          place, or an evaluation Dropout, the identity) and its
                                          temporaries (Conv2d.inference_bytes: Winograd's U, an
                                          up-conv's band of x)

        Liveness is not written out by hand: ``_graph`` runs on placeholders and an array counts
        as alive while the graph still holds it (a weak reference tells), which is when the
        real forward holds it. Not counted: the Python and library baseline of the process
        (tinyunet with NumPy and Numba about 0.10 GB resident after import), gradients of a
        model that was trained in this process (an untrained model's are never written, so
        never resident: Layer.zero_grad), and what the allocator keeps: at 512x512 the estimate
        is 0.48 GB and the peak resident memory 0.68 GB, 0.58 GB over the baseline after
        import, about 1.2x (examples/RESULTS.md, issue 18). ``parts=True`` returns
        {'parameters', 'workspace', 'activations', 'peak_layer'} instead.
        Test: tests/test_infer.py::test_inference_bytes_bound_what_numpy_allocates."""
        item = self.dtype.itemsize
        alive = []                                    # (weak reference, bytes) of every array made
        slots = {"cols": 0}
        peak = [0, None]

        def nbytes(a):
            return int(np.prod(a.shape)) * item

        def visit(name, layer, inputs, out):
            held = sum(size for ref, size in alive if ref() is not None)
            in_place = isinstance(layer, ReLU) or (isinstance(layer, Dropout) and not layer.training)
            new = 0 if in_place else int(np.prod(out)) * item
            if isinstance(layer, Dropout) and layer.training:
                new *= 2                              # the mask, drawn and dropped
            if isinstance(layer, Conv2d):             # UpConv2d too
                temporary, slot, workspace = layer.inference_bytes(inputs[0].shape)
                new += temporary
                slots[slot] = max(slots[slot], workspace)
            if held + new > peak[0]:
                peak[:] = [held + new, name]

        self._walk_shapes(input_shape, visit, made=lambda a: alive.append((weakref.ref(a), nbytes(a))))
        parameters = sum(int(v.size) * v.dtype.itemsize for v in self.parameters().values())
        result = {"parameters": parameters, "workspace": sum(slots.values()),
                  "activations": peak[0], "peak_layer": peak[1]}
        return result if parts else parameters + result["workspace"] + result["activations"]

    def summary(self, input_shape, print_fn=print) -> str:
        """Print (and return) a Keras-like table for an (N, C, H, W) or (C, H, W) input.

        Columns: layer, output shape, parameters, multiply-accumulates. Then the totals, and an
        estimate of the memory a training step (forward, backward, Adam) needs at that size:

            parameters + gradients + Adam's m and v      4 * params * itemsize
            kept for backward                            every conv's input (float; an
                                                         up-conv's four shifted copies), every
                                                         ReLU mask (bool), pool argmax (int8),
                                                         dropout mask (float)
            largest conv workspace                       Conv2d.workspace_bytes: the largest
                                                         piece of a column matrix or of
                                                         Winograd's V and M (at most
                                                         WORKSPACE_BYTES unless one output row
                                                         is larger); its gradient reuses it
        """
        records = self.layer_shapes(input_shape)
        item = self.dtype.itemsize
        rows, total_params, total_macs = [], 0, 0
        kept, workspace = 0, 0
        for name, layer, in_shape, out in records:
            params = int(sum(v.size for v in layer.params.values()))
            macs = 0
            elements = int(np.prod(out))
            if isinstance(layer, Conv2d):
                kh, kw = layer.kernel_size
                macs = elements * layer.in_channels * kh * kw
                kept += layer.kept_bytes(in_shape)
                workspace = max(workspace, layer.workspace_bytes(in_shape))
            elif isinstance(layer, ReLU) or isinstance(layer, MaxPool2d):
                kept += elements                                 # bool mask / int8 argmax
            elif isinstance(layer, Dropout):
                kept += elements * item
            total_params += params
            total_macs += macs
            rows.append((f"{name} ({type(layer).__name__})", str(out), f"{params:,}",
                         f"{macs:,}" if macs else ""))
        state = 4 * total_params * item
        headers = ("Layer (type)", "Output shape", "Param #", "MACs")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
        rule = "=" * len(line)

        def mb(b):
            return f"{b / 2 ** 20:,.1f} MiB"

        n, cin, hh, ww = records[0][2]
        text = [f"UNet {self.config.to_json()}", f"input {(n, cin, hh, ww)} {self.dtype.name}", rule, line, rule]
        text += ["  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        text += [rule,
                 f"Total params: {total_params:,} ({mb(total_params * item)})",
                 f"Total MACs: {total_macs:,} ({2 * total_macs / 1e9:,.2f} GFLOP forward)",
                 f"Training-step memory (estimate): {mb(state + kept + workspace)} = "
                 f"params, grads, Adam m and v {mb(state)} + kept for backward {mb(kept)} "
                 f"+ largest conv workspace {mb(workspace)}",
                 f"Inference memory inside no_grad() (estimate, UNet.inference_bytes): "
                 f"{mb(self.inference_bytes(records[0][2]))}"]
        result = "\n".join(text)
        if print_fn is not None:
            print_fn(result)
        return result
