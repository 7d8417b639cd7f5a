"""Inverted dropout, forward and backward.

Shapes: x: (N, C, H, W) -> y: same shape (any shape works).

While training, each element is kept with probability 1 - p and scaled by 1 / (1 - p):

    mask = (u >= p) / (1 - p),  u ~ Uniform[0, 1)      y = x * mask

Why scale while training: the expected value of y then equals x, so evaluation can be the
plain identity (y = x) and nothing has to be rescaled at test time.

Backward: y is linear in x with the factor mask, so dx = dy * mask, the SAME mask as the
forward (it is kept on the layer); a fresh draw would give a gradient of another function.

Where the uniforms come from. Each layer owns one NumPy generator (``seed=`` or ``rng=``),
created once; its state is all the state there is, and a checkpoint saves it
(tinyunet/checkpoint.py, through UNet.random_generators). Each training forward draws ONE
64-bit key from it, on the host, and the uniform of element i is then a pure function of
(key, i), a counter-based generator like Philox (here the SplitMix64 mixer, see keep_mask):

    z_i = mix(key + (i + 1) * 0x9E3779B97F4A7C15)     u_i = (z_i >> 40) / 2**24

computed with the same integer array operations by NumPy and by CuPy. So:

* on the GPU nothing is created per forward and there is no generator state to initialise
  (CuPy's default generator, XORWOW, runs a setup kernel per seed; this has none);
* the masks do not depend on the device: a run that moves between CPU and GPU (a checkpoint
  saved on one, resumed on the other) draws exactly the masks it would have drawn had it
  stayed. Proof: tests/test_gpu_dropout.py (on the CPU with a stand-in array module, and on a
  real GPU against the CPU's masks).

Proofs: tests/test_layers.py and tests/test_torch_oracle.py (F.dropout reproduced with the
same mask), tests/test_gpu_dropout.py (the generator: uniformity, device independence).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import get_array_module

from .base import Layer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)   # SplitMix64's increment: 2**64 / golden ratio
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
UNIFORM_BITS = 24                         # the top 24 bits: a float32 uniform holds exactly these


def keep_mask(key: int, shape, p: float, xp=np):
    """Boolean array of ``shape`` (on xp's device): element i kept when u_i >= p.

    u_i = (z_i >> 40) / 2**24 with z_i = SplitMix64's output for counter i under ``key``;
    u_i >= p is decided in integers, as (z_i >> 40) >= ceil(p * 2**24), so NumPy and CuPy
    agree bit for bit (no float rounding on either side). Unsigned 64-bit products wrap
    modulo 2**64 on both, as the mixer requires. Two uint64 buffers of the mask's size at most.
    """
    size = int(np.prod(shape, dtype=np.int64))
    z = xp.arange(1, size + 1, dtype=xp.uint64)
    z *= _GOLDEN
    z += np.uint64(key)
    shifted = xp.empty_like(z)
    for shift, factor in ((30, _MIX_1), (27, _MIX_2)):
        xp.right_shift(z, np.uint64(shift), out=shifted)
        z ^= shifted
        z *= factor
    xp.right_shift(z, np.uint64(31), out=shifted)
    z ^= shifted
    z >>= np.uint64(64 - UNIFORM_BITS)
    threshold = np.uint64(int(np.ceil(p * 2 ** UNIFORM_BITS)))
    return (z >= threshold).reshape(shape)


class Dropout(Layer):
    _saved = ("mask",)

    def __init__(self, p: float = 0.5, seed: int | None = None, rng: np.random.Generator | None = None,
                 name: str | None = None):
        super().__init__(name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{self._label()}: the drop probability p must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.mask = None
        self._shape = self._dtype = None

    def forward(self, x):
        """x -> x * mask while training (mask kept for backward); x itself in evaluation."""
        self._check_array(x, ndim=None)
        self._shape, self._dtype = x.shape, x.dtype
        keep_for_backward = self._keeps_for_backward()
        if not self.training or self.p == 0.0:
            self.mask = None
            return x
        key = int(self.rng.integers(2 ** 64, dtype=np.uint64))   # one draw per forward, any device
        keep = keep_mask(key, x.shape, self.p, get_array_module(x))
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        if keep_for_backward:                    # inside no_grad() the mask is drawn, used, dropped
            self.mask = mask
        return x * mask

    def backward(self, dy):
        """dy -> dy * mask (the forward's mask), or dy itself in evaluation."""
        self._check_grad(dy, self._shape, self._dtype)
        return dy if self.mask is None else dy * self.mask
