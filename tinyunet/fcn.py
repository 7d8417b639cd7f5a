"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer and Darrell), read top to bottom: the layer
table, the crop offsets derived from it, the forward and the backward.

The reference configuration (fcn.berkeleyvision.org, voc-fcn{32,16,8}s/net.py) at
``FCNConfig()``: VGG16's thirteen 3x3 convs + ReLU in five blocks (64, 64 | 128, 128 |
256 x 3 | 512 x 3 | 512 x 3), each block ending in a 2x2/2 max-pool that rounds UP (Caffe's
pooling: CeilMaxPool2d); conv1_1 pads by 100, every other 3x3 conv by 1; VGG's fully
connected layers as convolutions, fc6 a 7x7 unpadded conv to 4096 and fc7 a 1x1 conv to 4096,
each with ReLU and Dropout(0.5); then the class scores:

    FCN-32s  score_fr (1x1 -> K) -> upscore (64x64/32) -> crop to the input            = logits
    FCN-16s  score_fr -> upscore2 (4x4/2) ─┐
             pool4 -> score_pool4 (1x1) -> crop ─ + (fuse_pool4) -> upscore16 (32x32/16) -> crop
    FCN-8s   ... fuse_pool4 -> upscore_pool4 (4x4/2) ─┐
             pool3 -> score_pool3 (1x1) -> crop ───── + (fuse_pool3) -> upscore8 (16x16/8) -> crop

The upsamplers are ConvTranspose2d without bias, initialised to bilinear interpolation and,
as in the reference, frozen (``learn_upsampling=True`` lets them learn). Parameters at K = 21:
FCN-8s 134,489,759 (134,362,751 trainable), FCN-16s 134,815,994 (134,357,354), FCN-32s
136,152,917 (134,346,581)
(``count_parameters``, tests/test_fcn.py::test_reference_parameter_counts derives them from
the VGG16 table by hand). ``base_width`` and ``fc_width`` shrink it to train on a CPU.

Initialisation: he_normal convs with zero biases (the reference starts from ImageNet VGG16
weights, which tinyunet does not download); score layers zero as in the reference
(``score_init="he_normal"`` draws them instead: the gradient checks need every path alive).

Crop offsets, derived (Caffe's coord_map). Every layer maps a position u of its output to the
center of its receptive field in its input, an affine map; composed from the data onward each
blob has data position = a * u + b. A conv or pool (kernel k, stride s, padding p) gives
input = s * u + (k - 1) / 2 - p; a transposed conv is the inverse map, input = (u - (k - 1) / 2 + p) / s.
To add two maps of one scale a, crop map A (offset o) so that A[o + u] lies over B[u]:
a (o + u) + b_A = a u + b_B, so o = (b_B - b_A) / a. With conv1_1's pad of 100 this gives the
reference's 5 (score_pool4c), 9 (score_pool3c) and 31 (FCN-8s' final crop; 27 for 16s, 19 for
32s); the pad of 100 is what makes every offset >= 0 and every blob large enough for any input
size (the 7x7 fc6 needs pool5 to be at least 7x7). ``crop_offsets`` runs the graph on these
maps, so a change to the table changes the offsets with it.

Backward, what is new beside the U-Net: a sum fusion y = a + b sends dL/dy UNCHANGED to both
branches (the coarse path through the upsampler and the skip through the score layer); a crop
pads its gradient with zeros back to the size it cut from; the pool outputs pool3 and pool4
feed both the next block and a score layer, so their gradients ADD (as at a U-Net skip).

Shapes in the comments: an (N, 3, H, W) input, widths w1..w5 = 64, 128, 256, 512, 512.
Proofs: tests/test_fcn.py (float64 directional gradient of the whole network for each
variant, the derived offsets, the counts, and a PyTorch FCN written from the reference with
the same weights: same logits, same gradients).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from tinyunet.layers import (Add, CeilMaxPool2d, Conv2d, ConvTranspose2d, Crop2d, Dropout, ReLU)
from tinyunet.network import LayerNetwork

VARIANTS = ("32s", "16s", "8s")
VGG16_BLOCKS = (2, 2, 3, 3, 3)                 # 3x3 convs per block
# each variant's upsamplers: (name, kernel, stride), coarsest first
UPSAMPLERS = {"32s": (("upscore", 64, 32),),
              "16s": (("upscore2", 4, 2), ("upscore16", 32, 16)),
              "8s": (("upscore2", 4, 2), ("upscore_pool4", 4, 2), ("upscore8", 16, 8))}


@dataclass(frozen=True)
class FCNConfig:
    """variant '32s' | '16s' | '8s'; classes K (21: PASCAL VOC); base_width (64: VGG16's first
    block; the blocks have w, 2w, 4w, 8w, 8w); fc_width (4096: fc6 and fc7); input_pad (100:
    conv1_1's padding); dropout after fc6 and fc7; learn_upsampling (False: frozen bilinear);
    score_init 'zeros' (the reference) or 'he_normal'; dtype; seed."""
    variant: str = "8s"
    classes: int = 21
    in_channels: int = 3
    base_width: int = 64
    fc_width: int = 4096
    input_pad: int = 100
    dropout: float = 0.5
    learn_upsampling: bool = False
    score_init: str = "zeros"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        def bad(what):
            raise ValueError(f"FCNConfig: {what}")
        if self.variant not in VARIANTS:
            bad(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for field in ("classes", "in_channels", "base_width", "fc_width", "input_pad", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                bad(f"{field} must be an int, got {value!r}")
        if self.classes < 2:
            bad(f"classes must be >= 2 (softmax over K classes), got {self.classes}")
        if min(self.in_channels, self.base_width, self.fc_width) < 1 or self.input_pad < 0:
            bad("in_channels, base_width and fc_width must be >= 1 and input_pad >= 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad(f"dropout is a drop probability in [0, 1), got {self.dropout}")
        if self.score_init not in ("zeros", "he_normal"):
            bad(f"score_init must be 'zeros' or 'he_normal', got {self.score_init!r}")
        if np.dtype(self.dtype) not in (np.float32, np.float64):
            bad(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    @property
    def widths(self) -> list[int]:
        w = self.base_width
        return [w, 2 * w, 4 * w, 8 * w, 8 * w]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The layer table: what __init__ builds, what count_parameters sums
# ---------------------------------------------------------------------------------------------
def layer_table(c: FCNConfig) -> list[tuple[str, str, dict]]:
    """[(name, kind, arguments)] in forward order; kind: conv, relu, pool, dropout, score, up, crop, add."""
    rows, cin = [], c.in_channels
    for b, (convs, width) in enumerate(zip(VGG16_BLOCKS, c.widths), start=1):
        for j in range(1, convs + 1):
            rows += [(f"conv{b}_{j}", "conv", dict(cin=cin, cout=width, k=3, pad=c.input_pad if b == j == 1 else 1)),
                     (f"relu{b}_{j}", "relu", {})]
            cin = width
        rows.append((f"pool{b}", "pool", {}))
    for name, k, cout in (("6", 7, c.fc_width), ("7", 1, c.fc_width)):          # fc6, fc7 as convs
        rows += [(f"fc{name}", "conv", dict(cin=cin, cout=cout, k=k, pad=0)), (f"relu{name}", "relu", {})]
        if c.dropout > 0:
            rows.append((f"drop{name}", "dropout", {}))
        cin = cout
    rows.append(("score_fr", "score", dict(cin=cin, cout=c.classes)))
    up = {name: dict(k=k, s=s) for name, k, s in UPSAMPLERS[c.variant]}
    if c.variant == "32s":
        return rows + [("upscore", "up", up["upscore"]), ("score", "crop", {})]
    rows += [("upscore2", "up", up["upscore2"]), ("score_pool4", "score", dict(cin=c.widths[3], cout=c.classes)),
             ("score_pool4c", "crop", {}), ("fuse_pool4", "add", {})]
    if c.variant == "16s":
        return rows + [("upscore16", "up", up["upscore16"]), ("score", "crop", {})]
    return rows + [("upscore_pool4", "up", up["upscore_pool4"]),
                   ("score_pool3", "score", dict(cin=c.widths[2], cout=c.classes)),
                   ("score_pool3c", "crop", {}), ("fuse_pool3", "add", {}),
                   ("upscore8", "up", up["upscore8"]), ("score", "crop", {})]


def count_parameters(c: FCNConfig) -> dict:
    """{'total': ..., 'trainable': ...} from the table alone (nothing is allocated)."""
    total = trainable = 0
    for _, kind, a in layer_table(c):
        if kind in ("conv", "score"):
            n = a.get("k", 1) ** 2 * a["cin"] * a["cout"] + a["cout"]     # weight + bias
            total, trainable = total + n, trainable + n
        elif kind == "up":
            n = c.classes * c.classes * a["k"] ** 2                       # (K, K, k, k), no bias
            total += n
            trainable += n if c.learn_upsampling else 0
    return {"total": total, "trainable": trainable}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class FCN(LayerNetwork):
    """FCN-32s/16s/8s. ``forward(x)`` -> logits (N, K, H, W); ``backward(dlogits)`` -> dx."""

    def __init__(self, config: FCNConfig | None = None, **overrides):
        config = FCNConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
        self.config, self.tracer, self.training = config, None, True
        c, dtype = config, np.dtype(config.dtype)
        weight_seed, dropout_seed = np.random.SeedSequence(c.seed).spawn(2)
        weight_rng = np.random.default_rng(weight_seed)
        dropout_seeds = iter(dropout_seed.spawn(2))
        self.layers = {}
        for name, kind, a in layer_table(c):
            if kind == "conv":
                layer = Conv2d(a["cin"], a["cout"], a["k"], padding=a["pad"], rng=weight_rng, dtype=dtype)
            elif kind == "score":
                layer = Conv2d(a["cin"], a["cout"], 1, padding=0, rng=weight_rng, dtype=dtype)
                if c.score_init == "zeros":
                    layer.params["weight"][...] = 0
            elif kind == "up":
                layer = ConvTranspose2d(c.classes, c.classes, a["k"], stride=a["s"], bias=False,
                                        weight_init="bilinear", frozen=not c.learn_upsampling, dtype=dtype)
            else:
                layer = {"relu": ReLU, "pool": lambda: CeilMaxPool2d(2), "crop": Crop2d, "add": Add,
                         "dropout": lambda: Dropout(c.dropout, rng=np.random.default_rng(next(dropout_seeds)))}[kind]()
            layer.name = name
            self.layers[name] = layer
        self.offsets = self.crop_offsets()
        for name, offset in self.offsets.items():
            self.layers[name].offset = (offset, offset)

    # -- the crop offsets, derived by running the graph on coordinate maps --------------------
    def crop_offsets(self) -> dict:
        """{crop layer: offset}: ``_graph`` run on maps (a, b), data position = a * u + b."""
        offsets = {}

        def coordinate_run(name, *inputs):
            layer = self.layers[name]
            if isinstance(layer, Add):                             # sum fusion: the terms must line up
                first, second = inputs[0]
                if first != second:
                    raise ValueError(f"FCN: {name} adds maps that are not aligned: {first} and {second}")
                return first
            a, b = inputs[0]
            if isinstance(layer, (Conv2d, CeilMaxPool2d)):
                k = layer.kernel_size[0] if isinstance(layer, Conv2d) else layer.kernel_size
                s = layer.stride[0] if isinstance(layer, Conv2d) else layer.stride
                p = layer.padding if isinstance(layer, Conv2d) else 0
                return (a * s, b + a * ((k - 1) / 2 - p))         # input = s u + (k - 1)/2 - p
            if isinstance(layer, ConvTranspose2d):
                k, s, p = layer.kernel_size[0], layer.stride[0], layer.cropping[0][0]
                return (a / s, b + a * (p - (k - 1) / 2) / s)     # input = (u - (k - 1)/2 + p) / s
            if isinstance(layer, Crop2d):
                ref_a, ref_b = inputs[1]
                offset = (ref_b - b) / a
                if ref_a != a or offset != int(offset) or offset < 0:
                    raise ValueError(f"FCN: {name} cannot align its input (scale {a}, shift {b}) with "
                                     f"(scale {ref_a}, shift {ref_b}): offset {offset}; with conv1_1's padding "
                                     f"{self.config.input_pad} the output does not cover the input "
                                     f"(the reference pads by 100)")
                offsets[name] = int(offset)
                return (ref_a, ref_b)
            return (a, b)                                          # element-wise: ReLU, Dropout

        self._graph((1.0, 0.0), coordinate_run)
        return offsets

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x):
        """x: (N, C_in, H, W) -> logits: (N, K, H, W)."""
        self._check_input(x)
        return self._graph(x, self._run)

    def _graph(self, x, run):
        """The wiring, written once: arrays (forward), shapes (summary), coordinate maps (offsets)."""
        c, h, kept = self.config, x, {}
        for b, convs in enumerate(VGG16_BLOCKS, start=1):
            for j in range(1, convs + 1):
                h = run(f"relu{b}_{j}", run(f"conv{b}_{j}", h))          # (N, w_b, ...)
            h = run(f"pool{b}", h)                                       # (N, w_b, ceil(./2))
            kept[b] = h                                                  # pool3 and pool4 feed scores too
        for i in ("6", "7"):
            h = run(f"relu{i}", run(f"fc{i}", h))                        # (N, 4096, H/32 - 6, ...)
            if f"drop{i}" in self.layers:
                h = run(f"drop{i}", h)
        h = run("score_fr", h)                                           # (N, K, ...): coarse scores
        if c.variant == "32s":
            return run("score", run("upscore", h), x)                    # x32, crop to the input
        h = run("upscore2", h)                                           # x2
        skip = run("score_pool4c", run("score_pool4", kept[4]), h)       # pool4's scores, cropped to h
        h = run("fuse_pool4", (h, skip))                                 # sum fusion
        if c.variant == "16s":
            return run("score", run("upscore16", h), x)
        h = run("upscore_pool4", h)                                      # x2
        skip = run("score_pool3c", run("score_pool3", kept[3]), h)
        h = run("fuse_pool3", (h, skip))
        return run("score", run("upscore8", h), x)                       # x8, crop: (N, K, H, W)

    # -- backward -----------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits: (N, K, H, W) -> dL/dx; fills every layer's grads (zeros for frozen upsamplers)."""
        c = self.config
        self._begin_backward()
        dpool = {}                                                       # the score paths' share
        if c.variant == "32s":
            g = self._back("upscore", self._back("score", dlogits))
        else:
            g = self._back("score", dlogits)                             # zeros around the crop
            if c.variant == "8s":
                g = self._back("upscore8", g)
                g, dskip = self._back("fuse_pool3", g)                   # the same g to both terms
                dpool[3] = self._back("score_pool3", self._back("score_pool3c", dskip))
                g = self._back("upscore_pool4", g)
            else:
                g = self._back("upscore16", g)
            g, dskip = self._back("fuse_pool4", g)
            dpool[4] = self._back("score_pool4", self._back("score_pool4c", dskip))
            g = self._back("upscore2", g)
        g = self._back("score_fr", g)
        for i in ("7", "6"):
            if f"drop{i}" in self.layers:
                g = self._back(f"drop{i}", g)
            g = self._back(f"fc{i}", self._back(f"relu{i}", g))
        for b in range(5, 0, -1):
            if b in dpool:
                # pool{b}'s output fed both block b + 1 and a score layer: the gradients add
                g += dpool[b]
            g = self._back(f"pool{b}", g)
            for j in range(VGG16_BLOCKS[b - 1], 0, -1):
                g = self._back(f"conv{b}_{j}", self._back(f"relu{b}_{j}", g))
        return g
