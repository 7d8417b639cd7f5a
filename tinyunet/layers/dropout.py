"""Inverted dropout, forward and backward.

Shapes: x: (N, C, H, W) -> y: same shape (any shape works).

While training, each element is kept with probability 1 - p and scaled by 1 / (1 - p):

    mask = (u >= p) / (1 - p),  u ~ Uniform[0, 1)      y = x * mask

Why scale while training: the expected value of y then equals x, so evaluation can be the
plain identity (y = x) and nothing has to be rescaled at test time.

Backward: y is linear in x with the factor mask, so dx = dy * mask, the SAME mask as the
forward (it is kept on the layer); a fresh draw would give a gradient of another function.

The mask is drawn from a seeded NumPy generator (``seed=``), whose state a checkpoint saves,
so runs and gradient checks are reproducible. Proofs: tests/test_layers.py and
tests/test_torch_oracle.py (F.dropout reproduced with the same mask).
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import random_uniform

from .base import Layer


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
        keep = random_uniform(self.rng, x.shape, x.dtype, like=x) >= self.p
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        if keep_for_backward:                    # inside no_grad() the mask is drawn, used, dropped
            self.mask = mask
        return x * mask

    def backward(self, dy):
        """dy -> dy * mask (the forward's mask), or dy itself in evaluation."""
        self._check_grad(dy, self._shape, self._dtype)
        return dy if self.mask is None else dy * self.mask
