"""What every layer shares: parameters and their gradients, the device, and input checks.

A layer keeps two dicts with the same keys and shapes::

    layer.params["weight"]   the value
    layer.grads["weight"]    dL/d(value), written by the last backward()

``forward(x)`` keeps on ``self`` what ``backward`` needs and returns y; ``backward(dy)`` takes
dL/dy (the shape of y), fills ``self.grads`` and returns dL/dx (the shape of x). Each call to
backward overwrites the grads of the previous one: in a U-Net every layer is used once per step.

Inside ``tinyunet.no_grad()`` (tinyunet/grad_mode.py) a forward keeps nothing: each forward
asks ``self._keeps_for_backward()`` first, which also drops what an earlier forward kept, and
stores its arrays only when that says True; a backward after such a forward raises an error
that names no_grad. Test: tests/test_inference_mode.py.

Every public entry checks its input and raises :class:`LayerInputError` (a ValueError) or a
TypeError naming the layer, what it expected and what it got. Tested in tests/test_errors.py.
"""
from __future__ import annotations

import numpy as np

from tinyunet.backend import DeviceError, device_of, get_array_module, is_array, to_device
from tinyunet.grad_mode import is_grad_enabled

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class LayerInputError(ValueError):
    """A layer was given an input of the wrong shape, channels or values."""


class Layer:
    """Base class: ``params``/``grads`` dicts, ``to(device)``, ``astype(dtype)``, checks."""

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True
        self._forward_kept_nothing = False      # the last forward ran under no_grad()

    # -- identity, for error messages -------------------------------------------------------
    def _label(self) -> str:
        kind = type(self).__name__
        return kind if self.name == kind else f"{kind} '{self.name}'"

    def __repr__(self) -> str:
        return self._label()

    # -- modes, devices and dtypes ----------------------------------------------------------
    def train(self, mode: bool = True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    @property
    def device(self) -> str | None:
        """'cpu' or 'gpu' where the parameters live; None for a layer without parameters."""
        for value in self.params.values():
            return device_of(value)
        return None

    @property
    def dtype(self):
        for value in self.params.values():
            return value.dtype
        return None

    def to(self, device: str):
        """Move the parameters and gradients to 'cpu' or 'gpu' (in place; returns self)."""
        self.params = {k: to_device(v, device) for k, v in self.params.items()}
        self.grads = {k: to_device(v, device) for k, v in self.grads.items()}
        return self

    def astype(self, dtype):
        """Cast parameters and gradients to float32 or float64 (in place; returns self)."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self._label()}: parameters can be float32 or float64, not {dtype}")
        self.params = {k: v.astype(dtype, copy=False) for k, v in self.params.items()}
        self.grads = {k: v.astype(dtype, copy=False) for k, v in self.grads.items()}
        return self

    # -- what forward keeps for backward ------------------------------------------------------
    _saved: tuple[str, ...] = ()        # the attributes that hold it, named by each layer

    def release(self):
        """Drop what forward kept for backward. A network calls this right after the layer's
        backward, so each activation is freed as soon as the backward pass is past it (as
        PyTorch's autograd frees its saved tensors) instead of living until the next forward.
        A backward() after release() says that forward() must run first.
        Test: tests/test_unet.py::test_backward_frees_what_each_layer_kept_for_it."""
        for name in self._saved:
            setattr(self, name, None)

    def _keeps_for_backward(self) -> bool:
        """Called first by every forward: True when it must keep what backward needs (the
        default), False inside ``tinyunet.no_grad()``, where it then keeps nothing, and what an
        earlier forward kept is dropped here too (it would belong to another input)."""
        keep = is_grad_enabled()
        self._forward_kept_nothing = not keep
        if not keep:
            self.release()
        return keep

    def zero_grad(self):
        """Zero gradients of the parameters' shapes. ``xp.zeros`` and not ``zeros_like``: NumPy's
        zeros of a large array is calloc, whose pages the kernel maps only when first written,
        while zeros_like writes every byte at once. A model that only predicts never writes its
        gradients, so they cost it nothing (124 MB resident at the exact U-Net's width, a tenth of
        a 512x512 prediction's peak, before: examples/RESULTS.md, issue 18); a backward replaces
        them anyway. Test: tests/test_inference_mode.py::test_unwritten_gradients_are_not_resident."""
        for key, value in self.params.items():
            self.grads[key] = get_array_module(value).zeros(value.shape, dtype=value.dtype)

    # -- checks -----------------------------------------------------------------------------
    def _check_array(self, x, what: str = "input", ndim: int | None = 4, channels: int | None = None):
        """Check an incoming array: type, ndim (None: any), float dtype, device and dtype against params."""
        label = self._label()
        if not is_array(x):
            raise TypeError(f"{label}: the {what} must be a numpy or cupy array, got {type(x).__name__}")
        if ndim is not None and x.ndim != ndim:
            layout = "(N, C, H, W)" if ndim == 4 else f"{ndim} dimensions"
            raise LayerInputError(f"{label}: the {what} must be {layout}, got shape {tuple(x.shape)} "
                                  f"({x.ndim} dimensions)" + (
                                      "; add the batch axis with x[None]" if x.ndim == ndim - 1 else ""))
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{label}: the {what} must be float32 or float64, got {x.dtype}; "
                            f"convert with x.astype(np.float32)")
        own_device, own_dtype = self.device, self.dtype
        if own_device is not None and device_of(x) != own_device:
            raise DeviceError(f"{label}: the {what} is on the {device_of(x).upper()} but the parameters "
                              f"are on the {own_device.upper()}; move the layer with .to('{device_of(x)}') "
                              f"or the input with tinyunet.backend.to_device(x, '{own_device}')")
        if own_dtype is not None and x.dtype != own_dtype:
            raise TypeError(f"{label}: the {what} is {x.dtype} but the parameters are {own_dtype}; "
                            f"cast one of them (x.astype(...) or layer.astype(...)) so they match")
        if channels is not None and x.shape[1] != channels:
            raise LayerInputError(f"{label}: expected {channels} channels in the {what} (axis 1 of "
                                  f"N, C, H, W), got shape {tuple(x.shape)}")

    def _check_grad(self, dy, expected_shape, dtype):
        """Check the gradient given to backward() against the forward's output."""
        label = self._label()
        if self._forward_kept_nothing:
            raise RuntimeError(f"{label}: backward() after a forward that ran inside tinyunet.no_grad(), "
                               f"which keeps nothing for a backward; run the forward outside no_grad() "
                               f"to differentiate it")
        if expected_shape is None:
            raise RuntimeError(f"{label}: backward() called before forward()")
        if not is_array(dy):
            raise TypeError(f"{label}: the gradient must be a numpy or cupy array, got {type(dy).__name__}")
        if tuple(dy.shape) != tuple(expected_shape):
            raise LayerInputError(f"{label}: the gradient must have the output's shape "
                                  f"{tuple(expected_shape)}, got {tuple(dy.shape)}")
        if dy.dtype != dtype:
            raise TypeError(f"{label}: the gradient is {dy.dtype} but the forward ran in {dtype}")
