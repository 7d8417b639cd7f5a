"""SegNet (Badrinarayanan, Kendall and Cipolla), read top to bottom: the layer table, the
forward and the backward.

The reference configuration (alexgkendall/SegNet-Tutorial, segnet_train.prototxt) at
``SegNetConfig()``: an encoder that is VGG16's thirteen 3x3 convs (64, 64 | 128, 128 |
256 x 3 | 512 x 3 | 512 x 3), each followed by batch normalisation and ReLU, each block ending
in a 2x2/2 max-pool that rounds UP (Caffe) and REMEMBERS WHERE each maximum was; a decoder
that mirrors it: each block starts by unpooling with the indices of its encoder block's pool
(values back at the argmax positions, zeros elsewhere: MaxUnpool2d), then 3x3 convs + batch
norm + ReLU that fill the sparse map in. The decoder's last conv of each block narrows to the
next block's width, and the very last (conv1_1_D) gives the K class scores, without batch norm
or ReLU: the logits.

    encoder block b (b = 1..5)             decoder block b (b = 5..1)
    conv{b}_j -> bn{b}_j -> relu{b}_j      upsample{b} (indices of pool{b}, size of its input)
    pool{b}  ----- indices, size ------->  conv{b}_j_D -> bn{b}_j_D -> relu{b}_j_D, j = n_b..1

Parameters at K = 11 (CamVid, the reference's classes): 29,449,355 (convolutions with biases,
batch-norm scales and shifts; the 15,872 running means and variances are buffers, not
parameters): ``count_parameters``, derived by hand in tests/test_segnet.py. ``base_width``
(blocks of w, 2w, 4w, 8w, 8w channels) shrinks it to train on a CPU. Weights he_normal
(Caffe's MSRA filler) with zero biases; batch norm starts at scale 1, shift 0, with PyTorch's
momentum 0.1 (tinyunet/layers/batchnorm.py).

Backward, what is new beside the U-Net: there are no skip tensors, so no gradients meet and
add; the only thing the encoder hands the decoder is WHERE. An unpool's backward gathers dL/dy
at those positions (the three pixels of each 2x2 window that got a zero send nothing back),
the same routing the pool's own backward uses for its input: a decoder value and the encoder
value it came from sit at the same place. Batch norm's backward carries, besides
dy * gamma / sigma, the terms through the batch mean and the batch variance: every pixel of
a channel in the batch moves every output of that channel (tinyunet/layers/batchnorm.py).

Proofs: tests/test_segnet.py (float64 joint directional gradient through the whole network in
training mode; the count; a PyTorch SegNet written from the prototxt with the same weights:
same logits, same gradients, same running statistics).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from tinyunet.layers import BatchNorm2d, CeilMaxPool2d, Conv2d, MaxUnpool2d, ReLU
from tinyunet.network import LayerNetwork

VGG16_BLOCKS = (2, 2, 3, 3, 3)                 # 3x3 convs per block, encoder and decoder alike


@dataclass(frozen=True)
class SegNetConfig:
    """classes K (11: CamVid); in_channels; base_width (64: blocks of w, 2w, 4w, 8w, 8w);
    momentum and eps of batch norm (PyTorch's convention); dtype; seed."""
    classes: int = 11
    in_channels: int = 3
    base_width: int = 64
    momentum: float = 0.1
    eps: float = 1e-5
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        def bad(what):
            raise ValueError(f"SegNetConfig: {what}")
        for field in ("classes", "in_channels", "base_width", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                bad(f"{field} must be an int, got {value!r}")
        if self.classes < 2:
            bad(f"classes must be >= 2 (softmax over K classes), got {self.classes}")
        if min(self.in_channels, self.base_width) < 1:
            bad("in_channels and base_width must be >= 1")
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
def layer_table(c: SegNetConfig) -> list[tuple[str, str, dict]]:
    """[(name, kind, arguments)] in forward order; kind: conv, bn, relu, pool, unpool."""
    rows, cin, widths = [], c.in_channels, c.widths
    for b, convs in enumerate(VGG16_BLOCKS, start=1):                   # encoder
        for j in range(1, convs + 1):
            rows += [(f"conv{b}_{j}", "conv", dict(cin=cin, cout=widths[b - 1])),
                     (f"bn{b}_{j}", "bn", dict(channels=widths[b - 1])), (f"relu{b}_{j}", "relu", {})]
            cin = widths[b - 1]
        rows.append((f"pool{b}", "pool", {}))
    for b in range(5, 0, -1):                                            # decoder
        rows.append((f"upsample{b}", "unpool", {}))
        for j in range(VGG16_BLOCKS[b - 1], 0, -1):
            last = j == 1
            cout = widths[b - 1] if not last else (widths[b - 2] if b > 1 else c.classes)
            rows.append((f"conv{b}_{j}_D", "conv", dict(cin=widths[b - 1], cout=cout)))
            if not (b == 1 and last):                                    # the logits: no BN, no ReLU
                rows += [(f"bn{b}_{j}_D", "bn", dict(channels=cout)), (f"relu{b}_{j}_D", "relu", {})]
    return rows


def count_parameters(c: SegNetConfig) -> dict:
    """{'total': parameters, 'buffers': batch-norm running statistics}, from the table alone."""
    total = buffers = 0
    for _, kind, a in layer_table(c):
        if kind == "conv":
            total += 9 * a["cin"] * a["cout"] + a["cout"]
        elif kind == "bn":
            total += 2 * a["channels"]                                   # scale and shift
            buffers += 2 * a["channels"]                                 # running mean and variance
    return {"total": total, "buffers": buffers}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class SegNet(LayerNetwork):
    """SegNet. ``forward(x)`` -> logits (N, K, H, W); ``backward(dlogits)`` -> dx."""

    def __init__(self, config: SegNetConfig | None = None, **overrides):
        config = SegNetConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
        self.config, self.tracer, self.training = config, None, True
        c, dtype = config, np.dtype(config.dtype)
        weight_rng = np.random.default_rng(np.random.SeedSequence(c.seed))
        self.layers = {}
        for name, kind, a in layer_table(c):
            if kind == "conv":
                layer = Conv2d(a["cin"], a["cout"], 3, padding=1, rng=weight_rng, dtype=dtype)
            elif kind == "bn":
                layer = BatchNorm2d(a["channels"], momentum=c.momentum, eps=c.eps, dtype=dtype)
            elif kind == "pool":
                layer = CeilMaxPool2d(2, return_indices=True)
            elif kind == "unpool":
                layer = MaxUnpool2d(2)
            else:
                layer = ReLU()
            layer.name = name
            self.layers[name] = layer

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x):
        """x: (N, C_in, H, W) -> logits: (N, K, H, W)."""
        self._check_input(x)
        return self._graph(x, self._run)

    def _graph(self, x, run):
        """The wiring, written once: arrays (forward) and shapes (summary)."""
        h, where = x, {}
        for b, convs in enumerate(VGG16_BLOCKS, start=1):               # encoder
            for j in range(1, convs + 1):
                h = run(f"relu{b}_{j}", run(f"bn{b}_{j}", run(f"conv{b}_{j}", h)))   # (N, w_b, H_b, W_b)
            size = tuple(h.shape[2:])
            h, indices = run(f"pool{b}", h)                              # (N, w_b, ceil(H_b / 2), ...)
            where[b] = (indices, size)                                   # what the decoder gets: where
        for b in range(5, 0, -1):                                        # decoder
            indices, size = where[b]
            h = run(f"upsample{b}", h, indices, size)                    # (N, w_b, H_b, W_b), sparse
            for j in range(VGG16_BLOCKS[b - 1], 0, -1):
                h = run(f"conv{b}_{j}_D", h)
                if f"bn{b}_{j}_D" in self.layers:
                    h = run(f"relu{b}_{j}_D", run(f"bn{b}_{j}_D", h))
        return h                                                         # (N, K, H, W): conv1_1_D

    # -- backward -----------------------------------------------------------------------------
    def backward(self, dlogits):
        """dlogits: (N, K, H, W) -> dL/dx; fills every layer's grads."""
        self._begin_backward()
        g = dlogits
        for b in range(1, 6):                                            # decoder, last block first
            for j in range(1, VGG16_BLOCKS[b - 1] + 1):
                if f"bn{b}_{j}_D" in self.layers:
                    g = self._back(f"bn{b}_{j}_D", self._back(f"relu{b}_{j}_D", g))
                g = self._back(f"conv{b}_{j}_D", g)
            g = self._back(f"upsample{b}", g)                            # gathered at the indices
        for b in range(5, 0, -1):                                        # encoder
            g = self._back(f"pool{b}", g)                                # to each window's argmax
            for j in range(VGG16_BLOCKS[b - 1], 0, -1):
                g = self._back(f"conv{b}_{j}", self._back(f"bn{b}_{j}", self._back(f"relu{b}_{j}", g)))
        return g
