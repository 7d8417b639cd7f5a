"""Concatenation along the channel axis, forward and backward.

Shapes::

    xs = (x_1: (N, C_1, H, W), ..., x_k: (N, C_k, H, W))  ->  y: (N, C_1 + ... + C_k, H, W)

Every output channel is a copy of exactly one input channel, so the backward only splits dy
at the input sizes: dx_i = dy[:, C_1 + ... + C_{i-1} : C_1 + ... + C_i].

Takes and returns tuples. In the U-Net, one of the inputs is a skip connection: the tensor
it copies also went down the encoder, so it receives two gradients, and they add up (see
tinyunet/unet.py). Proofs: tests/test_layers.py and tests/test_torch_oracle.py.
"""
from __future__ import annotations

from tinyunet.backend import get_array_module

from .base import Layer, LayerInputError


class Concat(Layer):
    def __init__(self, name: str | None = None):
        super().__init__(name)
        self._channels = self._shape = self._dtype = None

    def forward(self, xs):
        """xs: tuple of (N, C_i, H, W) -> y: (N, sum C_i, H, W)."""
        if not isinstance(xs, (tuple, list)) or len(xs) < 1:
            raise TypeError(f"{self._label()}: expected a tuple of arrays, got {type(xs).__name__}")
        for index, x in enumerate(xs):
            self._check_array(x, what=f"input {index}")
        first = xs[0]
        for index, x in enumerate(xs[1:], start=1):
            if (x.shape[0], x.shape[2], x.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]):
                raise LayerInputError(
                    f"{self._label()}: inputs must agree in N, H and W to be joined on channels; input 0 "
                    f"is {tuple(first.shape)}, input {index} is {tuple(x.shape)}. In a U-Net this means "
                    f"the input size is not divisible by 2**depth (or the skip was not cropped)")
            if x.dtype != first.dtype:
                raise TypeError(f"{self._label()}: inputs must share one dtype, got {first.dtype} and {x.dtype}")
            if get_array_module(x) is not get_array_module(first):
                raise TypeError(f"{self._label()}: inputs must all be on one device (NumPy or CuPy)")
        self._keeps_for_backward()       # keeps only shapes, never arrays; marks a no_grad() forward
        xp = get_array_module(*xs)
        self._channels = [x.shape[1] for x in xs]
        y = xp.concatenate(xs, axis=1)
        self._shape, self._dtype = y.shape, y.dtype
        return y

    def backward(self, dy):
        """dy: (N, sum C_i, H, W) -> tuple of dx_i: (N, C_i, H, W)."""
        self._check_grad(dy, self._shape, self._dtype)
        grads, start = [], 0
        for channels in self._channels:
            grads.append(dy[:, start:start + channels])
            start += channels
        return tuple(grads)
